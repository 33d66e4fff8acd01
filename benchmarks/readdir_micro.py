"""Directory listing through a credfs mount against the same listing natively.

As root, from the repository:

    .venv/bin/python benchmarks/readdir_micro.py [--n 10000] [--big 100000] [--reps 5]
        [--dir DIR] [--uid UID] [-- CREDFS ARGS]

Makes a fresh directory of N empty files twice under one temporary directory
(one the credfs mount's source, one read natively: same filesystem; under
--dir, e.g. a RAM-backed ext4, else /tmp), mounts credfs (`python -m credfs
mount --foreground`, this checkout) and times, each as the median of --reps
runs, in one process (root, or a child running as --uid, as the compare
benchmark lists as uid 2001; the files then belong to that uid):

- scandir: `os.scandir(d)` counting entries (names and types, no stat), right
  after an (untimed) lstat pass over the same names, as the compare
  benchmark's listing does;
- scandir+lstat: `ls -l`-like, an lstat of each entry as it is listed;
- access while listing: how long an access(2) of another name takes (each
  one a request to the daemon) while another process lists a directory of
  --big files over and over: median, 99th percentile and longest. A daemon
  that read a large directory on its event loop would make every other
  caller wait for each pass.

It prints entries/s natively and through credfs, their ratio, and the
daemon's CPU time per listed entry (utime+stime from /proc/PID/stat).
Figures depend on the machine and its load: compare runs made back to back.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TICK = os.sysconf("SC_CLK_TCK")


def make_files(d: str, n: int) -> None:
    os.mkdir(d, 0o755)
    for i in range(n):
        os.close(os.open(os.path.join(d, f"file-{i:06d}"), os.O_CREAT | os.O_WRONLY, 0o644))


def mounted(mnt: str) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == mnt for line in f)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def scandir(d: str) -> int:
    n = 0
    with os.scandir(d) as it:
        for e in it:
            e.is_dir(follow_symlinks=False)  # the type, from d_type
            n += 1
    return n


def scandir_lstat(d: str) -> int:
    n = 0
    with os.scandir(d) as it:
        for e in it:
            e.stat(follow_symlinks=False)
            n += 1
    return n


def stat_pass(d: str) -> None:
    for name in os.listdir(d):
        os.lstat(os.path.join(d, name))


def access_while_listing(d: str, other: str, seconds: float = 2.0) -> list[float]:
    """Seconds each access(other) took while another process listed d in a loop
    (a process, not a thread: a thread would hold this one's GIL)."""
    child = os.fork()
    if child == 0:
        code = 1
        try:
            while True:
                scandir(d)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    took = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            os.access(other, os.R_OK)
            took.append(time.perf_counter() - t0)
            time.sleep(0.0005)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    return sorted(took)


def timed(fn: Callable[[str], int], d: str, reps: int, prepare: bool,
          daemon: int | None) -> tuple[float, float | None, int]:
    """Median seconds per listing, daemon CPU seconds per listing (the mean:
    the kernel counts it in clock ticks), entries."""
    runs, cpu, count = [], [], 0
    for _ in range(reps):
        if prepare:
            stat_pass(d)
        c0 = cpu_seconds(daemon) if daemon else 0.0
        t0 = time.perf_counter()
        count = fn(d)
        runs.append(time.perf_counter() - t0)
        if daemon:
            cpu.append(cpu_seconds(daemon) - c0)
    return statistics.median(runs), (statistics.mean(cpu) if daemon else None), count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000, help="files in the directory")
    p.add_argument("--big", type=int, default=100000,
                   help="files in the directory listed while access(2) is timed")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default="/tmp", help="where to make the directories")
    p.add_argument("--uid", type=int, default=0, help="list as this uid (and its gid)")
    p.add_argument("credfs_args", nargs="*", help="extra credfs mount arguments")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.stderr.write("readdir_micro: run as root\n")
        return 2
    tmp = tempfile.mkdtemp(prefix="readdir-micro.", dir=args.dir)
    os.chmod(tmp, 0o755)
    src, native, mnt = (os.path.join(tmp, x) for x in ("src", "native", "mnt"))
    for x in (src, native, mnt):
        os.mkdir(x, 0o755)
    for top in (src, native):
        make_files(os.path.join(top, "d"), args.n)
        make_files(os.path.join(top, "big"), args.big)
        os.close(os.open(os.path.join(top, "other"), os.O_CREAT | os.O_WRONLY, 0o644))
    if args.uid:
        for top in (src, native):
            for dirpath, _dirs, files in os.walk(os.path.join(top, "d")):
                os.chown(dirpath, args.uid, args.uid)
                for f in files:
                    os.chown(os.path.join(dirpath, f), args.uid, args.uid)
    cmd = [sys.executable, "-m", "credfs", "mount", src, mnt, "--foreground",
           "--log-level", "warning", *args.credfs_args]
    daemon = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not mounted(mnt):
            if daemon.poll() is not None or time.monotonic() > deadline:
                sys.stderr.write("readdir_micro: credfs did not mount\n")
                return 1
            time.sleep(0.05)
        print(f"{args.n} entries ({args.big} while timing access), median of {args.reps},"
              f" uid {args.uid}, under {args.dir};"
              f" credfs {' '.join(args.credfs_args)}", flush=True)
        if args.uid and os.fork() == 0:  # measure as the uid, in a child
            code = 1
            try:
                os.setgroups([])
                os.setresgid(args.uid, args.uid, args.uid)
                os.setresuid(args.uid, args.uid, args.uid)
                code = measure(args, native, mnt, daemon.pid)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        if args.uid:
            return os.waitstatus_to_exitcode(os.wait()[1])
        return measure(args, native, mnt, daemon.pid)
    finally:
        if mounted(mnt):
            subprocess.run(["umount", mnt], check=False, timeout=30)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=30)
        if mounted(mnt):
            subprocess.run(["umount", "-l", mnt], check=False, timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args: argparse.Namespace, native: str, mnt: str, daemon: int) -> int:
    for label, fn, prepare in (("scandir (after a stat pass)", scandir, True),
                               ("scandir+lstat (ls -l)", scandir_lstat, False)):
        nat, _, n_nat = timed(fn, os.path.join(native, "d"), args.reps, prepare, None)
        via, cpu, n_via = timed(fn, os.path.join(mnt, "d"), args.reps, prepare, daemon)
        assert n_nat == n_via == args.n, (n_nat, n_via)
        assert cpu is not None
        print(f"{label:<30} native {n_nat / nat:>11,.0f}/s  credfs {n_via / via:>10,.0f}/s"
              f"  ratio {nat / via:5.3f}  daemon CPU {cpu / n_via * 1e6:6.2f} µs/entry",
              flush=True)
    for where, top in (("native", native), ("credfs", mnt)):
        took = access_while_listing(os.path.join(top, "big"), os.path.join(top, "other"))
        print(f"access(2) while listing, {where:<6} {len(took):>6} calls: median "
              f"{took[len(took) // 2] * 1e6:7.0f} µs  p99 {took[int(len(took) * 0.99)] * 1e6:7.0f}"
              f" µs  longest {took[-1] * 1e6:7.0f} µs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
