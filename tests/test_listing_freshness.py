"""A listing shows the directory as it was at some time since the opendir
(readdir(3): names there at opendir must appear), also while another opener's
pass over the same directory is in flight in the daemon. A later opener takes
that pass only when the directory has not changed since it began (passes.py):
a pass already reading may predate the later opener's opendir or rewinddir,
which the daemon never hears of (see test_review23).

The daemon's passes are held at will: a fanotify group of the test's own
asks permission for every read of the backing directory (FAN_ACCESS_PERM,
which getdents raises before it reads), and answers the daemon's only when
let. The directory is large enough to be read by a worker, so a held pass
leaves the daemon free to serve the second opener.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
from helpers.agents import UserAgent
from helpers.mounts import CredfsMount

from credfs import listing, passes

pytestmark = pytest.mark.skipif(
    not hasattr(pyfuse3, "readdir_reply_packed"),
    reason="stock pyfuse3: listings are not packed (scripts/pyfuse3-readpack.patch)")

TIMEOUT = 15.0
# Long names: the directory outgrows listing.INLINE_MAX_BYTES, read by a worker.
FILES = [f"file-with-a-name-long-enough-{i:05d}" for i in range(1500)]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]
FAN_CLASS_CONTENT, FAN_CLOEXEC, FAN_NONBLOCK = 0x4, 0x1, 0x2
FAN_MARK_ADD, FAN_ACCESS_PERM, FAN_ONDIR, FAN_ALLOW = 0x1, 0x20000, 0x40000000, 0x1
_EVENT = struct.Struct("=IBBHQii")  # fanotify_event_metadata


class ReadGate:
    """Holds the reads of one directory by one process until released; other
    readers go through at once. Counts the reads it held."""

    def __init__(self, directory: Path, pid: int) -> None:
        self.group = _libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK,
                                         os.O_RDONLY)
        if self.group < 0:
            pytest.skip(f"no fanotify permission events here: "
                        f"{os.strerror(ctypes.get_errno())}")
        if _libc.fanotify_mark(self.group, FAN_MARK_ADD, FAN_ACCESS_PERM | FAN_ONDIR, -1,
                               os.fsencode(directory)) < 0:
            os.close(self.group)
            pytest.skip(f"cannot mark {directory}: {os.strerror(ctypes.get_errno())}")
        self.pid = pid
        self.holding = True
        self.held: list[int] = []  # event fds waiting for an answer
        self.count = 0  # reads held so far
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _answer(self, fd: int) -> None:
        os.write(self.group, struct.pack("=iI", fd, FAN_ALLOW))
        os.close(fd)

    def _serve(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.group], [], [], 0.05)
            if not ready:
                continue
            try:
                buf = os.read(self.group, 4096)
            except BlockingIOError:
                continue
            at = 0
            while at < len(buf):
                length, _v, _r, _m, _mask, fd, pid = _EVENT.unpack_from(buf, at)
                at += length
                with self.lock:
                    if self.holding and pid == self.pid and self._hold():
                        self.held.append(fd)
                        self.count += 1
                        continue
                self._answer(fd)

    def _hold(self) -> bool:
        """Hold this read of the process (called under the lock)?"""
        return True

    def wait_held(self, n: int, timeout: float = TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while self.count < n:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def release(self) -> None:
        with self.lock:
            self.holding = False
            held, self.held = self.held, []
        for fd in held:
            self._answer(fd)

    def close(self) -> None:
        self.release()
        self.stop.set()
        self.thread.join(TIMEOUT)
        os.close(self.group)


class Lister(threading.Thread):
    """Lists an open directory (os.listdir of its descriptor) in a thread."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.names: set[str] | OSError | None = None

    def run(self) -> None:
        try:
            self.names = set(os.listdir(self.fd))
        except OSError as exc:
            self.names = exc


