"""Kernel FUSE passthrough: reads and writes of an open file go from the kernel
straight to the backing file, never through the daemon.

How it keeps credfs's rule that every backing operation runs as the right
identity:

- The open is still done by a worker as the caller (or as the policy says).
  Only when that succeeded does the reply tell the kernel to use the backing
  file (FOPEN_PASSTHROUGH with a backing id).
- Reading or writing an open file checks no permission. What the writer's
  identity still decides are side effects of writing: setuid/setgid bits are
  cleared unless the writer holds CAP_FSETID, and ext4 lets fsuid 0 (its
  resuid) and CAP_SYS_RESOURCE use the reserved blocks.
- The kernel records the credentials of the thread that registers a backing
  file (FUSE_DEV_IOC_BACKING_OPEN) and uses them for every passthrough read and
  write of it, like overlayfs's override_creds. credfs registers a node's file
  as its first passthrough opener: the credentials the open was done with,
  plus CAP_SYS_ADMIN (the ioctl requires it; no write depends on it), minus
  CAP_FSETID when the daemon clears setid bits for that opener (in mounter
  mode, for a caller without CAP_FSETID). Its writes then have exactly the opener's
  side effects. Readers share any registration (reading has none). A writer
  with other credentials shares it only while it is open (below, direct
  I/O); once no open file uses it, the next writer registers anew.
- The kernel lets the open files of one inode use one backing file or the page
  cache, never both at once (iomode.c: every open of an inode open for
  passthrough must be a passthrough open, and none while the page cache is in
  use). credfs counts each node's open files per mode and answers
  accordingly: while a node has passthrough opens, a writer that may not share
  them gets passthrough with direct I/O (the kernel then sends its reads and
  writes to the daemon, which does them as that writer, and maps it through
  the backing file); while it has page-cache opens, new opens join them.
- Nodes of filtered views (redaction) never use passthrough: every read of
  them must go through the filter.

The registration is one per node at a time, made from the node's O_PATH
descriptor at its first passthrough open, replaced when a writer with other
credentials opens it while no open file uses it, and dropped when the kernel
forgets the node.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import functools
import logging
import stat
import struct
from dataclasses import dataclass

import pyfuse3
import trio

from . import backing
from .creds import CAP_FSETID, CAP_SYS_ADMIN, CredentialError, Credentials, cap_bit
from .inline import InlineRunner
from .workers import WorkerPool

log = logging.getLogger(__name__)

# linux/fuse.h: _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, uint32_t).
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502
UNREGISTER_BATCH = 64  # forgotten backing ids closed at once (see Passthrough.forgotten)


def binding_supports() -> bool:
    """True when pyfuse3 was built with backing_id (scripts/build-pyfuse3.sh)."""
    return hasattr(pyfuse3.FileInfo(), "backing_id")


def register(dev_fd: int, fd: int) -> int:
    """FUSE_DEV_IOC_BACKING_OPEN: the backing id for the file fd refers to,
    recorded with the calling thread's credentials."""
    arg = bytearray(struct.pack("=iIQ", fd, 0, 0))  # struct fuse_backing_map
    return fcntl.ioctl(dev_fd, FUSE_DEV_IOC_BACKING_OPEN, arg, True)


def unregister(dev_fd: int, backing_id: int) -> None:
    fcntl.ioctl(dev_fd, FUSE_DEV_IOC_BACKING_CLOSE, bytearray(struct.pack("=I", backing_id)),
                True)


@functools.lru_cache(maxsize=4096)
def registration_for(opener: Credentials, kills_setid: bool) -> Credentials:
    """The credentials a backing file registered for opener's open file is
    registered with: the opener's, with CAP_SYS_ADMIN (the ioctl needs it; no
    read or write depends on it), and without CAP_FSETID when opener's writes
    must clear setuid/setgid bits (kills_setid) although it holds it. (One
    object per identity: a thread holding it already recognises it.)"""
    caps = opener.caps | cap_bit(CAP_SYS_ADMIN)
    if kills_setid:
        caps &= ~cap_bit(CAP_FSETID)
    return dataclasses.replace(opener, caps=caps)


def kills_setid(creds: Credentials, daemon_kills: bool) -> bool:
    return daemon_kills or not creds.caps & cap_bit(CAP_FSETID)


class Io(enum.Enum):
    CACHED = "cached"  # the kernel's page cache, filled through the daemon
    PASSTHROUGH = "passthrough"
    # Reads and writes through the daemon, mmap through the backing file: for a
    # writer that may not share the registration while others use it.
    DIRECT = "passthrough+direct_io"


@dataclass(slots=True)
class _NodeIo:
    backing_id: int = 0  # registered for this node (0: not yet)
    creds: Credentials | None = None  # what it was registered with
    passthrough: int = 0  # open files using it
    cached: int = 0  # open files using the page cache
    registering: trio.Event | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    io: Io
    backing_id: int = 0

    @property
    def keep_cache(self) -> bool:
        # A passthrough open may not keep the page cache (the kernel refuses
        # FOPEN_KEEP_CACHE with it): it drops the node's cached pages, so
        # none cached before passthrough writes outlive them.
        return self.io is Io.CACHED


_CACHED = Choice(Io.CACHED)


