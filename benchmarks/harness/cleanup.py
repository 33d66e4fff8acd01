"""Leave nothing behind: a clean-up stack, signal handling, and a sweep for
what a run that was killed (SIGKILL, power cut of the shell) left.

Every run lives in its own directory /tmp/credfs-compare.XXXXXX holding an
`owner` file (pid and start time). Everything a run creates (tmpfs, loop
device, ext4, FUSE mounts, daemons whose command line names a path inside it)
can be found again from that directory, so a later run can tear down a dead
run's leftovers without touching a live run's.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from types import FrameType

from . import ramdisk, sysutil

RUN_PREFIX = "credfs-compare."
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A signal asked us to stop; raised in the main thread so finally blocks run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


def catch_signals() -> None:
    for s in _SIGNALS:
        signal.signal(s, _raise)


def ignore_signals() -> None:
    """While cleaning up: a second Ctrl-C must not cut the clean-up short
    (every step in it is bounded, so it ends on its own)."""
    for s in _SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def warn(msg: str) -> None:
    sys.stderr.write(f"compare: {msg}\n")


class Cleanup:
    """A stack of undo actions, run last-in first-out; each failure is reported
    and the rest still run."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, str, Callable[[], object]]] = []
        self._next = 0

    def push(self, what: str, fn: Callable[[], object]) -> int:
        self._next += 1
        self._stack.append((self._next, what, fn))
        return self._next

    def release(self, token: int) -> None:
        """Run one action now (e.g. stop one daemon early) and forget it."""
        for i, (t, what, fn) in enumerate(self._stack):
            if t == token:
                del self._stack[i]
                self._run(what, fn)
                return

    def run_all(self) -> None:
        while self._stack:
            _t, what, fn = self._stack.pop()
            self._run(what, fn)

    @staticmethod
    def _run(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as e:  # keep going: the next undo may still succeed
            warn(f"clean-up: {what}: {e}")


def new_run_dir() -> str:
    """A fresh run directory, 0755 so that the benchmark uids can reach inside."""
    d = tempfile.mkdtemp(prefix=RUN_PREFIX, dir="/tmp")
    os.chmod(d, 0o755)
    with open(os.path.join(d, "owner"), "w") as f:
        f.write(f"{os.getpid()} {sysutil.start_time(os.getpid())}\n")
    return d


def _owner_alive(run_dir: str) -> bool:
    try:
        with open(os.path.join(run_dir, "owner")) as f:
            pid_s, start_s = f.read().split()
    except (OSError, ValueError):
        # No owner file yet: a run that is just starting, or one that died
        # right after mkdtemp. Only the second is old.
        with contextlib.suppress(OSError):
            return time.time() - os.stat(run_dir).st_mtime < 60
        return False
    pid = int(pid_s)
    return sysutil.alive(pid) and str(sysutil.start_time(pid)) == start_s


def tear_down(run_dir: str) -> list[str]:
    """Remove everything below run_dir: processes, mounts, loop devices, files.

    Returns what could not be removed (empty when all is gone).
    """
    # Daemons and fio name paths inside run_dir on their command lines.
    left = [f"process {p}" for p in sysutil.terminate(sysutil.pids_mentioning(run_dir), 10)]
    # Loop devices first, while their image's tmpfs is still attached and the
    # kernel shows the image's full path; detach them once the ext4 on them is
    # unmounted, and only then the tmpfs.
    loops = sysutil.loop_devices_under(run_dir)
    ram = os.path.join(run_dir, ramdisk.RAM_DIR)
    for m in sysutil.mounts_under(run_dir):
        if m.mountpoint == ram:
            continue
        if m.fstype.startswith("fuse"):
            sysutil.abort_fuse(m)
        if not sysutil.lazy_umount(m.mountpoint):
            left.append(f"mount {m.mountpoint}")
    for dev in loops + orphan_loops():
        sysutil.detach_loop(dev)
    if not sysutil.lazy_umount(ram):
        left.append(f"mount {ram}")
    # Never remove files through something still mounted below.
    if sysutil.mounts_under(run_dir):
        left.append(f"directory {run_dir} (mounts below it)")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        if os.path.exists(run_dir):
            left.append(f"directory {run_dir}")
    # A busy loop device is only marked for detaching; report it if it stays.
    deadline = time.monotonic() + 10
    while sysutil.loop_devices_under(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    left += [f"loop device {d}" for d in sysutil.loop_devices_under(run_dir)]
    return left


def orphan_loops() -> list[str]:
    """Loop devices on a compare image whose tmpfs is already detached: no
    live run has those (its tmpfs stays attached until its loop is gone)."""
    return sysutil.loop_devices(lambda backing: backing in (f"/{ramdisk.IMAGE}",
                                                           f"/{ramdisk.IMAGE} (deleted)"))


def sweep_dead_runs() -> list[str]:
    """Tear down run directories whose owner is gone; returns the ones swept."""
    swept = []
    for dev in orphan_loops():
        sysutil.detach_loop(dev)
    for d in sorted(glob.glob(f"/tmp/{RUN_PREFIX}*")):
        if os.path.isdir(d) and not os.path.islink(d) and not _owner_alive(d):
            left = tear_down(d)
            swept.append(d)
            for what in left:
                warn(f"left over from a dead run, could not remove: {what}")
    return swept
