"""Mounter mode with an unprivileged service mounter (`--mounter 4000:4000`).

Every backing operation runs as the service uid, without capabilities, after the
kernel checked the caller against the inode as the mount shows it. So an
operation succeeds only when both the caller (first check) and the service
(second check) may do it, and whatever it creates belongs to the service.

The oracle is the kernel, twice: the same operation is done natively by the
caller on one copy of the tree (the first check: the mount shows the backing
attributes unchanged) and natively by an agent running as 4000:4000 with the
caller's umask on another copy (the second check, and the resulting objects).
The outcome through credfs must be the caller's refusal if there was one, else
the service's outcome; the credfs tree must then equal the untouched tree, or
the service's tree.

Also here: the recorded credentials stay what they were at mount time when the
process that mounted changes identity or exits, and the daemon keeps only the
capabilities its mode needs.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.agents import Identity, Outcome, UserAgent
from helpers.mounts import daemon_pids, is_mounted, kill_and_unmount
from helpers.trees import Node, build_tree, diff_snapshots, snapshot

SVC = 4000  # the service uid and gid; no passwd or group entry exists for it
SVC_GROUP2 = 4100  # a setgid dir's group that the service is not a member of
ALICE, BOB = 2001, 2002
CREDS_XATTR = "user.credfs.creds"
CHILD_TIMEOUT = 30.0

# Backing root: 4000:4000 0755. Modes are chosen so that the visible attributes
# and the service's own rights disagree in both directions.
TREE: tuple[Node, ...] = (
    Node("pub", "d", 0o777, SVC, SVC),
    Node("pub/alices", "f", 0o644, ALICE, ALICE, b"alice's\n"),
    Node("pub/svc644", "f", 0o644, SVC, SVC, b"svc 644\n"),
    Node("sgid", "d", 0o2777, SVC, SVC_GROUP2),
    Node("sticky", "d", 0o1777, SVC, SVC),
    Node("sticky/bobs", "f", 0o666, BOB, BOB, b"bob's\n"),
    # Others may do everything here, the service (owner class ---) nothing.
    Node("locked", "d", 0o077, SVC, SVC),
    Node("locked/f", "f", 0o666, SVC, SVC, b"locked\n"),
    # Visible mode lets "other" alice read and write; the owner (service) may not.
    Node("f0066", "f", 0o066, SVC, SVC, b"0066\n"),
    Node("alice600", "f", 0o600, ALICE, ALICE, b"alice 600\n"),
    Node("svc600", "f", 0o600, SVC, SVC, b"svc 600\n"),
    Node("pub/suid", "f", 0o6666, SVC, SVC, b"setuid\n"),
    Node("svcdir", "d", 0o700, SVC, SVC),
    Node("svcdir/f", "f", 0o644, SVC, SVC, b"in svcdir\n"),
    Node("sgid/svcf", "f", 0o644, SVC, SVC_GROUP2, b"svcf\n"),
    Node("rootsticky", "d", 0o1777),  # sticky, owned by root: the service owns neither
    Node("rootsticky/bobs", "f", 0o666, BOB, BOB, b"bob's\n"),
    Node("dacl", "d", 0o777, SVC, SVC, default_acl="u:2001:rwx,g::r-x,o::---"),
)
ROOT_OWNER = (SVC, SVC)

CREATE = os.O_CREAT | os.O_EXCL | os.O_WRONLY
NOW = None
EXPLICIT = (1_000_000_000, 1_000_000_000)


@dataclass(frozen=True)
class Case:
    who: str
    fn: str
    args: tuple[Any, ...]  # paths relative to the tree root, marked by a leading "/"
    # What the case is meant to show, checked against the native runs so that a
    # tree that does not do what a case claims fails loudly: "caller" (the first
    # check refuses), "service" (the caller may, the service may not), "both" (ok).
    decided_by: str

    def resolve(self, base: Path) -> tuple[Any, ...]:
        return tuple(str(base / a[1:]) if isinstance(a, str) and a.startswith("/") else a
                     for a in self.args)

    def __repr__(self) -> str:
        return f"{self.who}: {self.fn}{self.args!r}"


CASES: tuple[Case, ...] = (
    # Visible attributes allow the caller, the service is refused.
    Case("alice", "read", ("/f0066",), "service"),
    Case("alice", "write", ("/f0066", b"x", os.O_WRONLY | os.O_APPEND), "service"),
    Case("root", "read", ("/f0066",), "service"),  # even root: the second check is the service's
    Case("alice", "read", ("/alice600",), "service"),  # her own file; the service is "other"
    Case("root", "read", ("/alice600",), "service"),
    Case("alice", "truncate", ("/f0066", 0), "service"),
    Case("alice", "setxattr", ("/f0066", "user.k", b"v"), "service"),
    Case("bob", "utime", ("/f0066", NOW), "both"),  # bob may write, the service owns it
    # The caller is refused first.
    Case("alice", "read", ("/svc600",), "caller"),
    Case("root", "read", ("/svc600",), "both"),
    Case("alice", "read", ("/pub/svc644",), "both"),
    Case("alice", "write", ("/pub/svc644", b"x", os.O_WRONLY | os.O_TRUNC), "caller"),
    # A directory the service cannot use although everyone else may.
    Case("alice", "open_close", ("/locked/new", CREATE, 0o644), "service"),
    Case("alice", "listdir", ("/locked",), "service"),
    Case("root", "mkdir", ("/locked/d", 0o755), "service"),
    Case("alice", "stat", ("/locked/f",), "service"),
    # Attribute changes: the service owns only its own files and has no capabilities.
    Case("alice", "chmod", ("/pub/alices", 0o600), "service"),  # hers, not the service's
    Case("alice", "chmod", ("/pub/svc644", 0o600), "caller"),
    Case("root", "chmod", ("/pub/svc644", 0o600), "both"),
    Case("root", "chmod", ("/pub/alices", 0o600), "service"),
    Case("root", "chown", ("/pub/svc644", ALICE, -1), "service"),  # no CAP_CHOWN
    Case("root", "utime", ("/pub/svc644", EXPLICIT), "both"),
    Case("alice", "utime", ("/pub/alices", EXPLICIT), "service"),
    # Names: the service owns pub/ and sticky/.
    Case("bob", "unlink", ("/sticky/bobs",), "both"),
    Case("alice", "unlink", ("/sticky/bobs",), "caller"),
    Case("alice", "rename", ("/pub/alices", "/pub/renamed"), "both"),
    Case("alice", "link", ("/f0066", "/pub/hl"), "both"),
    Case("bob", "link", ("/alice600", "/pub/hl"), "caller"),  # protected_hardlinks
    # New objects (they belong to the service: the trees are compared).
    Case("alice", "open_close", ("/pub/new", CREATE, 0o644), "both"),
    Case("bob", "mkdir", ("/pub/d", 0o777), "both"),
    Case("root", "symlink", ("target", "/pub/l"), "both"),
    Case("root", "open_close", ("/pub/new", CREATE, 0o4755), "both"),
    Case("alice", "open_close", ("/sgid/new", CREATE, 0o2755), "both"),
    Case("bob", "mkdir", ("/sgid/d", 0o2777), "both"),
    Case("alice", "mkfifo", ("/sticky/fifo", 0o666), "both"),
    Case("alice", "open_close", ("/new-at-root", CREATE, 0o644), "caller"),  # root dir 0755
    Case("alice", "open_close", ("/dacl/new", CREATE, 0o666), "both"),  # default ACL, not umask
    Case("bob", "mkdir", ("/dacl/d", 0o777), "both"),
    # More refusals by the service.
    Case("bob", "unlink", ("/rootsticky/bobs",), "service"),  # sticky: neither owner
    Case("alice", "rename", ("/pub/alices", "/locked/x"), "service"),
    Case("root", "link", ("/alice600", "/pub/hl"), "service"),  # protected_hardlinks
    Case("alice", "listdir", ("/svcdir",), "caller"),
    Case("root", "listdir", ("/svcdir",), "both"),
    Case("root", "read", ("/svcdir/f",), "both"),
    Case("root", "chmod", ("/sgid/svcf", 0o2755), "both"),  # setgid dropped: not the
    # service's group
    # Writes and truncation clear setuid/setgid as the service (no CAP_FSETID) does.
    Case("root", "write", ("/pub/suid", b"r", os.O_WRONLY | os.O_APPEND), "both"),
    Case("alice", "write", ("/pub/suid", b"", os.O_WRONLY | os.O_TRUNC), "both"),
    Case("bob", "truncate", ("/pub/suid", 1), "both"),
)


@pytest.fixture
def svc_agent(make_agent: Any) -> UserAgent:
    """The service identity acting natively (the second check's oracle)."""
    return make_agent(SVC, SVC, [SVC])


@pytest.fixture
def trees(workdir: Path) -> dict[str, Path]:
    out = {}
    for name in ("as_caller", "as_service", "untouched"):
        p = workdir / name
        p.mkdir()
        out[name] = p
    return out


def _build(*roots: Path, root_mode: int = 0o755) -> None:
    for r in roots:
        build_tree(r, TREE, root_mode=root_mode, root_owner=ROOT_OWNER)


def _expected(case: Case, agents: dict[str, UserAgent], svc: UserAgent,
              trees: dict[str, Path]) -> tuple[Outcome, Path, str]:
    """The two-check outcome, the tree credfs should leave behind, and which
    check decided."""
    first = agents[case.who].do(case.fn, *case.resolve(trees["as_caller"]))
    if first[0] == "err":
        return first, trees["untouched"], "caller"
    second = svc.do(case.fn, *case.resolve(trees["as_service"]))
    return second, trees["as_service"], "service" if second[0] == "err" else "both"


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_two_checks_against_native(case: Case, backing: Path, mnt: Path, mount_credfs: Any,
                                   agents: dict[str, UserAgent], svc_agent: UserAgent,
                                   trees: dict[str, Path]) -> None:
    _build(backing, *trees.values())
    mount_credfs("--creds", "mounter", "--mounter", f"{SVC}:{SVC}")
    expected, expected_tree, decided_by = _expected(case, agents, svc_agent, trees)
    assert decided_by == case.decided_by, f"test setup: {case!r} is decided by {decided_by}"
    got = agents[case.who].do(case.fn, *case.resolve(mnt))
    assert got == expected, f"{case!r}: credfs {got}, caller-then-service natively {expected}"
    a, b = snapshot(backing), snapshot(expected_tree)
    assert a == b, f"{case!r}: credfs tree != expected tree:\n{diff_snapshots(a, b)}"


def test_everything_created_belongs_to_the_service(backing: Path, mnt: Path,
                                                   mount_credfs: Any,
                                                   agents: dict[str, UserAgent]) -> None:
    _build(backing)
    mount_credfs("--creds", "mounter", "--mounter", f"{SVC}:{SVC}")
    made: list[str] = []
    for who in ("alice", "bob", "root"):
        a = agents[who]
        for d in ("pub", "sgid", "sticky"):
            a.call("open_close", str(mnt / d / f"{who}-f"), CREATE, 0o644)
            a.call("mkdir", str(mnt / d / f"{who}-d"), 0o755)
            a.call("symlink", "x", str(mnt / d / f"{who}-l"))
            a.call("mkfifo", str(mnt / d / f"{who}-p"), 0o644)
            made += [f"{d}/{who}-{k}" for k in "fdlp"]
        # A file created through the mount is the service's, also as the mount shows it.
        st = a.call("stat", str(mnt / "pub" / f"{who}-f"))
        assert (st["uid"], st["gid"]) == (SVC, SVC)
    for rel in made:
        st = os.lstat(backing / rel)
        group = SVC_GROUP2 if rel.startswith("sgid/") else SVC  # setgid dir's group
        assert (st.st_uid, st.st_gid) == (SVC, group), rel


def test_creds_xattr_shows_service_and_is_read_only(backing: Path, mnt: Path,
                                                    mount_credfs: Any,
                                                    agents: dict[str, UserAgent]) -> None:
    # A root dir everyone may write: a refusal then comes from credfs, not from
    # the kernel's first check (user.* xattrs need write permission).
    _build(backing, root_mode=0o777)
    mount_credfs("--creds", "mounter", "--mounter", f"{SVC}:{SVC}")
    r = subprocess.run(["getfattr", "-n", CREDS_XATTR, "--only-values", str(mnt)],
                       capture_output=True, text=True, timeout=CHILD_TIMEOUT,
                       stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, r.stderr
    assert re.search(r"\buid=4000\b", r.stdout) and "mounter" in r.stdout, r.stdout
    for who in ("alice", "root"):
        value = agents[who].call("getxattr", str(mnt), CREDS_XATTR).decode()
        assert re.search(r"\buid=4000\b", value), value
        assert agents[who].do("setxattr", str(mnt), CREDS_XATTR, b"mounter: uid=0") == \
            ("err", 1)
        assert agents[who].do("removexattr", str(mnt), CREDS_XATTR) == ("err", 1)
    assert re.search(r"\buid=4000\b", agents["root"].call("getxattr", str(mnt), CREDS_XATTR)
                     .decode())


# -- the recorded credentials outlive the process that mounted ------------------

@dataclass
class MountingChild:
    """A forked root process that ran `credfs mount` (daemonizing) and then
    dropped to another uid; it waits to be told to exit."""

    pid: int
    go_fd: int

    def exit(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.go_fd)
        self.go_fd = -1
        _reap(self.pid)


def _reap(pid: int, timeout: float = CHILD_TIMEOUT) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)


def _mount_from_child(argv: list[str], drop_to: Identity) -> MountingChild:
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    err = tempfile.TemporaryFile()  # not a pipe: the daemon must not hold our pipes
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 70
        try:
            os.close(ready_r)
            os.close(go_w)
            rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, timeout=CHILD_TIMEOUT, check=False).returncode
            if rc == 0:
                os.setgroups(list(drop_to.groups))
                os.setresgid(drop_to.gid, drop_to.gid, drop_to.gid)
                os.setresuid(drop_to.uid, drop_to.uid, drop_to.uid)
            os.write(ready_w, f"{rc} {os.getuid()}".encode())
            os.read(go_r, 1)  # EOF when the parent closes its end (or dies)
            code = 0
        except BaseException:
            code = 71
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    child = MountingChild(pid, go_w)
    try:
        if not select.select([ready_r], [], [], CHILD_TIMEOUT)[0]:
            raise AssertionError("credfs mount did not return in time")
        msg = os.read(ready_r, 64).decode().split()
        err.seek(0)
        assert msg and msg[0] == "0", f"credfs mount failed: {msg}: {err.read().decode()}"
        assert int(msg[1]) == drop_to.uid
    except BaseException:
        child.exit()
        raise
    finally:
        os.close(ready_r)
        err.close()
    return child


