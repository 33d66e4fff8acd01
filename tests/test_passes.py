"""passes.py's rule on its own: when a pass may stand in for another opener's.

The behaviour through a mount (one read of the directory for two openers;
none shared after a change or over an unsettled directory) is in
test_listing_freshness and test_review23; these check the rule's arithmetic
with the kernel's own status of a real directory.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing

from credfs import passes


def _at(st: os.stat_result, ctime_ns: int, mtime_ns: int) -> os.stat_result:
    fields = list(st)
    out = os.stat_result(fields, {"st_ctime_ns": ctime_ns, "st_mtime_ns": mtime_ns,
                                  "st_atime_ns": st.st_atime_ns,
                                  "st_atime": st.st_atime, "st_mtime": mtime_ns / 1e9,
                                  "st_ctime": ctime_ns / 1e9})
    return out


def test_a_directory_is_settled_only_once_its_times_are_older_than_the_margin(
        tmp_path: Path) -> None:
    st = os.stat(tmp_path)
    now = passes.clock_ns()
    assert not passes.settled(st, now)  # just made
    old = now - passes.SETTLED_NS - 1_000_123
    assert passes.settled(_at(st, old, old), now)
    assert not passes.settled(_at(st, old, now + 10**9), now)  # mtime in the future
    # Whole seconds (a filesystem without sub-second times) need seconds.
    whole = (now // 10**9 - 1) * 10**9
    assert not passes.settled(_at(st, whole, whole), now)
    assert passes.settled(_at(st, whole - 10**9, whole - 10**9), now)


def test_a_change_to_the_directory_changes_its_stamp(tmp_path: Path) -> None:
    before = passes.stamp(os.stat(tmp_path))
    (tmp_path / "new").touch()
    after = passes.stamp(os.stat(tmp_path))
    assert after != before
    os.unlink(tmp_path / "new")
    assert passes.stamp(os.stat(tmp_path)) not in (before, after)


def _pass(owner: int) -> passes.Pass:
    if not hasattr(pyfuse3, "PackedListing"):
        pytest.skip("stock pyfuse3: no packed listings (scripts/pyfuse3-readpack.patch)")
    return passes.Pass(pyfuse3.PackedListing(3), owner)


def test_a_pass_is_offered_until_its_opener_closes_the_directory(tmp_path: Path) -> None:
    table = passes.Passes()
    clock = passes.clock_ns() + 10 * passes.SETTLED_SECONDS_NS  # the directory looks old
    st = os.stat(tmp_path)
    p = _pass(1)
    assert table.offer(7, p, st, clock)
    assert table.joinable(7, passes.stamp(st)) is p
    assert table.joinable(8, passes.stamp(st)) is None  # another directory
    (tmp_path / "new").touch()
    assert table.joinable(7, passes.stamp(os.stat(tmp_path))) is None
    table.release(7, 2)  # another opener's close
    assert table.joinable(7, passes.stamp(st)) is p
    table.release(7, 1)
    assert table.joinable(7, passes.stamp(st)) is None and len(table) == 0


def test_an_unsettled_or_withdrawn_pass_is_offered_no_more(tmp_path: Path) -> None:
    table = passes.Passes()
    st = os.stat(tmp_path)
    assert not table.offer(7, _pass(1), st, passes.clock_ns())  # just made: not settled
    p = _pass(1)
    assert table.offer(7, p, st, passes.clock_ns() + 10 * passes.SETTLED_SECONDS_NS)
    table.withdraw(7, p)
    assert table.joinable(7, passes.stamp(st)) is None


def test_a_streamed_pass_answers_as_far_as_it_has_read() -> None:
    async def main() -> None:
        p = _pass(1)
        got: list[int] = []

        async def reader(want: int) -> None:
            got.append(await p.until(want))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, 5)
            await trio.testing.wait_all_tasks_blocked()
            p.grew(3)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # 3 are not the 5 it waits for
            p.grew(8)
        assert got == [8]
        p.finish(OSError(errno.EIO, "gone"))
        assert await p.until(8) == 8  # what was read stays good
        with pytest.raises(OSError):
            await p.until(9)
        assert p.done.is_set() and not p.shareable

    trio.run(main)
