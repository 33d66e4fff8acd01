"""Watching the backing filesystem for changes made behind the mount's back.

With `--cache auto`, the kernel may serve names and attributes from its cache
for a while. Changes made through the mount keep that cache right (the replies
carry the new attributes; see cache.py for names). Changes made directly on the
backing store - by another program, another credfs, a backup restore - are
what the timeout was bounding. This module sees them as they happen instead:
one fanotify group with a filesystem mark on the backing filesystem, in
file-handle mode, reports every change to it; for each one that touches a
node the kernel knows, credfs tells the kernel to forget what it cached -
the name (deleted, renamed away, replaced), the attributes (chmod, chown,
ACL, link count, times), the page cache (data written). With the watch
running, nodes on the watched filesystem get long timeouts, kept only as a
backstop for the changes fanotify cannot report (writes through a shared
mapping made directly on the backing file).

Events caused by the daemon itself (every change made through the mount is
made by one of its threads) are skipped: the kernel already knows. Writes
through kernel passthrough are made by the writer's own process, so they do
arrive; the invalidation they cause is harmless, and cheap: a file only ever
opened with passthrough has no page in the kernel's cache, so only its
attributes are invalidated, from the event loop itself (Inode.paged).

Events are read in batches, at most every BATCH_DELAY: one wake-up per change
would cost more than the change. A directory that stops being searchable by
everyone drops every cached name of the mount (cache.py) as soon as its batch
is read. When the kernel's event queue overflows, every cached name and
attribute of the mount is dropped: nothing is ever trusted past a lost event.

Needs CAP_SYS_ADMIN (filesystem marks) and CAP_DAC_READ_SEARCH (turning a
reported file handle back into an inode), and a backing filesystem that
supports file handles; without them the short timeout applies as before.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import pyfuse3
import trio

from . import backing
from . import fanotify as fa

if TYPE_CHECKING:
    from .operations import Operations

T = TypeVar("T")
log = logging.getLogger(__name__)

BATCH_DELAY = 0.005  # seconds between two reads of the event queue
_HANDLE_CACHE = 4096  # decoded handles remembered (handle -> backing inode)
_READ_SIZE = 256 * 1024
# linux/exportfs.h: a handle of a 32-bit inode number and its generation, as
# fanotify reports it (the handle type, then the handle's bytes).
_FILEID_INO32_GEN = 1
_INO32_HANDLE = struct.Struct("=iII")

_GROUP_FLAGS = (fa.FAN_CLASS_NOTIF | fa.FAN_CLOEXEC | fa.FAN_NONBLOCK | fa.FAN_REPORT_FID
                | fa.FAN_REPORT_DIR_FID | fa.FAN_REPORT_NAME)
_NAME_GONE = fa.FAN_DELETE | fa.FAN_MOVED_FROM | fa.FAN_MOVED_TO
_NAME_CHANGES = _NAME_GONE | fa.FAN_CREATE
_MASK = (fa.FAN_MODIFY | fa.FAN_ATTRIB | fa.FAN_CREATE | _NAME_GONE | fa.FAN_ONDIR)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.open_by_handle_at.restype = ctypes.c_int


def _inode_of(mount_fd: int, handle: bytes) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the inode a reported handle names; None when it no
    longer exists (a deleted file's handle goes stale)."""
    kind, = struct.unpack_from("=i", handle)
    raw = struct.pack("=Ii", len(handle) - 4, kind) + handle[4:]
    fd = _libc.open_by_handle_at(mount_fd, raw, os.O_PATH | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.ESTALE, errno.ENOENT):
            return None
        raise OSError(err, f"open_by_handle_at: {os.strerror(err)}")
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_dev, st.st_ino


@dataclass
class Batch:
    """What one read of the queue asks the kernel to forget."""

    attrs: set[int] = field(default_factory=set)  # nodes: attributes only
    data: set[int] = field(default_factory=set)  # nodes: attributes and page cache
    names: set[tuple[int, bytes]] = field(default_factory=set)  # (directory node, name)
    dirs_changed: set[int] = field(default_factory=set)  # directories whose mode/ACL changed
    everything: bool = False  # the queue overflowed
    # Of attrs and data, moved here by Target.watched_change: nodes the kernel
    # holds no page of (Inode.paged), whose attributes are all there is to
    # forget. Told from the event loop, at once: nothing in that can wait.
    pageless: set[int] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.attrs or self.data or self.names or self.dirs_changed
                    or self.everything or self.pageless)

    def for_thread(self) -> bool:
        """Is anything left that is told from a helper thread (see run)?"""
        return bool(self.attrs or self.data or self.names)


