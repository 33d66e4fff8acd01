"""Medians, ratios to native, the two tables, results.csv/results.json, and
the facts about the machine that go with them."""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .candidates import REPO
from .workloads import Row, Sample


def _version(argv: list[str], pattern: str) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20,
                           stdin=subprocess.DEVNULL, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, r.stdout + r.stderr)
    return m.group(1) if m else None


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    commit = _version(["git", "-C", REPO, "describe", "--always", "--dirty"], r"(\S+)")
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem / (1 << 30), 1),
        "python": platform.python_version(),
        "credfs": commit,
        "mergerfs": _version(["mergerfs", "-V"], r"version:?\s*v?(\S+)"),
        "bindfs": _version(["bindfs", "--version"], r"bindfs\s+(\S+)"),
        "fio": _version(["fio", "--version"], r"fio-(\S+)"),
        "os": _version(["sh", "-c", ". /etc/os-release && echo \"$PRETTY_NAME\""], r"(.+)"),
    }


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}, "
            f"kernel {m['kernel']}, Python {m['python']}; credfs {m['credfs']}, "
            f"mergerfs {m['mergerfs']}, bindfs {m['bindfs']}, fio {m['fio']}")


def summarize(samples: list[Sample], rows: list[tuple[str, Row]],
              candidates: list[str]) -> list[dict[str, Any]]:
    """One entry per (row, candidate): median value, ratio to native's median,
    median daemon CPU per op, and the spread."""
    out = []
    for workload, row in rows:
        native = [s.value for s in samples if s.row == row.name and s.candidate == "native"]
        base = statistics.median(native) if native else None
        for cand in candidates:
            mine = [s for s in samples if s.row == row.name and s.candidate == cand]
            if not mine:
                continue
            values = [s.value for s in mine]
            cpus = [c for s in mine if (c := s.cpu_us_per_op) is not None]
            dev = [s.device_read / 1024 / s.ops for s in mine if s.ops]
            med = statistics.median(values)
            out.append({
                "workload": workload, "row": row.name, "unit": row.unit, "op": row.op,
                "candidate": cand, "reps": len(mine), "median": med,
                "min": min(values), "max": max(values),
                "ratio_to_native": med / base if base else None,
                "cpu_us_per_op": statistics.median(cpus) if cpus else None,
                "device_kib_per_op": statistics.median(dev) if dev else None,
            })
    return out


# Repetitions of one row and candidate spread further than this (slowest to
# fastest) make its median say little: the report names such rows.
SPREAD_LIMIT = 1.5


def wide_spreads(summary: list[dict[str, Any]], rows: list[tuple[str, Row]],
                 candidates: list[str], limit: float = SPREAD_LIMIT) -> list[str]:
    """One line per row whose repetitions spread by more than limit (max/min)
    for some candidate, naming each such candidate and its spread."""
    by = {(e["row"], e["candidate"]): e for e in summary}
    out = []
    for _w, r in rows:
        wide = [f"{c} {e['max'] / e['min']:.1f}x" for c in candidates
                if (e := by.get((r.name, c))) and e["reps"] > 1 and e["min"] > 0
                and e["max"] / e["min"] > limit]
        if wide:
            out.append(f"{r.name}: {', '.join(wide)}")
    return out


def _spread_note(summary: list[dict[str, Any]], rows: list[tuple[str, Row]],
                 candidates: list[str]) -> list[str]:
    wide = wide_spreads(summary, rows, candidates)
    if not wide:
        return []
    return ["", f"Repetitions more than {SPREAD_LIMIT}x apart (fastest to slowest), "
            "where the median says little:", *(f"  {line}" for line in wide)]


