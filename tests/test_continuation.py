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

import dataclasses
import errno
import itertools
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
from helpers import recordfs
from helpers.helperfs import HelperFs
from helpers.member import GROUP, as_member, leave_group
from helpers.mounts import CredfsMount

from credfs.continuation import Continuations
from credfs.creds import Credentials

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


def _create_many(directory: Path, uid: int, n: int, go: int) -> int:
    """Fork a child that becomes uid, waits for a byte on go, then creates n
    files (O_EXCL) in directory; its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.read(go, 1)
            for i in range(n):
                os.close(os.open(directory / f"{uid}-{i}",
                                 os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            code = 0
        finally:
            os._exit(code)
    return pid


def _reap(pid: int, deadline: float) -> int:
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -9


def test_exclusive_creates_carry_their_caller_while_others_interleave(
        backing: Path, mnt: Path, mount_credfs: Callable[..., CredfsMount]) -> None:
    """Two processes create at once: their requests interleave, so an exclusive
    CREATE seldom has the id right after its LOOKUP's, yet it continues that
    LOOKUP's syscall (the thread's latest). Every create carries its caller,
    and every file belongs to its creator."""
    shared = backing / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    m = mount_credfs(caller_caps=False)
    n, uids = 300, (2001, 2002)
    r, w = os.pipe()
    pids = [_create_many(mnt / "shared", uid, n, r) for uid in uids]
    try:
        os.write(w, b"go")
    finally:
        os.close(w)
        os.close(r)
        deadline = time.monotonic() + 60
        codes = [_reap(pid, deadline) for pid in pids]
    assert codes == [0, 0]
    for uid in uids:
        owners = {os.lstat(shared / f"{uid}-{i}").st_uid for i in range(n)}
        assert owners == {uid}
    m.stop()
    counts = [line for line in m.log.splitlines() if "callers:" in line]
    assert counts, m.log
    carried = int(counts[-1].split(", ")[1].split()[0])
    assert carried == n * len(uids), counts[-1]


@dataclasses.dataclass
class _Ctx:
    unique: int
    pid: int
    uid: int = 2001
    gid: int = 2001


def test_the_rule_as_continuation_states_it() -> None:
    """The decision alone, on request contexts as the kernel numbers them."""
    who = Credentials(2001, 2001, (2001,), 0)

    def after(lookups: list[tuple[_Ctx, bool]], make: _Ctx, exclusive: bool,
              name: bytes = b"a") -> Credentials | None:
        c = Continuations()
        for ctx, cached in lookups:
            c.lookup(ctx)
            c.absent(ctx, 1, b"a", cached, who)
        return c.makes_after_lookup(make, 1, name, exclusive)

    # Exclusive: the thread's latest LOOKUP, whatever came in between.
    assert after([(_Ctx(10, 7), True), (_Ctx(12, 8), True)], _Ctx(14, 7), True) is who
    assert after([(_Ctx(10, 7), True)], _Ctx(14, 7, uid=0), True) is None
    assert after([(_Ctx(10, 7), True)], _Ctx(12, 7), True, name=b"b") is None
    # Plain: right after an uncached "no such name" only.
    assert after([(_Ctx(10, 7), False)], _Ctx(12, 7), False) is who
    assert after([(_Ctx(10, 7), False), (_Ctx(12, 8), False)], _Ctx(14, 7), False) is None
    assert after([(_Ctx(10, 7), True)], _Ctx(12, 7), False) is None
    # A later LOOKUP of the thread that found the name ends the earlier one.
    c = Continuations()
    c.lookup(_Ctx(10, 7))
    c.absent(_Ctx(10, 7), 1, b"a", False, who)
    c.lookup(_Ctx(12, 7))
    assert c.makes_after_lookup(_Ctx(14, 7), 1, b"a", True) is None
