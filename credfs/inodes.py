"""The inode table: FUSE node ids, each backed by an O_PATH descriptor.

Every inode the kernel knows has one O_PATH descriptor here, opened without
following symlinks. Names are always resolved relative to the parent's
descriptor, never by building a backing path.

Node ids are the backing inode numbers (so st_ino through the mount matches
the backing one). That is safe because the descriptor pins the backing inode:
the backing filesystem cannot hand its number to another file while we hold
it, so (st_dev, st_ino) -> node can never silently point at another file.
Inodes on other devices (submounts inside the source) and a backing number
that collides with the FUSE root id get ids from a private range instead.

A file some callers may only read through a data filter (a policy's
redaction) has one node per view: the kernel keeps a page cache per node, so
filtered and unfiltered data can never be served from each other's cache.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from dataclasses import dataclass, field

import pyfuse3

log = logging.getLogger(__name__)

_PRIVATE_IDS_START = 1 << 62


@dataclass(slots=True, eq=False)  # one object per node: equal only to itself
class Inode:
    node: int
    fd: int
    key: tuple[int, int, tuple[str, ...]]  # backing (st_dev, st_ino) and the view
    mode: int  # S_IFMT bits; the type never changes
    lookups: int = 0
    # Names in this directory handed to the kernel with a positive entry timeout;
    # they must be invalidated when this directory stops being searchable by all.
    cached_names: set[bytes] = field(default_factory=set)
    # Bumped by every change through the mount that may reduce who can search it.
    search_epoch: int = 0
    # The search_epoch at which this directory, on the watched device, was
    # last seen searchable by everyone (see Operations._known_public).
    public_epoch: int = -1
    # Where the kernel last reached it through the mount (policies match paths);
    # a file with several links is known by the name it was last looked up by.
    parent: Inode | None = None
    name: bytes = b""
    owner_uid: int | None = None  # the creator on record (policies that ask)
    # A filtered view's node: the file version its page cache was filled from.
    cached_version: tuple[int, ...] | None = None
    # The backing file was seen without security.capability, on the watched
    # device, and no change to its attributes has been seen since (see
    # Operations._file_caps: the kernel asks before every write).
    caps_absent: bool = False
    # An open of it was answered with the kernel's page cache for its data
    # (not passthrough): the kernel may hold pages of it. Until then it holds
    # none (passthrough reads, writes and maps the backing file's; FUSE
    # caches no directory or symlink here), so telling it to forget the
    # attributes is all a change needs, and cannot wait on a page (watch.py).
    paged: bool = False

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def view(self) -> tuple[str, ...]:
        """The data filters every read through this node applies."""
        return self.key[2]


class InodeTable:
    def __init__(self, root_fd: int) -> None:
        st = os.fstat(root_fd)
        self.root_dev = st.st_dev
        self._by_node: dict[int, Inode] = {}
        self._by_key: dict[tuple[int, int, tuple[str, ...]], Inode] = {}
        self._views: dict[tuple[int, int], set[Inode]] = {}  # filtered nodes of a file
        self._private_ids = itertools.count(_PRIVATE_IDS_START)
        root = Inode(pyfuse3.ROOT_INODE, root_fd, (st.st_dev, st.st_ino, ()), st.st_mode,
                     lookups=1)
        self._by_node[root.node] = root
        self._by_key[root.key] = root

    def __len__(self) -> int:
        return len(self._by_node)

    def get(self, node: int) -> Inode:
        try:
            inode = self._by_node[node]
        except KeyError:
            # The kernel asked about a node we never gave it or already forgot.
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        if inode.fd < 0:
            raise pyfuse3.FUSEError(errno.EACCES)  # a placeholder: see placeholder()
        return inode

    def known(self, node: int) -> Inode | None:
        """The node if the kernel still knows it (no errors: for plumbing)."""
        return self._by_node.get(node)

    def nodes_of(self, dev: int, ino: int) -> list[int]:
        """Every node of the backing inode (dev, ino): its plain one and its views."""
        plain = self._by_key.get((dev, ino, ()))
        nodes = [plain.node] if plain is not None else []
        nodes.extend(v.node for v in self._views.get((dev, ino), ()))
        return nodes

    def inodes_of(self, dev: int, ino: int) -> list[Inode]:
        """nodes_of, as Inodes."""
        return [self._by_node[n] for n in self.nodes_of(dev, ino)]

    def oldest_names(self, count: int, skip: set[int]) -> list[tuple[int, bytes]]:
        """(parent node, name) of up to count of the oldest nodes that are not
        directories, placeholders or in skip; each is moved to the newest end,
        so that a node the kernel cannot drop is not chosen again first."""
        chosen: list[Inode] = []
        for inode in self._by_node.values():
            if len(chosen) >= count:
                break
            if inode.fd < 0 or inode.parent is None or inode.node in skip \
                    or stat.S_ISDIR(inode.mode):
                continue
            chosen.append(inode)
        for inode in chosen:
            self._by_node[inode.node] = self._by_node.pop(inode.node)
        return [(i.parent.node, i.name) for i in chosen if i.parent is not None]

    def plain(self, dev: int, ino: int) -> Inode | None:
        """The unfiltered node of the backing inode (dev, ino), if known."""
        return self._by_key.get((dev, ino, ()))

    def all_nodes(self) -> list[int]:
        return [n for n, i in self._by_node.items() if i.fd >= 0]

    def placeholder(self, type_bits: int) -> Inode:
        """A node with no backing descriptor, for a name listed in a directory
        the caller may read but not search.

        readdirplus must give every listed name a node; resolving the name would
        need search permission the caller does not have, and using the daemon's
        own rights for it is exactly what credfs never does. The placeholder is
        handed out with zero timeouts, so any use of the name makes the kernel
        look it up again, as the caller, and fail as natively; every operation
        on the placeholder itself is refused.
        """
        node = next(self._private_ids)
        inode = Inode(node, -1, (-1, node, ()), type_bits, lookups=1)
        self._by_node[node] = inode
        self._by_key[inode.key] = inode
        return inode

    def remember(self, fd: int, st: os.stat_result, parent: Inode | None = None,
                 name: bytes = b"", view: tuple[str, ...] = ()) -> Inode:
        """Count one more kernel reference to the inode fd refers to, reached as
        name in parent, seen through view (data filters; () for none).

        Takes ownership of fd: it is kept for a new inode, closed when the inode
        is already known (the known descriptor pins the same backing inode).
        """
        key = (st.st_dev, st.st_ino, view)
        inode = self._by_key.get(key)
        if inode is not None:
            os.close(fd)
        else:
            node = self._node_id(st) if not view else next(self._private_ids)
            inode = Inode(node, fd, key, stat.S_IFMT(st.st_mode))
            self._by_node[inode.node] = inode
            self._by_key[key] = inode
            if view:
                self._views.setdefault(key[:2], set()).add(inode)
        inode.lookups += 1
        if parent is not None:
            inode.parent, inode.name = parent, name
        return inode

    def moved(self, key: tuple[int, int], parent: Inode, name: bytes) -> None:
        """A rename through the mount put the file with this backing (st_dev,
        st_ino) at name."""
        plain = self._by_key.get((*key, ()))
        for inode in ({plain} if plain else set()) | self._views.get(key, set()):
            inode.parent, inode.name = parent, name

    @staticmethod
    def path(inode: Inode, name: bytes | None = None) -> str:
        """The path through the mount ("" for the root), with name appended."""
        parts = [] if name is None else [name]
        node = inode
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        if node.node != pyfuse3.ROOT_INODE:
            # Not reached from the root (cannot happen for a node the kernel got
            # from us): no path, so no rule can be trusted to apply.
            raise pyfuse3.FUSEError(errno.EACCES)
        return b"/".join(reversed(parts)).decode("utf-8", "surrogateescape")

    def _node_id(self, st: os.stat_result) -> int:
        if st.st_dev == self.root_dev and st.st_ino not in self._by_node \
                and st.st_ino != pyfuse3.ROOT_INODE and st.st_ino < _PRIVATE_IDS_START:
            return st.st_ino
        return next(self._private_ids)

    def forget(self, node: int, count: int) -> bool:
        """Drop count kernel references; True when the node is gone."""
        inode = self._by_node.get(node)
        if inode is None or node == pyfuse3.ROOT_INODE:
            return False
        inode.lookups -= count
        if inode.lookups > 0:
            return False
        del self._by_node[node]
        del self._by_key[inode.key]
        if inode.view:
            views = self._views[inode.key[:2]]
            views.discard(inode)
            if not views:
                del self._views[inode.key[:2]]
        if inode.fd >= 0:
            os.close(inode.fd)
        return True

    def directories_with_cached_names(self) -> list[Inode]:
        return [i for i in self._by_node.values() if i.cached_names]

    def close_all(self) -> None:
        for inode in self._by_node.values():
            if inode.fd < 0:
                continue
            try:
                os.close(inode.fd)
            except OSError:
                pass
        self._by_node.clear()
        self._by_key.clear()
        self._views.clear()
