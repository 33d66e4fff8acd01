"""Directory listings through credfs equal the kernel's, dots and all.

A listing larger than one readdirplus buffer exercises the resume offsets;
"." and ".." are listed as natively (ls -a).
"""

from __future__ import annotations

import os
from pathlib import Path

from helpers.agents import UserAgent


def _fill(d: Path, count: int) -> None:
    d.mkdir()
    d.chmod(0o755)
    for i in range(count):
        (d / f"entry-with-a-longish-name-{i:05d}").touch()
    (d / "sub").mkdir()


def test_listing_matches_native(native: Path, backing: Path, mount_credfs,
                                agents: dict[str, UserAgent]) -> None:
    for root in (native, backing):
        _fill(root / "big", 3000)
        _fill(root / "small", 2)
    m = mount_credfs()
    for who in ("alice", "root"):
        for d in ("big", "small", "big/sub", "."):
            want = agents[who].do("getdents_names", str(native / d))
            got = agents[who].do("getdents_names", os.path.join(m.mountpoint, d))
            assert got == want, (who, d)
            assert want[1][:2] == [".", ".."]
