"""Random operation sequences by several users: credfs (caller mode) against the kernel.

Each example builds two identical trees - the native one (N) and the backing one
(B) that credfs mounts at M - with directories and files of random modes
(setgid, sticky, group-owned by 3001/3002, owned by different uids). Then a
random sequence of steps runs: a random user does one operation on paths from a
small pool, once on N and once on M, from the same agent process. After every
step the two outcomes must be equal, and so must the full state of N and B
(type, mode, owner, group, nlink, size, contents, symlink targets, user xattrs)
and root's view of the tree through the mount.

The kernel is the oracle: nothing here knows which errno an operation should
give, only that credfs must give the same one the kernel gives natively. The one
difference tolerated is the one FUSE itself imposes (see skipped_permission_check):
a VFS check that natively comes second wins because the kernel never asks the
daemon; the error credfs gives must then be the one root gets natively.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import fsops
from helpers.agents import Identity, Outcome, UserAgent
from helpers.mounts import CredfsMount
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# -- vocabulary ----------------------------------------------------------------

# A small pool of names, so that steps collide with each other and with the tree.
PATHS = ("a", "b", "d1", "d2", "d1/a", "d1/b", "d1/s", "d1/s/a", "d2/a", "d2/b")
# Relative targets only, and none with "..": a symlink must resolve inside the
# tree it is in, or the two trees would reach the same outside path.
TARGETS = ("a", "b", "d1", "d1/a", "s", "s/a", "nowhere")
UIDS = (0, 2001, 2002, 2003, 2004)  # 2004 owns things but never acts
GIDS = (0, 2001, 2002, 2003, 3001, 3002, 3003)
DIR_MODES = (0o755, 0o777, 0o1777, 0o2775, 0o2770, 0o3777, 0o2777, 0o700, 0o750, 0o770,
             0o711, 0o1770, 0o555, 0o1733)
FILE_MODES = (0o644, 0o600, 0o640, 0o660, 0o666, 0o604, 0o444, 0o000, 0o4755, 0o2755,
              0o6775, 0o2745, 0o4777, 0o2666)
ROOT_MODES = (0o755, 0o777, 0o1777, 0o2777, 0o3777)
DATA = (b"", b"x", b"hello", b"0123456789" * 10)
XATTR_NAMES = ("user.k1", "user.k2")
XATTR_CREATE, XATTR_REPLACE = os.XATTR_CREATE, os.XATTR_REPLACE

USER_NAMES = ("alice", "bob", "carol", "root")
# Different umasks, so that the caller's umask is part of what is compared.
UMASKS = {"alice": 0o022, "bob": 0o002, "carol": 0o077, "root": 0o022}

_FLAG_NAMES = [(os.O_CREAT, "O_CREAT"), (os.O_EXCL, "O_EXCL"), (os.O_TRUNC, "O_TRUNC"),
               (os.O_APPEND, "O_APPEND"), (os.O_NOFOLLOW, "O_NOFOLLOW"),
               (os.O_DIRECTORY, "O_DIRECTORY")]


class Rel(str):
    """A path relative to the tree root; joined with N or M when the step runs."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str.__repr__(str(self))


class Mode(int):
    def __repr__(self) -> str:
        return f"{int(self):#o}"


class Flags(int):
    """Open flags, shown symbolically."""

    def __repr__(self) -> str:
        acc = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}
        parts = [acc[self & os.O_ACCMODE]]
        parts += [name for bit, name in _FLAG_NAMES if self & bit]
        return "|".join(parts)


class XFlags(int):
    def __repr__(self) -> str:
        return {0: "0", XATTR_CREATE: "XATTR_CREATE", XATTR_REPLACE: "XATTR_REPLACE"}[self]


class RFlags(int):
    def __repr__(self) -> str:
        return {fsops.RENAME_NOREPLACE: "RENAME_NOREPLACE",
                fsops.RENAME_EXCHANGE: "RENAME_EXCHANGE"}[self]


def _plain(a: Any) -> Any:
    # Agents get plain values only (the subclasses above exist for readable output).
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return int(a)
    if isinstance(a, str):
        return str(a)
    if isinstance(a, tuple):
        return tuple(_plain(x) for x in a)
    return a