class Passthrough:
    """Which open files of which nodes use passthrough, and their registrations."""

    def __init__(self, pool: WorkerPool, inline: InlineRunner | None = None) -> None:
        self._pool = pool
        self._inline = inline
        self.dev_fd: int | None = None
        self.enabled = True
        self._nodes: dict[int, _NodeIo] = {}
        self._unregistered: list[int] = []  # backing ids of forgotten nodes, to close

    async def choose(self, node: int, node_fd: int, node_dev: int, mode: int, filtered: bool,
                     opener: Credentials | None, writable: bool) -> Choice:
        """How a new open file of node does its I/O (counted until released).

        opener: registration_for the open's credentials, what its writes would
        run as (None: its writes may not run as any registration); writable:
        whether it may write.
        """
        st = self._nodes.get(node)
        if st is None:
            if not self.enabled or filtered or not stat.S_ISREG(mode) or self.dev_fd is None:
                return _CACHED  # never passthrough: nothing to count
            st = self._nodes[node] = _NodeIo()
        while st.registering is not None:  # one registration per node
            await st.registering.wait()
        # Reading has no side effects: any registration serves a reader.
        mine = not writable or (opener is not None and st.creds == opener)
        if st.passthrough:
            st.passthrough += 1
            return Choice(Io.PASSTHROUGH if mine else Io.DIRECT, st.backing_id)
        if st.cached or not self.enabled or opener is None:
            return self._cached(st)
        if st.backing_id and not mine:
            # Nothing uses it (the kernel let go of it before sending the last
            # release): another writer's file is registered anew.
            self._unregistered.append(st.backing_id)
            st.backing_id, st.creds = 0, None
        if not st.backing_id:
            backing_id = self._register_inline(node_fd, node_dev, opener)
            if backing_id is None:  # a worker registers: other opens wait meanwhile
                st.registering = trio.Event()
                try:
                    backing_id = await self._register_in_worker(node_fd, opener)
                finally:
                    st.registering.set()
                    st.registering = None
            st.backing_id = backing_id
            if not st.backing_id:
                return self._cached(st)
            st.creds = opener
        st.passthrough += 1
        return Choice(Io.PASSTHROUGH, st.backing_id)

    def _cached(self, st: _NodeIo) -> Choice:
        st.cached += 1
        return _CACHED

    def _register_inline(self, node_fd: int, node_dev: int, creds: Credentials) -> int | None:
        """The ioctl does not wait: on the event loop when metadata is done
        there, as creds like any inline operation (the loop thread is most
        likely lent to the opener already: only capabilities change). None:
        not here, a worker must."""
        if self._inline is None or not self._inline.covers(node_dev):
            return None
        assert self.dev_fd is not None
        try:
            return self._inline.run(creds, 0, register, self.dev_fd, node_fd)
        except backing.Elsewhere:
            return None
        except (OSError, CredentialError) as exc:
            return self._failed(exc)

    async def _register_in_worker(self, node_fd: int, creds: Credentials) -> int:
        assert self.dev_fd is not None
        try:
            return await self._pool.run(creds, 0, register, self.dev_fd, node_fd)
        except (OSError, CredentialError) as exc:
            return self._failed(exc)

    def _failed(self, exc: OSError | CredentialError) -> int:
        """A registration failed: 0 (the open uses the page cache)."""
        if isinstance(exc, OSError):
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                return 0  # a shortage: for this open only
            reason = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        else:
            reason = str(exc)
        # The kernel or the daemon's privileges do not allow it: for good.
        self.enabled = False
        log.warning("FUSE passthrough unavailable (%s); reads and writes go through the daemon",
                    reason)
        return 0

    def released(self, node: int, io: Io) -> None:
        st = self._nodes.get(node)
        if st is None:
            return
        if io is not Io.CACHED:
            st.passthrough -= 1
        elif io is Io.CACHED:
            st.cached -= 1

    def registered(self, node: int) -> bool:
        st = self._nodes.get(node)
        return st is not None and bool(st.backing_id)

    def forgotten(self, node: int, at_once: bool = False) -> None:
        """The kernel forgot the node: no open file of it remains. Its backing
        id is closed now when the loop thread is the daemon's own, or when the
        file is deleted and large (at_once: its space is wanted); when the
        thread is lent to a caller (inline.py), closing (CAP_SYS_ADMIN) waits
        for the next of: UNREGISTER_BATCH ids pending, or the loop going idle
        (close_unregistered, from InlineRunner.keep_tidy; at most inline.BUSY
        seconds on a daemon that never goes idle). Until then the backing file
        of a deleted name keeps its blocks."""
        st = self._nodes.pop(node, None)
        if st is None or not st.backing_id or self.dev_fd is None:
            return
        self._unregistered.append(st.backing_id)
        if at_once or self._inline is None or len(self._unregistered) >= UNREGISTER_BATCH:
            self.close_unregistered()

    def close_unregistered(self) -> None:
        """Close the backing ids of forgotten nodes (on the loop thread)."""
        if not self._unregistered or self.dev_fd is None:
            return
        if self._inline is not None:
            self._inline.own()
        ids, self._unregistered = self._unregistered, []
        for backing_id in ids:
            try:
                unregister(self.dev_fd, backing_id)
            except OSError as exc:
                log.warning("closing backing id %d: %s", backing_id, exc)
