"""passes.py's rule on its own: when a pass may stand in for another opener's.

The behaviour through a mount (one read of the directory for two openers;
none shared after a change or over an unsettled directory) is in
test_listing_freshness and test_review23; these check the rule's arithmetic
with the kernel's own status of a real directory.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def test_a_pass_is_offered_until_its_opener_closes_the_directory(tmp_path: Path) -> None:
    table = passes.Passes()
    clock = passes.clock_ns() + 10 * passes.SETTLED_SECONDS_NS  # the directory looks old
    st = os.stat(tmp_path)
    p = table.begin(7, 1, st, clock)
    assert p is not None and table.joinable(7, passes.stamp(st)) is p
    assert table.joinable(8, passes.stamp(st)) is None  # another directory
    (tmp_path / "new").touch()
    assert table.joinable(7, passes.stamp(os.stat(tmp_path))) is None
    table.release(7, 2)  # another opener's close
    assert table.joinable(7, passes.stamp(st)) is p
    table.release(7, 1)
    assert table.joinable(7, passes.stamp(st)) is None and len(table) == 0


def test_a_failed_or_private_pass_is_offered_no_more(tmp_path: Path) -> None:
    table = passes.Passes()
    st = os.stat(tmp_path)
    assert table.begin(7, 1, st, passes.clock_ns()) is None  # not settled: not offered
    p = table.begin(7, 1, st, passes.clock_ns() + 10 * passes.SETTLED_SECONDS_NS)
    assert p is not None
    table.end(7, p, None)
    assert p.done.is_set() and p.snapshot is None
    assert table.joinable(7, passes.stamp(st)) is None
