"""Compare credfs with the native directory, mergerfs and bindfs on a RAM-backed ext4.

As root, from the repository:

    .venv/bin/python benchmarks/compare.py --out bench-results      # the full run
    .venv/bin/python benchmarks/compare.py --quick                  # smoke: small sizes, 1 rep

It builds a journaled ext4 on a loop device whose image lives in a tmpfs of its
own, mounts every candidate on the same backing tree, and runs each workload
on each candidate, interleaved and rotated so that drift hits all of them
alike. It prints the median of the repetitions with the ratio to native's
median, and the daemons' CPU time per operation; --out also writes
results.csv and results.json.

Fairness: while one candidate is measured, no other candidate's daemon works.
Every credfs daemon but the measured one is stopped (SIGSTOP), also while
native, mergerfs or bindfs is measured: with --cache auto each credfs watches
the whole backing filesystem (fanotify), and a running idle one would read
and sift the measured candidate's events on the same CPUs. A daemon is
continued (SIGCONT) before its own turn, and measured only once it has read
its backlog (its CPU time has stopped growing for 0.1 s, at most 3 s); the
daemon CPU figures span the measured operations only. mergerfs and bindfs
watch nothing and stay running. Each sample records the idle credfs daemons'
CPU time meanwhile (0 when stopped). --keep-idle-running leaves them running,
as before, for comparison; the report says which.

Every mount, loop device and process it made is removed at the end, also on
an error, Ctrl-C or SIGTERM (stopped daemons are continued first); a run
killed outright is cleaned up by the next one, or by --clean. mergerfs,
bindfs and fio are installed with apt-get when missing (unless --no-install).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import signal
import sys
import time
from typing import Any

from harness import BenchError, cleanup, ramdisk, report, sysutil
from harness.agents import Agent
from harness.candidates import DEFAULT, SPECS, Candidate, IdleDaemons, Spec, start
from harness.workloads import ALL, NAMES, UID_A, UID_B, Env, Sample, Sizes, Workload, prepare

DEBIAN_PACKAGES = {"mergerfs": "mergerfs", "bindfs": "bindfs", "fio": "fio"}
IDLE_MODES = {"stopped": "stopped (SIGSTOP) while another candidate is measured",
              "running": "left running while another candidate is measured "
                         "(--keep-idle-running)"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"compare: {message}\n")
        raise SystemExit(2)


def _list(valid: tuple[str, ...], what: str) -> Any:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in valid]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or '(none given)'};"
                                             f" choose from {', '.join(valid)}")
        return items
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="compare.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes (64 MiB files, 500 files) and 1 repetition: a smoke test")
    p.add_argument("--reps", type=int, help="repetitions (default 3, 1 with --quick)")
    p.add_argument("--candidates", type=_list(tuple(SPECS), "candidate"),
                   default=list(DEFAULT),
                   help=f"comma-separated, from: {', '.join(SPECS)} (default: "
                        f"{','.join(DEFAULT)}; native is always included: the ratios need it)")
    p.add_argument("--workloads", type=_list(NAMES, "workload"), default=list(NAMES),
                   help=f"comma-separated subset of: {', '.join(NAMES)}")
    p.add_argument("--files", type=int,
                   help="files for the metadata and two-uid workloads (default 10000, "
                        "500 with --quick; the two uids make half each)")
    p.add_argument("--mergerfs-options", metavar="OPTS",
                   help="mergerfs -o options instead of the built-in fastest safe set")
    p.add_argument("--bindfs-options", metavar="OPTS",
                   help="bindfs -o options instead of the built-in big_writes")
    p.add_argument("--keep-idle-running", action="store_true",
                   help="leave the credfs daemons that are not being measured running (the "
                        "old behaviour: their backing-filesystem watches then take CPU from "
                        "whoever is measured); by default they are stopped")
    p.add_argument("--out", metavar="DIR", help="write results.csv and results.json there")
    p.add_argument("--no-install", action="store_true",
                   help="do not apt-get install missing mergerfs/bindfs/fio: fail instead")
    p.add_argument("--clean", action="store_true",
                   help="only remove what runs that died left behind (mounts, loop devices, "
                        "processes, files), then exit")
    p.add_argument("--timeout", type=float,
                   help="seconds one step may take before the run is abandoned "
                        "(default 900, 120 with --quick)")
    a = p.parse_args(argv)
    if a.reps is not None and a.reps < 1:
        p.error("--reps must be at least 1")
    if a.files is not None and a.files < 1:
        p.error("--files must be at least 1")
    if "native" not in a.candidates:
        a.candidates.insert(0, "native")
    return a


def ensure_tools(tools: set[str], install: bool) -> None:
    missing = sorted(t for t in tools if shutil.which(t) is None)
    if not missing:
        return
    pkgs = [DEBIAN_PACKAGES[t] for t in missing]
    if not install:
        raise BenchError(f"missing {', '.join(missing)}: apt-get install {' '.join(pkgs)} "
                         "(or leave out --no-install)")
    sys.stderr.write(f"compare: installing {' '.join(pkgs)} with apt-get\n")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    argv = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", *pkgs]
    r = sysutil.run(argv, timeout=900, check=False, env=env)
    if r.returncode != 0:  # perhaps stale package lists: update once and retry
        sysutil.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-q"], timeout=600,
                    check=False, env=env)
        sysutil.run(argv, timeout=900, env=env)
    still = [t for t in missing if shutil.which(t) is None]
    if still:
        raise BenchError(f"still missing after apt-get: {', '.join(still)}")


def plan(reps: int, workloads: list[Workload], cands: list[Candidate]
         ) -> list[tuple[int, Workload, Candidate]]:
    """Every (rep, workload) runs on every candidate back to back; the order of
    the candidates is rotated by one from each workload to the next and from
    each repetition to the next, so that no candidate always goes first (or
    right after the same other one) in a workload."""
    steps = []
    n = len(cands)
    for rep in range(reps):
        for wi, w in enumerate(workloads):
            k = (rep + wi) % n
            steps += [(rep, w, c) for c in cands[k:] + cands[:k]]
    return steps


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def _sizes(args: argparse.Namespace) -> Sizes:
    if args.quick:
        return Sizes.quick(args.files)
    return Sizes(meta_files=args.files, two_uid_files=args.files) if args.files else Sizes()


def _specs(args: argparse.Namespace) -> list[Spec]:
    """The chosen candidates, with the peers' options replaced where asked."""
    replaced = {"mergerfs": args.mergerfs_options, "bindfs": args.bindfs_options}
    return [dataclasses.replace(s, args=("-o", opts)) if (opts := replaced.get(s.kind)) else s
            for s in (SPECS[c] for c in args.candidates)]


