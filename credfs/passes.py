"""A directory's pass, streamed to its opener; one pass for openers listing it
at once, where that is sound.

A pass reads a directory's entries from its start into a PackedListing. A
large directory's pass is read by a worker while its opener is answered with
what has been read so far (Pass.until), so the kernel copies one chunk out
while the worker reads the next.

Each opener of a directory reads it in a pass of its own by default:
readdir(3) must show every name there at the opendir or the last rewinddir,
which the daemon never hears of (an lseek to 0), and a pass another opener
began earlier may have read past the place where such a name was made
since. Yet two users listing one shared directory at once would read it
twice for the same answer.

A later opener may take an earlier pass when the directory has not changed
since that pass began: the pass then shows the directory exactly as it is at
the later opener's first read, which is all readdir(3) asks. Whether it
changed is told by the directory's status (inode, ctime, mtime, size, link
count), taken right before the pass reads and again at the later opener's
request. That proves something only if every change made after the first
status alters it. A change stamps the directory with the current time, read
from a clock that lags by up to a tick and truncated to the filesystem's
granularity; so a pass is shared only when its directory's times were
already older than the clock read before its status by more than both
(a settled directory). A directory changed within that margin before its
pass (one still being filled, say) gets no sharing at all. (This trusts the
wall clock not to be set back by more than the margin while a pass is
offered, i.e. while its opener has the directory open.)

Only listings every opener would get alike are shared: without a policy
(which filters per caller), on a local filesystem (its fstat cannot wait on
anyone), and with no entry whose type had to be asked of the filesystem as
the opener (d_type unknown: the type then depends on the opener's search
right). Whoever takes the pass opened the directory as themselves: the
kernel sent credfs their OPENDIR, decided as them.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from pyfuse3 import PackedListing

# How much older than the clock a directory's times must be for its status
# to change with any later change: a coarse clock tick is 1-10 ms, timestamps
# are in nanoseconds on the local filesystems credfs reads inline.
SETTLED_NS = 50_000_000
# ... and when both times are whole seconds (a filesystem, or ext4 inodes of
# 128 bytes, that keeps only seconds).
SETTLED_SECONDS_NS = 2_000_000_000

Stamp = tuple[int, int, int, int, int]


def stamp(st: os.stat_result) -> Stamp:
    """What any change of a directory's entries alters (see settled)."""
    return (st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size, st.st_nlink)


def clock_ns() -> int:
    """The clock file times are taken from, read before the status it vouches for."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


def settled(st: os.stat_result, clock_before: int) -> bool:
    """Would any change to the directory after st was taken alter stamp(st)?
    clock_before: clock_ns() read before st was taken."""
    whole_seconds = st.st_ctime_ns % 1_000_000_000 == 0 == st.st_mtime_ns % 1_000_000_000
    margin = SETTLED_SECONDS_NS if whole_seconds else SETTLED_NS
    return max(st.st_ctime_ns, st.st_mtime_ns) + margin < clock_before


class Pass:
    """One read of a directory's entries into a PackedListing, from its start.

    A large directory's pass is read by a worker while its opener is already
    answered (streamed): `ready` counts the entries read so far whose records
    are final, and the opener's requests wait for more as they need them, so
    that the kernel copies out one chunk while the worker reads the next."""

    def __init__(self, snapshot: PackedListing, owner: int) -> None:
        self.snapshot = snapshot
        self.owner = owner  # the open directory (fh) whose pass it is
        self.stamp: Stamp | None = None  # set when offered to later openers
        self.ready = 0
        self.complete = False
        self.error: OSError | None = None  # why the pass ended early
        self.as_anyone = True  # no entry's type had to be asked as the opener
        self.done = trio.Event()
        self._grown = trio.Event()

    @classmethod
    def whole(cls, snapshot: PackedListing, owner: int, as_anyone: bool) -> Pass:
        """A pass already read to its end."""
        p = cls(snapshot, owner)
        p.as_anyone = as_anyone
        p.grew(len(snapshot))
        p.finish(None)
        return p

    @property
    def shareable(self) -> bool:
        """Complete, whole, and alike for every opener."""
        return self.complete and self.error is None and self.as_anyone

    def grew(self, ready: int) -> None:
        """On the loop: the first `ready` entries are final."""
        self.ready = ready
        self._grown.set()
        self._grown = trio.Event()

    def finish(self, error: OSError | None) -> None:
        """On the loop: the pass ended (error: early)."""
        self.error = error
        self.complete = True
        self._grown.set()
        self.done.set()

    async def until(self, n: int) -> int:
        """How many entries are ready once at least n are, or the pass ended;
        its error when it ended early and no more than ready are."""
        while self.ready < n and not self.complete:
            await self._grown.wait()
        if self.error is not None and self.ready < n:
            raise self.error
        return self.ready


class Passes:
    """The latest pass offered to later openers of each directory node; one
    per node, offered while its opener keeps the directory open."""

    def __init__(self) -> None:
        self._latest: dict[int, Pass] = {}

    def joinable(self, node: int, now: Stamp) -> Pass | None:
        """A pass (perhaps still reading) that shows the directory as it is
        now, now being its current stamp."""
        p = self._latest.get(node)
        return p if p is not None and p.stamp == now else None

    def offer(self, node: int, p: Pass, st: os.stat_result, clock_before: int) -> bool:
        """Offer a pass about to read the directory, whose status st was taken
        right before, to later openers: only when settled."""
        if not settled(st, clock_before):
            return False
        p.stamp = stamp(st)
        self._latest[node] = p
        return True

    def withdraw(self, node: int, p: Pass) -> None:
        """The pass turned out to be of no use to others (failed, or its
        opener had to ask for a type)."""
        if self._latest.get(node) is p:
            del self._latest[node]

    def release(self, node: int, owner: int) -> None:
        """The opener closed the directory: its pass is offered no more (those
        that took it keep their own reference)."""
        p = self._latest.get(node)
        if p is not None and p.owner == owner:
            del self._latest[node]

    def __len__(self) -> int:
        return len(self._latest)