class Target:
    """The daemon's side of the watch: which nodes a backing inode has, and the
    bookkeeping a change needs on the event loop before the kernel is told."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self.table = ops.table

    def nodes_of(self, dev: int, ino: int, is_dir: bool) -> list[int]:
        """The nodes of (dev, ino) if it is a directory as the event says: a
        number decoded from an old event may belong to a new file by now."""
        return [i.node for i in self.table.inodes_of(dev, ino) if i.is_dir == is_dir]

    async def to_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.ops.to_thread(fn, *args)

    def watched_change(self, batch: Batch) -> Batch:
        names = self.ops.names
        for node in self.table.all_nodes() if batch.everything else batch.attrs:
            inode = self.table.known(node)
            if inode is not None:
                inode.caps_absent = False  # a capability may have been set
                if batch.everything:
                    inode.public_epoch = -1  # a mode or ACL may have changed
        for parent_node, name in batch.names:
            parent = self.table.known(parent_node)
            if parent is not None:
                names.removed(parent, name)
        for node in batch.dirs_changed:
            directory = self.table.known(node)
            if directory is None or directory.fd < 0:
                continue
            try:
                _st, public = backing.stat_dir(directory.fd)
            except OSError:
                public = False  # cannot tell: as if no longer searchable by all
            # Drops every cached name of the mount if it is no longer
            # searchable by everyone (cache.py).
            names.changed(directory, public)
        if batch.everything:
            log.warning("backing filesystem changes were lost (fanotify queue "
                        "overflow): dropping every cached name and attribute")
            names.drop_everywhere(self.table.directories_with_cached_names())
            batch.data.update(self.table.all_nodes())
            return batch
        for node in batch.data | batch.attrs:
            inode = self.table.known(node)
            if inode is not None and not inode.paged:
                batch.pageless.add(node)
        batch.data -= batch.pageless
        batch.attrs -= batch.pageless
        return batch

    def watch_lost(self) -> Batch:
        """Watching stopped working: short timeouts, and forget what was cached
        on the strength of the watch."""
        self.ops.watched_dev = None
        return self.watched_change(Batch(everything=True))


class BackingWatch:
    def __init__(self, group: int, mount_fd: int, dev: int, ino32: bool = False) -> None:
        self.group = group
        self.mount_fd = mount_fd
        self.dev = dev
        self._ino32 = ino32  # handles carry the inode number (see _inode_in)
        self._own_pid = os.getpid()
        self._handles: OrderedDict[bytes, tuple[int, int] | None] = OrderedDict()

    @classmethod
    def start(cls, root_fd: int, dev: int) -> BackingWatch | str:
        """A watch on the filesystem root_fd is on, or why there cannot be one."""
        try:
            group = fa.init(_GROUP_FLAGS)
        except OSError as exc:
            return f"backing changes not watched: no fanotify group: {exc.strerror}"
        mount_fd = -1
        try:
            # open_by_handle_at wants a real descriptor on the filesystem.
            mount_fd = os.open(f"/proc/self/fd/{root_fd}",
                               os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fa.mark(group, fa.FAN_MARK_ADD | fa.FAN_MARK_FILESYSTEM, _MASK,
                    f"/proc/self/fd/{root_fd}".encode())
            # Proves that handles can be turned back into inodes here.
            root = fa.handle_of(root_fd)
            root_ino = os.fstat(root_fd).st_ino
            if _inode_of(mount_fd, root) != (dev, root_ino):
                raise OSError(errno.EOPNOTSUPP, "file handles do not round-trip")
            ino32 = len(root) == _INO32_HANDLE.size and \
                _INO32_HANDLE.unpack(root)[:2] == (_FILEID_INO32_GEN, root_ino)
        except OSError as exc:
            os.close(group)
            if mount_fd >= 0:
                os.close(mount_fd)
            no_handles = "the filesystem has no usable file handles"
            reason = {errno.EPERM: "needs CAP_SYS_ADMIN and CAP_DAC_READ_SEARCH",
                      errno.EXDEV: no_handles, errno.ENODEV: no_handles,
                      errno.EOPNOTSUPP: no_handles}
            return f"backing changes not watched: {reason.get(exc.errno or 0, exc.strerror)}"
        return cls(group, mount_fd, dev, ino32)

    def close(self) -> None:
        if self.group >= 0:
            os.close(self.group)
            os.close(self.mount_fd)
            self.group = self.mount_fd = -1

    async def run(self, target: Target, apply: Callable[[Batch], None]) -> None:
        """Read changes and make the kernel forget what they make stale, until
        cancelled. Handles not seen before are decoded, and apply runs, in a
        helper thread as the daemon: decoding needs CAP_DAC_READ_SEARCH, which
        the loop thread may have lent away (inline.py), and a notification may
        wait for a directory lock, or a page lock, that a request in flight
        holds until we reply. Pageless nodes are told on the loop (Batch)."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self.group)
                await trio.sleep(BATCH_DELAY)  # let a burst gather
                events = self.read()
                new = self._unknown(events)
                decoded = await target.to_thread(self._decode, new) if new else {}
                batch = self._collect(events, target, decoded)
                if batch:
                    log.debug("backing changed: %s", batch)
                    batch = target.watched_change(batch)
                    apply_pageless(batch)
                    if batch.for_thread():
                        await target.to_thread(apply, batch)
        except Exception:  # not Cancelled: that ends the daemon as it should
            # Whatever went wrong, long timeouts without a watch would keep
            # stale names: back to short ones, and forget what was cached.
            log.exception("watching the backing filesystem failed: timeouts are short again")
            await target.to_thread(apply, target.watch_lost())

    def read(self) -> list[fa.Event]:
        """The events queued now, but those the daemon caused (made through
        the mount: the kernel already knows)."""
        events: list[fa.Event] = []
        while True:
            try:
                buf = os.read(self.group, _READ_SIZE)
            except BlockingIOError:
                return events
            if not buf:
                return events
            events.extend(fa.parse(buf, skip_pid=self._own_pid))

    def _unknown(self, events: list[fa.Event]) -> set[bytes]:
        handles = self._handles
        return {h for ev in events for h in (ev.parent, ev.obj)
                if h is not None and h not in handles and self._inode_in(h) is None}

    def _inode_in(self, handle: bytes) -> tuple[int, int] | None:
        """The backing inode a handle names when the handle says it itself: the
        generic 32-bit inode number and generation (FILEID_INO32_GEN, ext2/3/4
        and others), checked on the root at start. The generation is not
        checked: a number freed and reused since the event (a file known to the
        daemon keeps its number: it holds a descriptor) names another file of
        the same type, which is then invalidated for nothing."""
        if self._ino32 and len(handle) == _INO32_HANDLE.size:
            kind, ino, _gen = _INO32_HANDLE.unpack(handle)
            if kind == _FILEID_INO32_GEN:
                return self.dev, ino
        return None

    def _decode(self, handles: set[bytes]) -> dict[bytes, tuple[int, int] | None]:
        """The backing inodes of handles (in a helper thread, as the daemon)."""
        return {h: _inode_of(self.mount_fd, h) for h in handles}

    def _collect(self, events: Iterable[fa.Event], target: Target,
                 decoded: dict[bytes, tuple[int, int] | None]) -> Batch:
        self._handles.update(decoded)
        batch = Batch()
        for ev in events:
            if ev.mask & fa.FAN_Q_OVERFLOW:
                batch.everything = True
                continue
            parents = self._nodes(target, ev.parent, is_dir=True)
            if ev.name == b".":  # an event on the directory itself
                self._changed(ev.mask, parents, batch, is_dir=True)
                continue
            if parents and ev.mask & _NAME_CHANGES:
                # A name made or removed changes its directory's times, size,
                # maybe link count and listing; a name gone or replaced must be
                # forgotten, and a new one may replace a cached "no such name"
                # (operations.py). Changes to the file behind a name (its
                # contents or attributes) leave the directory as it was.
                batch.data.update(parents)
                if ev.name is not None:
                    batch.names.update((p, ev.name) for p in parents)
            if ev.obj is not None:
                is_dir = bool(ev.mask & fa.FAN_ONDIR)
                self._changed(ev.mask, self._nodes(target, ev.obj, is_dir), batch,
                              is_dir)
        # Room is made only now: a handle _unknown found in the cache must
        # still be there when its events are matched, or they would be lost.
        while len(self._handles) > _HANDLE_CACHE:
            self._handles.popitem(last=False)
        return batch

    @staticmethod
    def _changed(mask: int, nodes: list[int], batch: Batch, is_dir: bool) -> None:
        if not nodes:
            return
        if mask & fa.FAN_MODIFY:
            batch.data.update(nodes)
        if mask & fa.FAN_ATTRIB:
            batch.attrs.update(nodes)
            if is_dir:
                batch.dirs_changed.update(nodes)

    def _nodes(self, target: Target, handle: bytes | None, is_dir: bool) -> list[int]:
        """The nodes of the directory (is_dir) or other file a handle names
        (every handle of the batch is in the cache until _collect is done)."""
        if handle is None:
            return []
        inode = self._inode_in(handle)
        if inode is None and handle in self._handles:
            inode = self._handles[handle]
            self._handles.move_to_end(handle)
        return target.nodes_of(*inode, is_dir) if inode is not None else []


def apply_pageless(batch: Batch) -> None:
    """Tell the kernel to forget the attributes of batch's pageless nodes (on
    the event loop: a node without pages is invalidated without waiting for
    anything - no page lock, no directory lock - so no reply we owe can
    hold it up)."""
    for node in batch.pageless:
        _quiet(pyfuse3.invalidate_inode, node, True)


def apply(batch: Batch) -> None:
    """Tell the kernel to forget what batch names (in a thread; see run)."""
    for parent, name in batch.names:
        _quiet(pyfuse3.invalidate_entry, parent, name)
    for node in batch.data:
        _quiet(pyfuse3.invalidate_inode, node, False)
    for node in batch.attrs - batch.data:
        _quiet(pyfuse3.invalidate_inode, node, True)


def _quiet(fn: Callable[..., None], *args: object) -> None:
    try:
        fn(*args)
    except OSError as exc:
        # ENOENT: the kernel forgot the node or name meanwhile - nothing to do.
        if exc.errno != errno.ENOENT:
            log.warning("cache invalidation %s%r: %s", fn.__name__, args, exc)
