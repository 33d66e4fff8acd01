"""The comparison benchmark (benchmarks/compare.py) keeps working, and leaves
nothing behind: a tiny real run, a run stopped with Ctrl-C or SIGTERM, and a
run killed outright whose leftovers the next run (or --clean) removes. While
one candidate is measured every other credfs daemon is stopped and accrues no
CPU time, and a daemon left stopped is still ended. Nothing about timings is
asserted; the figures only have to be there and add up.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "compare.py"
TINY = ["--quick", "--candidates", "native,credfs-caller", "--workloads", "metadata",
        "--files", "200", "--no-install"]
OPS = ("create", "stat", "readdir", "unlink")

# The RAM disk is a loop device: without loop support there is nothing to run.
pytestmark = pytest.mark.skipif(not os.path.exists("/dev/loop-control"),
                                reason="the benchmark needs loop devices (/dev/loop-control)")


def _leftovers(run_dir: str) -> list[str]:
    """Mounts, loop devices, processes and files of run_dir that still exist."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split(" ")[4]
            if mp == run_dir or mp.startswith(run_dir + "/"):
                found.append(f"mount {mp}")
    for d in Path("/sys/block").glob("loop*"):
        with contextlib.suppress(OSError):
            backing = (d / "loop" / "backing_file").read_text().strip()
            if backing.startswith(run_dir + "/") or backing.startswith("/credfs-compare.img"):
                found.append(f"loop device /dev/{d.name} on {backing}")
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and run_dir.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(f"process {entry}")
    if os.path.exists(run_dir):
        found.append(f"directory {run_dir}")
    return found


def _clean() -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--clean"], cwd=REPO, timeout=120,
                   capture_output=True, check=False)


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=REPO, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _until_measuring(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """Read the progress lines until the first measured step; the run directory."""
    assert proc.stderr is not None
    run_dir, seen = None, []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([proc.stderr], [], [], deadline - time.monotonic())[0]:
            break
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if m := re.match(r"compare: run directory (\S+)", line):
            run_dir = m.group(1)
        if line.startswith("[1/") and run_dir:
            return run_dir
    raise AssertionError("no measured step started; stderr:\n" + "".join(seen))


def _stopped(pid: int) -> bool:
    """Every thread of pid is stopped by a signal."""
    with contextlib.suppress(OSError, IndexError):
        states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0]
                  for t in Path(f"/proc/{pid}/task").iterdir()]
        return bool(states) and all(st == "T" for st in states)
    return False


def _stopped_daemons(run_dir: str) -> list[int]:
    """credfs daemons of run_dir whose every thread is stopped (SIGSTOP)."""
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if not entry.isdigit():
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if (b"credfs" in cmd and any(a.startswith(run_dir.encode()) for a in cmd)
                    and _stopped(int(entry))):
                found.append(int(entry))
    return found


