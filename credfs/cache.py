"""Who is authoritative for entries and attributes, and for how long.

The kernel's dentry and attribute caches are shared by every caller, and
without default_permissions the kernel does not check search permission while
walking a cached dentry. So a cached entry could carry one caller past a
directory that only another caller may search.

The rule that prevents it: a name is cached (positive entry timeout) only when
its parent directory is searchable by everyone - the x bit set for owner,
group and other, and no access ACL that could deny someone. A path walk then
can only skip the daemon on steps that every caller is allowed to take; the
first step through a directory that someone may not search has a zero entry
timeout, so the kernel asks the daemon again, as that caller. When a change
made through the mount (chmod, chown, ACL change) makes a directory
searchable by fewer, or a rename moves a name into such a directory, every
cached name of the mount is made stale before the reply (see notify.py).
Changes made directly on the backing directory are seen when the timeout
runs out.

Changes made directly on the backing directory are seen when the timeout
runs out - or, with `--cache auto` on a local filesystem and a root daemon,
as soon as watch.py reads them from fanotify; nodes on the watched
filesystem then get the long `watched_timeout`, a backstop only.

Attributes are never used for permission decisions in caller mode (every
open, access and name lookup is decided by the backing filesystem as the
caller), so their timeout only bounds how stale a stat may be.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import pyfuse3

from .notify import KernelNotifier


class CacheMode(enum.Enum):
    NONE = "none"
    AUTO = "auto"
    ALWAYS = "always"


@dataclass(frozen=True, slots=True)
class CachePolicy:
    mode: CacheMode
    timeout: float  # seconds an entry or attribute may be served from the kernel cache
    keep_page_cache: bool
    # The timeout for nodes on a filesystem whose changes are watched (watch.py):
    # every change the watch can see invalidates at once; this bounds the others.
    watched_timeout: float

    @classmethod
    def for_mode(cls, mode: CacheMode) -> CachePolicy:
        if mode is CacheMode.NONE:
            return cls(mode, 0.0, False, 0.0)
        if mode is CacheMode.AUTO:
            return cls(mode, 1.0, True, 60.0)
        return cls(mode, 3600.0, True, 3600.0)

    @property
    def wants_watch(self) -> bool:
        return self.watched_timeout > self.timeout


class CachedDir(Protocol):
    node: int
    cached_names: set[bytes]
    search_epoch: int


class NameCache:
    """Which names the kernel may serve from its dentry cache, and dropping them.

    A name gets a positive entry timeout only when its parent was seen
    searchable by everyone *after* the name was resolved (the worker looks at
    the parent right then) and no change through the mount reduced the
    parent's searchability while the request was under way (search_epoch).
    Every change through the mount that leaves a directory not searchable by
    all drops all names cached in it, whatever was believed before.
    """

    def __init__(self, policy: CachePolicy, notifier: KernelNotifier) -> None:
        self.policy = policy
        self.notifier = notifier

    def entry_timeout(self, parent: CachedDir, name: bytes, parent_public: bool,
                      epoch_at_start: int, timeout: float) -> float:
        """timeout: what the parent's filesystem allows (see CachePolicy)."""
        if not (parent_public and parent.search_epoch == epoch_at_start):
            return 0.0
        if timeout:
            parent.cached_names.add(name)
        return timeout

    def observed(self, directory: CachedDir, public: bool) -> None:
        """A fresh look at a directory (getattr, lookup): drop its names if it is
        no longer searchable by all (for example after a change behind our back)."""
        if not public and directory.cached_names:
            self._drop_all(directory)

    def changed(self, directory: CachedDir, public: bool) -> None:
        """Mode, owner or ACL of a directory changed through the mount. Called
        before the reply: the change must not return while a cached name still
        lets someone past the directory."""
        directory.search_epoch += 1
        if public or not directory.cached_names:
            return  # nothing in it is cached past the new rule
        if self.notifier.drop_all_entries():
            directory.cached_names.clear()
        else:
            self._drop_all(directory)

    def removed(self, parent: CachedDir, name: bytes) -> None:
        parent.cached_names.discard(name)

    def renamed(self, old: CachedDir, old_name: bytes, new: CachedDir, new_name: bytes,
                public: dict[int, bool], exchange: bool) -> None:
        """Names moved by rename; the kernel moves their dentries, timeouts and all.

        public: for old.node and new.node, whether that directory is searchable
        by all now. A cached name that lands where not everyone may search must
        not stay cached."""
        moves = [(old, old_name, new, new_name)]
        if exchange:
            moves.append((new, new_name, old, old_name))
        cached = [src_name in src.cached_names for src, src_name, _d, _n in moves]
        for src, src_name, dst, dst_name in moves:
            src.cached_names.discard(src_name)
            dst.cached_names.discard(dst_name)
        stranded = []
        for was_cached, (_s, _sn, dst, dst_name) in zip(cached, moves, strict=True):
            if was_cached and public[dst.node]:
                dst.cached_names.add(dst_name)
            elif was_cached:
                stranded.append((dst, dst_name))
        if stranded and not self.notifier.drop_all_entries():
            # The kernel moves the dentries after our reply: without epochs they
            # can only be dropped afterwards.
            for dst, dst_name in stranded:
                pyfuse3.invalidate_entry_async(dst.node, dst_name, ignore_enoent=True)

    def drop_everywhere(self, directories: list[CachedDir]) -> None:
        """Invalidate every cached name (the rules that allowed caching changed)."""
        if self.notifier.drop_all_entries():
            for directory in directories:
                directory.cached_names.clear()
        else:
            for directory in directories:
                self._drop_all(directory)

    def _drop_all(self, directory: CachedDir) -> None:
        for name in directory.cached_names:
            pyfuse3.invalidate_entry_async(directory.node, name, ignore_enoent=True)
        directory.cached_names.clear()