def _measure(steps: list[tuple[int, Workload, Candidate]], env: Env, reps: int,
             idle: IdleDaemons | None) -> list[Sample]:
    samples: list[Sample] = []
    t0 = time.monotonic()
    for i, (rep, w, cand) in enumerate(steps, 1):
        spent = time.monotonic() - t0
        left = f", ~{_elapsed(spent / (i - 1) * (len(steps) - i + 1))} left" if i > 1 else ""
        report.progress(f"[{i}/{len(steps)}] rep {rep + 1}/{reps}  {w.name:<11} on "
                        f"{cand.name:<20} {_elapsed(spent)} elapsed{left}")
        if idle is not None:
            idle.only(cand)
        for row, m in w.run(env, cand):
            samples.append(Sample(rep, w.name, row.name, cand.name, m.ops, m.seconds, m.cpu,
                                  m.device_read, m.idle_cpu, m.idle_running))
    if idle is not None:
        idle.resume_all()  # nothing past this point may find a mount hanging
    report.end_progress()
    return samples


def run(args: argparse.Namespace, clean: cleanup.Cleanup, meta: dict[str, Any]) -> int:
    sizes = _sizes(args)
    reps = args.reps or (1 if args.quick else 3)
    timeout = args.timeout or (120 if args.quick else 900)
    workloads = [cls(sizes) for cls in ALL if cls.name in args.workloads]
    specs = _specs(args)
    tools = {t for s in specs if (t := s.tool)} | {t for w in workloads for t in w.tools}
    if args.out:
        _check_out_dir(args.out)
    ensure_tools(tools, not args.no_install)
    _check_fd_limit(specs, sizes)
    meta["machine"] = report.machine()
    run_dir = cleanup.new_run_dir()
    meta["run_dir"] = run_dir
    sys.stderr.write(f"compare: run directory {run_dir}\n")
    # Pushed first, so it runs last: whatever the specific undos missed.
    clean.push(f"tear down {run_dir}", lambda: _tear_down(run_dir))
    image = sizes.read_file + max(w.space(sizes) for w in workloads) + (384 << 20)
    disk = ramdisk.make(run_dir, image, clean)
    meta["backing_store"] = disk.describe
    backing = os.path.join(disk.mountpoint, "tree")
    os.mkdir(backing, 0o755)
    agents = {uid: Agent(uid, uid) for uid in (UID_A, UID_B)}
    for a in agents.values():
        clean.push(f"stop agent uid {a.uid}", a.close)
    env = Env(disk.mountpoint, disk.loop, backing, agents, sizes, timeout)
    report.progress("preparing the backing tree")
    prepare(env)
    mnt_dir = os.path.join(run_dir, "mnt")
    os.mkdir(mnt_dir, 0o755)
    cands = []
    for spec in specs:
        report.progress(f"mounting {spec.name}")
        cands.append(start(spec, backing, mnt_dir, clean))
    meta["candidates"] = {s.name: s.describe for s in specs}
    meta["sizes"] = sizes.__dict__
    meta["reps"] = reps
    meta["idle_daemons"] = "running" if args.keep_idle_running else "stopped"
    env.daemons = [c for c in cands if c.pausable]
    idle = None if args.keep_idle_running else IdleDaemons(cands, clean)

    samples = _measure(plan(reps, workloads, cands), env, reps, idle)
    meta["idle_daemon_cpu_s"] = round(sum(s.idle_cpu or 0.0 for s in samples), 3)
    meta["load_average_end"] = os.getloadavg()
    rows = [(w.name, r) for w in workloads for r in w.rows]
    names = [c.name for c in cands]
    summary = report.summarize(samples, rows, names)
    m = meta["machine"]
    print(f"\ncredfs comparison, {reps} repetition(s); backing store: {disk.describe}")
    print(f"machine: {report.machine_line(m)}")
    print("candidates: " + "; ".join(f"{k} = {v}" for k, v in meta["candidates"].items()))
    if env.daemons:
        print(f"idle credfs daemons: {IDLE_MODES[meta['idle_daemons']]}; their CPU time "
              f"while others were measured: {meta['idle_daemon_cpu_s']:.2f} s")
    print(f"load average at start {meta['load_average_start'][0]:.2f}, "
          f"at end {meta['load_average_end'][0]:.2f}\n")
    print(report.tables(summary, rows, names))
    if args.out:
        meta["total_seconds"] = time.monotonic() - meta["_t0"]
        try:
            report.write(args.out, samples, summary, {k: v for k, v in meta.items()
                                                      if not k.startswith("_")})
            with open(os.path.join(args.out, "results.md"), "w") as f:
                f.write(report.markdown(summary, rows, names, m,
                                        IDLE_MODES[meta["idle_daemons"]] if env.daemons
                                        else None))
        except OSError as e:
            raise BenchError(f"writing the results to {args.out}: {e}") from None
        print(f"\nwrote results.csv, results.json and results.md (the tables for the README) "
              f"to {args.out}")
    return 0


