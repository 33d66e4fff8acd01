"""Two openers of one directory listing it at once share one pass over it
(Operations._packed_pass), and only when that is a listing POSIX allows: the
pass started after the second opener's opendir, so it shows the directory as
it was at some time since (readdir(3): names made or removed after opendir
may or may not appear; names there at opendir must).

The backing directory is a filesystem mounted inside credfs's source whose
passes over its root wait until let, each taking the names as they are when
it starts (helpers/listfs.py). credfs reads such a directory in a worker, so
its pass waits there while the daemon serves the second opener.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
from helpers import listfs
from helpers.mounts import CredfsMount, is_mounted, kill_and_unmount

pytestmark = pytest.mark.skipif(
    not hasattr(pyfuse3, "readdir_reply_packed") or not getattr(pyfuse3, "PARALLEL_DIROPS", 0),
    reason="stock pyfuse3: listings are not packed (scripts/pyfuse3-readpack.patch), and "
           "helpers/listfs.py cannot have two passes wait at once (pyfuse3-dirops.patch)")

TIMEOUT = 15.0
JOINED = "joining the pass another opener started"


class ListFs:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def expect(self, line: str, timeout: float = TIMEOUT) -> bool:
        """Read lines until `line` (True) or until none comes for timeout."""
        assert self.proc.stdout is not None
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                return False
            got = self.proc.stdout.readline()
            if not got:
                return False
            if got.strip() == line:
                return True

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)


@pytest.fixture
def serve_listfs() -> Iterator[Callable[[Path], ListFs]]:
    started: list[tuple[subprocess.Popen[str], Path]] = []

    def start(mnt: Path) -> ListFs:
        proc = subprocess.Popen([sys.executable, listfs.__file__, str(mnt)],
                                stdout=subprocess.PIPE, text=True)
        started.append((proc, mnt))
        fs = ListFs(proc)
        assert fs.expect("ready"), "listfs did not start"
        deadline = time.monotonic() + TIMEOUT
        while not is_mounted(mnt):
            assert time.monotonic() < deadline, "listfs did not mount"
            time.sleep(0.02)
        return fs

    yield start
    for proc, mnt in started:
        kill_and_unmount(mnt, [proc.pid])
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


@pytest.fixture
def setup(backing: Path, mnt: Path, serve_listfs: Callable[[Path], ListFs],
          mount_credfs: Callable[..., CredfsMount]) -> tuple[ListFs, Path, CredfsMount]:
    (backing / "m").mkdir()
    fs = serve_listfs(backing / "m")
    m = mount_credfs("--log-level", "debug")
    assert sorted(os.listdir(mnt / "m")) == sorted(n.decode() for n in listfs.NAMES)
    fs.signal(signal.SIGUSR2)
    assert fs.expect("armed")
    return fs, mnt / "m", m


def _run_listers(fs: ListFs, steps: Callable[[], None], listers: list[Lister]) -> None:
    """steps(), then let every pass answer and wait for the listers (bounded)."""
    try:
        steps()
    finally:
        fs.signal(signal.SIGUSR1)
        for t in listers:
            t.join(TIMEOUT)
    assert not any(t.is_alive() for t in listers), "a listing did not end once let"


def test_a_pass_started_before_an_opendir_is_not_shared_with_it(
        setup: tuple[ListFs, Path, CredfsMount]) -> None:
    fs, via, m = setup
    fds = [os.open(via, os.O_RDONLY | os.O_DIRECTORY)]
    listers = [Lister(fds[0])]

    def steps() -> None:
        listers[0].start()
        assert fs.expect("stalled 1"), "the first listing never reached the backing"
        fs.signal(signal.SIGHUP)
        assert fs.expect("made")
        fds.append(os.open(via, os.O_RDONLY | os.O_DIRECTORY))  # after the pass started
        listers.append(Lister(fds[1]))
        listers[1].start()
        assert fs.expect("stalled 2"), \
            "the second opener took a pass that started before its opendir"

    try:
        _run_listers(fs, steps, listers)
    finally:
        for fd in fds:
            os.close(fd)
    a, b = (t.names for t in listers)
    assert isinstance(a, set) and "made" not in a, a
    # "made" was there before the second opendir: its listing must show it.
    assert isinstance(b, set) and "made" in b, b
    assert JOINED not in m.log


def test_openers_listing_at_once_share_one_pass(
        setup: tuple[ListFs, Path, CredfsMount]) -> None:
    fs, via, m = setup
    fds = [os.open(via, os.O_RDONLY | os.O_DIRECTORY) for _ in range(2)]
    a, b = Lister(fds[0]), Lister(fds[1])
    try:
        def steps() -> None:
            a.start()
            assert fs.expect("stalled 1"), "the first listing never reached the backing"
            # Made after both opendirs: either listing may or may not show it.
            fs.signal(signal.SIGHUP)
            assert fs.expect("made")
            b.start()
            assert _logged(m, JOINED), "the second listing did not take the first's pass"
        _run_listers(fs, steps, [a, b])
    finally:
        for fd in fds:
            os.close(fd)
    assert isinstance(a.names, set) and a.names == b.names, (a.names, b.names)
    assert "made" not in a.names  # one pass, started before it was made
    assert a.names == {n.decode() for n in listfs.NAMES}