@pytest.fixture
def cleanup_daemon(mnt: Path) -> Iterator[None]:
    """Daemonized mounts are not the fixture's: end them by pid and unmount."""
    try:
        yield
    finally:
        kill_and_unmount(mnt)


def _creds_xattr(agent: UserAgent, mnt: Path) -> str:
    return agent.call("getxattr", str(mnt), CREDS_XATTR).decode()


@pytest.mark.usefixtures("cleanup_daemon")
def test_service_creds_survive_mounting_process(backing: Path, mnt: Path,
                                                users: dict[str, Identity],
                                                agents: dict[str, UserAgent]) -> None:
    _build(backing)
    argv = [sys.executable, "-m", "credfs", "mount", str(backing), str(mnt),
            "--creds", "mounter", "--mounter", f"{SVC}:{SVC}"]
    child = _mount_from_child(argv, users["alice"])
    try:
        assert is_mounted(mnt)
        pids = daemon_pids(mnt)
        assert len(pids) == 1, f"expected one daemon for {mnt}, found {pids}"
        assert_capabilities(pids[0], "service-mounter")
        for i, phase in enumerate(("mounter now runs as alice", "mounter exited")):
            value = _creds_xattr(agents["alice"], mnt)
            assert re.search(r"\buid=4000\b", value), f"{phase}: {value}"
            name = str(mnt / "pub" / f"bob-{i}")
            agents["bob"].call("open_close", name, CREATE, 0o644)
            st = agents["bob"].call("stat", name)
            assert (st["uid"], st["gid"]) == (SVC, SVC), phase
            child.exit()
        assert daemon_pids(mnt) == pids  # the same daemon, still serving
    finally:
        child.exit()