@dataclass(frozen=True)
class Step:
    user: str
    op: str  # an fsops function name
    args: tuple[Any, ...]

    def resolve(self, base: str) -> tuple[Any, ...]:
        return tuple(os.path.join(base, a) if isinstance(a, Rel) else _plain(a)
                     for a in self.args)

    def __repr__(self) -> str:
        return f"Step({self.user}: {self.op}({', '.join(map(repr, self.args))}))"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))  # hypothesis prints failing examples with this


@dataclass(frozen=True)
class Node:
    path: str
    kind: str  # "dir", "file" or "symlink"
    mode: int
    uid: int
    gid: int
    data: bytes | str = b""  # file contents or symlink target
    xattr: bytes | None = None  # value of user.k1, if set

    def __repr__(self) -> str:
        if self.kind == "symlink":
            return f"symlink {self.path} -> {self.data!r} ({self.uid}:{self.gid})"
        extra = f" {self.data!r}" if self.kind == "file" else ""
        if self.xattr is not None:
            extra += f" user.k1={self.xattr!r}"
        return f"{self.kind} {self.path} {self.mode:#o} {self.uid}:{self.gid}{extra}"


@dataclass(frozen=True)
class Tree:
    root_mode: int
    root_gid: int
    nodes: tuple[Node, ...]

    def __repr__(self) -> str:
        inner = "".join(f"\n    {n!r}," for n in self.nodes)
        return f"Tree(root {self.root_mode:#o} 0:{self.root_gid},{inner}\n)"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


# -- strategies ------------------------------------------------------------------

rel_paths = st.sampled_from(PATHS).map(Rel)
users_st = st.sampled_from(USER_NAMES)
mode_any = st.one_of(st.sampled_from(DIR_MODES + FILE_MODES),
                     st.integers(0, 0o7777)).map(Mode)
create_modes = st.sampled_from((0o644, 0o600, 0o666, 0o777, 0o2755, 0o4755, 0o1777)).map(Mode)
mkdir_modes = st.sampled_from((0o777, 0o755, 0o700, 0o2775, 0o1777, 0o3777, 0o2700)).map(Mode)
OPEN_FLAGS = (os.O_RDONLY, os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_APPEND,
              os.O_WRONLY | os.O_CREAT | os.O_EXCL, os.O_RDONLY | os.O_CREAT | os.O_EXCL,
              os.O_RDWR | os.O_CREAT, os.O_RDONLY | os.O_NOFOLLOW,
              os.O_RDONLY | os.O_DIRECTORY)
WRITE_FLAGS = (os.O_WRONLY, os.O_WRONLY | os.O_APPEND, os.O_WRONLY | os.O_TRUNC,
               os.O_WRONLY | os.O_CREAT, os.O_RDWR | os.O_APPEND)
ACCESS_MODES = (os.F_OK, os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK, os.R_OK | os.X_OK)


