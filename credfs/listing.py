"""Plain directory listings (FUSE_READDIR): names, d_ino and d_type only.

With READDIRPLUS_AUTO the kernel asks for readdirplus (a node and attributes
for every name) only for the first chunk of a listing and after lookups in
that directory, and for a plain readdir otherwise (fs/fuse/readdir.c,
fuse_use_readdirplus). A plain entry needs no node, no descriptor and no
lookup: its d_ino is the backing d_ino (node ids are backing inode numbers)
and its type the backing d_type, both from the snapshot the listing took at
its start, from which a policy's hidden names are already gone.

Needs a pyfuse3 built with scripts/pyfuse3-readdir.patch (ReaddirToken.plus,
readdir_reply_plain); with a stock pyfuse3 every request is a readdirplus.

With scripts/pyfuse3-readpack.patch as well, a snapshot taken without a
policy is a pyfuse3.PackedListing: the entries already as FUSE_READDIR
records, so that a plain reply is one copy, with no Python object per entry.
A readdirplus request may then also carry entries without a node (node id
0): the kernel lists them exactly as a plain reply would, and makes no dentry
for them. That is what a name gets when a node for it would be of no use
(see Operations.readdir): no lookup, no descriptor, no reference to forget.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Union

import pyfuse3

if TYPE_CHECKING:
    from pyfuse3 import PackedListing

DOTS = 2  # "." and ".." lead every listing, at offsets 0 and 1
FIRST_OFF = DOTS + 1  # the offset after the first entry past the dots

# The kernel may use readdirplus only where it pays (READDIRPLUS_AUTO) only
# when plain requests can be answered.
SUPPORTED = hasattr(pyfuse3, "readdir_reply_plain")
# Snapshots as ready-made records; readdirplus entries without a node.
PACKED = SUPPORTED and hasattr(pyfuse3, "readdir_reply_packed")

DirEntry = tuple[bytes, int, int]  # as backing.DirEntry
Snapshot = Union[list[DirEntry], "PackedListing"]


# A directory larger than this (st_size: bytes of entries on ext4 and xfs,
# 20 per name on tmpfs, twice the names' length on btrfs; 32 KiB is ~1,300
# names on ext4, ~0.4 ms to read) is read by a worker rather than inline on
# the event loop: the hop costs ~40 us, and the loop is free meanwhile.
INLINE_MAX_BYTES = 32 * 1024


# Entries a plain reply from a pass still being read waits for (or for its
# end): a kernel buffer's worth of names (32 KiB, as glibc's readdir asks
# for, holds ~800 of 10 bytes), so that a reply is rarely cut short.
STREAM_AHEAD = 1024


def inline_size(st: os.stat_result) -> bool:
    """Is the directory (its status) small enough to read on the event loop?"""
    return st.st_size <= INLINE_MAX_BYTES


def is_plain(token: pyfuse3.ReaddirToken) -> bool:
    """A plain readdir request (a stock pyfuse3 only sends readdirplus)."""
    return not getattr(token, "plus", True)


def is_packed(entries: Snapshot) -> bool:
    return not isinstance(entries, list)


def entries_of(snapshot: Snapshot, start: int, stop: int) -> list[DirEntry]:
    """(name, type bits, d_ino) of the entries start to stop of a snapshot."""
    if isinstance(snapshot, list):
        return snapshot[start:stop]
    return snapshot.entries(start, stop)


def reply_dots(token: pyfuse3.ReaddirToken, start_id: int, dir_node: int) -> bool:
    """"." and ".." from offset start_id in a plain reply; False when full.
    The dots carry the directory's own node id, as in readdirplus replies."""
    for pos in range(start_id, DOTS):
        dot = ((b".", b"..")[pos], stat.S_IFDIR, dir_node)
        if not pyfuse3.readdir_reply_plain(token, [dot], 0, pos + 1):
            return False
    return True


def reply_plain(token: pyfuse3.ReaddirToken, entries: Snapshot,
                start_id: int, dir_node: int, stop: int) -> None:
    """Fill a plain reply from offset start_id of "." and ".." and the
    entries before index stop (those read so far).

    Offsets are positions in this listing: entry i has offset DOTS + i + 1.
    """
    if not reply_dots(token, start_id, dir_node):
        return
    pos = max(start_id, DOTS) - DOTS
    if pos >= stop:
        return
    # One call for the whole chunk: the kernel's buffer decides where it ends.
    if isinstance(entries, list):  # always whole: read in one go
        pyfuse3.readdir_reply_plain(token, entries, pos, DOTS + pos + 1)
    else:
        pyfuse3.readdir_reply_packed(token, entries, pos, stop)


def reply_unlinked(token: pyfuse3.ReaddirToken, entries: PackedListing,
                   start: int, stop: int) -> bool:
    """Entries start to stop into a readdirplus reply without a node each;
    False when the kernel's buffer filled up before the last."""
    return pyfuse3.readdir_reply_packed(token, entries, start, stop) == stop - start


def runs(flags: list[bool]) -> list[tuple[int, int, bool]]:
    """(start, stop, flag) of each run of equal flags, in order."""
    out: list[tuple[int, int, bool]] = []
    start = 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            out.append((start, i, flags[start]))
            start = i
    return out
