"""Raw Linux syscalls that Python's os module does not offer, or offers only
process-wide.

Everything here acts on the *calling thread* only; that is the point: glibc's
setgroups() and os.setgroups() change every thread of the process, the raw
syscall does not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# Syscall numbers differ per architecture; these are the ones credfs needs.
_NR = {
    "x86_64": {
        "setgroups": 116, "getgroups": 115, "setfsuid": 122, "setfsgid": 123,
        "capget": 125, "capset": 126, "renameat2": 316, "faccessat2": 439,
        "unshare": 272, "fchmodat2": 452, "statx": 332,
        "write": 1, "pwrite64": 18, "writev": 20, "pwritev": 296, "pwritev2": 328,
        "copy_file_range": 326, "sendfile": 40, "splice": 275, "fallocate": 285,
        "io_submit": 209, "io_uring_enter": 426,
        "truncate": 76, "ftruncate": 77, "open": 2, "openat": 257, "openat2": 437, "creat": 85,
    },
    "aarch64": {
        "setgroups": 159, "getgroups": 158, "setfsuid": 151, "setfsgid": 152,
        "capget": 90, "capset": 91, "renameat2": 276, "faccessat2": 439,
        "unshare": 97, "fchmodat2": 452, "statx": 291,
        "write": 64, "pwrite64": 68, "writev": 66, "pwritev": 70, "pwritev2": 287,
        "copy_file_range": 285, "sendfile": 71, "splice": 76, "fallocate": 47,
        "io_submit": 2, "io_uring_enter": 426,
        "truncate": 45, "ftruncate": 46, "openat": 56, "openat2": 437,
    },
}
try:
    NR = _NR[platform.machine()]
except KeyError as exc:  # pragma: no cover - refuse rather than guess numbers
    raise ImportError(f"credfs: unsupported architecture {platform.machine()!r}") from exc

# Syscalls during which the kernel itself clears setuid/setgid bits (a write
# into the file), as opposed to a chmod or chown the caller asked for.
WRITE_FAMILY = frozenset(NR[n] for n in (
    "write", "pwrite64", "writev", "pwritev", "pwritev2", "copy_file_range", "sendfile",
    "splice", "fallocate", "io_submit", "io_uring_enter"))
# ... and during which it also removes file capabilities (security.capability):
# writes, truncates and opens with O_TRUNC.
KILL_PRIV_FAMILY = WRITE_FAMILY | frozenset(
    NR[n] for n in ("truncate", "ftruncate", "open", "openat", "openat2", "creat") if n in NR)

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
AT_EACCESS = 0x200
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
CLONE_FS = 0x200
AT_STATX_DONT_SYNC = 0x4000
STATX_TYPE = 0x1
_STATX_DEV_OFFSET = 136  # stx_dev_major, stx_dev_minor: two u32 (linux/stat.h)


def device_of(fd: int) -> int:
    """st_dev of what fd refers to, taken from the superblock without asking
    the filesystem (AT_STATX_DONT_SYNC: a FUSE filesystem gets no request)."""
    buf = ctypes.create_string_buffer(256)
    if _syscall(NR["statx"], ctypes.c_int(fd), b"",
                ctypes.c_int(AT_EMPTY_PATH | AT_STATX_DONT_SYNC), ctypes.c_uint(STATX_TYPE),
                buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    major = int.from_bytes(buf.raw[_STATX_DEV_OFFSET:_STATX_DEV_OFFSET + 4], sys.byteorder)
    minor = int.from_bytes(buf.raw[_STATX_DEV_OFFSET + 4:_STATX_DEV_OFFSET + 8], sys.byteorder)
    return os.makedev(major, minor)

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def setfsuid(uid: int) -> int:
    """Set the thread's fsuid; returns the previous one (never fails visibly)."""
    return _syscall(NR["setfsuid"], ctypes.c_uint(uid))


def setfsgid(gid: int) -> int:
    return _syscall(NR["setfsgid"], ctypes.c_uint(gid))


def getfsuid() -> int:
    # setfsuid(-1) is always invalid, so it changes nothing and reports the current value.
    return _syscall(NR["setfsuid"], ctypes.c_uint(0xFFFFFFFF))


def getfsgid() -> int:
    return _syscall(NR["setfsgid"], ctypes.c_uint(0xFFFFFFFF))


def setgroups_thread(groups: tuple[int, ...]) -> None:
    arr = (ctypes.c_uint * max(len(groups), 1))(*groups)
    _check(_syscall(NR["setgroups"], ctypes.c_size_t(len(groups)), arr))


# The credential switch runs per request: its syscalls go through prototypes
# made once, with buffers made once per distinct value (ctypes conversions
# cost as much as the syscalls themselves).
_setfsid_proto = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_uint)
_setgroups_proto = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_size_t,
                                    ctypes.c_void_p, use_errno=True)
_capset_proto = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                 ctypes.c_void_p, use_errno=True)
_syscall_setfsid = _setfsid_proto(("syscall", _libc))
_syscall_setgroups = _setgroups_proto(("syscall", _libc))
_syscall_capset = _capset_proto(("syscall", _libc))
_NR_SETFSUID, _NR_SETFSGID = NR["setfsuid"], NR["setfsgid"]
_NR_SETGROUPS, _NR_CAPSET = NR["setgroups"], NR["capset"]
_BUFFERS_MAX = 4096  # distinct group lists or capability sets kept; then start afresh


