"""The event-loop thread keeps the last caller's identity between inline
requests (inline.py): whatever else runs on it and needs the daemon's own
identity must take it back first. Each test makes a request by one user reach
the loop while it is lent to another, and compares with the kernel natively.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from helpers.agents import UserAgent
from helpers.mounts import CredfsMount

MountFactory = Callable[..., CredfsMount]

ROUNDS = 20
SEEN_WITHIN = 5.0


def _secret(root: Path) -> Path:
    """A file only its owner (bob) may read, in a directory everyone may search."""
    d = root / "d"
    d.mkdir()
    d.chmod(0o755)
    f = d / "secret"
    f.write_bytes(b"bob's\n")
    os.chown(f, 2002, 2002)
    f.chmod(0o600)
    shared = root / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    return f


def test_root_callers_capabilities_count_right_after_another_callers_request(
        backing: Path, native: Path, mnt: Path, mount_credfs: MountFactory,
        agents: dict[str, UserAgent]) -> None:
    """With --caller-caps, root reads bob's 0600 file as natively (its
    CAP_DAC_OVERRIDE counts), also when alice's request has just left the loop
    thread with her identity: deciding that root's capabilities count reads its
    /proc/<tid>/ns/user, which needs the daemon's own ptrace access, not
    alice's (as alice, root would be refused with EACCES)."""
    _secret(backing)
    _secret(native)
    m = mount_credfs()  # caller_caps=True: --caller-caps
    assert "metadata inline" in m.start_line()
    alice, root = agents["alice"], agents["root"]
    for top in (native, mnt):
        # Natively and through the mount, the same sequence of requests.
        got = []
        for i in range(ROUNDS):
            made = os.fspath(top / "shared" / f"a{i}")
            assert alice.do("mkdir", made, 0o755) == ("ok", None)  # inline, as alice
            got.append(root.do("read", os.fspath(top / "d" / "secret")))
            got.append(alice.do("read", os.fspath(top / "d" / "secret")))
            assert alice.do("rmdir", made) == ("ok", None)
        if top == native:
            expected = got
            assert expected[0][0] == "ok"  # root may read it natively
        else:
            assert got == expected


def test_watch_reads_changes_while_the_loop_thread_is_lent(
        backing: Path, mnt: Path, mount_credfs: MountFactory,
        agents: dict[str, UserAgent]) -> None:
    """Changes made on the backing store while alice keeps the daemon busy show
    through the mount at once, as without her: turning the change into a node
    (open_by_handle_at) needs the daemon's own CAP_DAC_READ_SEARCH, which the
    loop thread does not have while it holds alice's identity. Without it the
    watch would fail and fall back to short timeouts (logged)."""
    _secret(backing)
    m = mount_credfs()
    line = m.start_line()
    assert "backing changes watched with fanotify" in line and "metadata inline" in line, line
    bob = agents["bob"]
    secret = os.fspath(mnt / "d" / "secret")
    assert bob.do("stat", secret)[0] == "ok"  # cached now, for the watched timeout
    stop = threading.Event()
    churned: list[int] = []

    def churn() -> None:  # alice's requests, back to back, each reaching the loop
        alice = agents["alice"]
        i = 0
        while not stop.is_set():
            made = os.fspath(mnt / "shared" / f"c{i % 4}")
            alice.do("mkdir", made, 0o755)
            alice.do("rmdir", made)
            i += 1
        churned.append(i)

    t = threading.Thread(target=churn)
    t.start()
    try:
        time.sleep(0.2)
        for mode in (0o640, 0o604, 0o600):
            (backing / "d" / "secret").chmod(mode)  # behind the mount's back
            deadline = time.monotonic() + SEEN_WITHIN
            while (got := bob.do("stat", secret)[1]["mode"] & 0o777) != mode \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
            assert got == mode, f"mode {oct(got)}, not {oct(mode)}"
    finally:
        stop.set()
        t.join(timeout=60)
    assert churned and churned[0] > 0
    assert "watching the backing filesystem failed" not in m.log, m.log
