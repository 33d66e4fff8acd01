"""Metadata operations done on the event-loop thread itself (--inline auto).

Handing a request to a worker thread and back costs more than the syscalls
it makes. An operation that cannot wait on another process - a lookup, a
mkdir, an unlink, a chmod on a local filesystem - runs instead on the trio
thread, switched to exactly the credentials a worker would have taken, and
switched back to the daemon's own identity before anything else runs there:
the loop thread also reads callers' /proc entries (ns/user needs ptrace
access), writes notifications and unmounts at exit, and threads it starts
inherit what it holds. What may wait stays in the workers: opening an
existing file and truncating (a lease holder can hold those up to
lease-break-time), reads, writes, fsync, and everything on a filesystem
that is not local.

"Local" is decided per backing device, from the mount table (a statfs
would itself wait on a network filesystem's server): the filesystem types
in LOCAL_TYPES. A name that resolves onto another device while running
inline (a mount inside the backing tree) is handed to the workers instead.

The umask: when the kernel did not apply the caller's, the worker sets it on
its own fs_struct. The loop thread shares the process's fs_struct (unsharing
it would not help: threads it starts later share its new one), so it sets
the caller's umask for the duration of the syscall and puts the daemon's (0)
back right after, before anything else can run on the loop; threads sharing
it meanwhile are trio's helper threads (unmount, policy reload), which make
no files, and a umask only ever takes permission bits away.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from . import backing
from .creds import CredentialError, Credentials, ThreadIdentity

log = logging.getLogger(__name__)

T = TypeVar("T")

# Filesystems whose metadata operations complete without waiting on anyone
# else (no server, no FUSE daemon, no lease on a name).
LOCAL_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "f2fs",
                         "bcachefs", "jfs", "reiserfs", "zfs", "nilfs2"})

_EXIT_IDENTITY_LOST = 70  # EX_SOFTWARE


def mount_types(mountinfo: str = "/proc/self/mountinfo") -> dict[int, str]:
    """st_dev -> filesystem type of every mount the daemon can see."""
    out: dict[int, str] = {}
    with open(mountinfo, "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            fields = left.split()
            if len(fields) < 3 or not right:
                continue
            major, _, minor = fields[2].partition(b":")
            try:
                dev = os.makedev(int(major), int(minor))
            except ValueError:
                continue
            out[dev] = right.split(b" ", 1)[0].decode(errors="replace")
    return out


def local_type(dev: int) -> str | None:
    """The filesystem type of a backing device when it is a local one."""
    fstype = mount_types().get(dev)
    return fstype if fstype in LOCAL_TYPES else None


class LoopIdentity:
    """The event-loop thread's credentials: a caller's for one operation, the
    daemon's own the rest of the time. Made on the loop thread, after the
    daemon has set up its own identity (privileges dropped or kept)."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self._ident = ThreadIdentity(own_fs=False, idle_caps=True)
        self._umask = os.umask(0)
        os.umask(self._umask)
        self.own = self._ident.held()
        self._ident.current = self.own

    def become(self, creds: Credentials, umask: int) -> None:
        self._ident.become(creds, umask)

    def restore(self) -> None:
        self._ident.become(self.own, self._umask)


class InlineRunner:
    """Runs a backing function on the loop thread as someone (see the module)."""

    def __init__(self, types: dict[int, str] | None = None) -> None:
        self._types = types
        self._local: dict[int, bool] = {}
        self._local_set: frozenset[int] = frozenset()
        self._identity: LoopIdentity | None = None

    def covers(self, dev: int) -> bool:
        """May operations on this backing device run inline?"""
        local = self._local.get(dev)
        if local is None:
            types = mount_types() if self._types is None else self._types
            fstype = types.get(dev)
            local = self._local[dev] = fstype in LOCAL_TYPES
            if local:
                self._local_set = self._local_set | {dev}
            log.debug("device %d:%d (%s): metadata %s", os.major(dev), os.minor(dev),
                      fstype or "not in the mount table",
                      "inline" if local else "in workers")
        return local

    def run(self, creds: Credentials, umask: int, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on this thread as creds (umask applied); the thread is the
        daemon's own again when this returns or raises. CredentialError when
        creds cannot be taken on; backing.Elsewhere when fn met another device."""
        ident = self._identity
        if ident is None:
            ident = self._identity = LoopIdentity()
        elif ident.thread != threading.get_ident():
            raise RuntimeError("inline backing operation off the event-loop thread")
        confined = backing.confine(self._local_set)
        try:
            try:
                ident.become(creds, umask)
            except CredentialError as exc:
                log.warning("refusing request: %s", exc)
                raise
            return fn(*args)
        finally:
            backing.confine(confined)
            try:
                ident.restore()
            except BaseException:
                # The loop thread would go on as someone else: nothing it does
                # from here could be trusted. End the daemon (the mount fails
                # with ENOTCONN, closed) rather than serve on.
                log.critical("event-loop thread cannot return to the daemon's own "
                             "credentials: exiting", exc_info=True)
                os._exit(_EXIT_IDENTITY_LOST)
