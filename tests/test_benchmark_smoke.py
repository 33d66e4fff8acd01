"""The comparison benchmark (benchmarks/compare.py) keeps working, and leaves
nothing behind: a tiny real run, a run stopped with Ctrl-C, and a run killed
outright whose leftovers the next run removes. Nothing about timings is
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
def test_ctrl_c_cleans_up() -> None:
    proc = _start(*TINY, "--files", "10000", "--reps", "20")
    try:
        run_dir = _until_measuring(proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 128 + signal.SIGINT
        assert _leftovers(run_dir) == []
    finally:
        _stop(proc)
        _clean()


@pytest.mark.timeout(120)
def test_next_run_removes_what_a_killed_run_left() -> None:
    proc = _start(*TINY, "--files", "10000", "--reps", "20")
    try:
        run_dir = _until_measuring(proc)
        proc.kill()  # no clean-up of its own
        proc.wait(30)
        assert _leftovers(run_dir), "a killed run should have left its RAM disk"
        # The next run is not blocked by them, and removes them first.
        r = subprocess.run([sys.executable, str(SCRIPT), *TINY], cwd=REPO,
                           capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        assert f"removed what a dead run left in {run_dir}" in r.stderr
        assert _leftovers(run_dir) == []
    finally:
        _stop(proc)
        _clean()
