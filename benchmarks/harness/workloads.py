"""The workloads. Each runs once per (repetition, candidate) in its own fresh
directory of the backing tree and returns one Sample per row it measures.

The backing tree (on the RAM ext4):
    data/read.bin   the file every read workload reads (written once at set-up)
    work/           root 1777, like /tmp; a directory per workload run inside
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import BenchError, sysutil
from .agents import Agent
from .candidates import Candidate

MiB = 1 << 20
UID_A, UID_B = 2001, 2002  # the workloads' users (gid = uid, no other groups)


STABLE_LOOKS = 3  # settle(): looks at the free space that must agree


@dataclass(frozen=True)
class Sizes:
    read_file: int = 1 << 30  # shared file for sequential and random reads
    seq_write: int = 1 << 30
    block: int = MiB  # sequential read/write request size
    rand_io_1: int = 64 * MiB  # bytes read by the 1-job random read
    rand_io_4: int = 32 * MiB  # bytes read by each of the 4 jobs
    meta_files: int = 10_000
    small_files: int = 2_000
    small_size: int = 4096
    two_uid_files: int = 10_000  # in all, half by each uid

    @staticmethod
    def quick(files: int | None = None) -> Sizes:
        n = files or 500
        return Sizes(read_file=64 * MiB, seq_write=64 * MiB, rand_io_1=8 * MiB,
                     rand_io_4=2 * MiB, meta_files=n, small_files=min(n, 200),
                     two_uid_files=max(n, 2))


@dataclass(frozen=True)
class Row:
    name: str
    unit: str  # of the value (ops per second of this row's op)
    op: str  # what one op is, for the daemon-CPU table


@dataclass(frozen=True)
class Measured:
    seconds: float
    ops: int
    cpu: float | None  # daemon CPU seconds meanwhile (None: no daemon)
    device_read: int  # bytes read from the backing block device meanwhile
    idle_cpu: float | None = None  # the other credfs daemons' CPU seconds meanwhile
    idle_running: tuple[str, ...] = ()  # those of them that were not stopped


@dataclass
class Sample:
    rep: int
    workload: str
    row: str
    candidate: str
    ops: int
    seconds: float
    cpu: float | None  # daemon CPU seconds during the row (None: no daemon)
    device_read: int  # bytes the backing device read: shows whether reads missed the cache
    # The other credfs daemons (idle: not measured) during the row: their CPU
    # seconds (None: there are none) and the names of those not stopped at
    # its start or end. Stopped (see IdleDaemons), they accrue exactly 0.
    idle_cpu: float | None = None
    idle_running: tuple[str, ...] = ()

    @property
    def value(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else float("inf")

    @property
    def cpu_us_per_op(self) -> float | None:
        return None if self.cpu is None or not self.ops else self.cpu / self.ops * 1e6


@dataclass
class Env:
    """What every workload run needs."""
    fs_root: str  # the ext4 mountpoint (sync and drop caches there)
    device: str  # its block device, /dev/loopN
    backing: str  # the backing tree (what candidates mount; native reads it directly)
    agents: dict[int, Agent]
    sizes: Sizes
    timeout: float
    sticky_errno: int = 0  # the kernel's answer natively (set by prepare)
    daemons: list[Candidate] = field(default_factory=list)  # the credfs ones (see measure)
    counter: dict[str, int] = field(default_factory=dict)

    def workdir(self, cand: Candidate, label: str, owner: int, mode: int) -> tuple[str, str]:
        """A fresh directory, made natively: (backing path, path through cand)."""
        n = self.counter[label] = self.counter.get(label, 0) + 1
        name = f"{label}-{cand.name}-{n}"
        path = os.path.join(self.backing, "work", name)
        os.mkdir(path)
        os.chown(path, owner, owner)
        os.chmod(path, mode)
        return path, os.path.join(cand.root, "work", name)

    def remove(self, agent: Agent | None, backing_path: str, cand_path: str,
               cand: Candidate) -> None:
        """Remove a workload's directory through the candidate (see fileops.remove_tree),
        then natively whatever that left, and wait until it is really gone."""
        if agent is not None and os.path.exists(backing_path):
            agent.call("remove_tree", cand_path, timeout=self.timeout)
        shutil.rmtree(backing_path, ignore_errors=True)
        self.settle(cand, backing_path)

    def settle(self, cand: Candidate, backing_path: str, timeout: float = 30.0) -> None:
        """A FUSE daemon holds a removed file until the kernel forgets its inode
        (credfs: the node's O_PATH descriptor and its passthrough registration),
        a moment after unlink returned. Wait until the daemon holds nothing
        under backing_path, then write the filesystem back, so that the next
        candidate's 1 GiB write does not find the disk still full of the last
        one's."""
        if cand.proc is not None:
            fd_dir = f"/proc/{cand.proc.pid}/fd"
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    held = any(os.readlink(f"{fd_dir}/{n}").startswith(backing_path + "/")
                               for n in os.listdir(fd_dir))
                except OSError:
                    held = True  # an fd closed while we looked: look again
                if not held:
                    break
                time.sleep(0.05)
        sysutil.syncfs(self.fs_root)
        # The kernel can still hold a removed file after the daemon let go of
        # it (an asynchronous RELEASE in flight, a backing-file registration
        # being dropped): wait until the free space has stopped growing, the
        # same over STABLE_LOOKS looks 0.1 s apart.
        free, same = -1, 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and same < STABLE_LOOKS:
            now = os.statvfs(self.fs_root).f_bavail
            same = same + 1 if now == free else 0
            free = now
            time.sleep(0.1)
            sysutil.syncfs(self.fs_root)

    def measure(self, cand: Candidate, action: Callable[[], tuple[float, int]]) -> Measured:
        """Time, ops, daemon CPU and device reads of action, on a written-back
        filesystem and compacted free memory; and what the idle credfs
        daemons did meanwhile (nothing, when they are stopped)."""
        sysutil.syncfs(self.fs_root)
        sysutil.compact_memory()
        idle = [c for c in self.daemons if c is not cand]
        running = {c.name for c in idle if not c.stopped()}
        i0 = sum(c.cpu() or 0.0 for c in idle)
        c0, d0 = cand.cpu(), sysutil.device_read_bytes(self.device)
        seconds, ops = action()
        c1, d1 = cand.cpu(), sysutil.device_read_bytes(self.device)
        i1 = sum(c.cpu() or 0.0 for c in idle)
        running |= {c.name for c in idle if not c.stopped()}
        cpu = None if c0 is None or c1 is None else c1 - c0
        return Measured(seconds, ops, cpu, d1 - d0, i1 - i0 if idle else None,
                        tuple(sorted(running)))

    def call(self, uid: int, name: str, *args: Any) -> tuple[float, int]:
        r = self.agents[uid].call(name, *args, timeout=self.timeout)
        return r["t1"] - r["t0"], r["ops"]

    def parallel(self, calls: list[tuple[int, str, tuple[Any, ...]]]) -> tuple[float, int]:
        """Run calls in different agents at once: from the first start to the last end."""
        for uid, name, args in calls:
            self.agents[uid].send(name, *args)
        results = [self.agents[uid].receive(self.timeout) for uid, _n, _a in calls]
        return (max(r["t1"] for r in results) - min(r["t0"] for r in results),
                sum(r["ops"] for r in results))


def check_owners(backing_dir: str, expect: dict[str, int], cand: Candidate) -> None:
    """Every entry named <prefix>... in backing_dir must belong to uid:gid expect[prefix]
    on the backing store itself; fail loudly otherwise."""
    seen = 0
    with os.scandir(backing_dir) as it:
        for e in it:
            uid = next((u for p, u in expect.items() if e.name.startswith(p)), None)
            if uid is None:
                continue
            st = e.stat(follow_symlinks=False)
            seen += 1
            if (st.st_uid, st.st_gid) != (uid, uid):
                raise BenchError(f"{cand.name}: {e.path} belongs to {st.st_uid}:{st.st_gid} on "
                                 f"the backing store, but uid {uid} created it")
    if not seen:
        raise BenchError(f"{cand.name}: no files found in {backing_dir} to check owners of")


# --- the workloads ------------------------------------------------------------------------

class Workload:
    name = ""
    rows: tuple[Row, ...] = ()
    tools: tuple[str, ...] = ()

    def space(self, s: Sizes) -> int:
        """Bytes it needs on the backing store beyond the shared read file."""
        return 0

    def run(self, env: Env, cand: Candidate) -> list[tuple[Row, Measured]]:
        raise NotImplementedError


class SeqWrite(Workload):
    name = "seq-write"

    def __init__(self, s: Sizes) -> None:
        self.rows = (Row(f"seq write {_size(s.seq_write)} + fsync", "MiB/s", "MiB"),)

    def space(self, s: Sizes) -> int:
        return s.seq_write

    def run(self, env: Env, cand: Candidate) -> list[tuple[Row, Measured]]:
        bpath, cpath = env.workdir(cand, self.name, UID_A, 0o755)
        s = env.sizes
        got = env.measure(cand, lambda: env.call(UID_A, "seq_write", f"{cpath}/seq.bin",
                                                 s.seq_write, s.block))
        if os.stat(f"{bpath}/seq.bin").st_size != s.seq_write:
            raise BenchError(f"{cand.name}: {bpath}/seq.bin has the wrong size after the write")
        check_owners(bpath, {"seq": UID_A}, cand)
        env.remove(env.agents[UID_A], bpath, cpath, cand)
        return [(self.rows[0], got)]


class SeqRead(Workload):
    name = "seq-read"

    def __init__(self, s: Sizes) -> None:
        size = _size(s.read_file)
        self.rows = (Row(f"seq read {size} cold", "MiB/s", "MiB"),
                     Row(f"seq read {size} warm", "MiB/s", "MiB"))

    def run(self, env: Env, cand: Candidate) -> list[tuple[Row, Measured]]:
        path = os.path.join(cand.root, "data", "read.bin")
        sysutil.drop_caches(env.fs_root)
        cold = env.measure(cand, lambda: env.call(UID_A, "seq_read", path, env.sizes.block))
        env.call(UID_A, "seq_read", path, env.sizes.block)  # make sure it is all cached
        warm = env.measure(cand, lambda: env.call(UID_A, "seq_read", path, env.sizes.block))
        return [(self.rows[0], cold), (self.rows[1], warm)]


class RandRead(Workload):
    """fio, 4 KiB psync reads at random offsets, through the page cache
    (--direct=0) but missing it: all caches are dropped first (FUSE's too),
    fio invalidates the file's cache and advises random access (no
    readahead), and each job reads every block of its region at most once
    (fio's random map), a small part of a file much larger than what it reads."""
    name = "rand-read"
    tools = ("fio",)

    def __init__(self, s: Sizes) -> None:
        self.rows = (Row("rand read 4K cache-miss 1 job", "IOPS", "read"),
                     Row("rand read 4K cache-miss 4 jobs", "IOPS", "read"))

    def run(self, env: Env, cand: Candidate) -> list[tuple[Row, Measured]]:
        s = env.sizes
        path = os.path.join(cand.root, "data", "read.bin")
        out = []
        for row, jobs, io in ((self.rows[0], 1, s.rand_io_1), (self.rows[1], 4, s.rand_io_4)):
            sysutil.drop_caches(env.fs_root)
            region = s.read_file // jobs
            out.append((row, env.measure(cand, lambda j=jobs, r=region, i=io:
                                         _fio(env, path, j, r, i))))
        return out


def _fio(env: Env, path: str, jobs: int, region: int, io: int) -> tuple[float, int]:
    argv = ["setpriv", f"--reuid={UID_A}", f"--regid={UID_A}", "--clear-groups", "--",
            "fio", "--name=randread", f"--filename={path}", "--readonly", "--rw=randread",
            "--bs=4k", "--ioengine=psync", "--direct=0", "--invalidate=1", "--fadvise_hint=1",
            f"--size={region}", f"--offset_increment={region}", f"--io_size={io}",
            f"--numjobs={jobs}", "--group_reporting", "--randrepeat=0",
            f"--runtime={int(env.timeout)}", "--output-format=json"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=env.timeout + 30,
                           stdin=subprocess.DEVNULL, cwd="/", start_new_session=True)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio on {path} took more than {env.timeout:.0f} s") from None
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise BenchError(f"fio on {path} failed: {msg[-1] if msg else r.returncode}")
    try:
        read = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["read"]
        ios, iops = int(read["total_ios"]), float(read["iops"])
    except (ValueError, KeyError, IndexError) as e:
        raise BenchError(f"fio on {path}: unexpected output ({e})") from None
    if not ios or not iops:
        raise BenchError(f"fio on {path} read nothing")
    return ios / iops, ios


class Metadata(Workload):
    name = "metadata"

    def __init__(self, s: Sizes) -> None:
        n = s.meta_files
        self.rows = (Row(f"create {n} files", "files/s", "file"),
                     Row(f"stat {n} files", "files/s", "file"),
                     Row(f"readdir {n} files", "entries/s", "entry"),
                     Row(f"unlink {n} files", "files/s", "file"))

    def run(self, env: Env, cand: Candidate) -> list[tuple[Row, Measured]]:
        n = env.sizes.meta_files
        bpath, cpath = env.workdir(cand, self.name, UID_A, 0o755)
        p = "m"
        create = env.measure(cand, lambda: env.call(UID_A, "create_files", cpath, p, n, 0))
        check_owners(bpath, {p: UID_A}, cand)
        stat = env.measure(cand, lambda: env.call(UID_A, "stat_files", cpath, p, n))
        ls = env.measure(cand, lambda: env.call(UID_A, "list_dir", cpath))
        if ls.ops != n:
            raise BenchError(f"{cand.name}: listing {cpath} gave {ls.ops} entries, not {n}")
        unlink = env.measure(cand, lambda: env.call(UID_A, "unlink_files", cpath, p, n))
        env.remove(env.agents[UID_A], bpath, cpath, cand)
        return list(zip(self.rows, (create, stat, ls, unlink), strict=True))


class SmallFiles(Workload):
    name = "small-files"

    def __init__(self, s: Sizes) -> None:
        n, size = s.small_files, _size(s.small_size)
        self.rows = (Row(f"write {n} files of {size}", "files/s", "file"),
                     Row(f"read back {n} files of {size}", "files/s", "file"))

    def space(self, s: Sizes) -> int:
        return s.small_files * max(s.small_size, 4096)

    def run(self, env: Env, cand: Candidate) -> list[tuple[Row, Measured]]:
        n, size = env.sizes.small_files, env.sizes.small_size
        bpath, cpath = env.workdir(cand, self.name, UID_A, 0o755)
        w = env.measure(cand, lambda: env.call(UID_A, "create_files", cpath, "s", n, size))
        check_owners(bpath, {"s": UID_A}, cand)
        r = env.measure(cand, lambda: env.call(UID_A, "read_files", cpath, "s", n, size))
        env.remove(env.agents[UID_A], bpath, cpath, cand)
        return [(self.rows[0], w), (self.rows[1], r)]


class TwoUids(Workload):
    """The metadata workload by uids 2001 and 2002 at once, half of the files
    each, in one root-owned 1777 directory (like /tmp). Checks that the
    backing store gives each file to the uid that created it, and that the
    sticky bit stops 2002 from removing 2001's file with the kernel's own errno.

    Half each, not the whole workload each: the total stays that of the
    metadata workload, so the rows compare with its rows, and credfs (one
    descriptor per inode the kernel knows) stays below a 20000 RLIMIT_NOFILE.
    """
    name = "two-uids"

    def __init__(self, s: Sizes) -> None:
        n = s.two_uid_files // 2
        self.rows = (Row(f"2 uids create 2x{n} (sticky dir)", "files/s", "file"),
                     Row(f"2 uids stat 2x{n}", "files/s", "file"),
                     Row(f"2 uids readdir 2x{2 * n}", "entries/s", "entry"),
                     Row(f"2 uids unlink 2x{n}", "files/s", "file"))

    def run(self, env: Env, cand: Candidate) -> list[tuple[Row, Measured]]:
        n = env.sizes.two_uid_files // 2
        bpath, cpath = env.workdir(cand, self.name, 0, 0o1777)
        pa, pb = f"u{UID_A}-", f"u{UID_B}-"
        both = [(UID_A, pa), (UID_B, pb)]
        create = env.measure(cand, lambda: env.parallel(
            [(u, "create_files", (cpath, p, n, 0)) for u, p in both]))
        check_owners(bpath, {pa: UID_A, pb: UID_B}, cand)
        stat = env.measure(cand, lambda: env.parallel(
            [(u, "stat_files", (cpath, p, n)) for u, p in both]))
        ls = env.measure(cand, lambda: env.parallel([(u, "list_dir", (cpath,)) for u, _p in both]))
        if ls.ops != 4 * n:
            raise BenchError(f"{cand.name}: listing {cpath} twice gave {ls.ops} entries, "
                             f"not {4 * n}")
        got = env.agents[UID_B].call("try_unlink", f"{cpath}/{pa}000000", timeout=env.timeout)
        if got != env.sticky_errno:
            raise BenchError(f"{cand.name}: uid {UID_B} unlinking uid {UID_A}'s file in a sticky "
                             f"directory gave {_errname(got)}, "
                             f"natively {_errname(env.sticky_errno)}")
        unlink = env.measure(cand, lambda: env.parallel(
            [(u, "unlink_files", (cpath, p, n)) for u, p in both]))
        env.remove(None, bpath, cpath, cand)  # root's directory: removed natively
        return list(zip(self.rows, (create, stat, ls, unlink), strict=True))


def _errname(e: int) -> str:
    return "success" if e == 0 else os.strerror(e)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


ALL: tuple[type[Workload], ...] = (SeqWrite, SeqRead, RandRead, Metadata, SmallFiles, TwoUids)
NAMES = tuple(w.name for w in ALL)


def prepare(env: Env) -> None:
    """The shared tree: the read file, work/ (1777), and the kernel's own answer
    to the sticky-bit question, asked natively."""
    data = os.path.join(env.backing, "data")
    os.makedirs(data, 0o755)
    chunk = os.urandom(MiB)  # incompressible; nothing in the path compresses anyway
    fd = os.open(os.path.join(data, "read.bin"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for _ in range(env.sizes.read_file // MiB):
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    work = os.path.join(env.backing, "work")
    os.mkdir(work)
    os.chmod(work, 0o1777)
    oracle = os.path.join(work, "sticky-oracle")
    os.mkdir(oracle)
    os.chmod(oracle, 0o1777)
    env.agents[UID_A].call("create_files", oracle, "x", 1, 0, timeout=env.timeout)
    env.sticky_errno = env.agents[UID_B].call("try_unlink", f"{oracle}/x000000",
                                              timeout=env.timeout)
    shutil.rmtree(oracle)
    if env.sticky_errno == 0:
        raise BenchError("natively, uid 2002 could remove uid 2001's file in a sticky directory")