@pytest.mark.usefixtures("cleanup_daemon")
def test_root_mounter_creds_survive_setuid_of_mounting_process(
        backing: Path, mnt: Path, users: dict[str, Identity],
        agents: dict[str, UserAgent]) -> None:
    _build(backing)
    argv = [sys.executable, "-m", "credfs", "mount", str(backing), str(mnt),
            "--creds", "mounter"]
    child = _mount_from_child(argv, users["carol"])
    try:
        pids = daemon_pids(mnt)
        assert len(pids) == 1, f"expected one daemon for {mnt}, found {pids}"
        assert_capabilities(pids[0], "root-mounter")
        for i, phase in enumerate(("mounter now runs as carol", "mounter exited")):
            value = _creds_xattr(agents["bob"], mnt)
            assert re.search(r"\buid=0\b", value), f"{phase}: {value}"
            # A privileged mounter: new objects are the caller's (as overlayfs).
            agents["alice"].call("open_close", str(mnt / "pub" / f"alice-{i}"), CREATE, 0o644)
            st = os.lstat(backing / "pub" / f"alice-{i}")
            assert (st.st_uid, st.st_gid) == (ALICE, ALICE), phase
            child.exit()
    finally:
        child.exit()


# -- capabilities the daemon keeps -------------------------------------------------

