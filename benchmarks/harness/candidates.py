"""The candidates: the backing directory itself, and FUSE filesystems mounted
on it. Each FUSE daemon runs in the foreground as our child, so we know its
pid (for its CPU time) and can end it by pid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import BenchError, sysutil
from .cleanup import Cleanup, warn

REPO = str(Path(__file__).resolve().parents[2])

# mergerfs at its fastest safe setting for one branch:
#   cache.files=auto-full  kernel page cache kept across opens unless the
#                          file's mtime or size changed (as fast as `full` when
#                          nothing changes behind the mount, and not stale when
#                          something does)
#   cache.readdir=true     kernel caches listings (dropped when the dir changes)
#   cache.symlinks=true    kernel caches link targets
#   category.create=ff, minfreespace=0  with one branch no policy has anything
#                          to choose; the default (epmfs, 4G) would refuse
#                          creates on a branch with less than 4 GiB free
#   cache.entry/cache.attr left at their default 1 s (credfs auto uses 1 s too)
# Left out on purpose: cache.writeback (the kernel then owns O_APPEND and may
# write-back after close: mergerfs' own manual warns of corruption),
# security_capability=false and xattr=nosys (a write would no longer strip file
# capabilities; ACLs and xattrs stop working), threads (default: one per core).
MERGERFS_OPTIONS = ("allow_other,cache.files=auto-full,cache.readdir=true,"
                    "cache.symlinks=true,category.create=ff,minfreespace=0,fsname=bench-mergerfs")
# big_writes: without it bindfs (libfuse 2) gets 4 KiB writes. bindfs stays
# single-threaded: its --multithreaded mode has a documented ownership race.
BINDFS_OPTIONS = "big_writes"


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str  # native | credfs | mergerfs | bindfs
    args: tuple[str, ...] = ()

    @property
    def tool(self) -> str | None:
        """The command it needs, None when it is ours or none."""
        return self.kind if self.kind in ("mergerfs", "bindfs") else None

    def argv(self, source: str, mountpoint: str) -> list[str]:
        if self.kind == "credfs":
            return [sys.executable, "-m", "credfs", "mount", source, mountpoint,
                    "--foreground", "--log-level", "WARNING", *self.args]
        if self.kind in ("mergerfs", "bindfs"):
            return [self.kind, "-f", *self.args, source, mountpoint]
        raise ValueError(self.kind)

    @property
    def describe(self) -> str:
        if self.kind == "native":
            return "the backing directory itself"
        if self.kind == "credfs":
            return "credfs " + " ".join(self.args)
        return f"{self.kind} {' '.join(self.args)}"


SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("native", "native"),
    Spec("credfs-caller", "credfs", ("--creds", "caller", "--cache", "auto")),
    Spec("credfs-caller-always", "credfs", ("--creds", "caller", "--cache", "always")),
    Spec("credfs-caller-none", "credfs", ("--creds", "caller", "--cache", "none")),
    Spec("credfs-caller-nopt", "credfs", ("--creds", "caller", "--cache", "auto",
                                          "--passthrough", "never")),
    Spec("credfs-caller-nopoll", "credfs", ("--creds", "caller", "--cache", "auto",
                                            "--poll", "0")),
    Spec("credfs-mounter", "credfs", ("--creds", "mounter", "--cache", "auto")),
    Spec("mergerfs", "mergerfs", ("-o", MERGERFS_OPTIONS)),
    Spec("bindfs", "bindfs", ("-o", BINDFS_OPTIONS)),
)}
# What runs without --candidates (credfs-caller-none only on request: it is
# the slowest setting and not one anybody should deploy for speed;
# credfs-caller-nopt shows what passthrough is worth, credfs-caller-nopoll what
# polling /dev/fuse before sleeping is).
DEFAULT = ("native", "credfs-caller", "credfs-caller-always", "credfs-mounter", "mergerfs",
           "bindfs")


def _child_setup() -> None:
    # Own session: a Ctrl-C at the terminal is for us; we stop the daemon by
    # pid, in order. If we die without cleaning up, SIGTERM makes the daemon
    # unmount itself (the sweep of the next run handles the rest).
    os.setsid()
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class Candidate:
    """A started candidate: `root` is where workloads find the backing tree."""

    def __init__(self, spec: Spec, root: str, proc: subprocess.Popen[bytes] | None = None,
                 mountpoint: str | None = None, log: str | None = None) -> None:
        self.spec, self.root, self.proc = spec, root, proc
        self.mountpoint, self.log = mountpoint, log
        self.paused = False  # stopped by pause() and not continued since

    @property
    def pausable(self) -> bool:
        """A credfs daemon: it watches the whole backing filesystem, so it has
        work to do while others are measured (see IdleDaemons)."""
        return self.spec.kind == "credfs" and self.proc is not None

    @property
    def name(self) -> str:
        return self.spec.name

    def cpu(self) -> float | None:
        """The daemon's CPU seconds so far (None for native)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} daemon exited ({self.proc.returncode}); "
                             f"log: {self.log_tail()}")
        return sysutil.cpu_seconds(self.proc.pid)

    def stopped(self) -> bool:
        """Its daemon runs no code (every thread stopped by SIGSTOP)."""
        return self.proc is not None and sysutil.stopped(self.proc.pid)

    def pause(self) -> None:
        """SIGSTOP, and wait until every thread has stopped."""
        assert self.proc is not None
        self.paused = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)
        if not sysutil.wait_stopped(self.proc.pid):
            raise BenchError(f"{self.name} daemon did not stop on SIGSTOP "
                             f"({''.join(sysutil.thread_states(self.proc.pid)) or 'gone'})")

    def resume(self) -> bool:
        """SIGCONT, then wait until it has read the events queued meanwhile
        (its CPU time stops growing): that is not the next measurement's work.
        False when it was still busy after 3 s."""
        assert self.proc is not None
        self.paused = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        return sysutil.wait_cpu_quiet(self.proc.pid)

    def log_tail(self, lines: int = 5) -> str:
        if not self.log:
            return ""
        try:
            text = Path(self.log).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:]) or "(empty)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL and a connection abort; umount -l what stays."""
        proc, mnt = self.proc, self.mountpoint
        if proc is None or mnt is None:
            return
        if not sysutil.stop_daemon(proc, mnt):
            raise BenchError(f"could not unmount {mnt}")


