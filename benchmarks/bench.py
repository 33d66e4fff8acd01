"""Benchmarks: the same workloads on the native directory and through credfs.

Run on demand (as root):  .venv/bin/python benchmarks/bench.py [--quick] [--uid 2001]
Prints, per workload, the time natively, through credfs for each --cache mode
and credential mode, and the ratio to native. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

Workload = Callable[[str, int], int]  # (directory, scale) -> operations done


def _files(d: str, scale: int) -> list[str]:
    return [os.path.join(d, f"f{i:05d}") for i in range(scale)]


def create_small_files(d: str, scale: int) -> int:
    work = os.path.join(d, "create")
    os.mkdir(work)
    for p in _files(work, scale):
        with open(p, "wb") as f:
            f.write(b"x" * 100)
    return scale


def stat_files(d: str, scale: int) -> int:
    paths = _files(os.path.join(d, "create"), scale)
    for _ in range(5):
        for p in paths:
            os.stat(p)
    return 5 * scale


def listdir_stat(d: str, scale: int) -> int:
    work = os.path.join(d, "create")
    n = 0
    for _ in range(5):
        with os.scandir(work) as it:
            for e in it:
                e.stat(follow_symlinks=False)
                n += 1
    return n


def open_read_close(d: str, scale: int) -> int:
    paths = _files(os.path.join(d, "create"), scale)
    for p in paths:
        with open(p, "rb") as f:
            f.read()
    return scale


def seq_write(d: str, scale: int) -> int:
    block = b"\0" * (128 * 1024)
    n = scale // 10  # blocks of 128 KiB
    with open(os.path.join(d, "big"), "wb") as f:
        for _ in range(n):
            f.write(block)
    return n


def seq_read(d: str, scale: int) -> int:
    n = 0
    with open(os.path.join(d, "big"), "rb", buffering=0) as f:
        while f.read(128 * 1024):
            n += 1
    return n


def unlink_files(d: str, scale: int) -> int:
    for p in _files(os.path.join(d, "create"), scale):
        os.unlink(p)
    os.unlink(os.path.join(d, "big"))
    return scale


WORKLOADS: list[tuple[str, Workload]] = [
    ("create 100 B files", create_small_files),
    ("stat (x5)", stat_files),
    ("readdir+stat (x5)", listdir_stat),
    ("open/read/close", open_read_close),
    ("seq write 128K blocks", seq_write),
    ("seq read 128K blocks", seq_read),
    ("unlink", unlink_files),
]


def run_as(uid: int, d: str, scale: int) -> list[float]:
    """Run every workload in a child process with the given uid; seconds each."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            if uid:
                os.setgroups([uid])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            out = []
            for _name, fn in WORKLOADS:
                t0 = time.perf_counter()
                fn(d, scale)
                out.append(time.perf_counter() - t0)
            os.write(w, repr(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    if not data:
        raise RuntimeError("benchmark child failed")
    return list(eval(data))  # our own child's repr of a list of floats


@contextlib.contextmanager
def credfs_mount(src: str, mnt: str, args: list[str]) -> Iterator[None]:
    log = open(os.path.join(os.path.dirname(mnt), "bench-credfs.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "credfs", "mount", src, mnt,
                             "--foreground", *args], stdout=log, stderr=log,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("credfs did not mount")
            time.sleep(0.02)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            subprocess.run(["umount", "-l", mnt], check=False)
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=2000, help="files per workload (default 2000)")
    ap.add_argument("--uid", type=int, default=2001, help="non-root uid to run as (0 = root)")
    ap.add_argument("--quick", action="store_true", help="scale 300, fewer configurations")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark mounts credfs and runs as another uid")
    scale = 300 if args.quick else args.scale
    configs: list[tuple[str, list[str]]] = [
        ("caller, cache none", ["--cache", "none"]),
        ("caller, cache auto", ["--cache", "auto"]),
        ("caller, cache always", ["--cache", "always"]),
    ]
    if not args.quick:
        configs.append(("mounter, cache auto", ["--creds", "mounter"]))
    top = tempfile.mkdtemp(prefix="credfs-bench-", dir="/tmp")
    os.chmod(top, 0o755)
    results: dict[str, list[float]] = {}
    try:
        native = os.path.join(top, "native")
        os.mkdir(native)
        os.chown(native, args.uid, args.uid)
        results["native"] = run_as(args.uid, native, scale)
        for label, extra in configs:
            src, mnt = os.path.join(top, "src"), os.path.join(top, "mnt")
            for p in (src, mnt):
                shutil.rmtree(p, ignore_errors=True)
                os.mkdir(p)
            os.chown(src, args.uid, args.uid)
            with credfs_mount(src, mnt, extra):
                results[label] = run_as(args.uid, mnt, scale)
    finally:
        shutil.rmtree(top, ignore_errors=True)

    print(f"credfs benchmark: scale {scale} files, uid {args.uid}, "
          f"{os.cpu_count()} cpus; seconds (ratio to native)")
    labels = list(results)
    width = max(len(n) for n, _ in WORKLOADS) + 2
    print("".ljust(width) + "".join(label.rjust(24) for label in labels))
    for i, (name, _fn) in enumerate(WORKLOADS):
        base = results["native"][i]
        cells = []
        for label in labels:
            t = results[label][i]
            cells.append(f"{t:8.3f}s ({t / base:6.1f}x)".rjust(24))
        print(name.ljust(width) + "".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
