"""Metadata rows through a credfs mount against the same natively, one run.

As root, from the repository:

    .venv/bin/python benchmarks/credfs_meta.py [--files 5000] [--rounds 2]
        [--uid 2001] [--dir /tmp] [-- extra credfs mount arguments]

A fresh 0755 directory under --dir (/tmp; a RAM-backed ext4 mounted there
gives steadier figures than the root disk) holds a backing directory (mounted with
credfs on a third directory) and a native twin, each with a subdirectory
owned by --uid. A process running as that uid (groups: its uid) creates
(O_CREAT|O_EXCL, close), stats and unlinks --files files in the
subdirectory, natively and through the mount, alternately, --rounds times;
each operation names a file relative to an open descriptor of the
subdirectory, so the cost is the file's and not a walk of its path. Between
stat and unlink it fstat()s one open file --files times: one GETATTR each
when attributes are not cached (-- --cache none), the daemon's cost for a
request that needs no credentials. Per row
it prints the best round's ops/s natively and through credfs, their ratio,
and the daemon's CPU per operation (utime+stime of /proc/PID/stat) in that
round. Figures depend on the machine and its load: compare runs made back
to back.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from harness import sysutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("create", "stat", "fstat", "unlink")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def rows_as(uid: int, directory: str, files: int, daemon: int | None) -> dict[str, tuple]:
    """The three rows in a child running as uid: {row: (seconds, daemon ticks)}."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([uid])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            names = [f"f{i:06d}" for i in range(files)]
            out = []
            for row in ROWS:
                c0 = cpu_ticks(daemon) if daemon else 0
                t0 = time.perf_counter()
                if row == "create":
                    for n in names:
                        os.close(os.open(n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644,
                                         dir_fd=dfd))
                elif row == "stat":
                    for n in names:
                        os.stat(n, dir_fd=dfd)
                elif row == "fstat":
                    fd = os.open(names[0], os.O_RDONLY, dir_fd=dfd)
                    for _ in names:
                        os.fstat(fd)
                    os.close(fd)
                else:
                    for n in names:
                        os.unlink(n, dir_fd=dfd)
                t1 = time.perf_counter()
                c1 = cpu_ticks(daemon) if daemon else 0
                out.append(f"{row} {t1 - t0} {c1 - c0}")
            os.write(w, "\n".join(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not text:
        raise SystemExit(f"the uid {uid} process failed in {directory}")
    res = {}
    for line in text.splitlines():
        row, secs, ticks = line.split()
        res[row] = (float(secs), int(ticks))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--uid", type=int, default=2001)
    p.add_argument("--dir", default="/tmp",
                   help="where to make the work directory (e.g. a RAM-backed ext4)")
    p.add_argument("extra", nargs="*", help="extra `credfs mount` arguments (after --)")
    args = p.parse_args()
    hz = os.sysconf("SC_CLK_TCK")

    work = tempfile.mkdtemp(prefix="credfs-meta.", dir=args.dir)
    os.chmod(work, 0o755)
    src, native, mnt = (os.path.join(work, d) for d in ("src", "native", "mnt"))
    for d in (src, native, mnt):
        os.mkdir(d, 0o755)
    for d in (src, native):
        os.mkdir(os.path.join(d, "d"), 0o755)
        os.chown(os.path.join(d, "d"), args.uid, args.uid)
    log = open(os.path.join(work, "credfs.log"), "wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "credfs", "mount", src, mnt, "--foreground", *args.extra],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mnt):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"credfs did not mount; see {log.name}")
            time.sleep(0.05)
        best: dict[str, dict[str, tuple]] = {"native": {}, "credfs": {}}
        for _ in range(args.rounds):
            for kind, top, pid in (("native", native, None), ("credfs", mnt, daemon.pid)):
                res = rows_as(args.uid, os.path.join(top, "d"), args.files, pid)
                for row, v in res.items():
                    if row not in best[kind] or v[0] < best[kind][row][0]:
                        best[kind][row] = v
        with open(log.name, errors="replace") as f:
            start = [line.strip() for line in f if "serving" in line]
        print(f"{args.files} files as uid {args.uid}, best of {args.rounds}; "
              f"{start[0] if start else ''}")
        print(f"{'row':8} {'native ops/s':>13} {'credfs ops/s':>13} {'ratio':>6} "
              f"{'daemon CPU µs/op':>17}")
        for row in ROWS:
            n_s, c_s = best["native"][row][0], best["credfs"][row][0]
            cpu = best["credfs"][row][1] / hz / args.files * 1e6
            print(f"{row:8} {args.files / n_s:13.0f} {args.files / c_s:13.0f} "
                  f"{n_s / c_s:6.3f} {cpu:17.1f}")
    finally:
        sysutil.stop_daemon(daemon, mnt, grace=15)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
