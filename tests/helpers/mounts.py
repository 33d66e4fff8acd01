"""Start and stop a credfs daemon in the foreground, and never leave one behind.

Mount state is read from /proc/self/mountinfo rather than with stat-based
checks (os.path.ismount), because stat on a FUSE mount whose daemon hangs or has
died would hang or fail itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
UMOUNT_TIMEOUT = 10.0


class MountError(RuntimeError):
    """The daemon did not come up; the message carries its log."""


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str  # per-mount options and superblock options, comma-joined


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return field.encode().decode("unicode_escape").encode("latin-1").decode(
        "utf-8", "surrogateescape") if "\\" in field else field


def mounts() -> list[MountEntry]:
    """Every mount in this mount namespace, in mount order."""
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.rstrip("\n").split(" - ", 1)
            lf = left.split(" ")
            fstype, source, super_opts = right.split(" ", 2)
            entries.append(MountEntry(int(lf[0]), _unescape(lf[4]), fstype, _unescape(source),
                                      f"{lf[5]},{super_opts}"))
    return entries


def mounts_at(path: str | os.PathLike[str]) -> list[MountEntry]:
    p = os.path.abspath(path)
    return [m for m in mounts() if m.mountpoint == p]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return bool(mounts_at(path))


def lazy_umount(path: str | os.PathLike[str], keep: frozenset[int] = frozenset(),
                timeout: float = UMOUNT_TIMEOUT) -> None:
    """Detach the mounts stacked on path (umount -l, bounded), best effort.

    Stops at the first mount whose id is in keep (mounts that were there before).
    """
    for _ in range(len(mounts_at(path))):
        top = mounts_at(path)
        if not top or top[-1].mount_id in keep:
            return
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(["umount", "-l", os.fspath(path)], timeout=timeout,
                           stdin=subprocess.DEVNULL, capture_output=True, check=False)


def daemon_pids(mountpoint: str | os.PathLike[str]) -> list[int]:
    """pids of `credfs ... mount ... MOUNTPOINT` processes (daemonized ones included).

    Matching on the exact mountpoint argument keeps this to processes that a test
    started for its own (unique) directory.
    """
    target = os.path.abspath(mountpoint)
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [os.fsdecode(a) for a in argv if a]
        if ("mount" in args and any("credfs" in a for a in args)
                and any(os.path.abspath(a) == target for a in args if a.startswith("/"))):
            found.append(int(entry))
    return found


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_and_unmount(mountpoint: str | os.PathLike[str], pids: list[int] | None = None,
                     grace: float = STOP_TIMEOUT) -> None:
    """SIGTERM the given (or found) daemon pids, SIGKILL after grace, then umount -l."""
    pids = daemon_pids(mountpoint) if pids is None else pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    lazy_umount(mountpoint)


class CredfsMount:
    """`python -m credfs mount SOURCE MOUNTPOINT --foreground *extra_args` for a test.

    Use as a context manager, or call start()/stop(); stop() always runs the full
    clean-up (SIGTERM, SIGKILL after STOP_TIMEOUT, umount -l) and is idempotent.

    caller_caps (default True): add --caller-caps where it applies (caller mode
    and policies), because most tests compare root through credfs with root
    natively; tests of the default (callers' capabilities ignored) pass False.
    """

    def __init__(self, source: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
                 *extra_args: str, log_path: str | os.PathLike[str] | None = None,
                 ready_timeout: float = READY_TIMEOUT,
                 env: dict[str, str] | None = None, caller_caps: bool = True) -> None:
        if caller_caps and "mounter" not in extra_args and "--caller-caps" not in extra_args:
            extra_args = (*extra_args, "--caller-caps")
        self.source = os.path.abspath(source)
        self.mountpoint = os.path.abspath(mountpoint)
        self.extra_args = tuple(extra_args)
        self.log_path = Path(log_path or f"{self.mountpoint}.credfs.log")
        self.ready_timeout = ready_timeout
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._before: frozenset[int] = frozenset()  # mounts at mountpoint before start

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "credfs", "mount", self.source, self.mountpoint,
                "--foreground", *self.extra_args]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def log(self) -> str:
        """Everything the daemon wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start_line(self, timeout: float = 15.0) -> str:
        """The daemon's "credfs: serving ..." line. It can land a moment after
        the mount appears: waited for, bounded."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log.splitlines():
                if "credfs: serving " in line:
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(f"no start line within {timeout}s; log: {self.log}")
            time.sleep(0.05)

    @property
    def entry(self) -> MountEntry | None:
        """The topmost mount at the mountpoint, if any."""
        found = mounts_at(self.mountpoint)
        return found[-1] if found else None

    def start(self) -> CredfsMount:
        if self.proc is not None:
            raise RuntimeError("already started")
        self._before = before = frozenset(m.mount_id for m in mounts_at(self.mountpoint))
        with open(self.log_path, "ab") as log:
            # New session: a Ctrl-C meant for pytest must not reach the daemon
            # before our clean-up does; we signal it by pid ourselves.
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self.env)
        deadline = time.monotonic() + self.ready_timeout
        try:
            while True:
                if "recovered a dead" in self.log:
                    # credfs removed a dead mount that was there before; the new
                    # one may get its freed mount id: nothing before is ours to keep.
                    self._before = before = frozenset()
                if any(m.mount_id not in before and m.fstype.startswith("fuse")
                       for m in mounts_at(self.mountpoint)):
                    return self
                code = self.proc.poll()
                if code is not None:
                    raise MountError(f"credfs exited with {code} before mounting "
                                     f"{self.mountpoint}; log:\n{self.log}")
                if time.monotonic() > deadline:
                    raise MountError(f"{self.mountpoint} not mounted after "
                                     f"{self.ready_timeout} s; log:\n{self.log}")
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise

    def wait(self, timeout: float) -> int | None:
        """Wait for the daemon to exit on its own; its exit code, or None on timeout."""
        if self.proc is None:
            return self.returncode
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to timeout, SIGKILL; then umount -l if still mounted.

        Returns the daemon's exit code (negative for a signal), None if it never
        started.
        """
        proc = self.proc
        if proc is not None:
            try:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        # Exits once any request it is blocked in ends; the
                        # umount below aborts those.
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(timeout)
            finally:
                lazy_umount(self.mountpoint, self._before)
            if proc.returncode is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
            self.returncode = proc.returncode
        return self.returncode

    def __enter__(self) -> CredfsMount:
        return self.start() if self.proc is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"CredfsMount({self.source} -> {self.mountpoint}, pid={self.pid})"