def setfsuid_fast(uid: int) -> int:
    """setfsuid; returns the previous fsuid. setfsuid_fast(0xFFFFFFFF) only reads it."""
    return _syscall_setfsid(_NR_SETFSUID, uid)  # type: ignore[no-any-return]


def setfsgid_fast(gid: int) -> int:
    return _syscall_setfsid(_NR_SETFSGID, gid)  # type: ignore[no-any-return]


class GroupList:
    """A supplementary group list, sorted as the kernel keeps it, with its
    setgroups buffer."""

    __slots__ = ("_arr", "_n", "groups")

    def __init__(self, groups: tuple[int, ...]) -> None:
        self.groups = tuple(sorted(set(groups)))
        self._n = len(self.groups)
        self._arr = (ctypes.c_uint * max(self._n, 1))(*self.groups)

    def apply(self) -> None:
        """Make these the calling thread's groups (the thread only)."""
        if _syscall_setgroups(_NR_SETGROUPS, self._n, ctypes.addressof(self._arr)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


_group_lists: dict[tuple[int, ...], GroupList] = {}


def group_list(groups: tuple[int, ...]) -> GroupList:
    gl = _group_lists.get(groups)
    if gl is None:
        if len(_group_lists) >= _BUFFERS_MAX:
            _group_lists.clear()
        gl = _group_lists[groups] = GroupList(groups)
    return gl


class CapSetter:
    """capset of the calling thread with fixed permitted and inheritable sets,
    one ready buffer per effective set used."""

    def __init__(self, permitted: int, inheritable: int) -> None:
        self.permitted, self.inheritable = permitted, inheritable
        self._bufs: dict[int, tuple[int, int, object]] = {}

    def set(self, effective: int) -> None:
        buf = self._bufs.get(effective)
        if buf is None:
            if len(self._bufs) >= _BUFFERS_MAX:
                self._bufs.clear()
            hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
            data = (_CapData * 2)()
            for i, shift in enumerate((0, 32)):
                data[i].effective = (effective >> shift) & 0xFFFFFFFF
                data[i].permitted = (self.permitted >> shift) & 0xFFFFFFFF
                data[i].inheritable = (self.inheritable >> shift) & 0xFFFFFFFF
            buf = self._bufs[effective] = (ctypes.addressof(hdr), ctypes.addressof(data),
                                           (hdr, data))
        if _syscall_capset(_NR_CAPSET, buf[0], buf[1]) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def getgroups_thread() -> tuple[int, ...]:
    n = _check(_syscall(NR["getgroups"], 0, None))
    arr = (ctypes.c_uint * max(n, 1))()
    n = _check(_syscall(NR["getgroups"], n, arr))
    return tuple(arr[:n])


def capget_thread() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_syscall(NR["capget"], ctypes.byref(hdr), data))
    join = [d.effective for d in data], [d.permitted for d in data], [d.inheritable for d in data]
    return tuple(lo | (hi << 32) for lo, hi in join)  # type: ignore[return-value]


def capset_thread(effective: int, permitted: int, inheritable: int) -> None:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i, shift in enumerate((0, 32)):
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_syscall(NR["capset"], ctypes.byref(hdr), data))


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode (os.posix_fallocate has none)."""
    _check(_libc.fallocate(fd, mode, offset, length))


def unshare_fs() -> None:
    """Give the calling thread its own fs_struct, so umask() is per thread."""
    _check(_syscall(NR["unshare"], CLONE_FS))


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int) -> None:
    _check(_syscall(NR["renameat2"], olddirfd, oldname, newdirfd, newname, ctypes.c_uint(flags)))


def faccessat2(dirfd: int, name: bytes, mode: int, flags: int) -> None:
    _check(_syscall(NR["faccessat2"], dirfd, name, mode, flags))


def fchownat_empty(fd: int, uid: int, gid: int) -> None:
    """chown the object an O_PATH fd refers to, without following symlinks."""
    _libc.fchownat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                               ctypes.c_int)
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH))


def fchmodat2_empty(fd: int, mode: int) -> None:
    """chmod the object an O_PATH fd refers to (fchmodat2, Linux 6.6+)."""
    _check(_syscall(NR["fchmodat2"], fd, b"", ctypes.c_uint(mode), AT_EMPTY_PATH))


class Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def utimensat_empty(fd: int, atime_ns: int | None, mtime_ns: int | None,
                    touch: bool = False) -> None:
    """Set times on the object an O_PATH fd refers to, never following symlinks.

    touch=True passes NULL times: the "set both to now" request that owners *and*
    writers may make; explicit times (or one "now" and one omitted) are the
    owner's privilege, and the kernel decides that as the caller.
    """
    _libc.utimensat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int)
    flags = AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW
    if touch:
        _check(_libc.utimensat(fd, b"", None, flags))
        return
    ts = (Timespec * 2)()
    for slot, ns in ((0, atime_ns), (1, mtime_ns)):
        if ns is None:
            ts[slot].tv_sec, ts[slot].tv_nsec = 0, UTIME_OMIT
        else:
            ts[slot].tv_sec, ts[slot].tv_nsec = divmod(ns, 1_000_000_000)
    _check(_libc.utimensat(fd, b"", ts, flags))
