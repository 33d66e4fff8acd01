"""Small system helpers; every wait in here is bounded.

Mount state comes from /proc/self/mountinfo, never from stat(): a stat on a
FUSE mount whose daemon hangs would hang too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import BenchError

CLK_TCK = os.sysconf("SC_CLK_TCK")


def run(argv: list[str], timeout: float = 60, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command with a time limit; BenchError with its stderr when it fails."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(argv)}: no answer after {timeout:.0f} s") from None
    except FileNotFoundError:
        raise BenchError(f"{argv[0]}: command not found") from None
    if check and r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise BenchError(f"{' '.join(argv)} failed ({r.returncode}): "
                         f"{msg[-1] if msg else 'no message'}")
    return r


@dataclass(frozen=True)
class Mount:
    mount_id: int
    dev: str  # major:minor
    mountpoint: str
    fstype: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape").encode("latin-1").decode(
        "utf-8", "surrogateescape")


def mounts() -> list[Mount]:
    """Every mount in our mount namespace, in mount order."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.rstrip("\n").split(" - ", 1)
            lf = left.split(" ")
            found.append(Mount(int(lf[0]), lf[2], _unescape(lf[4]), right.split(" ", 1)[0]))
    return found


def mounts_under(top: str) -> list[Mount]:
    """Mounts at or below top, most recent first (the order to unmount them)."""
    return [m for m in reversed(mounts())
            if m.mountpoint == top or m.mountpoint.startswith(top.rstrip("/") + "/")]


def abort_fuse(m: Mount) -> None:
    """Abort a FUSE connection (fusectl), so requests blocked on a hung daemon end."""
    major, minor = (int(x) for x in m.dev.split(":"))
    path = f"/sys/fs/fuse/connections/{(major << 20) | minor}/abort"
    with contextlib.suppress(OSError):
        Path(path).write_text("1")


def lazy_umount(path: str, timeout: float = 20) -> bool:
    """umount -l, bounded; True when nothing is mounted at path any more."""
    for _ in range(8):  # mounts may be stacked
        if not any(m.mountpoint == path for m in mounts()):
            return True
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(["umount", "-l", path], capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, check=False)
    return not any(m.mountpoint == path for m in mounts())


def stop_daemon(proc: subprocess.Popen[bytes], mountpoint: str, grace: float = 10) -> bool:
    """End a FUSE daemon started by us: SIGTERM, then SIGKILL and a connection
    abort after grace seconds; umount -l whatever stays. True when nothing is
    mounted at mountpoint any more."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        # A stopped daemon (see IdleDaemons) would keep the SIGTERM pending.
        proc.send_signal(signal.SIGCONT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _killing(proc.pid, grace)
            for m in mounts_under(mountpoint):
                if m.mountpoint == mountpoint and m.fstype.startswith("fuse"):
                    abort_fuse(m)
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
    return lazy_umount(mountpoint)


def loop_devices(match: Callable[[str], bool]) -> list[str]:
    """/dev/loopN whose backing file path (as the kernel shows it) matches."""
    found = []
    for d in sorted(Path("/sys/block").glob("loop*")):
        with contextlib.suppress(OSError):
            if match((d / "loop" / "backing_file").read_text().strip()):
                found.append(f"/dev/{d.name}")
    return found


def loop_devices_under(top: str) -> list[str]:
    """/dev/loopN whose backing file lies below top."""
    prefix = top.rstrip("/") + "/"
    return loop_devices(lambda backing: backing.startswith(prefix))


def detach_loop(dev: str) -> None:
    """losetup -d (the kernel detaches it later if still busy: autoclear)."""
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=20,
                       stdin=subprocess.DEVNULL, check=False)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after the last ')'.
    return data.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """The process start time in clock ticks since boot (tells a reused pid apart)."""
    f = _stat_fields(pid)
    return int(f[19]) if f else None


def alive(pid: int) -> bool:
    f = _stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """pid and every process below it (children of all its threads, recursively)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def thread_states(pid: int) -> list[str]:
    """The state letter (R, S, D, T, ...) of each of pid's threads; [] once it is gone."""
    states = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, IndexError):
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
    return states


def stopped(pid: int) -> bool:
    """Every thread of pid is stopped by a signal (SIGSTOP): it runs no code."""
    states = thread_states(pid)
    return "T" in states and all(s in ("T", "Z", "X") for s in states)


def wait_stopped(pid: int, timeout: float = 5) -> bool:
    """After a SIGSTOP: each thread stops only when it next leaves the kernel."""
    deadline = time.monotonic() + timeout
    while not stopped(pid):
        if not alive(pid) or time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def wait_cpu_quiet(pid: int, quiet: float = 0.1, timeout: float = 3) -> bool:
    """Wait until pid's CPU time has not grown for `quiet` seconds (True), at
    most `timeout` seconds (False)."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = cpu_seconds(pid)
        if now == last:
            return True
        last = now
    return False


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and its descendants (threads included, exited ones too)."""
    ticks = 0
    for p in descendants(pid):
        f = _stat_fields(p)
        if f:
            ticks += int(f[11]) + int(f[12])
    return ticks / CLK_TCK


def _killing(pid: int, grace: float) -> None:
    # Worth saying: the process had no chance to clean up (a FUSE daemon: to unmount).
    sys.stderr.write(f"compare: process {pid} still there {grace:.0f} s after SIGTERM: "
                     "SIGKILL\n")


def terminate(pids: list[int], grace: float = 10) -> list[int]:
    """SIGTERM, wait up to grace, then SIGKILL; returns pids that still live after that."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            # A daemon a killed run left stopped keeps the SIGTERM pending until continued.
            os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + grace
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            _killing(pid, grace)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains text (e.g. a run directory)."""
    me = os.getpid()
    found = []
    needle = os.fsencode(text)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
    return found


def syncfs(path: str, timeout: float = 120) -> None:
    """Write back one filesystem (sync -f), not every filesystem on the machine."""
    run(["sync", "-f", path], timeout=timeout)


def drop_caches(path: str) -> None:
    """Write back our filesystem, then drop clean page cache, dentries and inodes.

    That drops FUSE mounts' page caches and cached names too (the daemons get
    FORGETs). It runs in a child so that a stuck kernel walk cannot hang us.
    """
    syncfs(path)
    run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], timeout=120)


def compact_memory() -> None:
    """Defragment free memory, so each candidate starts from the same state.

    Without it, whoever runs after a workload that left free memory in small
    pieces (a FUSE daemon's reads, say) pays for the kernel's compaction while
    it allocates large page-cache folios: a native 1 GiB read measured at
    0.5-1 GB/s right after a credfs read, and at 3-7 GB/s after compaction.
    """
    if os.path.exists("/proc/sys/vm/compact_memory"):
        run(["sh", "-c", "echo 1 > /proc/sys/vm/compact_memory"], timeout=120)


def device_read_bytes(dev: str) -> int:
    """Bytes read from a block device so far (/sys/block/X/stat, 512-byte sectors)."""
    fields = Path(f"/sys/block/{os.path.basename(dev)}/stat").read_text().split()
    return int(fields[2]) * 512


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out