CAP_BITS = {
    "chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4, "kill": 5,
    "setgid": 6, "setuid": 7, "setpcap": 8, "linux_immutable": 9, "net_bind_service": 10,
    "net_broadcast": 11, "net_admin": 12, "net_raw": 13, "ipc_lock": 14, "ipc_owner": 15,
    "sys_module": 16, "sys_rawio": 17, "sys_chroot": 18, "sys_ptrace": 19, "sys_pacct": 20,
    "sys_admin": 21, "sys_boot": 22, "sys_nice": 23, "sys_resource": 24, "sys_time": 25,
    "sys_tty_config": 26, "mknod": 27, "lease": 28, "audit_write": 29, "audit_control": 30,
    "setfcap": 31, "mac_override": 32, "mac_admin": 33, "syslog": 34, "wake_alarm": 35,
    "block_suspend": 36, "audit_read": 37, "perfmon": 38, "bpf": 39, "checkpoint_restore": 40,
}
# Nothing a filesystem daemon needs, in any mode.
NEVER = ("kill", "setpcap", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
         "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_pacct",
         "sys_boot", "sys_nice", "sys_time", "sys_tty_config", "lease", "audit_write",
         "audit_control", "mac_admin", "syslog", "wake_alarm", "block_suspend", "audit_read",
         "perfmon", "bpf", "checkpoint_restore")
