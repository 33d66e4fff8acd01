"""Metadata operations done on the event-loop thread itself (--inline auto).

Handing a request to a worker thread and back costs more than the syscalls
it makes. An operation that cannot wait on another process - a lookup, a
mkdir, an unlink, a chmod on a local filesystem - runs instead on the trio
thread, switched to exactly the credentials a worker would have taken (a
close, which checks nothing of the closer, as whoever the thread is: see
InlineRunner.close). What may wait stays in the workers: opening an
existing file and truncating (a lease holder can hold those up to
lease-break-time), reads, writes, fsync, and everything on a filesystem that
is not local.

The loop thread keeps the last caller's identity after an operation (it is
"lent"), so that a burst of requests by one caller costs no switch at all;
every inline operation switches to exactly its own credentials first, so no
operation ever runs with another's. What else runs on the loop thread and
needs the daemon's own identity calls `own()` first: reading another user's
/proc entries beyond status (ns/user, syscall: ptrace access), decoding file
handles for the watch (CAP_DAC_READ_SEARCH), closing passthrough backing ids
(CAP_SYS_ADMIN), starting threads (a thread inherits the identity of the
thread that starts it: trio.to_thread), unmounting at exit. Everything else
there is the same whoever the thread is (replies and notifications on
/dev/fuse, fstat and getdents on descriptors it holds, policy decisions).
After IDLE seconds without an inline operation (or BUSY seconds, when they
never stop), `keep_tidy` gives the thread its own identity back and runs the
work put off till then (closing backing ids, passthrough.py; closing
callers' status files, caller.py).

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

import trio

from . import backing
from .creds import CredentialError, Credentials, ThreadIdentity

log = logging.getLogger(__name__)

T = TypeVar("T")

# Filesystems whose metadata operations complete without waiting on anyone
# else (no server, no FUSE daemon, no lease on a name).
LOCAL_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "f2fs",
                         "bcachefs", "jfs", "reiserfs", "zfs", "nilfs2"})

_EXIT_IDENTITY_LOST = 70  # EX_SOFTWARE

# Seconds without an inline operation after which the loop thread takes its
# own identity back (and deferred work runs): long enough to span the gaps
# between one client's requests, short enough that an idle daemon is itself.
IDLE = 0.05
# Seconds the deferred work waits at most while inline operations never stop
# for IDLE (one busy caller is enough): a deleted file's blocks stay held by
# its passthrough backing id until that work runs.
BUSY = 1.0


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
    """The event-loop thread's credentials: a caller's while lent, the
    daemon's own otherwise. Made on the loop thread, after the daemon has set
    up its own identity (privileges dropped or kept)."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self._ident = ThreadIdentity(own_fs=False, idle_caps=True)
        self._umask = os.umask(0)
        os.umask(self._umask)
        self.own = self._ident.held()
        self._ident.current = self.own

    @property
    def lent(self) -> bool:
        return self._ident.current is not self.own

    def become(self, creds: Credentials, umask: int) -> None:
        self._ident.become(creds, umask)

    def restore_umask(self) -> None:
        self._ident.become(self._ident.current or self.own, self._umask)

    def restore(self) -> None:
        self._ident.become(self.own, self._umask)
        self._ident.current = self.own  # identity, not just equality: see lent


class InlineRunner:
    """Runs a backing function on the loop thread as someone (see the module)."""

    def __init__(self, types: dict[int, str] | None = None) -> None:
        self._types = types
        self._local: dict[int, bool] = {}
        self._local_set: frozenset[int] = frozenset()
        self._identity: LoopIdentity | None = None
        self._uses = 0  # inline operations so far (keep_tidy tells idleness by it)
        self._used: trio.Event | None = None  # set by the first operation after a tidy

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
        """fn(*args) on this thread as creds (umask applied), which the thread
        keeps afterwards (see the module). CredentialError when creds cannot be
        taken on (the thread is the daemon's own again then);
        backing.Elsewhere when fn met another device."""
        ident = self._identity
        if ident is None:
            ident = self._identity = LoopIdentity()
        elif ident.thread != threading.get_ident():
            raise RuntimeError("inline backing operation off the event-loop thread")
        self._uses += 1
        confined = backing.confine(self._local_set)
        try:
            try:
                ident.become(creds, umask)
            except CredentialError as exc:
                log.warning("refusing request: %s", exc)
                self._restore(ident)
                raise
            used = self._used
            if used is not None and not used.is_set():
                used.set()
            return fn(*args)
        finally:
            backing.confine(confined)
            if umask:
                self._guard(ident.restore_umask)

    def close(self, fd: int) -> None:
        """Close a backing descriptor on this thread as whoever the thread is
        now: closing checks no permission, and on a local filesystem it waits
        on no one and allocates nothing as the closer (delayed blocks were
        reserved, as the writer, when written). No switch: when callers take
        turns, a RELEASE does not cost one."""
        ident = self._identity
        if ident is not None and ident.thread != threading.get_ident():
            raise RuntimeError("inline close off the event-loop thread")
        self._uses += 1
        os.close(fd)

    async def to_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """trio.to_thread.run_sync(fn, *args), fn running as the daemon's own
        identity: a thread trio starts inherits the loop thread's, which may be
        lent by the time it starts (trio checkpoints before starting it), and
        trio reuses its threads."""
        ident = self._identity
        if ident is None:
            # Never lent yet, but it may be by the time the thread starts: the
            # own identity is taken now, on the loop thread, while it is so.
            ident = self._identity = LoopIdentity()
        return await trio.to_thread.run_sync(_as_daemon, ident.own, fn, *args)

    def own(self) -> bool:
        """Give the loop thread the daemon's own identity back, if it is lent
        (True then)."""
        ident = self._identity
        if ident is None or not ident.lent:
            return False
        if ident.thread != threading.get_ident():
            raise RuntimeError("loop identity restored off the event-loop thread")
        self._restore(ident)
        return True

    def _restore(self, ident: LoopIdentity) -> None:
        self._guard(ident.restore)

    @staticmethod
    def _guard(step: Callable[[], None]) -> None:
        try:
            step()
        except BaseException:
            # The loop thread would go on as someone else, or with a caller's
            # umask: nothing it does from here could be trusted. End the
            # daemon (the mount fails with ENOTCONN, closed) rather than serve on.
            log.critical("event-loop thread cannot return to the daemon's own "
                         "credentials: exiting", exc_info=True)
            os._exit(_EXIT_IDENTITY_LOST)

    async def keep_tidy(self, deferred: Callable[[], None] = lambda: None,
                        idle: float = IDLE, busy: float = BUSY) -> None:
        """Until cancelled: once inline operations have run and then none for
        `idle` seconds, or `busy` seconds after they began when they never
        stop, take the own identity back and run deferred(). Sleeps without
        a timer while nothing runs."""
        while True:
            self._used = trio.Event()
            await self._used.wait()
            since = trio.current_time()
            while trio.current_time() - since < busy:
                uses = self._uses
                await trio.sleep(idle)
                if self._uses == uses:
                    break
            self.own()
            deferred()


def _as_daemon(own: Credentials, fn: Callable[..., T], *args: Any) -> T:
    """In a helper thread: take on the daemon's own identity, then fn(*args).
    The umask is the daemon's (0) and is left alone: the thread shares it with
    the loop thread, which sets a caller's around inline syscalls."""
    ThreadIdentity(own_fs=False, idle_caps=True, umask=0).become(own, 0)
    return fn(*args)
