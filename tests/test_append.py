"""O_APPEND changed with fcntl(F_SETFL) after the open: each write appends or
not as the caller's file says at that write, as natively.

Through the daemon (`--passthrough never`) exactly: the patched pyfuse3 hands
each write the file's flags (scripts/pyfuse3-writeflags.patch). Through
passthrough, a file opened with O_APPEND keeps appending after F_SETFL clears
it: the kernel's own backing file keeps the open's flags (the README's known
limit; strict xfail, so that a kernel that passes F_SETFL on is noticed).
The oracle is the native twin: same steps, same offsets, same bytes.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
from helpers.agents import UserAgent
from helpers.mounts import CredfsMount
from helpers.trees import Node, build_tree

MountFactory = Callable[..., CredfsMount]

pytestmark = pytest.mark.skipif(
    not getattr(pyfuse3, "WRITE_FLAGS", False),
    reason="pyfuse3 built without write flags (scripts/build-pyfuse3.sh could not run)")

_DATA = b"0123456789"
_STEPS: dict[str, tuple[int, list[list[Any]]]] = {
    # opened appending, then cleared: the second write lands at offset 0
    "cleared": (os.O_WRONLY | os.O_APPEND,
                [["write", b"AB"], ["append", False], ["seek", 0], ["write", b"xy"]]),
    # opened at offsets, then set: the second write lands at the end
    "set": (os.O_WRONLY,
            [["seek", 2], ["write", b"ab"], ["append", True], ["seek", 0], ["write", b"CD"]]),
    # set and cleared again on one open file
    "both": (os.O_RDWR,
             [["append", True], ["write", b"E"], ["append", False], ["seek", 1],
              ["write", b"f"], ["append", True], ["write", b"G"]]),
}


def _tree() -> list[Node]:
    return [Node("f", "f", 0o666, uid=2001, gid=2001, data=_DATA)]


@pytest.mark.parametrize("passthrough", ["never", "auto"])
@pytest.mark.parametrize("case", sorted(_STEPS))
def test_append_set_or_cleared_after_open_counts_per_write(
        case: str, passthrough: str, request: pytest.FixtureRequest,
        mount_credfs: MountFactory, backing: Path, native: Path, mnt: Path,
        agents: dict[str, UserAgent]) -> None:
    if passthrough == "auto" and case == "cleared":
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="known limit (README, Passthrough): the kernel's backing "
            "file keeps the open's O_APPEND; F_SETFL never reaches it"))
    build_tree(backing, _tree())
    build_tree(native, _tree())
    mount_credfs("--passthrough", passthrough)
    flags, steps = _STEPS[case]
    alice = agents["alice"]
    got = alice.call("writes_with_append_toggled", os.fspath(mnt / "f"), flags, steps)
    want = alice.call("writes_with_append_toggled", os.fspath(native / "f"), flags, steps)
    assert (backing / "f").read_bytes() == (native / "f").read_bytes()
    assert got == want


def _append_only(path: Path) -> bool:
    """chattr +a path; False where the filesystem or this process cannot."""
    r = subprocess.run(["chattr", "+a", os.fspath(path)], capture_output=True, timeout=30)
    return r.returncode == 0


def test_an_append_only_file_stays_appended_to(
        mount_credfs: MountFactory, backing: Path, native: Path, mnt: Path,
        agents: dict[str, UserAgent]) -> None:
    """A file with the append-only attribute: opening it to write without
    O_APPEND is refused (EPERM) as natively, and writes through an O_APPEND
    open append even after F_SETFL cleared O_APPEND on the caller's file (the
    kernel's FUSE file does not know the attribute and lets that fcntl pass;
    the backing descriptor keeps O_APPEND, which the backing file system
    would not let go)."""
    build_tree(backing, _tree())
    build_tree(native, _tree())
    try:  # the attribute comes off again whatever happens: the tree must be removable
        if not (_append_only(backing / "f") and _append_only(native / "f")):
            pytest.skip("chattr +a not supported here")
        mount_credfs("--passthrough", "never")
        alice = agents["alice"]
        for base in (mnt, native):
            assert alice.do("open_close", os.fspath(base / "f"), os.O_WRONLY) == \
                ("err", errno.EPERM), base
        alice.call("writes_with_append_toggled", os.fspath(mnt / "f"), os.O_WRONLY | os.O_APPEND,
                   [["write", b"AB"], ["append", False], ["seek", 0], ["write", b"xy"]])
        assert (backing / "f").read_bytes() == _DATA + b"ABxy"
    finally:
        for base in (backing, native):
            subprocess.run(["chattr", "-a", os.fspath(base / "f")], capture_output=True,
                           timeout=30)
