"""Data filters a policy rule can apply to what a caller reads.

A filter looks at one version of a file and returns a view that rewrites
read data in place (same length), or None when it changes nothing.
"""

from __future__ import annotations

import os
from typing import Protocol


class FileView(Protocol):
    def apply(self, offset: int, data: bytes) -> bytes:
        """data as read at offset, filtered; always the same length."""


class ReadFilter(Protocol):
    name: str

    def view(self, fd: int, st: os.stat_result) -> FileView | None:
        """The view of this file version, or None when there is nothing to change."""


FILTERS: dict[str, ReadFilter] = {}
