"""Line numbers for TOML keys (tomllib reports none for valid files).

Good enough for error messages: table headers ([a.b], [[a]]) and `key =`
lines are found by a line scan; a key that cannot be placed falls back to its
table's header line.
"""

from __future__ import annotations

import re

_KEY = re.compile(r"""\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_\-]+)\s*=""")

TablePath = tuple[str | int, ...]


def _split_dotted(name: str) -> tuple[str, ...]:
    parts, cur, quote = [], "", ""
    for c in name:
        if quote:
            if c == quote:
                quote = ""
            else:
                cur += c
        elif c in "\"'":
            quote = c
        elif c == ".":
            parts.append(cur.strip())
            cur = ""
        else:
            cur += c
    parts.append(cur.strip())
    return tuple(parts)


class Locator:
    def __init__(self, text: str) -> None:
        self._headers: dict[TablePath, int] = {}
        self._keys: dict[tuple[TablePath, str], int] = {}
        counters: dict[tuple[str, ...], int] = {}
        current: TablePath = ()
        for lineno, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if s.startswith("[["):
                end = s.find("]]")
                parts = _split_dotted(s[2:end if end > 0 else None])
                idx = counters.get(parts, 0)
                counters[parts] = idx + 1
                current = (*parts, idx)
                self._headers.setdefault(current, lineno)
            elif s.startswith("["):
                end = s.find("]")
                current = _split_dotted(s[1:end if end > 0 else None])
                self._headers.setdefault(current, lineno)
            else:
                m = _KEY.match(line)
                if m:
                    key = m.group(1).strip("\"'")
                    self._keys.setdefault((current, key), lineno)

    def line(self, table: TablePath, key: str | None = None) -> int:
        """The line of key in table (or of the table), 0 when unknown."""
        if key is not None and (table, key) in self._keys:
            return self._keys[(table, key)]
        # A sub-table written inline or dotted: try the parent table's key.
        if key is None and len(table) > 1 and (table[:-1], str(table[-1])) in self._keys:
            return self._keys[(table[:-1], str(table[-1]))]
        if table in self._headers:
            return self._headers[table]
        return self.line(table[:-1], str(table[-1])) if table else 0
