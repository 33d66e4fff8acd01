"""Descriptor pressure: the kernel is asked to forget old entries before the
daemon runs out of descriptors.

Every inode the kernel knows costs the daemon one O_PATH descriptor
(inodes.py), and the kernel keeps what it looked up until memory runs short,
which on a big machine is never: a walk over more files than RLIMIT_NOFILE
allows would end in EMFILE for the callers, where natively it works. So when
the table holds more than HIGH of what the limit allows, the names of the
oldest nodes are invalidated (FUSE_NOTIFY_INVAL_ENTRY, from pyfuse3's notify
thread, as the kernel takes the directory's lock for it) until LOW would be
left; the kernel drops the dentries nobody uses, forgets their inodes, and
the FORGETs close the descriptors. A name used again is looked up again.

Left alone: directories (dropping one drops everything below it), files open
through the mount (the kernel keeps their inodes anyway), placeholders (no
descriptor). What the kernel cannot drop (a process's working directory, a
mapping) stays, and is not asked about again until every other node has been.

The kernel drops an entry under its directory's lock, which every lookup in
that directory holds (shared) while it waits for the daemon: a caller that
looks up new names in one directory without pause lets through about one
invalidation per lookup there, and can still outrun the relief in a single
directory holding more files than the limit allows (EMFILE, as before). A
walk over a tree, where the oldest entries are in other directories, and any
pause, let it catch up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pyfuse3

from .inodes import InodeTable

log = logging.getLogger(__name__)

HIGH = 0.75  # of the capacity: start asking the kernel to forget
LOW = 0.5  # of the capacity: how far down to ask


class DescriptorPressure:
    def __init__(self, capacity: int) -> None:
        """capacity: how many nodes the descriptor limit allows."""
        self.high = int(capacity * HIGH)
        self.low = int(capacity * LOW)
        self._rearm = 0  # no new request until the table grows past this
        self.asked = 0  # names invalidated so far (for the log and the tests)

    def grew(self, table: InodeTable, in_use: Callable[[], set[int]]) -> None:
        """The table has a new node: ask the kernel to forget if it is too full."""
        n = len(table)
        if n <= self.high:
            self._rearm = 0
            return
        if n < self._rearm:
            return  # the last request is still being answered with FORGETs
        want = n - self.low
        names = table.oldest_names(want, in_use())
        # Ask again only once a quarter of what was asked has come back as new
        # entries: the FORGETs of this request arrive meanwhile.
        self._rearm = n + max(want // 4, 1)
        if not self.asked:
            log.info("%d inodes known (descriptor limit allows ~%d): asking the kernel to "
                     "forget the oldest", n, int(self.high / HIGH))
        self.asked += len(names)
        for parent, name in names:
            pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
