"""Backing-store syscalls, run inside a worker that already holds the right
credentials.

Every function here is a plain, blocking sequence of syscalls on descriptors:
names are resolved relative to the parent's O_PATH descriptor with
O_NOFOLLOW, and an object is reached through its own O_PATH descriptor
(AT_EMPTY_PATH, or the /proc/self/fd magic link, which lands exactly on the
object that descriptor refers to and follows nothing further). Permission is
never checked here: the backing filesystem checks it, as the worker's
identity.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import mmap
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import syscalls

if TYPE_CHECKING:
    from pyfuse3 import PackedListing

ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"

# __FMODE_EXEC: the kernel marks opens made by execve() with this bit.
FMODE_EXEC = 0x20
# O_NOFOLLOW too: the kernel already resolved the name (a symlink never reaches
# FUSE open), and on the /proc/self/fd magic link it would only give ELOOP.
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | FMODE_EXEC


# The st_dev of credfs's own mount. The mount can be made to appear inside the
# backing tree (a bind mount of it there): any name that resolves onto it is
# refused, or a worker would wait on a request only its own daemon can answer.
_own_device: int | None = None


def refuse_device(dev: int | None) -> None:
    global _own_device
    _own_device = dev


# The devices names may resolve onto while this thread runs an operation
# inline on the event loop (see inline.py); None: anywhere (a worker).
_confinement = threading.local()


class Elsewhere(Exception):
    """A name resolved onto a device the event loop must not wait on: the
    operation is to be done by a worker instead. (Not an OSError: nothing
    here may take it for the caller's error.)"""


def confine(devices: frozenset[int] | None) -> frozenset[int] | None:
    """Confine this thread's name resolution to devices; returns the previous."""
    previous: frozenset[int] | None = getattr(_confinement, "devices", None)
    _confinement.devices = devices
    return previous


def open_name(dir_fd: int, name: bytes,
              flags: int = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC) -> int:
    """openat a name in a backing directory (never following a symlink), but
    never onto credfs's own mount."""
    check_name(name)
    fd = os.open(name, flags, dir_fd=dir_fd)
    devices = getattr(_confinement, "devices", None)
    if _own_device is not None or devices is not None:
        dev = syscalls.device_of(fd)
        if dev == _own_device:
            os.close(fd)
            raise OSError(errno.ELOOP, "the credfs mount itself is inside the backing tree")
        if devices is not None and dev not in devices:
            os.close(fd)
            raise Elsewhere(name)
    return fd


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def check_name(name: bytes) -> None:
    # The kernel never sends these, but a name must never climb out of its parent.
    if name in (b".", b"..") or b"/" in name or not name:
        raise OSError(errno.EINVAL, "invalid name")


@dataclass(slots=True)
class Found:
    """A name resolved to an O_PATH descriptor and its attributes, and whether
    its parent was searchable by everyone when we looked, right after."""

    fd: int
    st: os.stat_result
    parent_public: bool = False


def public_dir(fd: int, st: os.stat_result | None = None) -> bool:
    """Is the directory fd refers to searchable by everyone? (see cache.py)"""
    st = st or os.fstat(fd)
    if not (stat.S_ISDIR(st.st_mode) and st.st_mode & 0o111 == 0o111):
        return False
    try:
        os.getxattr(fd_path(fd), ACL_ACCESS)
    except OSError as exc:
        # No ACL: the mode decides. Any other answer: assume it may refuse someone.
        return exc.errno in (errno.ENODATA, errno.EOPNOTSUPP)
    return False


def open_path(dir_fd: int, name: bytes, known_public: bool = False) -> Found:
    """Resolve one name as the worker's identity (needs search on the parent).

    known_public: the caller knows the parent is searchable by everyone (see
    Operations._known_public); otherwise that is looked at here, after the
    name was resolved."""
    fd = open_name(dir_fd, name)
    try:
        return Found(fd, os.fstat(fd), known_public or public_dir(dir_fd))
    except BaseException:
        os.close(fd)
        raise


def lookup(dir_fd: int, name: bytes, known_public: bool = False) -> Found | None:
    """open_path, or None when there is no such name (a lookup's common answer,
    not an error: no exception to build and unwind)."""
    try:
        return open_path(dir_fd, name, known_public)
    except FileNotFoundError:
        return None


# A deleted file at least this large is worth releasing at once (passthrough.py).
LARGE = 1 << 20


def deleted_and_large(fd: int) -> bool:
    """Is the file fd refers to unlinked, and holding at least LARGE bytes?"""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_nlink == 0 and st.st_blocks * 512 >= LARGE


def reopen_path(fd: int) -> Found:
    """An O_PATH descriptor for the object an open file refers to."""
    pfd = os.open(fd_path(fd), os.O_PATH | os.O_CLOEXEC)
    return Found(pfd, os.fstat(pfd))


def reopen_named(dir_fd: int, name: bytes, fh: int) -> Found:
    """reopen_path for a file just opened as name in dir_fd: the name looked
    up again (a walk of /proc/self/fd costs about three times a lookup of
    one name), kept only if it still names the open file - the same device
    and inode, which cannot be reused while fh is open; otherwise (renamed
    over, replaced by a symlink, mounted on, no longer searchable) through
    fh itself."""
    try:
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return reopen_path(fh)
    try:
        st, opened = os.fstat(pfd), os.fstat(fh)
    except BaseException:
        os.close(pfd)
        raise
    if (st.st_dev, st.st_ino) != (opened.st_dev, opened.st_ino):
        os.close(pfd)
        return reopen_path(fh)
    return Found(pfd, st)


def stat_dir(fd: int) -> tuple[os.stat_result, bool]:
    """Attributes of a directory and whether everyone may search it."""
    st = os.fstat(fd)
    return st, public_dir(fd, st)


def getattr_(fd: int) -> os.stat_result:
    return os.fstat(fd)


def access(fd: int, mode: int) -> None:
    # AT_EACCESS: decide with the effective (fs) ids, as the kernel would for
    # the caller; plain access() would use the daemon's real uid.
    syscalls.faccessat2(fd, b"", mode, syscalls.AT_EACCESS | syscalls.AT_EMPTY_PATH)


def open_(fd: int, flags: int) -> int:
    return os.open(fd_path(fd), (flags & ~_OPEN_STRIP) | os.O_CLOEXEC)


def open_nowait(fd: int, flags: int) -> int:
    """open_, but EWOULDBLOCK instead of waiting for a lease holder to give up
    its lease (O_NONBLOCK; it changes nothing else for a regular file, and is
    taken off again unless the caller asked for it)."""
    out = open_(fd, flags | os.O_NONBLOCK)
    if not flags & os.O_NONBLOCK:
        os.set_blocking(out, True)
    return out


def create(dir_fd: int, name: bytes, flags: int, mode: int,
           known_public: bool = False) -> tuple[int, Found]:
    """Create (or open, without O_EXCL) in one syscall, as the caller
    (known_public: as for open_path)."""
    check_name(name)
    fh = os.open(name, (flags & ~(os.O_NOCTTY | FMODE_EXEC)) | os.O_CREAT | os.O_NOFOLLOW
                 | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        found = reopen_named(dir_fd, name, fh)
        found.parent_public = known_public or public_dir(dir_fd)
        return fh, found
    except BaseException:
        os.close(fh)
        raise


def mkdir(dir_fd: int, name: bytes, mode: int) -> Found:
    check_name(name)
    os.mkdir(name, mode, dir_fd=dir_fd)
    return open_path(dir_fd, name)


def mknod(dir_fd: int, name: bytes, mode: int, rdev: int) -> Found:
    check_name(name)
    os.mknod(name, mode, rdev, dir_fd=dir_fd)
    return open_path(dir_fd, name)


def symlink(dir_fd: int, name: bytes, target: bytes) -> Found:
    check_name(name)
    os.symlink(target, name, dir_fd=dir_fd)
    return open_path(dir_fd, name)


def link(fd: int, new_dir_fd: int, new_name: bytes) -> Found:
    check_name(new_name)
    # Through the magic link, linkat needs no CAP_DAC_READ_SEARCH (which
    # AT_EMPTY_PATH would), and the kernel applies protected_hardlinks to
    # the caller exactly as it would natively.
    os.link(fd_path(fd), new_name, dst_dir_fd=new_dir_fd, follow_symlinks=True)
    return open_path(new_dir_fd, new_name)


def readlink(fd: int) -> bytes:
    return os.readlink(b"", dir_fd=fd)


def unlink(dir_fd: int, name: bytes) -> None:
    check_name(name)
    os.unlink(name, dir_fd=dir_fd)


def rmdir(dir_fd: int, name: bytes) -> None:
    check_name(name)
    os.rmdir(name, dir_fd=dir_fd)


def key_at(dir_fd: int, name: bytes) -> tuple[int, int] | None:
    """(st_dev, st_ino) of name in the directory, None when it is not there."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# Which uid created a file, for policies that give creators rights others lack.
# trusted.*: only CAP_SYS_ADMIN reads or writes it, so no one can forge it on
# the backing store, and credfs refuses the name to callers through the mount.
OWNER_XATTR = "trusted.credfs.owner"


def read_owner(fd: int) -> int | None:
    try:
        value = os.getxattr(fd_path(fd), OWNER_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return None
        raise
    return int(value) if value.isdigit() else None


def record_owner(fd: int, uid: int) -> None:
    os.setxattr(fd_path(fd), OWNER_XATTR, str(uid).encode())


# What probe(..., tolerant=True) gives for a name that is there but cannot be
# looked at (a dead FUSE mount on it: ENOTCONN): nothing known about its file.
UNREADABLE: tuple[()] = ()


def probe(dir_fd: int, names: list[bytes], tolerant: bool = False
          ) -> list[tuple[bool, int | None] | tuple[()] | None]:
    """(is a directory, recorded owner) of each name, None where it is absent.

    For a policy's object conditions: runs as the daemon's probe identity,
    and what it finds is only ever used to decide, never shown. tolerant: a
    name whose file cannot be looked at is UNREADABLE instead of an error for
    all the names (a listing decides it as one whose file is unknown)."""
    out: list[tuple[bool, int | None] | tuple[()] | None] = []
    for name in names:
        try:
            fd = open_name(dir_fd, name)
        except OSError:
            out.append(None)
            continue
        try:
            out.append((stat.S_ISDIR(os.fstat(fd).st_mode), read_owner(fd)))
        except OSError:
            if not tolerant:
                raise
            out.append(UNREADABLE)
        finally:
            os.close(fd)
    return out


def walk_tree(dir_fd: int, name: bytes, limit: int
              ) -> list[tuple[str, bool, int | None]] | None:
    """Everything below the directory name (relative path, is a directory,
    recorded owner), or None when there are more than limit entries. Not a
    directory: []. Walked by descriptors, never following symlinks."""
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        top = open_name(dir_fd, name, dir_flags)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT):
            return []
        raise
    out: list[tuple[str, bool, int | None]] = []
    stack = [(top, "")]
    try:
        while stack:
            fd, prefix = stack.pop()
            try:
                with os.scandir(fd) as it:
                    entries = list(it)
                for e in entries:
                    if len(out) >= limit:
                        return None
                    rel = prefix + os.fsdecode(e.name)
                    is_dir = e.is_dir(follow_symlinks=False)
                    pfd = open_name(fd, os.fsencode(e.name))
                    try:
                        out.append((rel, is_dir, read_owner(pfd)))
                    finally:
                        os.close(pfd)
                    if is_dir:
                        stack.append((open_name(fd, os.fsencode(e.name), dir_flags),
                                      rel + "/"))
            finally:
                os.close(fd)
    finally:
        for fd, _prefix in stack:
            os.close(fd)
    return out


def rename(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes, flags: int) -> None:
    check_name(old)
    check_name(new)
    syscalls.renameat2(old_dir_fd, old, new_dir_fd, new, flags)


@dataclass(slots=True)
class AttrChange:
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    touch: bool = False  # both times "now": the owner-or-writer request
    kill_privs: bool = False  # clear setuid/setgid with a size change


def setattr_(fd: int, fh: int | None, change: AttrChange) -> os.stat_result:
    if change.mode is not None and change.size is not None \
            and only_clears_setid(os.fstat(fd).st_mode, change.mode):
        # The kernel's suid/sgid kill riding on a truncate: the truncate below,
        # done as the caller, clears them itself (or fails as natively).
        change = dataclasses.replace(change, mode=None)
    if change.uid is not None or change.gid is not None:
        syscalls.fchownat_empty(fd, -1 if change.uid is None else change.uid,
                                -1 if change.gid is None else change.gid)
    if change.mode is not None:
        if fh is not None:
            os.fchmod(fh, change.mode)
        else:
            syscalls.fchmodat2_empty(fd, change.mode)
    if change.size is not None:
        if change.kill_privs:
            kill_privileges(fd)
        if fh is not None:
            os.ftruncate(fh, change.size)
        else:
            os.truncate(fd_path(fd), change.size)
    if change.touch:
        syscalls.utimensat_empty(fd, None, None, touch=True)
    elif change.atime_ns is not None or change.mtime_ns is not None:
        syscalls.utimensat_empty(fd, change.atime_ns, change.mtime_ns)
    return os.fstat(fd)


def opendir(fd: int) -> int:
    return os.open(fd_path(fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


# One listed name: (name, S_IFMT bits from d_type (0 when unknown), d_ino, the
# backing inode number as the directory lists it). A plain tuple: a list of
# them is what pyfuse3.readdir_reply_plain takes.
DirEntry = tuple[bytes, int, int]

try:  # a pyfuse3 built with scripts/pyfuse3-readdir.patch reads directories in C
    from pyfuse3 import listdir_fd as _listdir_fd
except ImportError:
    _listdir_fd = None


def _type_bits(entry: os.DirEntry[str]) -> int:
    # These use d_type from getdents; they stat only when d_type is unknown.
    try:
        if entry.is_symlink():
            return 0o120000
        if entry.is_dir(follow_symlinks=False):
            return 0o040000
        if entry.is_file(follow_symlinks=False):
            return 0o100000
    except OSError:
        pass
    return 0


def list_dir(dir_fh: int) -> list[DirEntry]:
    """All names in an open directory (without . and ..), read through its fd."""
    if _listdir_fd is not None:
        entries: list[DirEntry] = _listdir_fd(dir_fh)
        for i, (name, type_bits, ino) in enumerate(entries):
            if not type_bits:  # d_type unknown: the type as the caller can lstat it
                entries[i] = (name, _lstat_type(dir_fh, name), ino)
        return entries
    os.lseek(dir_fh, 0, os.SEEK_SET)
    with os.scandir(dir_fh) as it:
        return [(os.fsencode(e.name), _type_bits(e), e.inode()) for e in it]


try:  # ... and can keep a listing as ready-made FUSE_READDIR records (listing.py)
    from pyfuse3 import listdir_packed as _listdir_packed
except ImportError:
    _listdir_packed = None


def list_dir_packed(dir_fh: int, first_off: int) -> tuple[PackedListing, bool]:
    """list_dir's entries as a pyfuse3.PackedListing (needs a pyfuse3 built
    with scripts/pyfuse3-readpack.patch) whose first entry has offset first_off;
    and whether it is the same for every opener (no type had to be asked)."""
    assert _listdir_packed is not None
    packed = _listdir_packed(dir_fh, first_off)
    if not packed.unknown_types:
        return packed, True
    for i, (name, type_bits, _ino) in enumerate(packed.entries()):
        if not type_bits:  # d_type unknown: the type as the caller can lstat it
            packed.set_type(i, _lstat_type(dir_fh, name))
    return packed, False


def read_pass(dir_fh: int, packed: PackedListing, progress: Callable[[int], None],
              bufsize: int = 32 * 1024) -> bool:
    """Append every entry of the open directory, read from its start, to
    packed, one getdents64 of bufsize at a time; progress(n) after each, n
    entries being final then (unknown types looked up as the caller). True
    when no type had to be looked up (the listing is every opener's)."""
    assert _listdir_packed is not None
    os.lseek(dir_fh, 0, os.SEEK_SET)
    as_anyone = True
    seen = len(packed)
    while packed.read_more(dir_fh, bufsize):
        if packed.unknown_types:
            as_anyone = False
            for i, (name, type_bits, _ino) in enumerate(packed.entries(seen), start=seen):
                if not type_bits:
                    packed.set_type(i, _lstat_type(dir_fh, name))
        seen = len(packed)
        progress(seen)
    return as_anyone


def _lstat_type(dir_fh: int, name: bytes) -> int:
    try:
        return stat.S_IFMT(os.lstat(name, dir_fd=dir_fh).st_mode)
    except OSError:
        return 0


def lookup_listed(dir_fh: int, entries: list[DirEntry]) -> list[Found | OSError]:
    """Resolve listed names as the caller; the error instead for a name that
    vanished (ENOENT), that the caller may list but not search (EACCES), or
    whose file cannot be looked at (a dead FUSE mount on it: ENOTCONN)."""
    out: list[Found | OSError] = []
    try:
        for name, _type_bits, _ino in entries:
            try:
                fd = open_name(dir_fh, name)
            except OSError as exc:
                out.append(exc)
                continue
            try:
                st = os.fstat(fd)
            except OSError as exc:
                os.close(fd)
                out.append(exc)
                continue
            out.append(Found(fd, st))
    except BaseException:
        for item in out:
            if isinstance(item, Found):
                os.close(item.fd)
        raise
    public = public_dir(dir_fh)  # looked at after the names were resolved
    for item in out:
        if isinstance(item, Found):
            item.parent_public = public
    return out


def statfs(fd: int) -> os.statvfs_result:
    return os.statvfs(fd_path(fd))


def read(fh: int, off: int, size: int) -> bytes:
    try:
        return os.pread(fh, size, off)
    except OSError as exc:
        if not _direct(fh, exc):
            raise
        buf = mmap.mmap(-1, max(size, 1))
        with buf:
            n = os.preadv(fh, [memoryview(buf)[:size]], off)
            return buf[:n]


def _direct(fh: int, exc: OSError) -> bool:
    """EINVAL on an O_DIRECT file (the caller opened it so): the backing
    filesystem wants an aligned buffer, which a Python bytes object is not.
    The caller's own offset and length were aligned or are refused again."""
    return exc.errno == errno.EINVAL and bool(fcntl.fcntl(fh, fcntl.F_GETFL) & os.O_DIRECT)


def only_clears_setid(current: int, new: int) -> bool:
    """True when new is current with only setuid and/or setgid removed."""
    setid = stat.S_ISUID | stat.S_ISGID
    cur, new = stat.S_IMODE(current), stat.S_IMODE(new)
    return cur != new and new | (cur & setid) == cur and not (cur ^ new) & ~setid


def kill_privileges(fd: int) -> None:
    """Clear setuid, and setgid where it means set-group-ID on execution, as the
    kernel does when someone without CAP_FSETID writes or truncates."""
    mode = os.fstat(fd).st_mode
    kill = mode & 0o4000 | (mode & 0o2000 if mode & 0o010 else 0)
    if kill and stat.S_ISREG(mode):
        syscalls.fchmodat2_empty(fd, stat.S_IMODE(mode) & ~kill)


def drop_append(fh: int) -> None:
    """Take O_APPEND off a backing descriptor opened with it, so that each
    write appends or not as the caller's open file says at that write (see
    write). It stays on an append-only file (chattr +a refuses: EPERM), and
    then every write appends, as it must. The open itself was made with
    O_APPEND, so who may open the file for writing was decided as natively."""
    flags = fcntl.fcntl(fh, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fh, fcntl.F_SETFL, flags & ~os.O_APPEND)
    except PermissionError:
        pass


def write(fh: int, off: int, data: bytes, kill_privs: bool = False,
          append: bool = False) -> int:
    """pwrite at off, or at the end of the file when append: the caller's
    file has O_APPEND now (RWF_APPEND: per write, as fcntl can change it)."""
    if kill_privs:
        kill_privileges(fh)
    rwf = os.RWF_APPEND if append else 0
    try:
        return os.pwritev(fh, [data], off, rwf) if rwf else os.pwrite(fh, data, off)
    except OSError as exc:
        if not _direct(fh, exc) or not data:
            raise
        with mmap.mmap(-1, len(data)) as buf:  # page-aligned: see _direct
            buf[:] = data
            return os.pwritev(fh, [buf], off, rwf)


def fallocate(fh: int, mode: int, off: int, length: int, kill_privs: bool = False) -> None:
    if kill_privs:
        kill_privileges(fh)
    syscalls.fallocate(fh, mode, off, length)


def flush(fh: int) -> None:
    # Closing a duplicate reports errors a filesystem only gives at close (NFS),
    # without closing the handle the kernel still uses.
    os.close(os.dup(fh))


def fsync(fh: int, datasync: bool) -> None:
    (os.fdatasync if datasync else os.fsync)(fh)


def close(fh: int) -> None:
    os.close(fh)


def getxattr(fd: int, name: bytes) -> bytes:
    return os.getxattr(fd_path(fd), name)


def setxattr(fd: int, name: bytes, value: bytes) -> None:
    os.setxattr(fd_path(fd), name, value)


def listxattr(fd: int) -> list[bytes]:
    return [os.fsencode(n) for n in os.listxattr(fd_path(fd))]


def removexattr(fd: int, name: bytes) -> None:
    os.removexattr(fd_path(fd), name)