SERVICE_ONLY = ("setuid", "setgid", "sys_admin")


def _names(mask: int) -> set[str]:
    return {n for n, bit in CAP_BITS.items() if mask & (1 << bit)} | {
        str(b) for b in range(41, 64) if mask & (1 << b)}


def _task_status(pid: int) -> dict[int, dict[str, str]]:
    """/proc/<pid>/task/<tid>/status of every thread: capabilities are per thread."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            fields = {}
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                fields[key] = value.strip()
            out[int(tid)] = fields
    return out


def assert_capabilities(pid: int, mode: str) -> None:
    """Every thread of daemon pid holds only what mode needs; no new privileges."""
    statuses = _task_status(pid)
    assert statuses, f"no threads found for daemon {pid}"
    for tid, status in statuses.items():
        sets = {k: _names(int(status[k], 16))
                for k in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb")}
        where = f"{mode} daemon {pid} thread {tid}: {sets}"
        assert status["NoNewPrivs"] == "1", where
        assert not sets["CapInh"] and not sets["CapAmb"], where
        for kind in ("CapEff", "CapPrm", "CapBnd"):
            assert not sets[kind] & set(NEVER), where
        assert sets["CapEff"] <= sets["CapPrm"] <= sets["CapBnd"], where
        if mode == "service-mounter":
            for kind in ("CapEff", "CapPrm", "CapBnd"):
                assert sets[kind] <= set(SERVICE_ONLY), where


@pytest.mark.parametrize("mode", ["caller", "root-mounter", "service-mounter"])
def test_daemon_keeps_only_the_capabilities_of_its_mode(
        mode: str, backing: Path, mnt: Path, mount_credfs: Any,
        agents: dict[str, UserAgent]) -> None:
    _build(backing)
    args = {"caller": [], "root-mounter": ["--creds", "mounter"],
            "service-mounter": ["--creds", "mounter", "--mounter", f"{SVC}:{SVC}"]}[mode]
    m = mount_credfs(*args)
    # Serve a few requests first, so that the worker threads exist and have switched.
    for who in ("alice", "root"):
        agents[who].do("listdir", str(mnt / "pub"))
        agents[who].do("read", str(mnt / "pub" / "svc644"))
    assert len(_task_status(m.pid)) > 1, "expected worker threads"
    assert_capabilities(m.pid, mode)
