"""Least privilege, seen from outside: what the daemon's threads hold while
they act for someone."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from credfs.creds import cap_names

ALICE = (2001, 2001, "2001,3001")


def _threads(pid: int) -> dict[int, dict[str, str]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                out[int(tid)] = dict(line.rstrip("\n").split(":\t", 1) for line in f
                                     if ":\t" in line)
        except FileNotFoundError:
            continue
    return out


@pytest.mark.parametrize("args", [[], ["--creds", "mounter", "--mounter", "4000:4000"]],
                         ids=["caller", "service-mounter"])
def test_worker_acting_for_a_user_holds_no_capabilities(
        args: list[str], backing: Path, mnt: Path, mount_credfs: Any) -> None:
    """A worker caught in the act: its open of a file for alice is held up by
    a lease on the backing file, and meanwhile its fsuid is the acting
    identity's and its effective set is empty (not even CAP_SYS_ADMIN or
    CAP_MKNOD, which a fsuid switch alone would leave)."""
    target = backing / "leased"
    target.write_bytes(b"data")
    os.chown(target, 4000, 4000)
    target.chmod(0o666)
    m = mount_credfs(*args)
    assert m.pid is not None
    acting_uid, acting_gid = (4000, 4000) if args else ALICE[:2]
    holder = os.open(target, os.O_RDONLY)
    # The lease break is announced with SIGIO, whose default action would end us.
    old_sigio = signal.signal(signal.SIGIO, signal.SIG_IGN)
    fcntl.fcntl(holder, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    reader = subprocess.Popen(["setpriv", f"--reuid={ALICE[0]}", f"--regid={ALICE[1]}",
                               f"--groups={ALICE[2]}", "--", "cat", str(mnt / "leased")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        acting: dict[int, dict[str, str]] = {}
        while not acting and time.monotonic() < deadline:
            acting = {tid: st for tid, st in _threads(m.pid).items()
                      if st["Uid"].split()[3] == str(acting_uid)
                      and st["State"].startswith("S")}
            time.sleep(0.02)
        assert acting, "no daemon thread is acting as the caller"
        for tid, st in acting.items():
            eff = int(st["CapEff"], 16)
            assert eff == 0, f"thread {tid} acting as {acting_uid} holds {cap_names(eff)}"
            assert st["Gid"].split()[3] == str(acting_gid)
    finally:
        fcntl.fcntl(holder, fcntl.F_SETLEASE, fcntl.F_UNLCK)  # lets the open go on
        os.close(holder)
        signal.signal(signal.SIGIO, old_sigio)
        try:
            reader.wait(timeout=20)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait(timeout=10)
    assert reader.returncode == 0, reader.stderr.read() if reader.stderr else ""