def _logged(mount: CredfsMount, text: str, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while text not in mount.log:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def settle(d: Path) -> None:
    """Wait until a later change must alter the directory's status, so that
    its passes may be shared (passes.settled)."""
    st = os.stat(d)
    while not passes.settled(st, passes.clock_ns()):
        time.sleep(0.01)


def large_dir(backing: Path) -> Path:
    """backing/d with FILES: read by a worker, and settled (its pass offered)."""
    d = backing / "d"
    d.mkdir()
    for name in FILES:
        (d / name).touch()
    assert os.stat(d).st_size > listing.INLINE_MAX_BYTES
    settle(d)
    return d


@pytest.fixture
def setup(backing: Path, mnt: Path, mount_credfs: Callable[..., CredfsMount]
          ) -> Iterator[tuple[ReadGate, Path, Path, CredfsMount]]:
    d = large_dir(backing)
    m = mount_credfs("--log-level", "debug")
    assert m.pid is not None
    gate = ReadGate(d, m.pid)
    try:
        yield gate, d, mnt / "d", m
    finally:
        gate.close()


def _listers_done(gate: ReadGate, listers: list[Lister]) -> None:
    gate.release()
    for t in listers:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in listers), "a listing did not end once let"


def _two_passes(gate: ReadGate, first_fd: int, second: Callable[[], int]) -> list[Lister]:
    """Lists first_fd until its pass is held, then the directory second()
    opens: the second lister must get a pass of its own (the gate holds two).
    Both are let go, waited for and closed; their listers are returned."""
    fds = [first_fd]
    listers = [Lister(first_fd)]
    try:
        listers[0].start()
        assert gate.wait_held(1), "the first listing never read the backing directory"
        fds.append(second())
        listers.append(Lister(fds[1]))
        listers[1].start()
        assert gate.wait_held(2), "the second opener took the first one's pass"
    finally:
        _listers_done(gate, listers)
        for fd in fds:
            os.close(fd)
    return listers


def test_a_pass_in_flight_does_not_stand_in_for_a_later_opendir(
        setup: tuple[ReadGate, Path, Path, CredfsMount]) -> None:
    gate, direct, via, _mount = setup

    def second() -> int:
        (direct / "made").touch()
        return os.open(via, os.O_RDONLY | os.O_DIRECTORY)  # after the pass started

    listers = _two_passes(gate, os.open(via, os.O_RDONLY | os.O_DIRECTORY), second)
    b = listers[1].names
    # "made" was there before the second opendir: its listing must show it.
    assert isinstance(b, set) and b == set(FILES) | {"made"}, b


def test_openers_of_an_unchanged_directory_share_one_pass(
        setup: tuple[ReadGate, Path, Path, CredfsMount],
        make_agent: Callable[..., UserAgent]) -> None:
    """Two users listing one directory at once: the second takes the first's
    pass (the daemon reads the directory once) and both get the native listing."""
    gate, direct, via, mount = setup
    other = make_agent(2001, 2001, [])
    fd = os.open(via, os.O_RDONLY | os.O_DIRECTORY)
    first = Lister(fd)
    second: list[list[str]] = []
    later = threading.Thread(target=lambda: second.append(other.call("listdir", str(via))),
                             daemon=True)
    try:
        first.start()
        assert gate.wait_held(1), "the first listing never read the backing directory"
        later.start()
        # The second lister waits for the held pass instead of reading itself.
        assert not gate.wait_held(2, timeout=1.0), "the second opener read the directory again"
        assert later.is_alive()
    finally:
        _listers_done(gate, [first])
        later.join(TIMEOUT)
        os.close(fd)
    assert not later.is_alive(), "the second listing did not end once let"
    assert _logged(mount, "takes the pass of handle"), "the daemon logged no shared pass"
    native = set(os.listdir(direct))
    assert first.names == native
    assert second and set(second[0]) == native


def test_a_pass_over_a_directory_changed_just_before_is_not_shared(
        setup: tuple[ReadGate, Path, Path, CredfsMount]) -> None:
    """A directory whose times are not yet older than a clock tick (here in
    the future) could change again without its status changing: its pass is
    its opener's alone, though nothing changes while it is held."""
    gate, direct, via, _mount = setup
    future = time.time() + 3600
    os.utime(direct, (future, future))
    listers = _two_passes(gate, os.open(via, os.O_RDONLY | os.O_DIRECTORY),
                          lambda: os.open(via, os.O_RDONLY | os.O_DIRECTORY))
    native = set(os.listdir(direct))
    assert [t.names for t in listers] == [native, native]
