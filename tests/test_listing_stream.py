"""A large directory's listing is answered while the daemon still reads it.

The daemon reads a directory larger than listing.INLINE_MAX_BYTES in a worker,
one getdents64 of 32 KiB at a time, and answers the opener's READDIR requests
with what it has read so far (passes.Pass): the kernel copies one chunk out
while the worker reads the next. Held at its second read (test_review23's
gate), the pass must already have given the lister its first names; let go,
the listing must be the native one, and a failure half way must reach the
lister as an error, not as a short listing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
from helpers.mounts import CredfsMount
from test_listing_freshness import FILES, TIMEOUT, large_dir
from test_review23 import SecondReadGate

pytestmark = pytest.mark.skipif(
    not hasattr(pyfuse3, "readdir_reply_packed"),
    reason="stock pyfuse3: listings are not packed (scripts/pyfuse3-readpack.patch)")


FAN_DENY = 0x2


class FailingSecondReadGate(SecondReadGate):
    """Fails the reads it held (fanotify denies them: EPERM) when let go."""

    def release(self) -> None:
        with self.lock:
            self.holding = False
            held, self.held = self.held, []
        for fd in held:
            os.write(self.group, struct.pack("=iI", fd, FAN_DENY))
            os.close(fd)


class StreamLister(threading.Thread):
    """Lists an open directory name by name, keeping what it got so far."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.names: list[str] = []
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            with os.scandir(self.fd) as it:
                for entry in it:
                    self.names.append(entry.name)
        except OSError as exc:
            self.error = exc


@contextlib.contextmanager
def held_listing(backing: Path, mnt: Path, mount_credfs: Callable[..., CredfsMount],
                 gate_class: type[SecondReadGate]) -> Iterator[tuple[Path, StreamLister]]:
    """A lister of a large directory through a fresh mount, started, whose pass
    the gate holds at its second read; let go (the gate's way) on leaving."""
    d = large_dir(backing)
    m = mount_credfs()
    assert m.pid is not None
    gate = gate_class(d, m.pid)
    fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    lister = StreamLister(fd)
    try:
        lister.start()
        assert gate.wait_held(1), "the pass never came to its second read"
        yield d, lister
    finally:
        gate.close()
        lister.join(TIMEOUT)
        os.close(fd)
    assert not lister.is_alive(), "the listing did not end once let"


def test_a_large_listing_is_answered_before_the_directory_is_read(
        backing: Path, mnt: Path, mount_credfs: Callable[..., CredfsMount]) -> None:
    with held_listing(backing, mnt, mount_credfs, SecondReadGate) as (d, lister):
        deadline = time.monotonic() + TIMEOUT
        while not lister.names and time.monotonic() < deadline:
            time.sleep(0.01)
        early = len(lister.names)
        assert lister.is_alive(), "the listing ended while the pass was held"
    assert early > 0, "no name reached the lister before the pass had read the directory"
    assert lister.error is None
    assert sorted(lister.names) == sorted(os.listdir(d))


def test_a_pass_that_fails_half_way_fails_the_listing(
        backing: Path, mnt: Path, mount_credfs: Callable[..., CredfsMount]) -> None:
    """The names already given stay given; the rest is the error the backing
    read gave (as natively a getdents that fails), not an early end."""
    with held_listing(backing, mnt, mount_credfs, FailingSecondReadGate) as (d, lister):
        pass
    assert isinstance(lister.error, OSError) and lister.error.errno == errno.EPERM, lister.error
    assert 0 < len(lister.names) < len(FILES)
    # The daemon serves on: a new listing is whole.
    assert sorted(os.listdir(mnt / "d")) == sorted(os.listdir(d))


def test_a_rewind_while_the_pass_still_reads_lists_the_whole_directory(
        backing: Path, mnt: Path, mount_credfs: Callable[..., CredfsMount]) -> None:
    """The opener takes a few names, then rewinds (lseek to 0, then
    os.listdir of the same open directory, which reads on from the offset)
    while its first pass is held, after a name was made behind the mount's
    back: the rewound listing shows it, and the new pass does not read the
    directory under the old one's feet (both read through one file offset)."""
    d = large_dir(backing)
    m = mount_credfs()
    assert m.pid is not None
    gate = SecondReadGate(d, m.pid)
    fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    again: list[list[str] | OSError] = []

    def relist() -> None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            again.append(os.listdir(fd))
        except OSError as exc:
            again.append(exc)

    rewinder = threading.Thread(target=relist, daemon=True)
    try:
        it = os.scandir(fd)
        first = next(it).name
        assert gate.wait_held(1), "the pass never came to its second read"
        (d / "made-after").touch()
        rewinder.start()
        rewinder.join(0.5)  # it waits for the held pass, or is done
    finally:
        gate.close()
        rewinder.join(TIMEOUT)
        it.close()
        os.close(fd)
    assert not rewinder.is_alive(), "the listing after the rewind did not end"
    native = sorted(os.listdir(d))
    assert first in native and "made-after" in native
    assert again and not isinstance(again[0], OSError), again
    assert sorted(again[0]) == native
