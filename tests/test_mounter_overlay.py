"""Mounter mode against its oracle: a real kernel overlayfs mount.

credfs `--creds mounter` emulates overlayfs' override_creds: the caller is
checked against the inode as seen through the mount, then the backing operation
runs with the credentials recorded at mount time. overlayfs with an empty lower
layer and the upper layer B is exactly that model, done by the kernel. So two
identical trees are built, A (the credfs source) and B (overlay's upper dir),
every operation is done by the same agent through both mounts, and the outcomes
and the resulting backing trees (walked as root on A and B directly) must match.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.agents import Outcome, UserAgent
from helpers.fsops import RENAME_EXCHANGE, RENAME_NOREPLACE
from helpers.mounts import is_mounted, lazy_umount
from helpers.trees import Node, build_tree, diff_snapshots, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ALICE, BOB, CAROL = 2001, 2002, 2003
G_AB = 3001  # alice and bob are members, carol is not
G_C = 3002  # carol only
MOUNT_TIMEOUT = 30.0

# The agents' umasks differ, so that umask handling (and a default ACL replacing
# it) is part of every comparison.
UMASKS = {"alice": 0o022, "bob": 0o002, "carol": 0o077, "root": 0o022}


TREE: tuple[Node, ...] = (
    Node("pub", "d", 0o777),
    Node("pub/f", "f", 0o644, ALICE, ALICE, b"alpha\n", xattrs=(("user.tag", b"one"),)),
    Node("pub/g", "f", 0o666, BOB, BOB, b"bravo\n"),
    Node("pub/x", "f", 0o4755, ALICE, G_AB, b"#!/bin/sh\n"),  # setuid executable
    Node("pub/y", "f", 0o2664, BOB, G_AB, b"yankee\n"),  # setgid without group exec
    Node("pub/acl", "f", 0o600, 0, 0, b"acl\n", acl="u:2003:rw-"),  # carol via ACL only
    Node("pub/ln", "l", data=b"f"),
    Node("pub/sub", "d", 0o755, CAROL, CAROL),
    Node("pub/sub/h", "f", 0o644, CAROL, CAROL, b"hotel\n"),
    Node("sgid", "d", 0o2775, 0, G_AB),
    Node("sgid/f", "f", 0o664, BOB, G_AB, b"sierra\n"),
    Node("sgid/sub", "d", 0o2775, ALICE, G_AB),
    Node("sticky", "d", 0o1777),
    Node("sticky/a", "f", 0o644, ALICE, ALICE, b"a\n"),
    Node("sticky/b", "f", 0o666, BOB, BOB, b"b\n", xattrs=(("user.b", b"bee"),)),
    Node("grp", "d", 0o770, 0, G_AB),
    Node("grp/f", "f", 0o660, 0, G_AB, b"group\n"),
    Node("home", "d", 0o755, ALICE, ALICE),
    Node("home/p", "f", 0o600, ALICE, ALICE, b"private\n"),
    Node("acl", "d", 0o750, 0, 0, acl="u:2003:r-x"),  # carol may enter only via the ACL
    Node("acl/f", "f", 0o644, 0, 0, b"acl-dir\n"),
    Node("dacl", "d", 0o777, 0, G_C, default_acl="u:2003:rwx,g::rwx"),  # default ACL
    Node("dacl/f", "f", 0o640, CAROL, G_C, b"dacl\n"),
)

# Names an operation may touch: every object of the tree, plus new names in
# each directory (so creations land in plain, setgid, sticky, group-owned,
# private, ACL and default-ACL directories).
NEW_PATHS = ("pub/n", "pub/m", "sgid/n", "sgid/sub/n", "sticky/n", "grp/n", "home/n",
             "acl/n", "dacl/n", "dacl/m", "pub/sub/n")
PATHS = tuple(n.path for n in TREE) + NEW_PATHS


def _run_quiet(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, timeout=MOUNT_TIMEOUT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=False)


class Overlay:
    """A kernel overlayfs mount: empty lower dir, `upper` as the upper layer."""

    def __init__(self, lower: Path, upper: Path, work: Path, target: Path) -> None:
        self.lower, self.upper, self.work, self.target = lower, upper, work, target

    def mount(self) -> None:
        r = _run_quiet(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}",
                        str(self.target)])
        if r.returncode != 0:
            pytest.fail(f"overlay mount failed: {r.stderr.strip()}")

    def unmount(self) -> None:
        if not is_mounted(self.target):
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            _run_quiet(["umount", str(self.target)])
        lazy_umount(self.target)  # only if the plain unmount did not do it


@dataclass(frozen=True)
class P:
    """A path relative to the mount root (resolved to each mount at run time)."""

    rel: str

    def __repr__(self) -> str:
        return repr(self.rel)


@dataclass(frozen=True)
class Step:
    who: str
    fn: str
    args: tuple[Any, ...]

    def __repr__(self) -> str:
        octal = self.fn in ("chmod", "mkdir", "mkfifo", "open_close", "write")
        args = ", ".join(oct(a) if octal and isinstance(a, int) else repr(a)
                         for a in self.args)
        return f"{self.who}: {self.fn}({args})"


class Pair:
    """The same tree twice: through credfs (A) and through overlayfs (B)."""

    def __init__(self, a: Path, b: Path, credfs_mnt: Path, overlay: Overlay,
                 agents: dict[str, UserAgent]) -> None:
        self.a, self.b, self.credfs_mnt, self.overlay = a, b, credfs_mnt, overlay
        self.agents = agents
        self.history: list[str] = []

    def reset(self) -> None:
        """Fresh trees for the next example.

        A is rebuilt under the live credfs mount, which must then run with
        --cache none. B is rebuilt only while overlay is unmounted (changing an
        upper dir behind a live overlay mount is undefined), then overlay is
        mounted afresh.
        """
        self.overlay.unmount()
        build_tree(self.a, TREE)
        build_tree(self.b, TREE)
        self.overlay.mount()
        self.history = []
        self.check_state()

    def _resolve(self, base: Path, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(str(base / a.rel) if isinstance(a, P) else a for a in args)

    def run(self, step: Step) -> tuple[Outcome, Outcome]:
        agent = self.agents[step.who]
        via_overlay = agent.do(step.fn, *self._resolve(self.overlay.target, step.args))
        via_credfs = agent.do(step.fn, *self._resolve(self.credfs_mnt, step.args))
        self.history.append(f"{step!r} -> overlay {via_overlay}, credfs {via_credfs}")
        return via_overlay, via_credfs

    def check(self, step: Step) -> Outcome:
        via_overlay, via_credfs = self.run(step)
        assert via_credfs == via_overlay, self._story(f"outcome differs for {step!r}")
        self.check_state()
        return via_credfs

    def check_state(self) -> None:
        a, b = snapshot(self.a), snapshot(self.b)
        if a != b:
            pytest.fail(self._story("backing trees differ (credfs A != overlay B):\n"
                                    + diff_snapshots(a, b)))

    def _story(self, what: str) -> str:
        return what + "\nsteps so far:\n" + "\n".join(f"  {h}" for h in self.history)


@pytest.fixture
def pair(request: pytest.FixtureRequest, workdir: Path, backing: Path, mount_credfs: Any,
         make_agent: Any, users: dict[str, Any]) -> Iterator[Pair]:
    """Both trees built, credfs mounted on A (cache mode: the indirect parameter,
    default "auto", so the kernel's caches are part of the comparison), overlayfs
    mounted with B as its upper layer."""
    cache = getattr(request, "param", "auto")
    upper = workdir / "upper"
    lower = workdir / "lower"  # stays empty: every object is an upper-only object
    work = workdir / "ovl-work"  # same filesystem as upper, outside it
    target = workdir / "ovl"
    for d in (upper, lower, work, target):
        d.mkdir()
        d.chmod(0o755)
    build_tree(backing, TREE)
    build_tree(upper, TREE)
    mount_credfs("--creds", "mounter", "--cache", cache)
    overlay = Overlay(lower, upper, work, target)
    agents = {name: make_agent(users[name], umask=umask) for name, umask in UMASKS.items()}
    p = Pair(backing, upper, workdir / "mnt", overlay, agents)
    try:
        overlay.mount()
        p.check_state()
        yield p
    finally:
        overlay.unmount()


# -- hand-written cases (quick) ------------------------------------------------

def _steps(pair: Pair, steps: list[Step]) -> list[Outcome]:
    return [pair.check(s) for s in steps]


def test_new_objects_owned_as_overlayfs_does(pair: Pair) -> None:
    """Files, dirs and symlinks made by each user in a plain, a setgid and a
    default-ACL dir: owner, group, mode (umask, setgid inheritance, default ACL)."""
    steps = []
    for who in ("alice", "bob", "carol", "root"):
        for d in ("pub", "sgid", "sgid/sub", "dacl", "sticky"):
            steps += [
                Step(who, "open_close", (P(f"{d}/{who}-f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                                         0o666)),
                Step(who, "open_close", (P(f"{d}/{who}-sg"), os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                                         0o2775)),
                Step(who, "mkdir", (P(f"{d}/{who}-d"), 0o777)),
                Step(who, "symlink", ("f", P(f"{d}/{who}-l"))),
                Step(who, "stat", (P(f"{d}/{who}-d"),)),
            ]
    outcomes = _steps(pair, steps)
    # Someone succeeded in each dir (a comparison of refusals alone proves little).
    assert any(o[0] == "ok" for o in outcomes)


def test_chmod_chown_by_owner_and_non_owner(pair: Pair) -> None:
    """The caller's ownership is checked (setattr_prepare), then root applies it:
    refusals, setgid stripping for non-members, setuid cleared by chown."""
    steps = [
        Step("bob", "chmod", (P("pub/f"), 0o666)),  # not the owner
        Step("alice", "chmod", (P("pub/f"), 0o600)),
        Step("alice", "chmod", (P("pub/f"), 0o2644)),  # her own group: setgid kept
        Step("alice", "chown", (P("pub/f"), -1, G_AB)),  # a group she is in
        Step("alice", "chmod", (P("pub/f"), 0o2644)),
        Step("alice", "chown", (P("pub/f"), -1, G_C)),  # a group she is not in
        Step("alice", "chown", (P("pub/f"), BOB, -1)),  # giving it away
        Step("carol", "chmod", (P("sgid/f"), 0o777)),  # not hers
        Step("bob", "chmod", (P("pub/y"), 0o2666)),  # G_AB is one of bob's groups
        Step("carol", "chown", (P("pub/sub/h"), -1, G_AB)),  # carol is not in G_AB
        Step("root", "chown", (P("pub/sub/h"), -1, G_AB)),
        Step("carol", "chmod", (P("pub/sub/h"), 0o2644)),  # setgid for a foreign group
        Step("root", "chown", (P("pub/x"), BOB, -1)),  # clears setuid
        Step("root", "chmod", (P("pub/x"), 0o6755)),
        Step("alice", "chmod", (P("pub/x"), 0o755)),  # no longer hers
        Step("root", "chmod", (P("home"), 0o1777)),
        Step("bob", "chmod", (P("home"), 0o755)),
    ]
    _steps(pair, steps)


def test_utime_truncate_by_owner_writer_and_others(pair: Pair) -> None:
    steps = [
        Step("bob", "utime", (P("pub/f"), None)),  # neither owner nor writer
        Step("alice", "utime", (P("pub/g"), None)),  # a writer may "touch"
        Step("alice", "utime", (P("pub/g"), (1_000_000_000, 1_000_000_000))),  # only owners
        Step("bob", "utime", (P("pub/g"), (1_000_000_000, 1_000_000_000))),
        Step("carol", "truncate", (P("pub/g"), 1)),
        Step("carol", "truncate", (P("pub/f"), 1)),
        Step("carol", "utime", (P("pub/acl"), None)),  # writer through the ACL
        Step("carol", "truncate", (P("pub/acl"), 2)),
    ]
    _steps(pair, steps)


def test_write_and_truncate_clear_setuid_as_overlayfs(pair: Pair) -> None:
    """A write or truncate clears setuid/setgid unless the *caller* holds
    CAP_FSETID; overlayfs decides it by the caller, not by its root mounter."""
    steps = []
    for who, path in (("alice", "pub/x"), ("bob", "pub/x"), ("root", "pub/x")):
        steps += [
            Step("root", "chmod", (P(path), 0o6777)),
            Step(who, "write", (P(path), b"w\n", os.O_WRONLY | os.O_APPEND)),
            Step(who, "stat", (P(path),)),  # the mode as the mount shows it (cached)
            Step("root", "chmod", (P(path), 0o6777)),
            Step(who, "write", (P(path), b"t\n", os.O_WRONLY | os.O_TRUNC)),
            Step(who, "stat", (P(path),)),
            Step("root", "chmod", (P(path), 0o6777)),
            Step(who, "write", (P(path), b"", os.O_WRONLY | os.O_TRUNC)),  # open(O_TRUNC) only
            Step(who, "stat", (P(path),)),
            Step("root", "chmod", (P(path), 0o6777)),
            Step(who, "truncate", (P(path), 1)),
            Step(who, "stat", (P(path),)),
        ]
    steps += [Step("bob", "write", (P("pub/y"), b"y\n", os.O_RDWR | os.O_APPEND)),
              Step("root", "truncate", (P("pub/y"), 0))]
    _steps(pair, steps)


def test_fifo_opened_without_waiting(pair: Pair) -> None:
    """A FIFO made through the mount, opened by the random sequences' own
    operations: each open returns at once, with the same outcome as on
    overlayfs (no reader: ENXIO for a write-only open)."""
    steps = [Step("alice", "mkfifo", (P("pub/fifo"), 0o666))]
    for who in ("alice", "bob", "root"):
        steps += [
            Step(who, "write", (P("pub/fifo"), b"x\n", os.O_WRONLY | os.O_TRUNC | os.O_NONBLOCK)),
            Step(who, "write", (P("pub/fifo"), b"y\n", os.O_RDWR | os.O_APPEND | os.O_NONBLOCK)),
            Step(who, "read_nonblock", (P("pub/fifo"),)),
            Step(who, "open_close", (P("pub/fifo"), os.O_RDONLY | os.O_NONBLOCK)),
        ]
    _steps(pair, steps)


def test_access_only_via_acl(pair: Pair) -> None:
    """carol is let in by named ACL entries only; the others are refused."""
    steps = []
    for who in ("alice", "bob", "carol", "root"):
        steps += [
            Step(who, "read", (P("pub/acl"),)),
            Step(who, "write", (P("pub/acl"), b"w\n", os.O_WRONLY | os.O_APPEND)),
            Step(who, "listdir", (P("acl"),)),
            Step(who, "read", (P("acl/f"),)),
            Step(who, "open_close", (P("acl/n"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)),
            Step(who, "access", (P("pub/acl"), os.R_OK)),
            Step(who, "access", (P("acl"), os.X_OK)),
        ]
    outcomes = _steps(pair, steps)
    # The ACL did let carol in (not just "everyone refused alike").
    assert outcomes[2 * 7] == ("ok", b"acl\n")
    assert outcomes[2 * 7 + 2] == ("ok", ["f"])


def test_sticky_and_group_dirs(pair: Pair) -> None:
    steps = [
        Step("alice", "unlink", (P("sticky/b"),)),  # bob's file in a sticky dir
        Step("alice", "rename", (P("sticky/b"), P("sticky/n"))),
        Step("bob", "rename", (P("sticky/b"), P("sticky/n"))),
        Step("alice", "rename", (P("sticky/a"), P("sticky/n"))),  # over bob's file
        Step("carol", "listdir", (P("grp"),)),  # not in the dir's group
        Step("carol", "read", (P("grp/f"),)),
        Step("bob", "write", (P("grp/f"), b"new\n", os.O_WRONLY | os.O_TRUNC)),
        Step("bob", "link", (P("grp/f"), P("pub/m"))),  # protected_hardlinks? no: writable
        Step("carol", "link", (P("home/p"), P("pub/m"))),  # protected_hardlinks
        Step("alice", "link", (P("pub/f"), P("grp/n"))),
        Step("carol", "unlink", (P("grp/n"),)),
        Step("alice", "setxattr", (P("sticky/b"), "user.x", b"1")),  # writable by all
        Step("bob", "setxattr", (P("sticky"), "user.x", b"1")),  # sticky dir: owner only
        Step("alice", "listxattr", (P("sticky/b"),)),
        Step("carol", "removexattr", (P("sticky/b"), "user.b")),
        Step("bob", "removexattr", (P("sticky/b"), "user.b")),
    ]
    _steps(pair, steps)


# -- random sequences ------------------------------------------------------------

_paths = st.sampled_from(PATHS).map(P)
_data = st.sampled_from([b"", b"x", b"some longer data\n"])
_modes = st.sampled_from([0o644, 0o600, 0o755, 0o777, 0o000, 0o4755, 0o2755, 0o2644,
                          0o6711, 0o1777, 0o2770, 0o640])
_ids = st.sampled_from([-1, 0, ALICE, BOB, CAROL])
_gids = st.sampled_from([-1, 0, ALICE, G_AB, G_C])
_xattr_names = st.sampled_from(["user.tag", "user.x"])


def _op(fn: str, *args: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, tuple[Any, ...]]]:
    return st.tuples(st.just(fn), st.tuples(*args))


# Opens never wait (O_NONBLOCK): a path may name a FIFO made by an earlier
# step, whose open for reading or writing alone would block until the agent's
# time limit, natively as through the mount. On a regular file it changes nothing.
_ops = st.one_of(
    _op("read_nonblock", _paths),
    _op("write", _paths, _data, st.just(os.O_WRONLY | os.O_TRUNC | os.O_NONBLOCK)),
    _op("write", _paths, _data, st.just(os.O_RDWR | os.O_APPEND | os.O_NONBLOCK)),
    _op("open_close", _paths, st.just(os.O_CREAT | os.O_EXCL | os.O_WRONLY), _modes),
    _op("open_close", _paths, st.just(os.O_RDONLY | os.O_NONBLOCK)),
    _op("access", _paths, st.sampled_from([os.R_OK, os.W_OK, os.X_OK])),
    _op("chmod", _paths, _modes),
    _op("chown", _paths, _ids, _gids),
    _op("utime", _paths, st.sampled_from([None, (1_000_000_000, 1_000_000_000)])),
    _op("truncate", _paths, st.sampled_from([0, 3, 100])),
    _op("rename", _paths, _paths),
    _op("rename2", _paths, _paths, st.sampled_from([RENAME_NOREPLACE, RENAME_EXCHANGE])),
    _op("link", _paths, _paths),
    _op("unlink", _paths),
    _op("rmdir", _paths),
    _op("mkdir", _paths, _modes),
    _op("mkfifo", _paths, _modes),
    _op("symlink", st.sampled_from(["f", "../pub/f", "n", "/nonexistent"]), _paths),
    _op("setxattr", _paths, _xattr_names, _data),
    _op("getxattr", _paths, _xattr_names),
    _op("removexattr", _paths, _xattr_names),
    _op("listxattr", _paths),
    _op("listdir", _paths),
    _op("stat", _paths),
    _op("readlink", _paths),
)
_steps_strategy = st.lists(
    st.builds(lambda who, op: Step(who, op[0], op[1]), st.sampled_from(list(UMASKS)), _ops),
    min_size=5, max_size=30)


@pytest.mark.parametrize("pair", ["none"], indirect=True)  # A is rebuilt behind its back
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=_steps_strategy)
def test_random_sequences_match_overlayfs(pair: Pair, steps: list[Step]) -> None:
    # The fixture's mounts are reused across examples; each starts from fresh trees.
    pair.reset()
    for step in steps:
        pair.check(step)
