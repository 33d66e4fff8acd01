"""Making and removing the FUSE mount.

As root the daemon mounts itself, with mount(2): that lets it pass
MS_POSIXACL, which makes the FUSE kernel module leave the caller's umask to
the daemon (it sends the unmasked mode and the umask). The worker then
creates with the caller's umask in effect, so a default ACL on the parent
replaces the umask exactly as it does natively. pyfuse3 is then handed the
open /dev/fuse descriptor as "/dev/fd/N".

Without root the mount goes through libfuse and fusermount3; then the kernel
applies the umask itself before the daemon sees the mode (documented).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess

from .options import MS_POSIXACL, MountOptions

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
MNT_DETACH = 2


class MountError(OSError):
    pass


def _mount(source: bytes, target: bytes, fstype: bytes, flags: int, data: bytes) -> None:
    _libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                            ctypes.c_ulong, ctypes.c_char_p)
    if _libc.mount(source, target, fstype, flags, data) != 0:
        err = ctypes.get_errno()
        raise MountError(err, os.strerror(err))


def umount(target: str, lazy: bool = False) -> None:
    _libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
    if _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        raise MountError(err, os.strerror(err), target)


def open_fuse_device() -> int:
    try:
        return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError(2, "/dev/fuse does not exist (is the fuse module loaded?)") from None
    except OSError as exc:
        raise MountError(exc.errno, f"cannot open /dev/fuse: {exc.strerror}") from None


def mount_fuse(opts: MountOptions, allow_other: bool) -> int:
    """Mount the FUSE filesystem at opts.mountpoint; returns the /dev/fuse fd."""
    fd = open_fuse_device()
    os.set_inheritable(fd, True)
    data = [f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}"]
    if allow_other:
        data.append("allow_other")
    if opts.default_permissions:
        data.append("default_permissions")
    if opts.max_read:
        data.append(f"max_read={opts.max_read}")
    fsname = opts.fsname or os.path.abspath(opts.source)
    try:
        _mount(fsname.encode(), os.fsencode(os.path.abspath(opts.mountpoint)),
               f"fuse.{opts.subtype}".encode(), opts.ms_flags | MS_POSIXACL,
               ",".join(data).encode())
    except MountError as exc:
        os.close(fd)
        raise MountError(exc.errno, f"mount failed: {exc.strerror}") from None
    return fd


def device_of_mount(mountpoint: str) -> int | None:
    """st_dev of the topmost mount at mountpoint, from /proc/self/mountinfo
    (a stat of it would ask the daemon that is only now starting)."""
    path = os.path.abspath(mountpoint)
    # Only the parent is resolved: resolving the mountpoint itself would stat it.
    want = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ", 5)
            if fields[4].encode().decode("unicode_escape") == want:
                major, minor = fields[2].split(":")
                found = os.makedev(int(major), int(minor))
    return found


def unmount(mountpoint: str, via_fusermount: bool) -> None:
    """Unmount, lazily when busy, so the daemon can always end."""
    if via_fusermount:
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return
    try:
        umount(mountpoint)
    except MountError as exc:
        if exc.errno == 16:  # EBUSY
            umount(mountpoint, lazy=True)
        elif exc.errno not in (22, 2):  # EINVAL: not mounted (any more)
            raise
