"""Metadata on the event loop (--inline auto, the default on a local backing
filesystem): every inline operation runs as exactly the credentials a worker
would have taken, and the loop thread is the daemon's own again afterwards.

The kernel is the oracle: the same operations by the same users on the native
twin. The loop thread's credentials are read from /proc/<daemon>/task/<pid>.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import run_cli

ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
INLINE_MODES = [["--inline", "auto"], ["--inline", "never"]]
CHILD_TIMEOUT = 60.0


def _loop_thread(pid: int) -> dict[str, str]:
    """The daemon's main thread (the trio loop) as /proc shows it."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


_IDENTITY_FIELDS = ("Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapInh", "Umask")


def _build(root: Path) -> None:
    """The same tree natively and in the backing directory (as root)."""
    sg = root / "sg"  # setgid, group 3001 (alice, bob), default ACL for 3003
    sg.mkdir()
    os.chown(sg, 0, 3001)
    sg.chmod(0o2775)
    subprocess.run(["setfacl", "-d", "-m", "g:3003:rwx,o::---", os.fspath(sg)], check=True,
                   timeout=30, capture_output=True)
    bobs = root / "bobs"
    bobs.mkdir()
    os.chown(bobs, 2002, 2002)
    bobs.chmod(0o755)
    alices = root / "alices"
    alices.mkdir()
    os.chown(alices, 2001, 2001)
    alices.chmod(0o755)
    f = alices / "file"
    f.write_bytes(b"alice")
    os.chown(f, 2001, 2001)
    f.chmod(0o644)
    shared = root / "shared"  # 1777, like /tmp
    shared.mkdir()
    shared.chmod(0o1777)


# (agent name, fsops function, path relative to the tree, more arguments)
_SCRIPT: list[tuple[str, str, str, tuple[Any, ...]]] = [
    ("alice", "mkdir", "sg/a", (0o777,)),
    ("bob", "mkdir", "sg/b", (0o750,)),
    ("carol", "mkdir", "sg/c", (0o777,)),  # not in 3001: refused
    ("alice", "open_close", "sg/f", (os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)),
    ("alice", "open_close", "sg/f", (os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)),  # EEXIST
    ("bob", "mkfifo", "sg/fifo", (0o666,)),
    ("alice", "symlink", "sg/ln", ("a",)),
    ("alice", "mkdir", "bobs/x", (0o777,)),  # bob's 0755 dir: refused
    ("bob", "chmod", "alices/file", (0o666,)),  # not the owner: refused
    ("alice", "chmod", "alices/file", (0o2755,)),  # not in group 2001? she is: kept
    ("bob", "unlink", "alices/file", ()),  # refused
    ("carol", "setxattr", "alices/file", ("user.x", b"1")),  # refused
    ("alice", "setxattr", "alices/file", ("user.x", b"1")),
    ("carol", "stat", "sg/a", ()),
    ("carol", "listdir", "sg", ()),
    ("bob", "rename", "sg/b", ("sg/b2",)),
    ("carol", "open_close", "shared/c", (os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)),
    ("alice", "unlink", "shared/c", ()),  # sticky: refused
    ("alice", "rmdir", "sg/a", ()),
    ("alice", "access_errno", "bobs", (os.W_OK,)),
    ("root", "mkdir", "bobs/r", (0o700,)),
    ("root", "chown", "bobs/r", (2003, 3002)),
    ("carol", "readlink", "sg/ln", ()),
    ("alice", "link", "alices/file", ("shared/hard",)),
    # no default ACL here: each caller's own umask decides the mode
    ("alice", "mkdir", "shared/am", (0o777,)),
    ("bob", "open_close", "shared/bf", (os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)),
    ("carol", "mkfifo", "shared/cf", (0o666,)),
]