def _freeze_while_daemon_stopped(proc: subprocess.Popen[str], run_dir: str,
                                 timeout: float = 60) -> list[int]:
    """Stop the harness itself at a moment when one of its credfs daemons is
    stopped (native's turn), so that it cannot continue it; the daemons."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _stopped_daemons(run_dir):
            proc.send_signal(signal.SIGSTOP)
            while not _stopped(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.005)
            if pids := _stopped_daemons(run_dir):
                return pids
            proc.send_signal(signal.SIGCONT)  # it had just continued it: again
        time.sleep(0.01)
    raise AssertionError(f"no credfs daemon of {run_dir} was ever stopped")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.mark.timeout(120)
def test_quick_run_reports_every_row_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    run_dir = data["run_dir"]
    assert _leftovers(run_dir) == []

    cands = ("native", "credfs-caller")
    summary = {(e["row"], e["candidate"]): e for e in data["summary"]}
    assert set(summary) == {(f"{op} 200 files", c) for op in OPS for c in cands}
    for op in OPS:
        assert summary[(f"{op} 200 files", "native")]["ratio_to_native"] == 1.0
        assert summary[(f"{op} 200 files", "credfs-caller")]["ratio_to_native"] > 0
    assert len(data["samples"]) == len(OPS) * len(cands)
    for s in data["samples"]:
        assert s["ops"] == 200 and s["seconds"] > 0
        # Only a daemon has CPU time to report.
        assert (s["cpu"] is None) == (s["candidate"] == "native")
    assert data["machine"]["kernel"] == os.uname().release
    assert data["candidates"]["credfs-caller"] == "credfs --creds caller --cache auto"

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["kind"] for r in rows) == ["median"] * 8 + ["sample"] * 8
    assert "credfs-caller" in r.stdout and "create 200 files (files/s)" in r.stdout
    md = (out / "results.md").read_text()
    assert "| create 200 files (files/s) |" in md and "| native | credfs-caller |" in md


@pytest.mark.timeout(120)
@pytest.mark.parametrize("keep", [False, True], ids=["stopped", "keep-idle-running"])
def test_idle_credfs_daemons_do_nothing_while_another_is_measured(tmp_path: Path,
                                                                  keep: bool) -> None:
    """Two credfs candidates: while native or one of them is measured, the
    other (or both) is stopped and accrues exactly 0 CPU ticks. With
    --keep-idle-running they run, as before, and the record says so."""
    out = tmp_path / "out"
    argv = [sys.executable, str(SCRIPT), "--quick", "--candidates",
            "native,credfs-caller,credfs-mounter", "--workloads", "metadata", "--files", "200",
            "--no-install", "--out", str(out), *(["--keep-idle-running"] if keep else [])]
    try:
        r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=110,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr[-3000:]
        data = json.loads((out / "results.json").read_text())
        assert _leftovers(data["run_dir"]) == []
    finally:
        _clean()
    assert data["idle_daemons"] == ("running" if keep else "stopped")
    assert ("(--keep-idle-running)" in r.stdout) == keep
    daemons = {"credfs-caller", "credfs-mounter"}
    assert len(data["samples"]) == len(OPS) * 3
    for s in data["samples"]:
        idle = sorted(daemons - {s["candidate"]})
        if keep:
            assert s["idle_running"] == idle, s
        else:
            # Not one tick: the stopped daemons did no work at all.
            assert s["idle_running"] == [] and s["idle_cpu"] == 0.0, s
    if not keep:
        assert data["idle_daemon_cpu_s"] == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_cleans_up(signum: int) -> None:
    proc = _start(*TINY, "--files", "10000", "--reps", "20")
    try:
        run_dir = _until_measuring(proc)
        # Interrupted while credfs is stopped: it must still be ended.
        _freeze_while_daemon_stopped(proc, run_dir)
        proc.send_signal(signum)
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(90) == 128 + signum
        assert _leftovers(run_dir) == []
        assert proc.stderr is not None
        assert "SIGKILL" not in proc.stderr.read()  # continued, it ended on SIGTERM
    finally:
        _stop(proc)
        _clean()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sweeper", ["next run", "--clean"])
def test_next_run_removes_what_a_killed_run_left(sweeper: str) -> None:
    proc = _start(*TINY, "--files", "10000", "--reps", "20")
    try:
        run_dir = _until_measuring(proc)
        stopped = _freeze_while_daemon_stopped(proc, run_dir)
        proc.kill()  # no clean-up of its own
        proc.wait(30)
        assert _leftovers(run_dir), "a killed run should have left its RAM disk"
        # Its daemon stays stopped, with the SIGTERM of its parent's death pending.
        assert _stopped_daemons(run_dir) == stopped
        # The next run is not blocked by them, and removes them first.
        args = TINY if sweeper == "next run" else ["--clean"]
        r = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO,
                           capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        assert f"removed what a dead run left in {run_dir}" in r.stderr
        assert "could not remove" not in r.stderr
        assert "SIGKILL" not in r.stderr  # continued, the daemon ended on SIGTERM
        assert _leftovers(run_dir) == []
    finally:
        _stop(proc)
        _clean()


def test_rows_whose_repetitions_spread_wide_are_named() -> None:
    """The report names each row whose repetitions lie more than
    report.SPREAD_LIMIT apart for some candidate (a median of a noisy row
    says little), and only those, in the text and the Markdown tables."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from harness import report
        from harness.workloads import Row
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = [("w", Row("steady", "ops/s", "op")), ("w", Row("noisy", "ops/s", "op"))]

    def entry(row: str, cand: str, lo: float, hi: float) -> dict[str, object]:
        return {"workload": "w", "row": row, "unit": "ops/s", "op": "op", "candidate": cand,
                "reps": 3, "median": (lo + hi) / 2, "min": lo, "max": hi,
                "ratio_to_native": 1.0, "cpu_us_per_op": None, "device_kib_per_op": None}
    summary = [entry("steady", "native", 100, 140), entry("steady", "credfs", 50, 60),
               entry("noisy", "native", 100, 110), entry("noisy", "credfs", 10, 90)]
    assert report.wide_spreads(summary, rows, ["native", "credfs"]) == ["noisy: credfs 9.0x"]
    assert "noisy: credfs 9.0x" in report.tables(summary, rows, ["native", "credfs"])
    machine = dict.fromkeys(("cpu", "cores", "ram_gib", "os", "kernel", "python", "credfs",
                             "mergerfs", "bindfs", "fio"), "x")
    md = report.markdown(summary, rows, ["native", "credfs"], machine)
    assert "where the median says little: noisy: credfs 9.0x." in md
    assert "steady:" not in md