def _check_out_dir(out: str) -> None:
    """Fail before measuring, not after, if the results cannot be written."""
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "a"):
            pass
    except OSError as e:
        raise BenchError(f"--out {out}: {e.strerror}") from None


def _check_fd_limit(specs: list[Spec], sizes: Sizes) -> None:
    """credfs holds a descriptor per inode the kernel knows: with more files in
    one workload than its open-file limit allows it would fail with EMFILE."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    need = max(sizes.meta_files, sizes.two_uid_files, sizes.small_files) + 1000
    if any(s.kind == "credfs" for s in specs) and hard != resource.RLIM_INFINITY and hard < need:
        raise BenchError(f"--files {need - 1000} needs about {need} open files in credfs, "
                         f"but RLIMIT_NOFILE's hard limit is {hard}")


def _tear_down(run_dir: str) -> None:
    left = cleanup.tear_down(run_dir)
    if left:
        raise BenchError("could not remove " + ", ".join(left))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("compare: run as root: it mounts filesystems, makes a loop device "
                         "and runs workloads as other uids\n")
        return 2
    meta: dict[str, Any] = {"_t0": time.monotonic(), "load_average_start": os.getloadavg(),
                            "command": " ".join(sys.argv)}
    clean = cleanup.Cleanup()
    cleanup.catch_signals()
    rc = 1
    try:
        for d in cleanup.sweep_dead_runs():
            sys.stderr.write(f"compare: removed what a dead run left in {d}\n")
        rc = 0 if args.clean else run(args, clean, meta)
    except BenchError as e:
        report.end_progress()
        sys.stderr.write(f"compare: error: {e}\n")
    except cleanup.Interrupted as e:
        report.end_progress()
        sys.stderr.write(f"compare: {e}: stopping and cleaning up\n")
        rc = 128 + e.signum
    finally:
        cleanup.ignore_signals()
        clean.run_all()
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)
    run_dir = meta.get("run_dir")
    if run_dir and (sysutil.mounts_under(run_dir) or sysutil.loop_devices_under(run_dir)
                    or cleanup.orphan_loops()):
        sys.stderr.write(f"compare: error: mounts or loop devices left under {run_dir}\n")
        rc = rc or 1
    sys.stderr.write(f"compare: total time {_elapsed(time.monotonic() - meta['_t0'])}\n")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