def _num(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def tables(summary: list[dict[str, Any]], rows: list[tuple[str, Row]],
           candidates: list[str]) -> str:
    """The text tables: median (ratio to native), then daemon CPU µs per op."""
    by = {(e["row"], e["candidate"]): e for e in summary}
    label_w = max(len(f"{r.name} ({r.unit})") for _w, r in rows) + 2
    lines = ["Median of the repetitions; in parentheses the ratio to native's median "
             "(higher is faster; 1.00 = as fast as native)", ""]
    cells = {(r.name, c): (f"{_num(e['median'])} ({e['ratio_to_native']:.2f})"
                           if (e := by.get((r.name, c))) and e["ratio_to_native"] is not None
                           else (_num(e["median"]) if e else "-"))
             for _w, r in rows for c in candidates}
    widths = {c: max(len(c), *(len(cells[(r.name, c)]) for _w, r in rows)) + 2
              for c in candidates}
    lines.append("".ljust(label_w) + "".join(c.rjust(widths[c]) for c in candidates))
    for _w, r in rows:
        lines.append(f"{r.name} ({r.unit})".ljust(label_w)
                     + "".join(cells[(r.name, c)].rjust(widths[c]) for c in candidates))
    lines += _spread_note(summary, rows, candidates)
    daemons = [c for c in candidates if c != "native"]
    if daemons:
        lines += ["", "Daemon CPU time (user + system), microseconds per operation", ""]
        lw = max(len(f"{r.name} (per {r.op})") for _w, r in rows) + 2
        dw = {c: max(len(c), 8) + 2 for c in daemons}
        lines.append("".ljust(lw) + "".join(c.rjust(dw[c]) for c in daemons))
        for _w, r in rows:
            vals = []
            for c in daemons:
                e = by.get((r.name, c))
                v = e["cpu_us_per_op"] if e else None
                vals.append(("-" if v is None else _num(v)).rjust(dw[c]))
            lines.append(f"{r.name} (per {r.op})".ljust(lw) + "".join(vals))
    reads = [r for _w, r in rows if re.search(r"\bread\b", r.name)]
    if reads:
        lines += ["", "Read from the backing block device, KiB per operation "
                  "(4 for a 4 KiB read that missed every cache, 0 for a hit)", ""]
        lw = max(len(f"{r.name} (per {r.op})") for r in reads) + 2
        dw = {c: max(len(c), 8) + 2 for c in candidates}
        lines.append("".ljust(lw) + "".join(c.rjust(dw[c]) for c in candidates))
        for r in reads:
            vals = []
            for c in candidates:
                e = by.get((r.name, c))
                v = e["device_kib_per_op"] if e else None
                vals.append(("-" if v is None else _num(v)).rjust(dw[c]))
            lines.append(f"{r.name} (per {r.op})".ljust(lw) + "".join(vals))
    return "\n".join(lines)


def markdown(summary: list[dict[str, Any]], rows: list[tuple[str, Row]],
             candidates: list[str], machine: dict[str, Any], idle: str | None = None) -> str:
    """The median table and the daemon-CPU table in Markdown, for the README;
    idle: what the idle credfs daemons did (compare.IDLE_MODES)."""
    by = {(e["row"], e["candidate"]): e for e in summary}
    daemons = [c for c in candidates if c != "native"]
    out = [f"Machine: {machine_line(machine)}.", "",
           *([f"Idle credfs daemons: {idle}.", ""] if idle else []),
           "Median (ratio to native; higher is faster):", "",
           "| workload | " + " | ".join(candidates) + " |",
           "|---|" + "---|" * len(candidates)]
    for _w, r in rows:
        cells = []
        for c in candidates:
            e = by.get((r.name, c))
            cells.append("-" if not e else f"{_num(e['median'])} ({e['ratio_to_native']:.2f})"
                         if e["ratio_to_native"] is not None else _num(e["median"]))
        out.append(f"| {r.name} ({r.unit}) | " + " | ".join(cells) + " |")
    wide = wide_spreads(summary, rows, candidates)
    if wide:
        out += ["", f"Repetitions more than {SPREAD_LIMIT}x apart (fastest to slowest), "
                "where the median says little: " + "; ".join(wide) + "."]
    if daemons:
        out += ["", "Daemon CPU time per operation (µs):", "",
                "| workload | " + " | ".join(daemons) + " |", "|---|" + "---|" * len(daemons)]
        for _w, r in rows:
            cells = []
            for c in daemons:
                e = by.get((r.name, c))
                v = e["cpu_us_per_op"] if e else None
                cells.append("-" if v is None else _num(v))
            out.append(f"| {r.name} (per {r.op}) | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write(out_dir: str, samples: list[Sample], summary: list[dict[str, Any]],
          meta: dict[str, Any]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    units = {e["row"]: e["unit"] for e in summary}
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "rep", "workload", "row", "unit", "candidate", "ops", "seconds",
                    "value", "ratio_to_native", "daemon_cpu_s", "cpu_us_per_op",
                    "device_read_bytes"])
        for s in samples:
            w.writerow(["sample", s.rep, s.workload, s.row, units.get(s.row, ""), s.candidate,
                        s.ops, f"{s.seconds:.6f}", f"{s.value:.3f}", "",
                        "" if s.cpu is None else f"{s.cpu:.3f}",
                        "" if s.cpu_us_per_op is None else f"{s.cpu_us_per_op:.2f}",
                        s.device_read])
        for e in summary:
            w.writerow(["median", "", e["workload"], e["row"], e["unit"], e["candidate"], "", "",
                        f"{e['median']:.3f}",
                        "" if e["ratio_to_native"] is None else f"{e['ratio_to_native']:.4f}",
                        "", "" if e["cpu_us_per_op"] is None else f"{e['cpu_us_per_op']:.2f}",
                        ""])
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**meta, "summary": summary,
                   "samples": [asdict(s) | {"value": s.value, "cpu_us_per_op": s.cpu_us_per_op}
                               for s in samples]}, f, indent=1)
        f.write("\n")


def progress(text: str) -> None:
    """One status line, rewritten in place on a terminal (a line each otherwise)."""
    if sys.stderr.isatty():
        width = os.get_terminal_size(sys.stderr.fileno()).columns - 1
        sys.stderr.write("\r" + text[:width].ljust(width))
    else:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


def end_progress() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\n")
        sys.stderr.flush()
