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
  write of it, like overlayfs's override_creds. credfs registers every file as
  one *registrar*: in caller and policy modes a neutral identity (uid and gid
  65534, no groups, only CAP_SYS_ADMIN, which the ioctl requires); in mounter
  mode the mounter, with only CAP_SYS_ADMIN. A writable open uses passthrough
  only when its writes would have the registrar's side effects (see
  write_effects_match: never for a file with setuid/setgid bits at open);
  any other writer's writes go through the daemon. A setid bit set on a file
  while it is open for passthrough writes is cleared by the next write as
  for a writer outside the file's group without CAP_FSETID.
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

The registration is one per node, made at its first passthrough open from the
node's O_PATH descriptor and dropped when the kernel forgets the node.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
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
CAP_SYS_RESOURCE = 24
NEUTRAL_ID = 65534
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


def registrar_for(mounter: Credentials | None) -> Credentials:
    """The credentials passthrough reads and writes run with."""
    if mounter is not None:
        return dataclasses.replace(mounter, caps=cap_bit(CAP_SYS_ADMIN))
    return Credentials(NEUTRAL_ID, NEUTRAL_ID, (), cap_bit(CAP_SYS_ADMIN))


def write_effects_match(writer: Credentials, kills_setid: bool, registrar: Credentials,
                        file_mode: int, file_gid: int) -> bool:
    """Would the writer's writes to a file of file_mode and group file_gid
    have exactly the registrar's side effects?

    kills_setid: the writer's writes clear setuid/setgid bits (the daemon
    clears them itself or the writer lacks CAP_FSETID). The registrar never
    holds CAP_FSETID or CAP_SYS_RESOURCE, so its writes always clear them and
    use the reserved blocks only by being fsuid 0. Whether a write clears a
    setgid bit without group execute also depends on the writer's groups: a
    file with setuid or setgid bits is never shared, nor one in a group of the
    registrar's that the writer is not in (a setgid bit set while it is open
    would be kept by the registrar's writes where the writer's clear it).
    """
    return not file_mode & (stat.S_ISUID | stat.S_ISGID) and kills_setid \
        and not writer.caps & cap_bit(CAP_SYS_RESOURCE) \
        and (writer.uid == 0) == (registrar.uid == 0) \
        and (_in_group(writer, file_gid) or not _in_group(registrar, file_gid))


def _in_group(creds: Credentials, gid: int) -> bool:
    return gid == creds.gid or gid in creds.groups


def kills_setid(creds: Credentials, daemon_kills: bool) -> bool:
    return daemon_kills or not creds.caps & cap_bit(CAP_FSETID)


class Io(enum.Enum):
    CACHED = "cached"  # the kernel's page cache, filled through the daemon
    PASSTHROUGH = "passthrough"
    # Reads and writes through the daemon, mmap through the backing file: for a
    # writer that may not share the registrar's identity while others do.
    DIRECT = "passthrough+direct_io"


@dataclass(slots=True)
class _NodeIo:
    backing_id: int = 0  # registered for this node (0: not yet)
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

    def __init__(self, registrar: Credentials, pool: WorkerPool,
                 inline: InlineRunner | None = None) -> None:
        self.registrar = registrar
        self._pool = pool
        self._inline = inline
        self.dev_fd: int | None = None
        self.enabled = True
        self._nodes: dict[int, _NodeIo] = {}
        self._unregistered: list[int] = []  # backing ids of forgotten nodes, to close

    async def choose(self, node: int, node_fd: int, node_dev: int, mode: int, filtered: bool,
                     may_share: bool) -> Choice:
        """How a new open file of node does its I/O (counted until released).

        may_share: reads only, or writes with the registrar's side effects.
        """
        st = self._nodes.get(node)
        if st is None:
            if not self.enabled or filtered or not stat.S_ISREG(mode) or self.dev_fd is None:
                return _CACHED  # never passthrough: nothing to count
            st = self._nodes[node] = _NodeIo()
        while st.registering is not None:  # one registration per node
            await st.registering.wait()
        if st.passthrough:
            st.passthrough += 1
            return Choice(Io.PASSTHROUGH if may_share else Io.DIRECT, st.backing_id)
        if st.cached or not may_share or not self.enabled:
            return self._cached(st)
        if not st.backing_id:
            st.registering = trio.Event()
            try:
                st.backing_id = await self._register(node_fd, node_dev)
            finally:
                st.registering.set()
                st.registering = None
            if not st.backing_id:
                return self._cached(st)
        st.passthrough += 1
        return Choice(Io.PASSTHROUGH, st.backing_id)

    def _cached(self, st: _NodeIo) -> Choice:
        st.cached += 1
        return _CACHED

    async def _register(self, node_fd: int, node_dev: int) -> int:
        assert self.dev_fd is not None
        try:
            # The ioctl does not wait: on the event loop when metadata is done
            # there, switched to the registrar like any inline operation.
            if self._inline is not None and self._inline.covers(node_dev):
                try:
                    return self._inline.run(self.registrar, 0, register, self.dev_fd, node_fd)
                except backing.Elsewhere:
                    pass
            return await self._pool.run(self.registrar, 0, register, self.dev_fd, node_fd)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                return 0  # a shortage: this open uses the page cache
            reason = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        except CredentialError as exc:
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
