"""uid/gid mapping between the mount's view and the backing store.

`--uid-map MOUNT_ID:BACKING_ID:COUNT[,...]` (and `--gid-map`) say which ids, as
they appear through the mount, stand for which ids on the backing store, in the
three-number form of /proc/PID/uid_map and newuidmap. "As they appear through
the mount" means in the FUSE connection's user namespace, which is the
daemon's: the kernel sends a caller's fsuid/fsgid translated into it, and
translates the ids we report back out of it for each caller. So a process
that is root inside a container whose root is host uid 100000 arrives as
100000, and `--uid-map 100000:1000:1` lets it act as the backing store's 1000
and see 1000's files as its own.

Ids outside the map show as the overflow id (65534), as unmapped ids do in a
user namespace, and can never be set (EINVAL) or acted as (a caller outside
the map is refused). They are reported to the kernel as the real id 65534,
not as the invalid id (2^32-1): for an inode with an invalid owner the VFS
refuses every write and setattr before the request reaches us (EACCES,
EOVERFLOW), which would give a container process fewer rights than its
backing identity has natively. In caller mode the kernel makes no permission
decision on these attributes, so nothing is lost; mounter mode refuses
callers that are themselves the overflow id (see identity.py).
"""

from __future__ import annotations

import bisect
import errno
import itertools
from dataclasses import dataclass

OVERFLOW_ID = 65534  # what an unmapped id shows as (/proc/sys/kernel/overflowuid)
MAX_ID = 0xFFFFFFFF  # ids are u32, and -1 is not an id
MAX_RANGES = 340  # the kernel's own limit for a user namespace's uid_map


class IdMapError(ValueError):
    """A malformed map: the message names the option and the range."""


@dataclass(frozen=True, slots=True)
class IdRange:
    view: int  # first id as it appears through the mount
    backing: int  # first id on the backing store
    count: int

    def __str__(self) -> str:
        return f"{self.view}:{self.backing}:{self.count}"


class IdMap:
    """One direction-agnostic map of ranges; an empty map is the identity."""

    def __init__(self, ranges: list[IdRange], option: str = "map") -> None:
        self.option = option
        self.ranges = tuple(ranges)
        self._by_view = sorted(ranges, key=lambda r: r.view)
        self._by_backing = sorted(ranges, key=lambda r: r.backing)
        self._view_starts = [r.view for r in self._by_view]
        self._backing_starts = [r.backing for r in self._by_backing]

    @property
    def identity(self) -> bool:
        return not self.ranges

    @classmethod
    def parse(cls, spec: str, option: str) -> IdMap:
        """MOUNT_ID:BACKING_ID:COUNT[,...] -> IdMap, or IdMapError saying what is wrong."""
        items = [s.strip() for s in spec.split(",")]
        if not spec.strip() or any(not s for s in items):
            raise IdMapError(f"{option} {spec!r}: expected MOUNT_ID:BACKING_ID:COUNT[,...]"
                             " (an empty range)")
        if len(items) > MAX_RANGES:
            raise IdMapError(f"{option}: {len(items)} ranges, at most {MAX_RANGES}")
        ranges = [_parse_range(item, option) for item in items]
        _check_overlap(ranges, option, "view", "mount")
        _check_overlap(ranges, option, "backing", "backing")
        return cls(ranges, option)

    def to_backing(self, view_id: int) -> int | None:
        """The backing id a view id stands for, or None when it is not mapped."""
        if not self.ranges:
            return view_id
        i = bisect.bisect_right(self._view_starts, view_id) - 1
        if i >= 0:
            r = self._by_view[i]
            if view_id < r.view + r.count:
                return r.backing + view_id - r.view
        return None

    def to_view_or_none(self, backing_id: int) -> int | None:
        if not self.ranges:
            return backing_id
        i = bisect.bisect_right(self._backing_starts, backing_id) - 1
        if i >= 0:
            r = self._by_backing[i]
            if backing_id < r.backing + r.count:
                return r.view + backing_id - r.backing
        return None

    def to_view(self, backing_id: int) -> int:
        """The id a backing id shows as; the overflow id when it is not mapped."""
        v = self.to_view_or_none(backing_id)
        return OVERFLOW_ID if v is None else v

    def __str__(self) -> str:
        return ",".join(map(str, self.ranges)) or "identity"


def _parse_range(item: str, option: str) -> IdRange:
    parts = item.split(":")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        raise IdMapError(f"{option} range {item!r}: expected MOUNT_ID:BACKING_ID:COUNT, "
                         "three non-negative numbers")
    view, backing, count = map(int, parts)
    if count == 0:
        raise IdMapError(f"{option} range {item!r}: COUNT must be at least 1")
    for what, first in (("MOUNT_ID", view), ("BACKING_ID", backing)):
        # The last id of the range must still be an id: -1 (2^32-1) is not one.
        if first + count - 1 >= MAX_ID:
            raise IdMapError(f"{option} range {item!r}: {what}+COUNT-1 = {first + count - 1}"
                             f" overflows (ids end at {MAX_ID - 1})")
    return IdRange(view, backing, count)


def _check_overlap(ranges: list[IdRange], option: str, side: str, label: str) -> None:
    ordered = sorted(ranges, key=lambda r: getattr(r, side))
    for a, b in itertools.pairwise(ordered):
        if getattr(a, side) + a.count > getattr(b, side):
            raise IdMapError(f"{option}: ranges {a} and {b} overlap on the {label} side")


@dataclass(frozen=True, slots=True)
class IdMapping:
    """The uid map and the gid map of one mount."""

    uids: IdMap
    gids: IdMap

    @classmethod
    def parse(cls, uid_spec: str | None, gid_spec: str | None) -> IdMapping | None:
        """None when neither option is given: no mapping, and no cost per request."""
        if uid_spec is None and gid_spec is None:
            return None
        uids = IdMap.parse(uid_spec, "--uid-map") if uid_spec is not None else IdMap([])
        gids = IdMap.parse(gid_spec, "--gid-map") if gid_spec is not None else IdMap([])
        return cls(uids, gids)

    def describe(self) -> str:
        return f"uid map {self.uids}, gid map {self.gids}"

    def owner_to_backing(self, uid: int | None, gid: int | None
                         ) -> tuple[int | None, int | None]:
        """chown/chgrp through the mount: the backing ids, or OSError(EINVAL) for an
        id outside the map (as the kernel refuses an id it cannot map)."""
        buid = None if uid is None else self.uids.to_backing(uid)
        bgid = None if gid is None else self.gids.to_backing(gid)
        if (uid is not None and buid is None) or (gid is not None and bgid is None):
            raise OSError(errno.EINVAL, f"owner {uid}:{gid} is outside the id map")
        return buid, bgid
