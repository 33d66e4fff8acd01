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
"""

from __future__ import annotations

import stat

import pyfuse3

DOTS = 2  # "." and ".." lead every listing, at offsets 0 and 1

# The kernel may use readdirplus only where it pays (READDIRPLUS_AUTO) only
# when plain requests can be answered.
SUPPORTED = hasattr(pyfuse3, "readdir_reply_plain")


def is_plain(token: pyfuse3.ReaddirToken) -> bool:
    """A plain readdir request (a stock pyfuse3 only sends readdirplus)."""
    return not getattr(token, "plus", True)


def reply_plain(token: pyfuse3.ReaddirToken, entries: list[tuple[bytes, int, int]],
                start_id: int, dir_node: int) -> None:
    """Fill a plain reply from offset start_id of "." and ".." and entries.

    The dots carry the directory's own node id, as in readdirplus replies.
    Offsets are positions in this listing: entry i has offset DOTS + i + 1.
    """
    for pos in range(start_id, DOTS):
        dot = ((b".", b"..")[pos], stat.S_IFDIR, dir_node)
        if not pyfuse3.readdir_reply_plain(token, [dot], 0, pos + 1):
            return
    pos = max(start_id, DOTS) - DOTS
    if pos < len(entries):
        # One call for the whole chunk: the kernel's buffer decides where it ends.
        pyfuse3.readdir_reply_plain(token, entries, pos, DOTS + pos + 1)
