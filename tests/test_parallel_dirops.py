"""Lookups in one directory are not held up by a slow one (FUSE_PARALLEL_DIROPS;
scripts/pyfuse3-dirops.patch, Operations.enable_parallel_dirops).

Without the flag the kernel holds a mutex of the directory around every
LOOKUP and READDIR it sends: one lookup that waits on a slow backing (here a
name that is the mount point of a filesystem that answers only when let,
helpers/stallfs.py) holds up every other caller's lookup in that directory,
although the daemon is free to answer them. Natively, a lookup of another
name in that directory does not wait either.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
from helpers import stallfs
from helpers.helperfs import HelperFs

pytestmark = pytest.mark.skipif(
    not getattr(pyfuse3, "PARALLEL_DIROPS", False),
    reason="stock pyfuse3: no FUSE_PARALLEL_DIROPS (scripts/pyfuse3-dirops.patch not built)")

# Far longer than a lookup takes on any machine: a lookup still waiting then
# waits on the other one.
LOOKUP_TIMEOUT = 10.0


@pytest.fixture
def serve_stallfs(helper_fs: Callable[..., HelperFs]) -> Callable[[Path], HelperFs]:
    return lambda mnt: helper_fs(stallfs.__file__, mnt)


class Stat(threading.Thread):
    """os.stat(path) in a thread: its result or its error once done."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.result: os.stat_result | OSError | None = None

    def run(self) -> None:
        try:
            self.result = os.stat(self.path)
        except OSError as exc:
            self.result = exc


def lookups_side_by_side(slow_fs: HelperFs, slow_path: Path, other_path: Path
                         ) -> os.stat_result:
    """Stat slow_path (its lookup waits on stallfs), then other_path in the same
    directory meanwhile: other_path's result, asserting it did not wait."""
    slow = Stat(slow_path)
    other = Stat(other_path)
    try:
        slow.start()
        assert slow_fs.line() == "stalled", f"the lookup of {slow_path} never reached stallfs"
        other.start()
        other.join(LOOKUP_TIMEOUT)
        assert not other.is_alive(), \
            f"the lookup of {other_path} waited for {slow_path}'s slow lookup"
        assert slow.is_alive(), "the slow lookup was not slow: the test proves nothing"
    finally:
        slow_fs.signal(signal.SIGUSR1)
        slow.join(LOOKUP_TIMEOUT)
        other.join(LOOKUP_TIMEOUT)
    assert not slow.is_alive(), "the slow lookup did not end once let"
    assert isinstance(slow.result, os.stat_result), slow.result
    assert isinstance(other.result, os.stat_result), other.result
    return other.result


def test_a_slow_lookup_holds_up_no_other_in_its_directory(
        backing: Path, mnt: Path, serve_stallfs: Callable[[Path], HelperFs],
        mount_credfs: Callable[..., object]) -> None:
    d = backing / "d"
    (d / "slow").mkdir(parents=True)
    (d / "other").write_bytes(b"x")
    slow_fs = serve_stallfs(d / "slow")  # its root's attributes come only when let
    # The kernel's own answer first: natively, the other lookup does not wait.
    native = lookups_side_by_side(slow_fs, d / "slow", d / "other")
    mount_credfs()
    through = lookups_side_by_side(slow_fs, mnt / "d" / "slow", mnt / "d" / "other")
    assert (through.st_ino, through.st_size) == (native.st_ino, native.st_size)
