"""More files in use than the daemon's descriptor limit allows (pressure.py):
a walk over them works through the mount as it does natively, because the
daemon asks the kernel to forget old entries before it runs out.

The daemon is started under `prlimit --nofile=LIMIT:LIMIT`, so that a few
thousand files are more than it may hold.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.agents import UserAgent
from helpers.mounts import CredfsMount

MountFactory = Callable[..., CredfsMount]

LIMIT = 1200
FILES = 3000


class LowFdMount(CredfsMount):
    @property
    def argv(self) -> list[str]:
        return ["prlimit", f"--nofile={LIMIT}:{LIMIT}", "--", *super().argv]


DIRS = 30  # FILES spread over DIRS directories, walked one after the other


def _name(i: int) -> str:
    return f"many/d{i % DIRS:02d}/f{i:05d}"


def _fill(root: Path) -> None:
    for d in range(DIRS):
        p = root / "many" / f"d{d:02d}"
        p.mkdir(parents=True)
        p.chmod(0o755)
    (root / "many").chmod(0o755)
    for i in range(FILES):
        (root / _name(i)).write_bytes(b"%d" % i)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_walk_over_more_files_than_descriptors(
        backing: Path, native: Path, mnt: Path, mount_credfs: MountFactory,
        agents: dict[str, UserAgent]) -> None:
    """alice walks a tree of FILES files in DIRS directories, as find does
    (directory by directory), stat'ing each file, twice; reads every 7th file;
    lists each directory with attributes (ls -l): every call gives what it
    gives natively (no EMFILE), and the daemon never holds more descriptors
    than its limit."""
    _fill(backing)
    _fill(native)
    m = mount_credfs(kind=LowFdMount)
    assert m.pid is not None
    if f"(RLIMIT_NOFILE {LIMIT})" not in m.start_line():
        pytest.skip("the daemon raised its descriptor limit (CAP_SYS_RESOURCE): "
                    f"{m.start_line()}")
    alice = agents["alice"]
    for _ in range(2):
        for top in (native, mnt):
            paths = [os.fspath(top / _name(i))
                     for i in sorted(range(FILES), key=lambda i: (i % DIRS, i))]
            got = alice.call("lstat_each", paths, timeout=300)
            if top == native:
                expected = got
                assert all(kind == "ok" for kind, _v in expected)
            else:
                assert got == expected
        assert alice.call("read_each", [os.fspath(mnt / _name(i))
                                        for i in range(0, FILES, 7)], timeout=300) == \
            alice.call("read_each", [os.fspath(native / _name(i))
                                     for i in range(0, FILES, 7)], timeout=300)
        for d in range(DIRS):
            sub = f"many/d{d:02d}"
            assert alice.call("listdir_stat", os.fspath(mnt / sub), timeout=300) == \
                alice.call("listdir_stat", os.fspath(native / sub), timeout=300)
        assert _fds(m.pid) <= LIMIT
    assert "asking the kernel to forget the oldest" in m.log
    assert not re.search(r"EMFILE|Too many open files|ERROR|Traceback", m.log), m.log
