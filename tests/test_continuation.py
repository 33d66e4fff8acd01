"""The caller read for a LOOKUP serves the CREATE (or MKDIR, MKNOD, SYMLINK)
of the same syscall (credfs/continuation.py), and only that.

First the kernel facts the rule rests on, seen by a filesystem that records
the requests it gets with their ids (helpers/recordfs.py): an exclusive
create and mkdir send a LOOKUP of their own right before; a non-exclusive
open(O_CREAT) after a cached "no such name" sends its CREATE with none, the
next id after an earlier syscall's LOOKUP. Then credfs: a process that loses
a group between a failed stat and a create must be refused exactly as
natively, whether or not the kernel looked the name up again; and where the
rule applies, the daemon does take the caller over (its exit line counts it).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
from helpers import recordfs
from helpers.helperfs import HelperFs
from helpers.member import GROUP, as_member, leave_group
from helpers.mounts import CredfsMount

pytestmark = pytest.mark.skipif(
    "unique" not in dir(pyfuse3.RequestContext),
    reason="stock pyfuse3: requests carry no id (scripts/pyfuse3-unique.patch not built)")

STEP = 2


@pytest.fixture
def serve_recordfs(tmp_path: Path, helper_fs: Callable[..., HelperFs]) -> Callable[[str], Path]:
    def start(mode: str) -> Path:
        mnt = tmp_path / f"recordfs-{mode}"
        mnt.mkdir()
        helper_fs(recordfs.__file__, mnt, mode)
        records(mnt)  # whatever mounting caused
        return mnt
    return start


def records(mnt: Path) -> list[tuple[str, int, int, str]]:
    return [tuple(r) for r in json.loads(os.getxattr(mnt, recordfs.RECORD_XATTR))]


def _absent(path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        os.stat(path)


def _ops(recs: list[tuple[str, int, int, str]]) -> list[tuple[str, str]]:
    return [(op, name) for op, _unique, _tid, name in recs]


def _consecutive(recs: list[tuple[str, int, int, str]]) -> bool:
    return all(b[1] - a[1] == STEP for a, b in itertools.pairwise(recs))


def test_exclusive_makes_look_the_name_up_in_their_own_syscall(
        serve_recordfs: Callable[[str], Path]) -> None:
    mnt = serve_recordfs("cached")
    os.close(os.open(mnt / "a", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    recs = records(mnt)
    assert _ops(recs) == [("LOOKUP", "a"), ("CREATE", "a")], recs
    assert _consecutive(recs) and recs[0][2] == recs[1][2] == os.getpid(), recs
    # After a cached "no such name", the exclusive create and the mkdir still
    # ask first: the LOOKUP their CREATE or MKDIR follows is their own.
    for name, make in (("b", lambda p: os.close(os.open(p, os.O_CREAT | os.O_EXCL
                                                         | os.O_WRONLY, 0o644))),
                       ("c", lambda p: os.mkdir(p, 0o755))):
        _absent(mnt / name)
        make(mnt / name)
        recs = records(mnt)
        assert [op for op, _n in _ops(recs)] == ["LOOKUP", "LOOKUP",
                                                 "CREATE" if name == "b" else "MKDIR"], recs
        assert _consecutive(recs[1:]), recs


def test_a_cached_absence_lets_a_plain_create_come_without_a_lookup(
        serve_recordfs: Callable[[str], Path]) -> None:
    """Why the rule wants O_EXCL after a cached "no such name": the CREATE of
    a later syscall then directly follows the earlier syscall's LOOKUP."""
    mnt = serve_recordfs("cached")
    _absent(mnt / "d")
    os.close(os.open(mnt / "d", os.O_CREAT | os.O_WRONLY, 0o644))
    recs = records(mnt)
    assert _ops(recs) == [("LOOKUP", "d"), ("CREATE", "d")], recs
    assert _consecutive(recs), recs


def test_an_uncached_absence_is_looked_up_again(
        serve_recordfs: Callable[[str], Path]) -> None:
    mnt = serve_recordfs("uncached")
    _absent(mnt / "e")
    os.close(os.open(mnt / "e", os.O_CREAT | os.O_WRONLY, 0o644))
    recs = records(mnt)
    assert _ops(recs) == [("LOOKUP", "e"), ("LOOKUP", "e"), ("CREATE", "e")], recs


def _stat_drop_group_create(path: Path, flags: int, drop: bool) -> int:
    """As a member of GROUP (helpers/member.py): stat path (absent), leave
    GROUP when drop, then create path with flags. 0 or the create's errno."""
    def steps() -> int:
        try:
            os.stat(path)
            return 249  # it should not be there
        except FileNotFoundError:
            pass
        if drop:
            leave_group()
        try:
            os.close(os.open(path, flags | os.O_CREAT | os.O_WRONLY, 0o644))
        except OSError as exc:
            return exc.errno or 248
        return 0
    got = as_member(steps)
    assert got < 248, f"child failed: {got}"
    return got


def _group_dir(top: Path) -> Path:
    d = top / "d"
    d.mkdir()
    os.chown(d, 0, GROUP)
    d.chmod(0o775)  # searchable by everyone: absences are cached
    return d


@pytest.mark.parametrize("flags", [0, os.O_EXCL], ids=["plain", "exclusive"])
def test_a_group_left_between_stat_and_create_counts_as_natively(
        flags: int, native: Path, backing: Path, mnt: Path,
        mount_credfs: Callable[..., CredfsMount]) -> None:
    nat, back = _group_dir(native), _group_dir(backing)
    m = mount_credfs(caller_caps=False)
    via = mnt / "d"
    for i, drop in enumerate((False, True, False, True)):
        name = f"f{i}"
        want = _stat_drop_group_create(nat / name, flags, drop)
        got = _stat_drop_group_create(via / name, flags, drop)
        assert got == want, (name, drop, errno.errorcode.get(got), errno.errorcode.get(want))
        assert want == (errno.EACCES if drop else 0)
        if not drop:
            n, b = os.lstat(nat / name), os.lstat(back / name)
            assert (b.st_uid, b.st_gid, stat.S_IMODE(b.st_mode)) == \
                (n.st_uid, n.st_gid, stat.S_IMODE(n.st_mode))
    m.stop()
    counts = [line for line in m.log.splitlines() if "callers:" in line]
    assert counts, m.log
    carried = int(counts[-1].split(", ")[1].split()[0])
    # Exclusive: each create continues its own LOOKUP's syscall. Plain: the
    # kernel kept the stat's "no such name" and sent the create without a
    # LOOKUP; the caller that stat'ed may have changed since (and did).
    assert carried == (4 if flags else 0), counts[-1]
