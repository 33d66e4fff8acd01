"""Security review of "the caller read for a LOOKUP serves the CREATE of the
same syscall" (credfs/continuation.py) and of reading callers from /proc:
cases where credfs granted more than the kernel does natively.

1. A MKNOD is not always exclusive. Once credfs has answered a CREATE with
   ENOSYS (what it passes on when the backing filesystem cannot make files,
   e.g. a FUSE filesystem without create and mknod mounted inside the
   backing tree), the kernel stops sending CREATE on that connection and
   turns every open(O_CREAT) into MKNOD + OPEN - also a non-exclusive one
   after a cached "no such name", with no LOOKUP of its own. Taking that MKNOD
   for exclusive carried an earlier syscall's caller over it: a group left
   between a stat and the create still counted.
2. An io_uring worker thread runs each request under the submitter's
   credentials (override_creds), while /proc/<worker>/status shows the
   credentials the process had when the worker was made. A process that
   left a group afterwards still created in that group's directory through
   credfs by openat via io_uring.

The kernel is the oracle: the same steps on the native twin.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
from helpers import enosysfs, uring
from helpers.helperfs import HelperFs
from helpers.member import GROUP, as_member, leave_group
from helpers.mounts import CredfsMount

TIMEOUT = 15.0
def _group_dir(top: Path) -> Path:
    d = top / "d"
    d.mkdir()
    os.chown(d, 0, GROUP)
    d.chmod(0o775)  # searchable by everyone: credfs lets the kernel cache absences
    return d


def _stat_leave_create(path: Path) -> Callable[[], int]:
    def steps() -> int:
        try:
            os.stat(path)
            return 253  # it should not be there
        except FileNotFoundError:
            pass
        leave_group()
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))  # not exclusive
        except OSError as exc:
            return exc.errno or 252
        return 0
    return steps


@pytest.fixture
def enosys_mount(helper_fs: Callable[..., HelperFs]) -> Callable[[Path], None]:
    def start(mnt: Path) -> None:
        mnt.mkdir()
        helper_fs(enosysfs.__file__, mnt)
    return start


@pytest.mark.skipif("unique" not in dir(pyfuse3.RequestContext),
                    reason="stock pyfuse3: no request ids, nothing is carried")
def test_a_create_turned_mknod_is_not_taken_for_exclusive(
        native: Path, backing: Path, mnt: Path, mount_credfs: Callable[..., CredfsMount],
        enosys_mount: Callable[[Path], None]) -> None:
    nat, _back = _group_dir(native), _group_dir(backing)
    enosys_mount(backing / "nocreate")
    m = mount_credfs(caller_caps=False)
    # A create the backing filesystem cannot do: ENOSYS natively and through
    # credfs; the kernel then sends MKNOD for every open(O_CREAT) on credfs.
    for top in (backing, mnt):
        with pytest.raises(OSError) as exc:
            os.open(top / "nocreate" / "x", os.O_CREAT | os.O_WRONLY, 0o644)
        assert exc.value.errno == errno.ENOSYS
    want = as_member(_stat_leave_create(nat / "f"))
    got = as_member(_stat_leave_create(mnt / "d" / "f"))
    assert want == errno.EACCES
    assert got == want, (errno.errorcode.get(got), m.log)
    assert not (backing / "d" / "f").exists()


def _uring_create(path: Path, leave: bool) -> Callable[[], int]:
    """A worker made while in GROUP; GROUP left (this thread only) when leave;
    then an exclusive create of path by openat run in the worker."""
    def steps() -> int:
        try:
            ring = uring.Ring()
        except uring.UringUnavailable:
            return 251
        try:
            if ring.nop() != 0:
                return 250
            if leave:
                leave_group()
            fd = ring.openat(os.fsencode(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            # The worker still shows the group it was made with: what /proc says
            # is not what the request runs as.
            if not uring.worker_groups() or any(g != (GROUP,) for g in uring.worker_groups()):
                return 250
        finally:
            ring.close()
        if fd < 0:
            return -fd
        os.close(fd)
        return 0
    return steps


def _uring_available() -> bool:
    try:
        uring.Ring().close()
    except uring.UringUnavailable:
        return False
    return True


@pytest.mark.skipif(not _uring_available(), reason="io_uring is not available here")
def test_an_io_uring_worker_does_not_lend_its_groups(
        native: Path, backing: Path, mnt: Path,
        mount_credfs: Callable[..., CredfsMount]) -> None:
    nat, back = _group_dir(native), _group_dir(backing)
    mount_credfs(caller_caps=False)
    via = mnt / "d"
    # Natively the worker acts as the submitter is now: out of the group, refused.
    assert as_member(_uring_create(nat / "left", leave=True)) == errno.EACCES
    assert as_member(_uring_create(via / "left", leave=True)) == errno.EACCES
    assert not (back / "left").exists()
    # Still in the group, natively allowed; credfs cannot tell a worker's
    # credentials from /proc and refuses it (fails closed) rather than guess.
    assert as_member(_uring_create(nat / "kept", leave=False)) == 0
    assert as_member(_uring_create(via / "kept", leave=False)) == errno.EACCES
    assert stat.S_ISDIR(os.lstat(back).st_mode)
