"""review23: a listing against rewinddir, with another opener's pass in flight.

A rewinddir (or seekdir(0)) is an lseek on the FUSE file: the kernel does not
tell the daemon. After it, POSIX wants the listing to show the directory's
current state, as a new opendir would. CPython's os.listdir(fd) and
os.scandir(fd) rewind before they read, so this is the common way to list an
already open directory. It failed when credfs let a listing take a pass
another opener had started, whatever had changed since. A pass is taken now
only when the directory's status shows no change since it began (passes.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
from helpers.mounts import CredfsMount
from test_listing_freshness import FILES, TIMEOUT, Lister, ReadGate, settle

from credfs import listing

pytestmark = pytest.mark.skipif(
    not hasattr(pyfuse3, "readdir_reply_packed"),
    reason="stock pyfuse3: listings are not packed (scripts/pyfuse3-readpack.patch)")


SKIP = 1  # reads of the daemon let through before the gate holds


class SecondReadGate(ReadGate):
    """A ReadGate that lets the first read of the daemon through and holds
    the later ones: the pass has read its first chunk and is still running."""

    def __init__(self, directory: Path, pid: int) -> None:
        self.passed = 0
        super().__init__(directory, pid)

    def _hold(self) -> bool:
        if self.passed >= SKIP:
            return True
        self.passed += 1
        return False


def _early_name(d: Path) -> str:
    """A new name the backing directory lists among its first (hash order
    on ext4): in the part of the directory a pass reads with its first call."""
    for i in range(1000):
        name = f"late-{i}"
        (d / name).touch()
        with os.scandir(d) as it:
            early = [e.name for _, e in zip(range(100), it, strict=False)]
        os.unlink(d / name)
        if name in early:
            return name
    pytest.skip("no name lists early here (not a hash-ordered directory)")


def test_a_rewind_before_the_first_read_shows_the_current_directory(
        backing: Path, mnt: Path, mount_credfs: Callable[..., CredfsMount]) -> None:
    d = backing / "d"
    d.mkdir()
    for name in FILES:
        (d / name).touch()
    assert os.stat(d).st_size > listing.INLINE_MAX_BYTES
    victim = _early_name(d)
    settle(d)  # its pass is offered to later openers: only the change may stop them
    m = mount_credfs("--log-level", "debug")
    assert m.pid is not None
    via = mnt / "d"
    gate = SecondReadGate(d, m.pid)
    fds: list[int] = []
    listers: list[threading.Thread] = []
    try:
        fds.append(os.open(via, os.O_RDONLY | os.O_DIRECTORY))  # opened, not read yet
        fds.append(os.open(via, os.O_RDONLY | os.O_DIRECTORY))
        listers.append(Lister(fds[1]))
        listers[0].start()
        # The other opener's pass has read its first chunk (the victim in it)
        # and waits for its second.
        assert gate.wait_held(1), "the other listing never read the backing directory"
        # Made behind the mount's back (through it, the create would wait for
        # the held listing: the kernel holds the directory's lock shared while
        # a READDIR is out), where the held pass has already read.
        (d / victim).touch()
        # os.listdir(fd) rewinds, then reads: the state now, with the new name.
        listers.append(Lister(fds[0]))
        listers[1].start()
        listers[1].join(1.0)  # either it joined the held pass or it is done
    finally:
        gate.close()
        for t in listers:
            t.join(TIMEOUT)
        for fd in fds:
            os.close(fd)
    assert not any(t.is_alive() for t in listers), "a listing did not end once let"
    native = set(os.listdir(d))  # the kernel's answer: nothing changed since the rewind
    assert victim in native
    names = listers[1].names
    assert isinstance(names, set), names
    assert victim in names, "a name made before rewinddir was not listed after it"
    assert names == native
