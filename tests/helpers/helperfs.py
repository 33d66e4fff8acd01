"""The small FUSE filesystems of tests/helpers (pollfs, stallfs, slowdirfs,
recordfs, enosysfs), each run as a script: `python SCRIPT MOUNTPOINT ARGS...`
that prints "ready" once it serves, and ends (unmounting) on SIGTERM. Use the
`helper_fs` fixture (conftest.py), which ends every one it started.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from .mounts import is_mounted, kill_and_unmount

TIMEOUT = 15.0


class HelperFs:
    def __init__(self, proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
        self.proc = proc
        self.mountpoint = mountpoint
        self._pending = b""

    def line(self, timeout: float = TIMEOUT) -> str:
        """The next line it printed, or "" when none came within timeout
        (read from the pipe itself: a buffered reader could hold a line that
        select no longer reports)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                return ""
            chunk = os.read(fd, 4096)
            if not chunk:
                return ""
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode().strip()

    def expect(self, want: str, timeout: float = TIMEOUT) -> bool:
        """Read lines until want (True), or until none comes within timeout."""
        while (got := self.line(timeout)) != want:
            if not got:
                return False
        return True

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self) -> None:
        kill_and_unmount(self.mountpoint, [self.proc.pid])
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_helper_fs(script: str, mountpoint: Path, *args: str) -> HelperFs:
    """script serving at mountpoint, ready and mounted (ended again if not)."""
    proc = subprocess.Popen([sys.executable, script, str(mountpoint), *args],
                            stdout=subprocess.PIPE)
    fs = HelperFs(proc, mountpoint)
    try:
        assert fs.line() == "ready", f"{Path(script).name} did not start"
        deadline = time.monotonic() + TIMEOUT
        while not is_mounted(mountpoint):
            assert time.monotonic() < deadline, f"{Path(script).name} did not mount"
            time.sleep(0.02)
    except BaseException:
        fs.signal(signal.SIGTERM)
        fs.stop()
        raise
    return fs