def _play(agents: dict[str, Any], root: Path) -> list[tuple[str, Any]]:
    out = []
    for who, fn, rel, more in _SCRIPT:
        args = [os.fspath(root / rel)]
        for a in more:
            # a second path argument (rename, link) is relative to the tree too
            args.append(os.fspath(root / a) if isinstance(a, str) and "/" in a else a)
        out.append(agents[who].do(fn, *args))
    return out


def _acls(root: Path) -> dict[str, dict[str, bytes | None]]:
    out: dict[str, dict[str, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            entry: dict[str, bytes | None] = {}
            for acl in (ACL_ACCESS, ACL_DEFAULT):
                try:
                    entry[acl] = os.getxattr(p, acl, follow_symlinks=False)
                except OSError as exc:
                    entry[acl] = None if exc.errno == errno.ENODATA else str(exc).encode()
            out[os.path.relpath(p, root)] = entry
    return out


@pytest.mark.parametrize("mode", INLINE_MODES, ids=["inline", "never"])
def test_metadata_as_natively_with_setgid_dirs_and_default_acls(
        mode: list[str], backing: Path, native: Path, mnt: Path, mount_credfs: Any,
        users: Any, make_agent: Any) -> None:
    """Creates, refusals, owners, groups, modes and inherited ACLs through the
    mount equal the kernel's on the native twin, for several users with
    different umasks (the loop thread applies the caller's umask, and a
    default ACL replaces it, as natively)."""
    _build(backing)
    _build(native)
    m = mount_credfs(*mode)
    assert ("metadata inline" in m.start_line()) == (mode[1] == "auto")
    agents = {"alice": make_agent(users["alice"], umask=0o027),
              "bob": make_agent(users["bob"], umask=0o002),
              "carol": make_agent(users["carol"], umask=0o077),
              "root": make_agent(users["root"])}
    through = _play(agents, mnt)
    natively = _play(agents, native)
    assert through == natively
    assert ("err", errno.EACCES) in natively  # the script does include refusals
    assert agents["root"].call("tree_state", os.fspath(backing)) == \
        agents["root"].call("tree_state", os.fspath(native))
    assert _acls(backing) == _acls(native)


@pytest.mark.parametrize("caller_caps", [False, True], ids=["no-caller-caps", "caller-caps"])
def test_loop_thread_is_the_daemon_again_after_inline_operations(
        caller_caps: bool, backing: Path, mnt: Path, mount_credfs: Any, users: Any,
        make_agent: Any) -> None:
    """After many inline operations by different users, refused ones and
    ones by root with its capabilities among them, the loop thread's fsuid,
    fsgid, groups, capabilities and umask are exactly what they were before,
    once the daemon is idle (the thread keeps the last caller's identity
    between requests, and takes its own back after inline.IDLE seconds)."""
    _build(backing)
    m = mount_credfs(caller_caps=caller_caps)
    assert "metadata inline" in m.start_line()
    assert m.pid is not None
    before = _loop_thread(m.pid)
    assert before["CapEff"] == before["CapPrm"]  # the daemon's own: all it kept
    assert before["Uid"].split()[3] == "0" and before["Umask"] == "0000"
    agents = {name: make_agent(users[name], umask=0o027) for name in
              ("alice", "bob", "carol", "root")}
    for _ in range(3):
        _play(agents, mnt)
        for name, agent in agents.items():
            agent.do("stat", os.fspath(mnt / "sg" / "nothing"))
            agent.do("mkdir", os.fspath(mnt / "shared" / f"d-{name}"), 0o777)
            agent.do("rmdir", os.fspath(mnt / "shared" / f"d-{name}"))
    own = {k: before[k] for k in _IDENTITY_FIELDS}
    deadline = time.monotonic() + 10
    while (after := {k: _loop_thread(m.pid)[k] for k in _IDENTITY_FIELDS}) != own \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after == own


def _run_caller(uid: int, gid: int, steps: list[Any]) -> list[Any]:
    """A forked process as uid/gid that keeps CAP_SETGID only, so that it can
    change its own groups between requests: steps are ["groups", [..]] or
    [fsop name, path, args...]; returns each step's ("ok", value) / ("err", errno)."""

    def body() -> list[Any]:
        import prctl  # python-prctl
        from helpers import fsops
        os.setgroups(steps[0][1])
        prctl.set_keepcaps(True)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        prctl.cap_permitted.limit(prctl.CAP_SETGID)
        prctl.cap_effective.setgid = True
        results: list[Any] = []
        for step in steps:
            if step[0] == "groups":
                os.setgroups(step[1])
                results.append(("ok", None))
                continue
            try:
                value = getattr(fsops, step[0])(*step[1:])
                results.append(("ok", value.decode() if isinstance(value, bytes) else value))
            except OSError as exc:
                results.append(("err", exc.errno))
        return results

    out = _in_child(body)
    assert "ok" in out, f"the caller process failed: {out}"
    return [tuple(x) for x in out["ok"]]


def _group_tree(root: Path, gid: int) -> None:
    g = root / "g"  # only group gid may search it
    g.mkdir()
    os.chown(g, 0, gid)
    g.chmod(0o010)
    (g / "x").write_bytes(b"x")
    f = root / "secret"  # only group gid may read it
    f.write_bytes(b"secret")
    os.chown(f, 0, gid)
    f.chmod(0o040)


@pytest.mark.parametrize("mode", INLINE_MODES, ids=["inline", "never"])
def test_groups_changed_between_two_requests_count_at_once(
        mode: list[str], backing: Path, native: Path, mnt: Path, mount_credfs: Any) -> None:
    """The same thread loses group 3001, then gets it back: each request is
    decided with the groups the caller has at that moment (inline lookup
    and access, worker open)."""
    _group_tree(backing, 3001)
    _group_tree(native, 3001)
    mount_credfs(*mode, caller_caps=False)

    def steps(root: Path) -> list[Any]:
        probe = [["stat", os.fspath(root / "g" / "x")],
                 ["access_errno", os.fspath(root / "g"), os.X_OK],
                 ["read", os.fspath(root / "secret")]]
        return [["groups", [2001, 3001]], *probe, ["groups", [2001]], *probe,
                ["groups", [2001, 3001]], *probe]
    natively = _run_caller(2001, 2001, steps(native))
    through = _run_caller(2001, 2001, steps(mnt))
    assert through == natively
    assert natively[1][0] == "ok" and natively[5] == ("err", errno.EACCES)


def test_caller_in_hundreds_of_groups_has_all_of_them(
        backing: Path, native: Path, mnt: Path, mount_credfs: Any) -> None:
    """/proc/<tid>/status of a caller in 900 groups is longer than 4096 bytes:
    its groups must be read to the last one (a cut Groups: line lost the
    groups at its end, and turned the last digits read into another id)."""
    groups = [1_000_000 + i for i in range(900)]
    last = groups[-1]
    _group_tree(backing, last)
    _group_tree(native, last)
    mount_credfs(caller_caps=False)

    def steps(root: Path) -> list[Any]:
        return [["groups", groups], ["read", os.fspath(root / "secret")],
                ["stat", os.fspath(root / "g" / "x")]]
    natively = _run_caller(2001, 2001, steps(native))
    assert natively[1] == ("ok", "secret")
    assert _run_caller(2001, 2001, steps(mnt)) == natively


def test_inline_option_in_help_and_refused_when_unknown(backing: Path, mnt: Path) -> None:
    r = run_cli("mount", "--help")
    assert r.returncode == 0 and "--inline {auto,never}" in r.stdout
    r = run_cli("mount", backing, mnt, "--inline", "sometimes")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--inline" in r.stderr and "Traceback" not in r.stderr


def _in_child(body: Any) -> Any:
    """body() in a forked child (its credential changes stay there); its
    JSON-able result, or the text of what it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            try:
                out: Any = {"ok": body()}
            except BaseException as exc:  # reported to the parent
                out = {"raised": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    deadline = time.monotonic() + CHILD_TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], max(deadline - time.monotonic(), 0))
            if not ready or not (chunk := os.read(r, 65536)):
                break
            data += chunk
    finally:
        os.close(r)
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return json.loads(data)


def _thread_ids() -> dict[str, str]:
    with open("/proc/thread-self/status") as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    return {k: status[k] for k in ("Uid", "Gid", "Groups", "CapEff", "Umask")}


def test_inline_switch_that_cannot_be_made_fails_closed_and_restores() -> None:
    """A daemon that may not take on an identity (no CAP_SETUID left) refuses
    the operation with CredentialError, which the handlers answer EACCES, and
    never runs it, and the thread is its own again. An operation that raises
    leaves the thread lent to its caller, with the daemon's umask, and own()
    gives it back exactly as it was."""
    from credfs.creds import CredentialError, Credentials
    from credfs.inline import InlineRunner

    def body() -> dict[str, Any]:
        import prctl  # python-prctl
        os.umask(0)
        runner = InlineRunner()
        before = _thread_ids()
        ran: list[int] = []
        alice = Credentials(2001, 2001, (2001, 3001), 0)

        def boom() -> None:
            ran.append(os.getuid())
            raise OSError(errno.EROFS, "refused by the backing store")
        try:
            runner.run(alice, 0o027, boom)
        except OSError as exc:
            raised = exc.errno
        lent = _thread_ids()
        given_back = runner.own()
        after_error = _thread_ids()
        prctl.cap_effective.setuid = False
        prctl.cap_permitted.setuid = False
        runner = InlineRunner()  # the daemon's own identity, now without setuid
        own = _thread_ids()
        try:
            runner.run(alice, 0o027, ran.append, 1)
            refused = False
        except CredentialError:
            refused = True
        return {"before": before, "after_error": after_error, "raised": raised,
                "lent": lent, "given_back": given_back,
                "own": own, "after_refusal": _thread_ids(), "refused": refused,
                "ran": ran}

    out = _in_child(body)
    assert "ok" in out, out
    res = out["ok"]
    assert res["raised"] == errno.EROFS and res["after_error"] == res["before"]
    assert res["given_back"]
    assert res["lent"]["Uid"].split()[3] == "2001" and res["lent"]["Gid"].split()[3] == "2001"
    assert res["lent"]["Groups"].split() == ["2001", "3001"]
    assert int(res["lent"]["CapEff"], 16) == 0 and res["lent"]["Umask"] == res["before"]["Umask"]
    assert res["refused"] and res["ran"] == [0]  # the refused operation never ran
    assert res["after_refusal"] == res["own"]


def test_inline_close_keeps_whoever_the_thread_is() -> None:
    """A RELEASE on a local filesystem closes its descriptor as whoever the
    loop thread is at that moment (closing checks no permission): the thread
    lent to alice closes a descriptor the daemon opened for bob, and is still
    exactly alice's afterwards, with no switch made."""
    from credfs.creds import Credentials
    from credfs.inline import InlineRunner

    def body() -> dict[str, Any]:
        os.umask(0)
        runner = InlineRunner()
        bob = Credentials(2002, 2002, (2002,), 0)
        fd = runner.run(bob, 0, os.open, "/dev/null", os.O_WRONLY)
        runner.run(Credentials(2001, 2001, (2001, 3001), 0), 0o027, lambda: None)
        lent = _thread_ids()
        runner.close(fd)
        try:
            os.fstat(fd)
            closed = False
        except OSError as exc:
            closed = exc.errno == errno.EBADF
        return {"lent": lent, "after": _thread_ids(), "closed": closed}

    out = _in_child(body)
    assert "ok" in out, out
    res = out["ok"]
    assert res["closed"]
    assert res["lent"]["Uid"].split()[3] == "2001" and res["lent"]["Groups"].split() == \
        ["2001", "3001"]
    assert res["after"] == res["lent"]