def _step(op: str, *arg_strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[Step]:
    return st.builds(lambda user, *args: Step(user, op, tuple(args)), users_st,
                     *arg_strategies)


steps_st: st.SearchStrategy[Step] = st.one_of(
    _step("access", rel_paths, st.sampled_from(ACCESS_MODES)),
    _step("open_close", rel_paths, st.sampled_from(OPEN_FLAGS).map(Flags), create_modes),
    _step("write", rel_paths, st.sampled_from(DATA), st.sampled_from(WRITE_FLAGS).map(Flags)),
    _step("read", rel_paths),
    _step("stat", rel_paths),
    _step("mkdir", rel_paths, mkdir_modes),
    _step("rmdir", rel_paths),
    _step("unlink", rel_paths),
    _step("rename", rel_paths, rel_paths),
    _step("rename2", rel_paths, rel_paths,
          st.sampled_from((fsops.RENAME_NOREPLACE, fsops.RENAME_EXCHANGE)).map(RFlags)),
    _step("link", rel_paths, rel_paths),
    _step("symlink", st.sampled_from(TARGETS), rel_paths),
    _step("readlink", rel_paths),
    _step("chmod", rel_paths, mode_any),
    _step("chown", rel_paths, st.sampled_from((-1, *UIDS)), st.sampled_from((-1, *GIDS))),
    _step("utime", rel_paths,
          st.one_of(st.none(), st.sampled_from(((1_000_000.0, 2_000_000.0), (0.0, 86400.5))))),
    _step("truncate", rel_paths, st.sampled_from((0, 1, 5, 100))),
    _step("setxattr", rel_paths, st.sampled_from(XATTR_NAMES), st.sampled_from((b"", b"v1")),
          st.sampled_from((0, XATTR_CREATE, XATTR_REPLACE)).map(XFlags)),
    _step("getxattr", rel_paths, st.sampled_from(XATTR_NAMES)),
    _step("listxattr", rel_paths),
    _step("removexattr", rel_paths, st.sampled_from(XATTR_NAMES)),
    _step("listdir", rel_paths),
)



def step_lists(max_size: int) -> st.SearchStrategy[list[Step]]:
    # The length is drawn first (uniformly, shrinking towards 1): plain st.lists
    # makes mostly very short sequences.
    return st.integers(1, max_size).flatmap(
        lambda n: st.lists(steps_st, min_size=n, max_size=n))


uids_st = st.sampled_from(UIDS)
gids_st = st.sampled_from(GIDS)


@st.composite
def trees(draw: st.DrawFn) -> Tree:
    nodes: list[Node] = []

    xattrs = st.one_of(st.none(), st.just(b"v0"))

    def add_dir(path: str) -> None:
        nodes.append(Node(path, "dir", draw(st.sampled_from(DIR_MODES)), draw(uids_st),
                          draw(gids_st), xattr=draw(xattrs)))

    def maybe_file(path: str) -> None:
        if draw(st.integers(0, 3)):  # mostly there: most steps should find something
            nodes.append(Node(path, "file", draw(st.sampled_from(FILE_MODES)), draw(uids_st),
                              draw(gids_st), draw(st.sampled_from(DATA)), draw(xattrs)))

    add_dir("d1")
    add_dir("d2")
    maybe_file("a")
    maybe_file("d1/a")
    maybe_file("d2/a")
    if draw(st.integers(0, 3)):
        add_dir("d1/s")
        maybe_file("d1/s/a")
    if draw(st.booleans()):
        nodes.append(Node("d2/b", "symlink", 0o777, draw(uids_st), draw(gids_st),
                          draw(st.sampled_from(TARGETS))))
    return Tree(draw(st.sampled_from(ROOT_MODES)), draw(st.sampled_from((0, 3001, 3002))),
                tuple(nodes))


# -- running ---------------------------------------------------------------------


def reset_tree(root: Path, tree: Tree) -> None:
    """Empty root (as root, through its native path) and build tree in it."""
    for child in list(root.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    for name in os.listxattr(root):
        if name.startswith("user."):
            os.removexattr(root, name)
    os.chown(root, 0, tree.root_gid)
    os.chmod(root, tree.root_mode)
    for n in tree.nodes:
        p = root / n.path
        if n.kind == "dir":
            p.mkdir()
        elif n.kind == "file":
            assert isinstance(n.data, bytes)
            p.write_bytes(n.data)
        else:
            assert isinstance(n.data, str)
            p.symlink_to(n.data)
        os.chown(p, n.uid, n.gid, follow_symlinks=False)
        if n.xattr is not None:
            os.setxattr(p, "user.k1", n.xattr)
        if n.kind != "symlink":
            os.chmod(p, n.mode)  # after chown, which would clear setuid/setgid


def copy_tree(src: Path, dst: Path) -> None:
    """An exact copy (types, modes, owners, contents, user xattrs) made as root."""
    shutil.copytree(src, dst, symlinks=True)
    for rel, entry in fsops.tree_state(str(src)).items():
        p = dst / rel
        os.chown(p, entry["uid"], entry["gid"], follow_symlinks=False)
        if entry["type"] != "l":
            os.chmod(p, int(entry["mode"], 8))
            for name, value in entry["xattrs"].items():
                os.setxattr(p, name, value)


def skipped_permission_check(step: Step, nat: Outcome, fus: Outcome, native: Path,
                             scratch: Path, root: UserAgent) -> bool:
    """Is this the one kind of difference FUSE itself forces on a caller-mode daemon?

    Without default_permissions the kernel's permission() hook on a FUSE inode
    allows everything except access() and chdir, so the VFS goes past the checks
    it makes before it asks the filesystem - search permission for the second
    path of rename/link, write permission (and, as seen on 6.18, the sticky bit)
    in may_delete()/may_create() - and may then fail on a later check of its own
    (may_delete()'s EISDIR/ENOTDIR, vfs_link()'s EPERM for a directory, a missing
    source's ENOENT) that natively comes after the EACCES/EPERM. The daemon is
    never asked, so it cannot give the native error. Accepted only when native
    says EACCES or EPERM, credfs fails too (never a success), and credfs's error
    is exactly what the kernel gives natively when permission is no obstacle:
    the same step by root on a copy of the native tree.
    """
    if nat[0] != "err" or nat[1] not in (errno.EACCES, errno.EPERM) or fus[0] != "err":
        return False
    if scratch.exists():
        shutil.rmtree(scratch)
    copy_tree(native, scratch)
    try:
        unhindered = root.do(step.op, *step.resolve(str(scratch)))
    finally:
        shutil.rmtree(scratch)
    return unhindered == fus


def state_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    lines = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            lines.append(f"  {path}:\n    native: {a.get(path)}\n    credfs: {b.get(path)}")
    return "\n".join(lines)


@dataclass
class Runner:
    native: Path
    backing: Path
    mountpoint: Path
    agents: dict[str, UserAgent]
    scratch: Path
    check_mount_view: bool = True

    def run_example(self, tree: Tree, steps: Sequence[Step]) -> None:
        reset_tree(self.native, tree)
        reset_tree(self.backing, tree)
        log: list[str] = []

        def fail(why: str) -> None:
            history = "\n".join(log)
            pytest.fail(f"credfs differs from the kernel: {why}\n{tree!r}\nsteps:\n{history}",
                        pytrace=False)

        self._compare_states(fail, "after setup")
        for i, step in enumerate(steps, 1):
            agent = self.agents[step.user]
            nat = agent.do(step.op, *step.resolve(str(self.native)))
            fus = agent.do(step.op, *step.resolve(str(self.mountpoint)))
            log.append(f"  {i:2}. {step!r:70} native {fmt(nat)}  credfs {fmt(fus)}")
            if nat != fus:
                if not skipped_permission_check(step, nat, fus, self.native, self.scratch,
                                                self.agents["root"]):
                    fail(f"outcome of step {i}")
                log[-1] += "  (FUSE: VFS check before the daemon's, see skipped_permission_check)"
            if step.op == "utime" and step.args[1] is not None and nat[0] == "ok":
                self._compare_times(fail, step, i)
            self._compare_states(fail, f"state after step {i}")

    def _compare_states(self, fail: Callable[[str], None], when: str) -> None:
        nat = fsops.tree_state(str(self.native))
        back = fsops.tree_state(str(self.backing))
        if nat != back:
            fail(f"{when}: native tree vs backing tree\n{state_diff(nat, back)}")
        if self.check_mount_view:
            # root's view through the mount must be the backing tree itself
            # (every change in an example goes through the mount, so not even the
            # cache of --cache auto may show anything stale).
            view = self.agents["root"].call("tree_state", str(self.mountpoint))
            if view != back:
                fail(f"{when}: root's view through the mount vs backing tree\n"
                     f"{state_diff(back, view)}")

    def _compare_times(self, fail: Callable[[str], None], step: Step, i: int) -> None:
        # Explicit times must land exactly (the state walk ignores times).
        n = os.stat(self.native / step.args[0])
        b = os.stat(self.backing / step.args[0])
        if (n.st_atime_ns, n.st_mtime_ns) != (b.st_atime_ns, b.st_mtime_ns):
            fail(f"times after step {i}: native {(n.st_atime_ns, n.st_mtime_ns)} "
                 f"credfs {(b.st_atime_ns, b.st_mtime_ns)}")


def fmt(outcome: Outcome) -> str:
    status, value = outcome
    if status == "err":
        return f"{errno.errorcode.get(value, value)}"
    if value is None:
        return "ok"
    return f"ok {value!r}"[:60]


@pytest.fixture
def user_agents(users: dict[str, Identity], make_agent: Callable[..., UserAgent]
                ) -> dict[str, UserAgent]:
    made = {name: make_agent(users[name], umask=UMASKS[name]) for name in USER_NAMES}
    for name, a in made.items():  # the agents are who they claim to be
        me = a.call("whoami")
        assert me["uid"] == (users[name].uid,) * 3 and me["umask"] == UMASKS[name]
    return made


HYPOTHESIS_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,  # same examples on every run: CI stays stable
    "database": None,
    "print_blob": False,
    "suppress_health_check": list(HealthCheck),
}


def test_random_sequences_cache_none(native: Path, backing: Path, mnt: Path,
                                     mount_credfs: Callable[..., CredfsMount],
                                     user_agents: dict[str, UserAgent]) -> None:
    # One mount for every example: --cache none, so no entry or attribute of a
    # tree that reset_tree wiped (behind the mount's back) can outlive it.
    mount_credfs("--cache", "none")
    runner = Runner(native, backing, mnt, user_agents, native.parent / "scratch")

    @settings(max_examples=40, **HYPOTHESIS_SETTINGS)
    @given(tree=trees(), steps=step_lists(30))
    def run(tree: Tree, steps: list[Step]) -> None:
        runner.run_example(tree, steps)

    run()


def test_random_sequences_cache_auto(native: Path, backing: Path, mnt: Path,
                                     mount_credfs: Callable[..., CredfsMount],
                                     user_agents: dict[str, UserAgent]) -> None:
    # The default cache (1 s, only below directories everyone may search), with
    # a fresh mount per example: every change in an example goes through the
    # mount, so whatever the kernel caches must never show anything but the
    # backing tree.
    runner = Runner(native, backing, mnt, user_agents, native.parent / "scratch")

    @settings(max_examples=15, **HYPOTHESIS_SETTINGS)
    @given(tree=trees(), steps=step_lists(20))
    def run(tree: Tree, steps: list[Step]) -> None:
        reset_tree(backing, tree)  # before mounting: nothing stale to begin with
        with fresh_mount(mount_credfs):
            runner.run_example(tree, steps)

    run()


@contextlib.contextmanager
def fresh_mount(factory: Callable[..., CredfsMount], *args: str) -> Iterator[CredfsMount]:
    m = factory(*args)
    try:
        yield m
    finally:
        m.stop()


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_RDONLY | os.O_NOFOLLOW,
                                   os.O_WRONLY | os.O_NOFOLLOW,
                                   os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW],
                         ids=lambda f: repr(Flags(f)))
def test_open_nofollow(native: Path, backing: Path, mnt: Path,
                       mount_credfs: Callable[..., CredfsMount],
                       user_agents: dict[str, UserAgent], flags: int) -> None:
    """O_NOFOLLOW only concerns a symlink as the last component: a regular file or
    a directory opens as usual (the random sequences found this)."""
    tree = Tree(0o755, 0, (Node("d1", "dir", 0o777, 2001, 2001),
                           Node("a", "file", 0o666, 2001, 2001, b"x"),
                           Node("d2", "dir", 0o755, 0, 0),
                           Node("d2/b", "symlink", 0o777, 0, 0, "a")))
    reset_tree(native, tree)
    reset_tree(backing, tree)
    mount_credfs("--cache", "none")
    for user in ("alice", "root"):
        for rel in ("a", "d1", "d2/b"):
            step = Step(user, "open_close", (Rel(rel), Flags(flags), Mode(0o644)))
            nat = user_agents[user].do(step.op, *step.resolve(str(native)))
            fus = user_agents[user].do(step.op, *step.resolve(str(mnt)))
            assert fus == nat, f"{step!r}: native {fmt(nat)}, credfs {fmt(fus)}"
