"""Bounded reads from a file descriptor and the collector of redactions.

Every parser in this package reads the file only through Source, which counts
what it reads: a hostile file (looping IFDs, a million tiny boxes, absurd
lengths) exhausts the budget and raises LimitExceeded, which the parsers treat
like any other malformation (see __init__ for what that means).
"""

from __future__ import annotations

import os

ZERO = 0x00
SPACE = 0x20

# Budgets per file version. Metadata is small (an Exif segment is < 64 KiB, a
# moov box of a long video a few MiB): these are far above what real files need
# and far below what would stall a worker thread.
MAX_READ_BYTES = 64 << 20
MAX_READS = 200_000


class Malformed(Exception):
    """The structure being parsed is not what its format says it must be."""


class LimitExceeded(Malformed):
    """The file asks for more work than any real media file needs."""


class Source:
    """Reads with os.pread on an fd of known size, within a budget."""

    def __init__(self, fd: int, size: int, *, max_bytes: int = MAX_READ_BYTES,
                 max_reads: int = MAX_READS) -> None:
        self.fd = fd
        self.size = size
        self._bytes_left = max_bytes
        self._reads_left = max_reads

    def read(self, off: int, n: int) -> bytes:
        """Up to n bytes at off (fewer at end of file; none outside it)."""
        if off < 0 or n <= 0 or off >= self.size:
            return b""
        n = min(n, self.size - off)
        self._reads_left -= 1
        self._bytes_left -= n
        if self._reads_left < 0 or self._bytes_left < 0:
            raise LimitExceeded(f"read budget exhausted at offset {off}")
        chunks = []
        while n > 0:
            b = os.pread(self.fd, n, off)
            if not b:  # the file shrank under us: what is left is all we get
                break
            chunks.append(b)
            off += len(b)
            n -= len(b)
        return b"".join(chunks)

    def exact(self, off: int, n: int) -> bytes:
        """Exactly n bytes at off, or Malformed."""
        b = self.read(off, n)
        if len(b) != n:
            raise Malformed(f"{n} bytes at offset {off} run past the end of the file")
        return b


class Found:
    """The redactions found so far: (start, end, fill byte), file offsets."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.spans: list[tuple[int, int, int]] = []

    def add(self, start: int, end: int, fill: int = ZERO) -> None:
        start, end = max(start, 0), min(end, self.size)
        if start < end:
            self.spans.append((start, end, fill))

    def zero(self, start: int, end: int) -> None:
        self.add(start, end, ZERO)

    def blank(self, start: int, end: int) -> None:
        self.add(start, end, SPACE)


def normalize(spans: list[tuple[int, int, int]]) -> tuple[tuple[int, int, int], ...]:
    """Sorted, non-overlapping spans; adjacent spans of one fill merged.

    Where a zero span and a space span overlap, zero wins (the stronger one).
    """
    zeros = _merge([(s, e) for s, e, f in spans if f == ZERO])
    spaces = _merge([(s, e) for s, e, f in spans if f != ZERO])
    out = [(s, e, ZERO) for s, e in zeros]
    for s, e in spaces:
        for zs, ze in zeros:  # both lists are short: a handful of spans per file
            if ze <= s or zs >= e:
                continue
            if zs > s:
                out.append((s, zs, SPACE))
            s = max(s, ze)
            if s >= e:
                break
        if s < e:
            out.append((s, e, SPACE))
    out.sort()
    return tuple(out)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out
