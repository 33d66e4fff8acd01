"""The floor under every credfs request: pyfuse3's own per-request cost.

As root, from the repository:

    .venv/bin/python benchmarks/pyfuse3_floor.py [--files 1000] [--seconds 3]
        [--clients 1] [--idle 3] [--min-tasks 2] [--max-tasks 8] [--hold 0]
        [--poll-us 50]

A trivial pyfuse3 filesystem (no credfs): a root directory with N files
f0..fN-1 whose lookup and getattr return constant attributes with entry and
attribute timeouts 0, mounted on a temporary directory by a child process
(this script with --serve). Client processes os.stat the files in a loop;
each stat is a LOOKUP (the dentry is never trusted) and a GETATTR. The
filesystem counts its requests; a getxattr on the root reads the count.

Reported: µs per stat (wall time / stats, all clients together), µs per
request, the daemon's CPU per request (utime+stime from /proc/PID/stat over
the same window) and the daemon's CPU over an idle window (it must stay
near 0: the session loop polls only right after a request, never while the
mount is idle). --poll-us N is pyfuse3.main's poll_us (credfs mount --poll;
0 compares with the loop that always sleeps). --hold S keeps the load
running S seconds more after the measurement with the daemon's pid printed,
for a profiler (py-spy record --pid PID, perf record -p PID).

Figures depend on the machine and its load: compare runs made back to back;
`taskset -c 0` (daemon and clients on one CPU) gives the steadiest figures.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time

from harness import sysutil

COUNT_XATTR = b"user.floor.requests"


def serve(mountpoint: str, files: int, min_tasks: int, max_tasks: int, poll_us: int) -> None:
    import pyfuse3
    import trio

    class Floor(pyfuse3.Operations):
        def __init__(self) -> None:
            super().__init__()
            self.requests = 0

        def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = ino
            a.entry_timeout = 0
            a.attr_timeout = 0
            if ino == pyfuse3.ROOT_INODE:
                a.st_mode = stat.S_IFDIR | 0o755
                a.st_nlink = 2
            else:
                a.st_mode = stat.S_IFREG | 0o644
                a.st_nlink = 1
            a.st_size = 0
            return a

        async def lookup(self, parent_inode: int, name: bytes,
                         ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
            self.requests += 1
            if parent_inode == pyfuse3.ROOT_INODE and name[:1] == b"f":
                try:
                    i = int(name[1:])
                except ValueError:
                    i = -1
                if 0 <= i < files:
                    return self._attrs(pyfuse3.ROOT_INODE + 1 + i)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                          ) -> pyfuse3.EntryAttributes:
            self.requests += 1
            return self._attrs(inode)

        async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext
                           ) -> bytes:
            if inode == pyfuse3.ROOT_INODE and name == COUNT_XATTR:
                return str(self.requests).encode()
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return
            nursery.start_soon(stop_on_signal)
            poll = {"poll_us": poll_us} if hasattr(pyfuse3, "poll_window_us") else {}
            await pyfuse3.main(min_tasks=min_tasks, max_tasks=max_tasks, **poll)
            nursery.cancel_scope.cancel()

    pyfuse3.init(Floor(), mountpoint, ["fsname=floor"])
    print("ready", flush=True)
    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)


def requests(mountpoint: str) -> int:
    return int(os.getxattr(mountpoint, COUNT_XATTR))


def client(mountpoint: str, files: int, deadline: float, out_fd: int) -> None:
    paths = [os.path.join(mountpoint, f"f{i}") for i in range(files)]
    n = 0
    while time.monotonic() < deadline:
        for p in paths:
            os.stat(p)
        n += len(paths)
    os.write(out_fd, f"{n}\n".encode())


def load(mountpoint: str, files: int, clients: int, seconds: float) -> int:
    """clients processes stat'ing for seconds; total stats done."""
    deadline = time.monotonic() + seconds
    r, w = os.pipe()
    pids = []
    for _ in range(clients):
        pid = os.fork()
        if pid == 0:
            try:
                client(mountpoint, files, deadline, w)
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(w)
    for pid in pids:
        os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return sum(int(x) for x in f.read().split())


def measure(args: argparse.Namespace) -> None:
    hz = os.sysconf("SC_CLK_TCK")
    with tempfile.TemporaryDirectory(prefix="pyfuse3-floor.") as mnt:
        daemon = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", mnt,
             "--files", str(args.files), "--min-tasks", str(args.min_tasks),
             "--max-tasks", str(args.max_tasks), "--poll-us", str(args.poll_us)],
            stdout=subprocess.PIPE, text=True)
        try:
            assert daemon.stdout is not None
            if daemon.stdout.readline().strip() != "ready":
                raise SystemExit("daemon did not start")
            for _ in range(100):
                if os.path.ismount(mnt):
                    break
                time.sleep(0.05)
            load(mnt, args.files, args.clients, 0.5)  # warm up
            r0, c0, t0 = requests(mnt), cpu_ticks(daemon.pid), time.monotonic()
            stats = load(mnt, args.files, args.clients, args.seconds)
            t1, c1, r1 = time.monotonic(), cpu_ticks(daemon.pid), requests(mnt)
            reqs = r1 - r0  # the getxattr that reads the count is not counted
            cpu = (c1 - c0) / hz
            print(f"clients={args.clients} stats={stats} requests={reqs} "
                  f"({reqs / stats:.2f}/stat) in {t1 - t0:.2f}s")
            print(f"  {(t1 - t0) / stats * 1e6:.1f} µs/stat, "
                  f"{(t1 - t0) / reqs * 1e6:.1f} µs/request wall, "
                  f"daemon CPU {cpu / reqs * 1e6:.1f} µs/request "
                  f"({cpu / (t1 - t0) * 100:.0f}% of one core)")
            if args.hold:
                print(f"  holding load {args.hold}s: daemon pid {daemon.pid}", flush=True)
                load(mnt, args.files, args.clients, args.hold)
            if args.idle:
                c0 = cpu_ticks(daemon.pid)
                time.sleep(args.idle)
                c1 = cpu_ticks(daemon.pid)
                print(f"  idle {args.idle:.0f}s: daemon CPU {(c1 - c0) / hz * 1e3:.0f} ms")
        finally:
            sysutil.stop_daemon(daemon, mnt)
        print(f"  daemon exit status {daemon.returncode}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--serve", metavar="MOUNTPOINT", help=argparse.SUPPRESS)
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--idle", type=float, default=3.0)
    p.add_argument("--hold", type=float, default=0.0)
    p.add_argument("--min-tasks", type=int, default=2)
    p.add_argument("--max-tasks", type=int, default=8)
    p.add_argument("--poll-us", type=int, default=50,
                   help="pyfuse3.main's poll_us (credfs mount --poll; default 50, as credfs)")
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.files, args.min_tasks, args.max_tasks, args.poll_us)
    else:
        measure(args)


if __name__ == "__main__":
    main()
