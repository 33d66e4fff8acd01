"""In-process costs of credfs's metadata path, per request (µs), no mount.

As root, from the repository:

    .venv/bin/python benchmarks/meta_micro.py [--n 20000]

A forked child stands for the caller (uid 2001, groups 2001,3001,3003; a
second one for uid 2002). The script measures, each as the median of 5 runs:
reading the caller's credentials from /proc, a credential switch when the
thread already holds them and a real switch, the hop to a worker thread and
back through trio, and whole handlers (lookup+forget, mkdir+rmdir,
create-O_EXCL+release+unlink) called on an Operations object as pyfuse3
would, through the worker pool and (when this credfs has it) inline on the
event loop. Figures depend on the machine and its load: compare runs made
back to back.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import trio

from credfs import backing, caller, syscalls
from credfs.cache import CacheMode, CachePolicy
from credfs.creds import Credentials, ThreadIdentity
from credfs.identity import CallerIdentity
from credfs.inodes import InodeTable
from credfs.notify import KernelNotifier
from credfs.operations import Operations
from credfs.workers import WorkerPool

try:  # present once the inline path exists
    from credfs import inline as inline_mod
except ImportError:
    inline_mod = None  # type: ignore[assignment]

REPS = 5


def spawn_caller(uid: int, groups: list[int]) -> tuple[int, int]:
    """A process as uid that waits on a pipe; (pid, write end)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.setgroups(groups)
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    return pid, w


def per_op(fn: Callable[[int], None], n: int) -> float:
    """Median µs per op of fn(n) over REPS runs."""
    runs = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        fn(n)
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def in_thread(fn: Callable[[], float]) -> float:
    """Run fn in a fresh thread (credentials are per thread); its result."""
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(600)
    return out[0]


def report(name: str, us: float) -> None:
    print(f"{name:<48} {us:9.2f} µs/op", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="operations per run")
    args = p.parse_args()
    n = args.n
    if os.geteuid() != 0:
        sys.stderr.write("meta_micro: run as root\n")
        return 2
    os.umask(0)
    alice_pid, alice_w = spawn_caller(2001, [2001, 3001, 3003])
    bob_pid, bob_w = spawn_caller(2002, [2002, 3001])
    time.sleep(0.2)
    try:
        return run(n, alice_pid, bob_pid)
    finally:
        for pid, w in ((alice_pid, alice_w), (bob_pid, bob_w)):
            os.write(w, b"x")  # (each child also holds the other's pipe: no EOF)
            os.close(w)
            os.waitpid(pid, 0)


def run(n: int, alice_pid: int, bob_pid: int) -> int:
    permitted = syscalls.capget_thread()[1]
    resolver = caller.CallerResolver(permitted)
    ctx_a = SimpleNamespace(uid=2001, gid=2001, pid=alice_pid, umask=0o022)
    ctx_b = SimpleNamespace(uid=2002, gid=2002, pid=bob_pid, umask=0o022)

    def lookups(k: int) -> None:
        for _ in range(k):
            resolver(ctx_a)
    report("caller credentials from /proc", per_op(lookups, n))
    alice, bob = resolver(ctx_a), resolver(ctx_b)

    def same() -> float:
        ident = ThreadIdentity()

        def go(k: int) -> None:
            for _ in range(k):
                ident.become(alice, 0)
        return per_op(go, n)
    report("switch, thread already holds the identity", in_thread(same))

    def switch() -> float:
        ident = ThreadIdentity()

        def go(k: int) -> None:
            for _ in range(k // 2):
                ident.become(alice, 0)
                ident.become(bob, 0)
        return per_op(go, n)
    report("switch between two callers", in_thread(switch))

    if inline_mod is not None:
        def loop_switch() -> float:
            ident = inline_mod.LoopIdentity()

            def go(k: int) -> None:
                for _ in range(k):
                    ident.become(alice, 0o022)
                    ident.restore()
            return per_op(go, n)
        report("loop thread: caller and back to the daemon", in_thread(loop_switch))

    with tempfile.TemporaryDirectory(prefix="meta-micro.") as tmp:
        os.chmod(tmp, 0o755)
        src = os.path.join(tmp, "src")
        os.mkdir(src, 0o777)
        open(os.path.join(src, "f"), "w").close()
        modes = ["pool"] + (["inline"] if inline_mod is not None else [])
        for mode in modes:
            trio.run(handlers, n // 4, src, ctx_a, alice, mode)
    return 0


async def handlers(n: int, src: str, ctx: SimpleNamespace, alice: Credentials,
                   mode: str) -> None:
    root_fd = os.open(src, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    table = InodeTable(root_fd)
    pool = WorkerPool(4)
    pool.start()
    permitted = syscalls.capget_thread()[1]
    identity = CallerIdentity(caller.CallerResolver(permitted))
    kwargs = {}
    if inline_mod is not None:
        kwargs["inline"] = inline_mod.InlineRunner() if mode == "inline" else None
    ops = Operations(table, pool, identity, CachePolicy.for_mode(CacheMode.AUTO),
                     kernel_applies_umask=False, notifier=KernelNotifier(None), **kwargs)
    try:
        async def timed(name: str, body: Callable[[], object], k: int) -> None:
            runs = []
            for _ in range(REPS):
                t0 = time.perf_counter()
                for _ in range(k):
                    await body()  # type: ignore[misc]
                runs.append((time.perf_counter() - t0) / k * 1e6)
            report(f"{name} [{mode}]", statistics.median(runs))

        async def lookup() -> None:
            e = await ops.lookup(1, b"f", ctx)
            ops.forget([(e.st_ino, 1)])
        await timed("handler lookup + forget", lookup, n)

        async def hop() -> None:
            await pool.run(alice, 0, backing.getattr_, root_fd)
        if mode == "pool":
            await timed("worker hop (fstat in a worker)", hop, n)

        async def mkdir_rmdir() -> None:
            e = await ops.mkdir(1, b"d", 0o755, ctx)
            await ops.rmdir(1, b"d", ctx)
            ops.forget([(e.st_ino, 1)])
        await timed("handler mkdir + rmdir", mkdir_rmdir, n)

        async def create_unlink() -> None:
            fi, e = await ops.create(1, b"c", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, ctx)
            await ops.release(fi.fh)
            await ops.unlink(1, b"c", ctx)
            ops.forget([(e.st_ino, 1)])
        await timed("handler create(O_EXCL) + release + unlink", create_unlink, n)
    finally:
        pool.stop()
        table.close_all()


if __name__ == "__main__":
    sys.exit(main())