class IdleDaemons:
    """While one candidate is measured, every other credfs daemon is stopped
    (SIGSTOP), whoever is measured (native, mergerfs and bindfs too).

    Each credfs mount (--cache auto) watches the whole backing filesystem with
    fanotify: a running idle daemon would read and sift the events of the
    measured candidate's changes, on the same CPUs. Stopped, it does nothing:
    its queue fills and overflows (a notification group never blocks the
    writers), and once continued it reads that backlog and forgets its caches
    (credfs/watch.py); resume() waits for that before its own measurement.
    mergerfs and bindfs watch nothing and are never stopped. A stopped
    daemon's mount hangs whoever touches it: only the measured candidate's
    mount is touched, and resume_all() runs before the rest of the run
    touches any (after the measurements, and first thing in the clean-up).
    """

    def __init__(self, cands: list[Candidate], clean: Cleanup) -> None:
        self.daemons = [c for c in cands if c.pausable]
        # Pushed after the candidates' stops, so it runs before them.
        clean.push("continue the stopped daemons", self.resume_all)

    def only(self, cand: Candidate) -> None:
        """Stop every daemon but cand's; continue cand's and let it catch up."""
        for c in self.daemons:
            if c is not cand and not c.paused:
                c.pause()
        if cand.paused and not cand.resume():
            warn(f"{cand.name} was still busy 3 s after SIGCONT; measuring it anyway")

    def resume_all(self) -> None:
        """SIGCONT to every daemon, stopped or not (no-op for a running one)."""
        for c in self.daemons:
            c.paused = False
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGCONT)


def start(spec: Spec, source: str, mnt_dir: str, cleanup: Cleanup,
          timeout: float = 30) -> Candidate:
    if spec.kind == "native":
        return Candidate(spec, source)
    mountpoint = os.path.join(mnt_dir, spec.name)
    os.mkdir(mountpoint, 0o755)
    log = os.path.join(mnt_dir, f"{spec.name}.log")
    before = {m.mount_id for m in sysutil.mounts_under(mountpoint)}
    with open(log, "ab") as out:
        # cwd = the repository, so `python -m credfs` imports this checkout's credfs.
        proc = subprocess.Popen(spec.argv(source, mountpoint), cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_child_setup)  # safe: the harness has no threads
    cand = Candidate(spec, mountpoint, proc, mountpoint, log)
    cleanup.push(f"stop {spec.name}", cand.stop)
    deadline = time.monotonic() + timeout
    while not any(m.mount_id not in before and m.fstype.startswith("fuse")
                  and m.mountpoint == mountpoint for m in sysutil.mounts_under(mountpoint)):
        if proc.poll() is not None:
            raise BenchError(f"{spec.name} exited ({proc.returncode}) before mounting: "
                             f"{cand.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{spec.name} not mounted after {timeout:.0f} s: {cand.log_tail()}")
        time.sleep(0.02)
    return cand
