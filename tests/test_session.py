"""The daemon's request loop (scripts/pyfuse3-session.patch) ends cleanly when
the mount goes away while clients keep it busy.

With the session patch, the task that reads requests answers those that need
no wait itself and reads the next one at once from a non-blocking FUSE fd;
a request that waits for a worker is handed over to another task. Several
client processes here keep both kinds in flight (lookups, creates, unlinks
done on the event loop; opens of existing files, reads without passthrough
and fsyncs done by workers) when the daemon is signalled or the mount is
lazily unmounted: the daemon must exit on its own, in time, without a
traceback, and leave no mount. (Idle mounts: tests/test_cli.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.mounts import CredfsMount, is_mounted

EXIT_TIMEOUT = 15.0
CLIENTS = 4
CLIENT_LIMIT = 60.0  # a client ends by itself after this long, whatever happens

# Each client works in its own directory until the mount is gone (any error
# other than the ones a vanishing mount gives is printed and ends it non-zero).
_CLIENT = r"""
import errno, os, sys, time
top, tag, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
gone = (errno.ENOTCONN, errno.ENOENT, errno.ENODEV, errno.ECONNABORTED)
deadline = time.monotonic() + limit
d = os.path.join(top, "c" + tag)
try:
    os.mkdir(d)
    with open(os.path.join(d, "keep"), "wb") as f:
        f.write(b"x" * 4096)
    print("ready", flush=True)
    i = 0
    while time.monotonic() < deadline:
        p = os.path.join(d, "f%d" % (i % 50))
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"y")
        os.fsync(fd)
        os.close(fd)
        os.stat(p)
        with open(os.path.join(d, "keep"), "rb") as f:
            f.read()
        os.unlink(p)
        i += 1
except OSError as e:
    if e.errno not in gone:
        print("client error:", e, flush=True)
        sys.exit(1)
"""


@pytest.fixture
def busy(mnt: Path) -> Iterator[Callable[[], list[subprocess.Popen[str]]]]:
    """busy() -> client processes hammering mnt (killed and reaped at teardown)."""
    procs: list[subprocess.Popen[str]] = []

    def start() -> list[subprocess.Popen[str]]:
        for n in range(CLIENTS):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _CLIENT, str(mnt), str(n), str(CLIENT_LIMIT)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True))
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()  # bounded: the client's own limit
            assert line == "ready\n", f"client could not start: {line!r}"
        time.sleep(1.0)  # let them get going
        for p in procs:
            assert p.poll() is None, "a client ended while the mount was there"
        return procs

    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=CLIENT_LIMIT)
            if p.stdout:
                p.stdout.close()


def _ends_cleanly(m: CredfsMount, mnt: Path, clients: list[subprocess.Popen[str]]) -> int:
    code = m.wait(EXIT_TIMEOUT)
    assert code is not None, f"daemon still running {EXIT_TIMEOUT} s later; log:\n{m.log}"
    assert not is_mounted(mnt)
    assert "Traceback" not in m.log, m.log
    for p in clients:
        try:
            out, _ = p.communicate(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail("a client still runs after the mount went away")
        assert p.returncode == 0, out
    return code


@pytest.mark.parametrize("passthrough", ["auto", "never"])
def test_sigterm_while_busy_ends_daemon(mount_credfs: Callable[..., CredfsMount], mnt: Path,
                                        busy: Callable[[], list[subprocess.Popen[str]]],
                                        passthrough: str) -> None:
    m = mount_credfs("--passthrough", passthrough)
    clients = busy()
    m.signal(signal.SIGTERM)
    assert _ends_cleanly(m, mnt, clients) == 0, m.log


def test_lazy_unmount_while_busy_ends_daemon(mount_credfs: Callable[..., CredfsMount],
                                             mnt: Path,
                                             busy: Callable[[], list[subprocess.Popen[str]]]
                                             ) -> None:
    m = mount_credfs()
    clients = busy()
    r = subprocess.run(["umount", "-l", str(mnt)], capture_output=True, text=True, timeout=15,
                       stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, r.stderr
    _ends_cleanly(m, mnt, clients)


@pytest.fixture
def fusectl() -> Iterator[Path]:
    """/sys/fs/fuse/connections, mounted for the test if it was not."""
    p = Path("/sys/fs/fuse/connections")
    here = not is_mounted(p)
    if here:
        r = subprocess.run(["mount", "-t", "fusectl", "fusectl", os.fspath(p)],
                           capture_output=True, text=True, timeout=15, check=False)
        if r.returncode != 0:
            pytest.skip(f"no fusectl: {r.stderr.strip()}")
    try:
        yield p
    finally:
        if here:
            subprocess.run(["umount", os.fspath(p)], capture_output=True, timeout=15,
                           check=False)


def test_aborted_connection_ends_daemon(mount_credfs: Callable[..., CredfsMount], mnt: Path,
                                        busy: Callable[[], list[subprocess.Popen[str]]],
                                        fusectl: Path) -> None:
    """An administrator's last resort for a hung mount, the connection's abort
    file, while clients are busy: requests in flight can no longer be answered
    and the next read of /dev/fuse fails. The daemon still unmounts and exits,
    without a traceback."""
    m = mount_credfs()
    clients = busy()
    (fusectl / str(os.minor(os.stat(mnt).st_dev)) / "abort").write_text("1")
    _ends_cleanly(m, mnt, clients)
