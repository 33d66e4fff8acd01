"""Least privilege, seen from outside: what the daemon's threads hold while
they act for someone."""

from __future__ import annotations

import errno
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
                      if st["Name"] == "credfs-worker"
                      and st["Uid"].split()[3] == str(acting_uid)}
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


def _as(uid: int, caps: str | None, *cmd: str) -> tuple[int, str]:
    """Run cmd as uid with groups [uid] and, when given, these capabilities
    (inheritable + ambient: what a backup tool given them with setcap holds)."""
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", f"--groups={uid}"]
    if caps:
        argv += [f"--inh-caps=-all,{caps}", f"--ambient-caps=-all,{caps}"]
    p = subprocess.run([*argv, "--", *cmd], capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.parametrize("emulate", [False, True], ids=["default", "caller-caps"])
def test_callers_capabilities_count_only_with_caller_caps(
        emulate: bool, backing: Path, native: Path, mnt: Path, mount_credfs: Any) -> None:
    """A backup tool (uid 2005) holding CAP_DAC_READ_SEARCH reads alice's 0600
    file natively. Through credfs it does so only with --caller-caps, and even
    then gets nothing its capability does not give (it cannot write the file),
    exactly as natively; without it, it is an ordinary uid 2005. Root alike."""
    for d in (backing, native):
        (d / "private").mkdir(mode=0o700)
        (d / "private" / "notes").write_text("alice's notes\n")
        os.chmod(d / "private" / "notes", 0o600)
        for p in (d / "private", d / "private" / "notes"):
            os.chown(p, 2001, 2001)
    mount_credfs(caller_caps=emulate)
    backup = "+dac_read_search"
    cases = [(2005, backup, "cat", "private/notes"),
             (2005, backup, "sh", "-c", "echo x >> {}/private/notes"),
             (2005, None, "cat", "private/notes"),
             (0, None, "cat", "private/notes")]
    for uid, caps, *cmd in cases:
        natively = _as(uid, caps, *[c.replace("{}", str(native)) if "{}" in c else
                                    str(native / c) if c.startswith("private") else c
                                    for c in cmd])
        through = _as(uid, caps, *[c.replace("{}", str(mnt)) if "{}" in c else
                                   str(mnt / c) if c.startswith("private") else c
                                   for c in cmd])
        holds_caps = uid == 0 or caps is not None
        if emulate or not holds_caps:
            assert (through[0] == 0) == (natively[0] == 0), (uid, caps, cmd, through, natively)
        else:
            # Without emulation a capability counts for nothing through the mount.
            assert through[0] != 0, (uid, caps, cmd, through)
    assert (backing / "private" / "notes").read_text() == "alice's notes\n"


def test_service_mounter_drops_root(backing: Path, mnt: Path, mount_credfs: Any,
                                    make_agent: Any) -> None:
    """With --mounter SERVICE (no policy), every backing operation is the
    service's: after mounting, the daemon is the service itself (real, effective
    and saved ids) and keeps only CAP_SYS_ADMIN, in every thread; it still
    serves (alice's file belongs to the service) and unmounts cleanly."""
    backing.chmod(0o777)
    m = mount_credfs("--creds", "mounter", "--mounter", "4000:4000")
    assert m.pid is not None
    alice = make_agent(2001, 2001, [2001])
    assert alice.call("write", os.fspath(mnt / "f"), b"x", os.O_CREAT | os.O_WRONLY) == 1
    st = (backing / "f").stat()
    assert (st.st_uid, st.st_gid) == (4000, 4000)
    for tid, status in _threads(m.pid).items():
        assert status["Uid"].split() == ["4000"] * 4, (tid, status["Uid"])
        assert status["Gid"].split() == ["4000"] * 4, (tid, status["Gid"])
        assert status["Groups"].split() == ["4000"], (tid, status["Groups"])
        assert set(cap_names(int(status["CapPrm"], 16))) == {"sys_admin"}, (tid, status)
        assert set(cap_names(int(status["CapEff"], 16))) <= {"sys_admin"}, (tid, status)
    assert "dropped root" in m.start_line()
    # No caller, not even the service user it now runs as, reads its environment
    # or memory (both ask for ptrace access to it); and it is not dumpable: the
    # kernel shows a non-dumpable process's /proc files as root's.
    assert os.stat(f"/proc/{m.pid}/environ").st_uid == 0
    service = make_agent(4000, 4000, [4000])
    for what in ("environ", "mem"):
        assert service.do("read", f"/proc/{m.pid}/{what}") == ("err", errno.EACCES), what
    assert m.stop() == 0, m.log
