"""Read filters: views of a file's bytes that differ from the backing file.

A policy rule names filters (`filters = ["redact-location"]`); for a read by a
caller the rule applies to, the data path asks the filter for a view of the
open file's current version and passes every chunk it returns through
`view.apply(offset, data)`. A view never changes the length of what it is
given, so sizes, offsets and EOF stay those of the backing file.

    FILTERS["redact-location"].view(fd, os.fstat(fd))  -> FileView | None

Views are cached per file version, keyed by (st_dev, st_ino, st_size,
st_mtime_ns, st_ctime_ns): any write, truncate or metadata change gives a new
key, so the ranges are found again. The cache is bounded (least recently used
out) and safe to call from the worker threads.
"""

from __future__ import annotations

import bisect
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from .location import ZERO, find_redactions

VersionKey = tuple[int, int, int, int, int]
Spans = tuple[tuple[int, int, int], ...]


class FileView(Protocol):
    def apply(self, offset: int, data: bytes) -> bytes:
        """data read at offset, as this view shows it (same length)."""
        ...


class ReadFilter(Protocol):
    name: str

    def view(self, fd: int, st: os.stat_result) -> FileView | None:
        """The view of the open file fd whose fstat is st; None: nothing to change."""
        ...


class OverwriteView:
    """Overwrites fixed byte spans (start, end, fill byte) of a file version."""

    __slots__ = ("_ends", "_spans")

    def __init__(self, spans: Spans) -> None:
        self._spans = spans  # sorted, non-overlapping
        self._ends = [e for _, e, _ in spans]

    @property
    def spans(self) -> Spans:
        return self._spans

    def apply(self, offset: int, data: bytes) -> bytes:
        end = offset + len(data)
        i = bisect.bisect_right(self._ends, offset)  # first span ending after offset
        spans = self._spans
        if i == len(spans) or spans[i][0] >= end or not data:
            return data  # the common case: this read touches no span
        buf = bytearray(data)
        while i < len(spans) and spans[i][0] < end:
            s, e, fill = spans[i]
            lo, hi = max(s, offset) - offset, min(e, end) - offset
            buf[lo:hi] = bytes((fill,)) * (hi - lo)
            i += 1
        return bytes(buf)


def version_key(st: os.stat_result) -> VersionKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class SpanFilter:
    """A ReadFilter whose views overwrite spans found by `finder(fd, size)`."""

    SCAN_ATTEMPTS = 3

    def __init__(self, name: str, finder: Callable[[int, int], Spans],
                 max_entries: int = 4096) -> None:
        self.name = name
        self._finder = finder
        self._max = max_entries
        self._cache: OrderedDict[VersionKey, OverwriteView | None] = OrderedDict()
        self._lock = threading.Lock()

    def view(self, fd: int, st: os.stat_result) -> FileView | None:
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None
        key = version_key(st)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        # Found outside the lock: two threads opening a new version at once may
        # both scan it (same result); a slow scan never blocks other files.
        for _ in range(self.SCAN_ATTEMPTS):
            spans = self._finder(fd, st.st_size)
            now = os.fstat(fd)
            if version_key(now) == key:
                break
            # Written to while we scanned: the spans may mix two versions.
            st, key = now, version_key(now)
        else:
            # Still changing: hide all of it rather than guess (fail closed).
            return OverwriteView(((0, st.st_size, ZERO),))
        v = OverwriteView(spans) if spans else None
        with self._lock:
            self._cache[key] = v
            self._cache.move_to_end(key)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return v

    def cached_versions(self) -> int:
        with self._lock:
            return len(self._cache)


FILTERS: dict[str, ReadFilter] = {
    "redact-location": SpanFilter("redact-location", find_redactions),
}

_READ_ATTEMPTS = 3


def prepare(fd: int, names: tuple[str, ...]) -> VersionKey:
    """Find what the named filters change in the file's current version (at
    open, so that the first read does not pay for it); that version."""
    st = os.fstat(fd)
    for name in names:
        FILTERS[name].view(fd, st)
    return version_key(st)


def filtered_pread(fd: int, offset: int, size: int, names: tuple[str, ...]) -> bytes:
    """pread through the named filters, for the file version the bytes came from.

    The version is taken before and after the read: a write in between could
    pair new bytes with the old version's spans, so the read is retried, and
    when the file keeps changing it reads as zeros (fail closed).
    """
    for _ in range(_READ_ATTEMPTS):
        st = os.fstat(fd)
        data = os.pread(fd, size, offset)
        if version_key(os.fstat(fd)) == version_key(st):
            break
    else:
        return bytes(len(data))
    for name in names:
        view = FILTERS[name].view(fd, st)
        if view is not None:
            data = view.apply(offset, data)
    return data
