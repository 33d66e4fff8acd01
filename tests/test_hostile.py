"""Hostile callers: each test tries to get past credfs and must fail as it
does natively (issue 8, "Hardening").

- Escape the backing root: ".." at the root, symlinks pointing outside, a
  symlink or directory swapped in while others look up and open, a directory
  renamed out of the root under a caller, hard links to files the caller
  cannot read, the mount bound into its own backing tree.
- Gain rights through the daemon: unsearchable paths after a cache warm-up,
  writes through read-only handles, chmod/chown of another's file, setuid and
  setgid bits that natively are cleared, device nodes, trusted.* and
  security.* xattrs, and credfs's own trusted.credfs.* names.
- Confuse identity: a caller killed while its request is in flight, pid
  reuse, callers in other pid namespaces, thousands of distinct callers.

Layout for the escapes: the backing root is workdir/outer/src and the mount
is workdir/mnt, so a relative symlink resolves to a *different* place
depending on who follows it: the caller's kernel, through the mount, reaches
workdir/... (a "decoy"), whereas anything resolved on the backing side
reaches workdir/outer/... (the "canaries", which must never be read or
changed through the mount). The native twin, workdir/native, sits where the
mount sits, so the kernel's answers on it are the oracle.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.agents import Identity, UserAgent
from helpers.mounts import CredfsMount, lazy_umount, mounts_at
from helpers.trees import Node, build_tree, diff_snapshots, snapshot
from helpers.userns import NsAgent
from test_inodes import PidnsCredfsMount, drop_caches, fd_count, wait_for

MountFactory = Callable[..., CredfsMount]
AgentFactory = Callable[..., UserAgent]

ESCAPED = b"ESCAPED: read outside the backing root"
DECOY = b"decoy: where the caller's own kernel resolves it"
SECRET = b"secret outside the root"
RACE_SECONDS = 4.0
RACE_MAX_ROUNDS = 2000


@pytest.fixture
def outer(workdir: Path) -> Path:
    """workdir/outer: holds the backing root src/ and the canaries next to it."""
    o = workdir / "outer"
    o.mkdir()
    o.chmod(0o755)
    (o / "src").mkdir()
    (o / "src").chmod(0o755)
    (o / "canary").write_bytes(ESCAPED)
    (o / "canary").chmod(0o666)  # anyone could read or change it: only the path protects it
    (o / "canarydir").mkdir()
    (o / "canarydir" / "file").write_bytes(ESCAPED)
    (o / "canarydir" / "file").chmod(0o666)
    (o / "secret").write_bytes(SECRET)
    (o / "secret").chmod(0o600)
    (workdir / "canary").write_bytes(DECOY)
    (workdir / "canary").chmod(0o644)
    (workdir / "canarydir").mkdir()
    (workdir / "canarydir" / "file").write_bytes(DECOY)
    (workdir / "canarydir" / "file").chmod(0o644)
    return o


def canaries(outer: Path) -> dict[str, dict[str, Any]]:
    """Everything about the objects outside the root (src/ left out)."""
    snap = snapshot(outer)
    return {k: v for k, v in snap.items() if k != "src" and not k.startswith("src/")}


@pytest.fixture
def src(outer: Path) -> Path:
    return outer / "src"


@pytest.fixture
def escape_mount(mount_credfs: MountFactory, src: Path) -> Callable[..., CredfsMount]:
    return lambda *args: mount_credfs(*args, source=src)


def both(tree: list[Node], src: Path, native: Path) -> None:
    build_tree(src, tree)
    build_tree(native, tree)


def never_escaped(outcomes: Any) -> None:
    assert ESCAPED not in repr(outcomes).encode() and "ESCAPED" not in repr(outcomes), outcomes


def alive(m: CredfsMount) -> bool:
    return m.proc is not None and m.proc.poll() is None


class Racer:
    """A thread (as root, in this process) flipping something in the backing
    tree until stopped; counts its rounds. Bounded by RACE_MAX_ROUNDS*100."""

    def __init__(self, flip: Callable[[int], None]) -> None:
        self.flip = flip
        self.rounds = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.rounds < RACE_MAX_ROUNDS * 100:
                self.flip(self.rounds)
                self.rounds += 1
        except BaseException as e:  # reported by stop()
            self.error = e

    def __enter__(self) -> Racer:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(30)
        assert not self._t.is_alive()
        if self.error is not None and exc[0] is None:
            raise self.error


def race_reads(agent: UserAgent, paths: list[str], listing: bool = False) -> list[Any]:
    """Run the agent's read (or listdir) loop in chunks for ~RACE_SECONDS."""
    fn = "listdir_outcomes" if listing else "read_outcomes"
    seen: set[Any] = set()
    deadline = time.monotonic() + RACE_SECONDS
    rounds = 0
    while time.monotonic() < deadline and rounds < RACE_MAX_ROUNDS:
        seen.update(agent.call(fn, paths, 50))
        rounds += 50
    return sorted(seen, key=repr)


# -- escaping the backing root -------------------------------------------------------


def test_dotdot_at_the_root_is_the_callers_parent(escape_mount: Callable[..., CredfsMount],
                                                   src: Path, native: Path, outer: Path,
                                                   mnt: Path, workdir: Path,
                                                   agents: dict[str, UserAgent]) -> None:
    """".." of the mount root is the mountpoint's parent, resolved by the
    caller's own kernel exactly as ".." of the native twin (never the backing
    root's parent, outer/); the daemon never gets a ".." to resolve."""
    tree = [Node("sub", "d"), Node("sub/f", "f", 0o644, data=b"in")]
    both(tree, src, native)
    before = canaries(outer)
    escape_mount()
    for name in ("alice", "root"):
        a = agents[name]
        for rel in ("..", "../..", "sub/../..", "sub/../../canarydir"):
            assert a.do("listdir", os.fspath(mnt / rel)) == \
                a.do("listdir", os.fspath(native / rel)), (name, rel)
        for rel in ("../canary", "sub/../../canary", "../canarydir/file", "../outer/canary"):
            got = a.do("read", os.fspath(mnt / rel))
            assert got == a.do("read", os.fspath(native / rel)), (name, rel)
        assert a.do("read", os.fspath(mnt / "../canary")) == ("ok", DECOY)
        assert a.call("stat_ino", os.fspath(mnt / "sub/..")) == a.call("stat_ino", os.fspath(mnt))
        assert a.do("mkdir", os.fspath(mnt / "..")) == a.do("mkdir", os.fspath(native / ".."))
        assert a.do("getdents_names", os.fspath(mnt)) == \
            a.do("getdents_names", os.fspath(native))
    assert canaries(outer) == before


def test_symlinks_pointing_outside_are_followed_by_the_caller_only(
        escape_mount: Callable[..., CredfsMount], src: Path, native: Path, outer: Path,
        mnt: Path, workdir: Path, agents: dict[str, UserAgent]) -> None:
    """Relative and absolute symlinks to outside the root: the caller's kernel
    follows them from where the caller sees them (the decoy, or the secret
    with the caller's own rights); the daemon never follows one itself, not
    for reads, opens, xattrs, chown, or as a directory in a walk."""
    tree = [
        Node("rel", "l", data=b"../canary"),
        Node("d", "d"),
        Node("d/rel2", "l", data=b"../../canary"),
        Node("dirlink", "l", data=b"../canarydir"),
        Node("abs", "l", data=os.fsencode(outer / "canary")),
        Node("abs_secret", "l", data=os.fsencode(outer / "secret")),
        Node("alicelink", "l", uid=2001, gid=2001, data=b"../canary"),
    ]
    both(tree, src, native)
    before = canaries(outer)
    escape_mount()
    ops: list[tuple[str, str, tuple[Any, ...]]] = []
    for rel in ("rel", "d/rel2", "dirlink/file", "abs", "abs_secret", "alicelink"):
        ops += [("read", rel, ()), ("stat", rel, ()), ("readlink", rel, ()),
                ("llistxattr", rel, ()), ("lsetxattr", rel, ("user.x", b"1")),
                ("lgetxattr", rel, ("user.x",)), ("lremovexattr", rel, ("user.x",))]
    ops += [("listdir", "dirlink", ()), ("lchown", "alicelink", (2001, 2001)),
            ("lchown", "rel", (2001, 2001)), ("utime", "alicelink", ())]
    results = {}
    for name in ("alice", "bob"):
        a = agents[name]
        for op, rel, args in ops:
            got = a.do(op, os.fspath(mnt / rel), *args)
            want = a.do(op, os.fspath(native / rel), *args)
            results[(name, op, rel)] = got
            assert got == want, (name, op, rel, got, want)
        # Writes through the links (as someone the targets refuse).
        for rel in ("rel", "dirlink/file", "abs_secret"):
            assert a.do("write", os.fspath(mnt / rel), b"X") == \
                a.do("write", os.fspath(native / rel), b"X"), (name, rel)
    root = agents["root"]
    for op, rel, args in ops:
        if op in ("read", "stat", "readlink", "llistxattr", "lgetxattr", "listdir"):
            assert root.do(op, os.fspath(mnt / rel), *args) == \
                root.do(op, os.fspath(native / rel), *args), ("root", op, rel)
    # trusted.* on a symlink, as root: lands on the link itself, never its target.
    assert root.do("lsetxattr", os.fspath(mnt / "rel"), "trusted.t", b"1") == \
        root.do("lsetxattr", os.fspath(native / "rel"), "trusted.t", b"1")
    assert root.do("lgetxattr", os.fspath(mnt / "rel"), "trusted.t") == ("ok", b"1")
    # An absolute link is followed by the caller's kernel to the real canary,
    # as natively (compared above); every relative one must stay on this side.
    never_escaped({k: v for k, v in results.items() if k[2] != "abs"})
    assert canaries(outer) == before, diff_snapshots(before, canaries(outer))
    # Through the mount the decoy is what the relative links reach.
    assert agents["alice"].do("read", os.fspath(mnt / "rel")) == ("ok", DECOY)
    assert agents["alice"].do("read", os.fspath(mnt / "abs_secret"))[0] == "err"


def _replace_with(path: Path, make: Callable[[Path], None]) -> None:
    """Atomically replace path (file, dir or link) by what make builds."""
    tmp = path.with_name(f".{path.name}.new")
    make(tmp)
    if tmp.is_dir() and not tmp.is_symlink() and path.is_dir() and not path.is_symlink():
        os.rename(path, path.with_name(f".{path.name}.old"))
        os.rename(tmp, path)
        old = path.with_name(f".{path.name}.old")
        for child in os.listdir(old):
            os.unlink(old / child)
        os.rmdir(old)
        return
    if path.is_dir() and not path.is_symlink():
        # rename(2) cannot replace a directory with a non-directory: exchange.
        from helpers.fsops import RENAME_EXCHANGE, rename2
        rename2(os.fspath(tmp), os.fspath(path), RENAME_EXCHANGE)
        for child in os.listdir(tmp):
            os.unlink(tmp / child)
        os.rmdir(tmp)
        return
    if tmp.is_dir() and not tmp.is_symlink():
        from helpers.fsops import RENAME_EXCHANGE, rename2
        rename2(os.fspath(tmp), os.fspath(path), RENAME_EXCHANGE)
        os.unlink(tmp)
        return
    os.rename(tmp, path)


def _file(data: bytes) -> Callable[[Path], None]:
    def make(p: Path) -> None:
        p.write_bytes(data)
        p.chmod(0o644)
    return make


def _link(target: str) -> Callable[[Path], None]:
    return lambda p: os.symlink(target, p)


def _dir_with_file(data: bytes) -> Callable[[Path], None]:
    def make(p: Path) -> None:
        p.mkdir()
        p.chmod(0o755)
        (p / "file").write_bytes(data)
        (p / "file").chmod(0o644)
    return make


def _exchange(a: Path, b: Path) -> None:
    from helpers.fsops import RENAME_EXCHANGE, rename2
    rename2(os.fspath(a), os.fspath(b), RENAME_EXCHANGE)


@pytest.mark.parametrize("cache", ["none", "always"])
def test_symlink_swapped_in_between_lookup_and_open(
        cache: str, escape_mount: Callable[..., CredfsMount], src: Path, native: Path,
        outer: Path, mnt: Path, agents: dict[str, UserAgent]) -> None:
    """A file and a relative symlink to outside keep swapping places (behind
    the mount's back, atomically: RENAME_EXCHANGE) while alice opens the name
    through the mount, and a directory keeps swapping with a symlink to an
    outside directory while she walks through it. Every outcome must be one the
    kernel gives natively on the twin in one of the two states; ESCAPED (what
    the backing-side resolution of the link would read) never."""
    inside = b"inside the root"
    tree = [Node("d", "d"), Node("d/x", "f", 0o644, data=inside),
            Node("d/.x", "l", data=b"../../canary"),
            Node("w", "d"), Node("w/file", "f", 0o644, data=inside),
            Node(".w", "l", data=b"../canarydir")]
    both(tree, src, native)
    before = canaries(outer)
    m = escape_mount("--cache", cache)
    alice = agents["alice"]
    rels = ["d/x", "w/file"]
    allowed: set[Any] = set()
    # The oracle: the twin in each state, read natively by alice.
    for _state in (0, 1):
        for _p, status, value in alice.call("read_outcomes",
                                            [os.fspath(native / r) for r in rels], 1):
            allowed.add((os.path.relpath(_p, native), status, value))
        _exchange(native / "d/x", native / "d/.x")
        _exchange(native / "w", native / ".w")

    def flip(i: int) -> None:
        _exchange(src / "d/x", src / "d/.x") if i % 2 else _exchange(src / "w", src / ".w")

    with Racer(flip) as racer:
        seen = race_reads(alice, [os.fspath(mnt / r) for r in rels])
    got = {(os.path.relpath(p, mnt), status, value) for p, status, value in seen}
    print(f"racer rounds {racer.rounds}; outcomes {sorted(got, key=repr)}")
    never_escaped(got)
    assert got <= allowed, f"outcomes no native state gives: {got - allowed}"
    assert canaries(outer) == before
    assert alive(m)


def test_directory_renamed_out_of_the_root_under_a_caller(
        escape_mount: Callable[..., CredfsMount], src: Path, outer: Path, mnt: Path,
        workdir: Path, agents: dict[str, UserAgent], make_agent: AgentFactory,
        users: dict[str, Identity]) -> None:
    """alice sits in mnt/a/b (her cwd) when b is renamed out of the backing
    root (to outer/). Natively ".." would now lead to outer/; through the mount
    it must not: ".." is the mount's a/, and nothing outside is reachable. Then
    the same with the rename flipping back and forth while she walks."""
    build_tree(src, [Node("a", "d"), Node("a/b", "d"), Node("a/b/f", "f", 0o644, data=b"in b"),
                     Node("a/inA", "f", 0o644, data=b"in a")])
    before = canaries(outer)
    m = escape_mount("--cache", "none")
    alice = agents["alice"]
    alice.call("chdir", os.fspath(mnt / "a/b"))
    os.rename(src / "a/b", outer / "b_out")
    try:
        outcomes = {rel: alice.do("listdir", rel) for rel in (".", "..", "../..", "../../..")}
        outcomes |= {f"read {rel}": alice.do("read", rel)
                     for rel in ("f", "../inA", "../canary", "../../canary",
                                 "../../../canary", "../canarydir/file")}
        never_escaped(outcomes)
        # ".." is where the caller's kernel has b: the mount's a/ (or gone), never outer/.
        assert outcomes[".."] in (("ok", ["b", "inA"]), ("ok", ["inA"])) or \
            outcomes[".."][0] == "err", outcomes[".."]
        assert outcomes[".."] != ("ok", sorted(os.listdir(outer)))
        assert outcomes["read ../inA"] in (("ok", b"in a"), ("err", errno.ENOENT))
    finally:
        alice.call("chdir", "/")
        os.rename(outer / "b_out", src / "a/b")

    walker = make_agent(users["alice"])

    def flip(i: int) -> None:
        if i % 2:
            os.rename(outer / "b_out", src / "a/b")
        else:
            os.rename(src / "a/b", outer / "b_out")

    paths = [os.fspath(mnt / rel) for rel in ("a/b/f", "a/b/../inA", "a/b/../../canary",
                                             "a/b/../../../canary")]
    with Racer(flip) as racer:
        seen = race_reads(walker, paths)
        listed = walker.call("listdir_outcomes",
                             [os.fspath(mnt / "a/b/.."), os.fspath(mnt / "a/b/../..")], 200)
    if (outer / "b_out").exists():
        os.rename(outer / "b_out", src / "a/b")
    print(f"racer rounds {racer.rounds}; outcomes {seen}; listings {listed}")
    never_escaped(seen)
    for _p, status, value in listed:
        assert status == "err" or ("b_out" not in value and "canarydir" not in value), listed
    assert canaries(outer) == before
    assert alive(m)


def test_hard_links_to_files_the_caller_cannot_read(
        escape_mount: Callable[..., CredfsMount], src: Path, native: Path, outer: Path,
        mnt: Path, agents: dict[str, UserAgent]) -> None:
    """protected_hardlinks, as natively: no link to a file one may not read and
    write; links that root made (to a file inside, or to one outside the root)
    give nothing more than the file's own mode; a link from outside the mount
    into it fails (another mount)."""
    tree = [Node("secret", "f", 0o600, data=b"root only"),
            Node("ro", "f", 0o644, data=b"read only"),
            Node("bobs", "f", 0o666, uid=2002, gid=2002, data=b"bob rw"),
            Node("pub", "d", 0o1777)]
    both(tree, src, native)
    for root_dir in (src, native):
        os.link(root_dir / "secret", root_dir / "pub/hl")
        os.link(outer / "secret", root_dir / "out_hl")
    before = canaries(outer)
    escape_mount()
    results = {}
    for name in ("alice", "bob", "carol"):
        a = agents[name]
        for target in ("secret", "ro", "bobs", "out_hl", "pub/hl"):
            new = f"pub/{name}-{target.replace('/', '_')}"
            got = a.do("link", os.fspath(mnt / target), os.fspath(mnt / new))
            want = a.do("link", os.fspath(native / target), os.fspath(native / new))
            results[(name, target)] = got
            assert got == want, (name, target, got, want)
        for rel in ("pub/hl", "out_hl"):
            assert a.do("read", os.fspath(mnt / rel)) == a.do("read", os.fspath(native / rel))
        got = a.do("link", os.fspath(outer / "canary"), os.fspath(mnt / f"pub/{name}-in"))
        assert got[0] == "err", got  # EXDEV: the kernel never lets a link cross mounts
    assert snapshot(src) == snapshot(native), diff_snapshots(snapshot(src), snapshot(native))
    assert canaries(outer) == before
    print(results)


def _abort_fuse_connection(mountpoint: Path, dev: int) -> None:
    """Abort a hung FUSE connection through fusectl (mounted here if needed)."""
    ctl = Path("/sys/fs/fuse/connections")
    mounted_here = False
    if not (ctl / str(os.minor(dev))).exists():
        r = subprocess.run(["mount", "-t", "fusectl", "none", os.fspath(ctl)],
                           capture_output=True, timeout=10, check=False)
        mounted_here = r.returncode == 0
    try:
        with contextlib.suppress(OSError):
            (ctl / str(os.minor(dev)) / "abort").write_text("1")
    finally:
        if mounted_here:
            subprocess.run(["umount", os.fspath(ctl)], capture_output=True, timeout=10,
                           check=False)
    lazy_umount(mountpoint)


def test_mount_inside_its_own_backing_tree(escape_mount: Callable[..., CredfsMount],
                                           src: Path, mnt: Path, workdir: Path,
                                           agents: dict[str, UserAgent]) -> None:
    """`credfs mount SRC SRC/sub` (also through a symlink) is refused; and when
    root binds the mount into its own backing tree afterwards, walking the loop
    it makes ends (however it ends) and the daemon keeps serving: one caller
    must not be able to tie up every worker in requests to the daemon itself."""
    (src / "sub").mkdir()
    (src / "f").write_bytes(b"f")
    (src / "f").chmod(0o644)
    os.symlink(src / "sub", workdir / "sublink")
    for target in (src / "sub", workdir / "sublink"):
        r = subprocess.run([sys.executable, "-m", "credfs", "mount", os.fspath(src),
                            os.fspath(target), "--foreground"], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL, check=False)
        assert r.returncode != 0 and "inside the source" in r.stderr, (target, r)
        assert not mounts_at(target) and not mounts_at(src / "sub")
    m = escape_mount("--cache", "none")
    dev = os.stat(mnt).st_dev
    loop = src / "loop"
    loop.mkdir()
    subprocess.run(["mount", "--bind", os.fspath(mnt), os.fspath(loop)], check=True,
                   timeout=10, capture_output=True)
    alice = agents["alice"]
    deep = mnt.joinpath(*["loop"] * 40, "f")
    try:
        try:
            got = alice.do("read", os.fspath(deep), timeout=20)
        except Exception as e:
            got = ("hung", repr(e))
        served = agents["root"].do("listdir", os.fspath(mnt), timeout=10) \
            if got[0] != "hung" else ("hung", None)
        print(f"walk through 40 loops: {got}; root listing afterwards: {served}")
        assert got[0] != "hung", f"walking the bind loop hung the daemon: {got}"
        assert got in (("ok", b"f"),) or got[0] == "err"
        assert served == ("ok", sorted(["f", "loop", "sub"]))
        assert alive(m)
    finally:
        _abort_fuse_connection(loop, dev)
        lazy_umount(loop)


# -- gaining rights through the daemon --------------------------------------------------


def test_unsearchable_path_stays_closed_after_root_warmed_the_cache(
        mount_credfs: MountFactory, backing: Path, native: Path, mnt: Path,
        agents: dict[str, UserAgent], make_agent: AgentFactory,
        users: dict[str, Identity]) -> None:
    """root reads private/pub/file (private is 0700) with --cache always; then
    alice tries every way in: the path, a ".." detour, access(), a listing, and
    root's cwd through /proc. Each as natively: refused."""
    tree = [Node("private", "d", 0o700), Node("private/pub", "d", 0o755),
            Node("private/pub/file", "f", 0o644, data=b"behind a closed door")]
    both(tree, backing, native)
    mount_credfs("--cache", "always")
    root = agents["root"]
    for base in (mnt, native):
        assert root.call("read", os.fspath(base / "private/pub/file"))
        root.call("listdir_stat", os.fspath(base / "private/pub"))
    root_in_mnt = make_agent(users["root"])
    root_in_mnt.call("chdir", os.fspath(mnt / "private/pub"))
    root_in_native = make_agent(users["root"])
    root_in_native.call("chdir", os.fspath(native / "private/pub"))
    alice = agents["alice"]
    ops: list[tuple[str, str, tuple[Any, ...]]] = [
        ("read", "private/pub/file", ()), ("stat", "private/pub/file", ()),
        ("stat", "private/pub", ()), ("listdir", "private/pub", ()),
        ("read", "private/pub/../pub/file", ()), ("access_errno", "private/pub/file", (4,)),
        ("write", "private/pub/new", (b"x", os.O_CREAT)), ("open_close", "private/pub", (0,)),
    ]
    for op, rel, args in ops:
        got = alice.do(op, os.fspath(mnt / rel), *args)
        want = alice.do(op, os.fspath(native / rel), *args)
        assert got == want, (op, rel, got, want)
        assert got[0] == "err", (op, rel, got)
    assert root_in_mnt.pid is not None and root_in_native.pid is not None
    assert alice.do("read", f"/proc/{root_in_mnt.pid}/cwd/file") == \
        alice.do("read", f"/proc/{root_in_native.pid}/cwd/file")
    assert snapshot(backing) == snapshot(native)


def test_read_only_handle_gives_no_write(mount_credfs: MountFactory, backing: Path,
                                         native: Path, mnt: Path,
                                         agents: dict[str, UserAgent]) -> None:
    """Through a descriptor opened O_RDONLY: pwrite, ftruncate, a shared
    writable mmap fail; fchmod, fchown, fsetxattr and futimens are decided by
    the file's owner and mode, not by the descriptor; as natively. And the
    other way round: a descriptor opened for writing keeps writing after the
    mode is taken away (the decision at open is final)."""
    tree = [Node("own", "f", 0o644, uid=2001, gid=2001, data=b"alice's"),
            Node("roots", "f", 0o644, data=b"root's"),
            Node("open", "f", 0o666, data=b"anyone's")]
    both(tree, backing, native)
    mount_credfs()
    alice = agents["alice"]
    for rel in ("own", "roots", "open"):
        fds = [alice.call("open_fd", os.fspath(base / rel), os.O_RDONLY)
               for base in (mnt, native)]
        for op, args in (("fd_write", (b"X",)), ("fd_truncate", (0,)),
                         ("fd_mmap_shared_write", ()), ("fd_chmod", (0o666,)),
                         ("fd_chown", (2002, -1)), ("fd_chown", (-1, 3001)),
                         ("fd_setxattr", ("user.x", b"1")), ("fd_utime_now", ()),
                         ("fstat_fd", ())):
            got, want = (alice.do(op, fd, *args) for fd in fds)
            assert got == want, (rel, op, got, want)
        for fd in fds:
            alice.call("close_fd", fd)
    fds = [alice.call("open_fd", os.fspath(base / "open"), os.O_WRONLY) for base in (mnt, native)]
    for base in (backing, native):
        (base / "open").chmod(0o600)
    for fd in fds:
        assert alice.do("fd_write", fd, b"still", 0) == ("ok", 5)
        alice.call("close_fd", fd)
    assert snapshot(backing) == snapshot(native), diff_snapshots(snapshot(backing),
                                                                 snapshot(native))


@pytest.fixture
def nsroot() -> Iterator[NsAgent]:
    """A "root" inside a user namespace that maps only itself (0 -> 2001): all
    capabilities, but only over its own namespace, as a container's root."""
    a = NsAgent([(0, 2001, 1)], [(0, 2001, 1)], 0, 0, [0], name="nsroot")
    try:
        yield a
    finally:
        a.close()


def test_chown_and_chmod_of_anothers_file(mount_credfs: MountFactory, backing: Path,
                                          native: Path, mnt: Path,
                                          agents: dict[str, UserAgent],
                                          nsroot: NsAgent) -> None:
    """Every way a non-owner (and a namespaced root) could change owner or
    mode, by path and by descriptor: outcomes and resulting trees as natively."""
    tree = [Node("bobs", "f", 0o644, uid=2002, gid=2002, data=b"bob"),
            Node("alices", "f", 0o644, uid=2001, gid=2001, data=b"alice"),
            Node("bobdir", "d", 0o755, uid=2002, gid=2002),
            Node("bobdir/link", "l", uid=2002, gid=2002, data=b"../alices")]
    both(tree, backing, native)
    mount_credfs()
    who: dict[str, UserAgent] = {"alice": agents["alice"], "carol": agents["carol"],
                                 "nsroot": nsroot}
    ops: list[tuple[str, str, tuple[Any, ...]]] = [
        ("chmod", "bobs", (0o666,)), ("chmod", "bobs", (0o4755,)),
        ("chown", "bobs", (2001, -1)), ("chown", "bobs", (-1, 2001)),
        ("chown", "alices", (2002, -1)), ("chown", "alices", (-1, 3002)),
        ("chmod", "bobdir", (0o777,)), ("lchown", "bobdir/link", (2001, 2001)),
        ("utime", "bobs", ((1.0, 2.0),)), ("chown", "bobs", (0, 0)),
    ]
    for name, a in who.items():
        for op, rel, args in ops:
            got = a.do(op, os.fspath(mnt / rel), *args)
            want = a.do(op, os.fspath(native / rel), *args)
            assert got == want, (name, op, rel, got, want)
        fds = [a.call("open_fd", os.fspath(base / "bobs")) for base in (mnt, native)]
        for op, args in (("fd_chmod", (0o777,)), ("fd_chown", (0, 0)),
                         ("fd_chown", (-1, 3001))):
            got, want = (a.do(op, fd, *args) for fd in fds)
            assert got == want, (name, op, got, want)
        for fd in fds:
            a.call("close_fd", fd)
    assert snapshot(backing) == snapshot(native), diff_snapshots(snapshot(backing),
                                                                 snapshot(native))


SETID_CASES: list[tuple[str, str, tuple[Any, ...]]] = [
    # (who, operation, args): each on a fresh alice-owned 06775 file of group 3001
    ("bob", "write", (b"bob was here",)),
    ("bob", "pwrite", (b"B", 3)),
    ("bob", "truncate", (2,)),
    ("bob", "open_close", (os.O_WRONLY | os.O_TRUNC,)),
    ("bob", "fd_truncate", (1,)),
    ("alice", "write", (b"owner writes",)),
    ("alice", "truncate", (0,)),
    ("root", "write", (b"root writes",)),
    ("root", "chown", (2002, -1)),
    ("root", "chown", (-1, 3002)),
    ("alice", "chown", (-1, 3003)),
    ("alice", "chown", (2001, 2001)),
    ("alice", "chmod", (0o6775,)),  # as is, owner in the group
    ("carol", "write", (b"carol cannot",)),
]


@pytest.mark.parametrize(("who", "op", "args"), SETID_CASES,
                         ids=[f"{w}-{o}-{i}" for i, (w, o, _a) in enumerate(SETID_CASES)])
def test_setid_bits_cleared_as_natively(who: str, op: str, args: tuple[Any, ...],
                                        mount_credfs: MountFactory, backing: Path,
                                        native: Path, mnt: Path,
                                        agents: dict[str, UserAgent]) -> None:
    """Writes, truncates (by path, by descriptor, by O_TRUNC) and chowns clear
    setuid/setgid exactly when the kernel clears them natively; nobody keeps a
    bit the kernel would have cleared."""
    tree = [Node("f", "f", 0o6775, uid=2001, gid=3001, data=b"setid program"),
            Node("g", "f", 0o2755, uid=2001, gid=3002, data=b"group not alice's")]
    both(tree, backing, native)
    mount_credfs()
    a = agents[who]
    for base in (mnt, native):
        if op == "fd_truncate":
            fd = a.call("open_fd", os.fspath(base / "f"), os.O_WRONLY)
            got = a.do(op, fd, *args)
            a.call("close_fd", fd)
        else:
            got = a.do(op, os.fspath(base / "f"), *args)
        if base == mnt:
            through = got
        else:
            assert through == got, (through, got)
    # chmod keeping setgid on a file whose group alice is not in: dropped.
    assert agents["alice"].do("chmod", os.fspath(mnt / "g"), 0o2755) == \
        agents["alice"].do("chmod", os.fspath(native / "g"), 0o2755)
    assert snapshot(backing) == snapshot(native), diff_snapshots(snapshot(backing),
                                                                 snapshot(native))


def test_device_nodes_as_non_root(mount_credfs: MountFactory, backing: Path, native: Path,
                                  mnt: Path, agents: dict[str, UserAgent],
                                  nsroot: NsAgent) -> None:
    """Character and block devices cannot be made by a user or by a
    namespaced root, through the mount as natively; a FIFO can."""
    tree = [Node("pub", "d", 0o1777)]
    both(tree, backing, native)
    mount_credfs()
    null, loop0 = os.makedev(1, 3), os.makedev(7, 0)
    for name, a in (("alice", agents["alice"]), ("nsroot", nsroot)):
        for kind, dev in (("chr", stat.S_IFCHR | 0o666), ("blk", stat.S_IFBLK | 0o666)):
            rdev = null if kind == "chr" else loop0
            rel = f"pub/{name}-{kind}"
            got = a.do("mknod", os.fspath(mnt / rel), dev, rdev)
            want = a.do("mknod", os.fspath(native / rel), dev, rdev)
            assert got == want, (name, kind, got, want)
            assert got[0] == "err"
        rel = f"pub/{name}-fifo"
        assert a.do("mkfifo", os.fspath(mnt / rel)) == a.do("mkfifo", os.fspath(native / rel))
    assert snapshot(backing) == snapshot(native), diff_snapshots(snapshot(backing),
                                                                 snapshot(native))


def test_privileged_xattr_namespaces(mount_credfs: MountFactory, backing: Path, native: Path,
                                     mnt: Path, agents: dict[str, UserAgent],
                                     nsroot: NsAgent) -> None:
    """trusted.* and security.* (and security.capability) by a user, by a
    namespaced root, and by root: as natively, by path and by descriptor."""
    tree = [Node("alices", "f", 0o644, uid=2001, gid=2001, data=b"a"),
            Node("roots", "f", 0o644, data=b"r", xattrs=(("user.u", b"1"),))]
    both(tree, backing, native)
    for base in (backing, native):
        os.setxattr(base / "roots", "trusted.t", b"root's trusted")
        os.setxattr(base / "alices", "trusted.t", b"root's trusted on alice's file")
    mount_credfs()
    cap_v2 = bytes.fromhex("0000000200000000000000000000000000000000")  # empty caps, v2
    for name, a in (("alice", agents["alice"]), ("nsroot", nsroot), ("root", agents["root"])):
        for rel in ("alices", "roots"):
            for op, args in (("getxattr", ("trusted.t",)), ("listxattr", ()),
                             ("setxattr", ("trusted.new", b"x")),
                             ("setxattr", ("security.new", b"x")),
                             ("getxattr", ("security.new",)),
                             ("setxattr", ("security.capability", cap_v2)),
                             ("removexattr", ("trusted.t",)),
                             ("getxattr", ("trusted.t",))):
                if name == "nsroot" and args[:1] == ("security.capability",):
                    continue  # see test_namespaced_root_sets_file_capabilities_as_natively
                got = a.do(op, os.fspath(mnt / rel), *args)
                want = a.do(op, os.fspath(native / rel), *args)
                assert got == want, (name, rel, op, args, got, want)
    for base in (backing, native):
        for rel in ("alices", "roots"):
            with contextlib.suppress(OSError):
                os.removexattr(base / rel, "security.capability")
    assert snapshot(backing) == snapshot(native)
    names = {b: sorted(os.listxattr(b / "roots")) for b in (backing, native)}
    assert names[backing] == names[native], names


@pytest.mark.xfail(strict=True, reason=(
    "known limit (README): a caller's capabilities count only in the daemon's own user "
    "namespace, so a namespaced root cannot write the namespaced (v3) security.capability "
    "it may write natively on its own file; credfs refuses it (EPERM), never the reverse"))
def test_namespaced_root_sets_file_capabilities_as_natively(
        mount_credfs: MountFactory, backing: Path, native: Path, mnt: Path,
        nsroot: NsAgent) -> None:
    """A container's root (0 -> 2001) natively holds CAP_SETFCAP over files whose
    owner its namespace maps, and may give its own file capabilities (the
    kernel stores a v3, namespaced security.capability). Through the mount the
    outcome must be the same: neither more nor less."""
    tree = [Node("mine", "f", 0o755, uid=2001, gid=2001, data=b"#!/bin/sh\n"),
            Node("roots", "f", 0o755, data=b"#!/bin/sh\n")]
    both(tree, backing, native)
    mount_credfs()
    cap_v2 = bytes.fromhex("0000000200000000000000000000000000000000")
    for rel in ("mine", "roots"):
        got = nsroot.do("setxattr", os.fspath(mnt / rel), "security.capability", cap_v2)
        want = nsroot.do("setxattr", os.fspath(native / rel), "security.capability", cap_v2)
        assert got == want, (rel, got, want)


@pytest.mark.parametrize("mode", ["caller", "mounter", "policy"])
def test_reserved_credfs_xattrs_are_untouchable_even_by_root(
        mode: str, mount_credfs: MountFactory, backing: Path, mnt: Path,
        agents: dict[str, UserAgent]) -> None:
    """trusted.credfs.* is credfs's own record on the backing store: through the
    mount, nobody (root included) reads it, sets it, removes it or sees it
    listed, on files, directories, symlinks or the root; by path or descriptor."""
    build_tree(backing, [Node("f", "f", 0o644, data=b"f"), Node("d", "d"),
                         Node("l", "l", data=b"f")])
    name, value = "trusted.credfs.owner", b"2001"
    for rel in ("f", "d", "."):
        os.setxattr(backing / rel, name, value)
    os.setxattr(backing / "l", name, value, follow_symlinks=False)
    policy = Path(__file__).resolve().parent.parent / "policies/shared-mount.toml"
    mount_credfs(*(("--policy", os.fspath(policy)) if mode == "policy" else ("--creds", mode)))
    root = agents["root"]
    for rel in ("f", "d", ".", "l"):
        p = os.fspath(mnt / rel)
        lops = rel == "l"
        get, lst, set_, rm = (("lgetxattr", "llistxattr", "lsetxattr", "lremovexattr") if lops
                              else ("getxattr", "listxattr", "setxattr", "removexattr"))
        assert root.do(get, p, name)[0] == "err", rel
        assert root.do(get, p, "trusted.credfs.other")[0] == "err", rel
        listed = root.call(lst, p)
        assert not [n for n in listed if n.startswith("trusted.credfs.")], (rel, listed)
        assert root.do(set_, p, name, b"0")[0] == "err", rel
        assert root.do(set_, p, "trusted.credfs.forged", b"0")[0] == "err", rel
        assert root.do(rm, p, name)[0] == "err", rel
        assert os.getxattr(backing / rel, name, follow_symlinks=False) == value, rel
        with pytest.raises(OSError):
            os.getxattr(backing / rel, "trusted.credfs.forged", follow_symlinks=False)
    fd = root.call("open_fd", os.fspath(mnt / "f"))
    assert root.do("fd_setxattr", fd, name, b"0")[0] == "err"
    root.call("close_fd", fd)
    assert os.getxattr(backing / "f", name) == value


# -- confusing identity ---------------------------------------------------------


def _fork_as(uid: int, gid: int, groups: list[int], body: Callable[[], int],
             before_fork: Callable[[], None] | None = None) -> tuple[int, int]:
    """Fork a child that takes uid/gid/groups and exits with body()'s value.
    Returns (pid, exit status); the child is reaped."""
    if before_fork is not None:
        before_fork()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            code = body()
        except BaseException:
            code = 98
        finally:
            os._exit(code)
    _done, status = os.waitpid(pid, 0)
    return pid, os.waitstatus_to_exitcode(status)


def _read_code(path: Path) -> Callable[[], int]:
    """body for _fork_as: 0 when path can be read, else the errno."""
    def body() -> int:
        try:
            path.read_bytes()
            return 0
        except OSError as e:
            return e.errno or 97
    return body


def _fork_at_pid(target: int, uid: int, gid: int, groups: list[int],
                 body: Callable[[], int], tries: int = 200) -> int | None:
    """Run body in a child that has pid target (ns_last_pid; root only): its
    exit status, or None when other forks on the machine always won."""
    for _ in range(tries):
        def aim() -> None:
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(target - 1))
        pid, code = _fork_as(uid, gid, groups, body, aim)
        if pid == target:
            return code
    return None


def test_pid_reuse_never_lends_the_old_callers_groups(mount_credfs: MountFactory,
                                                      backing: Path, native: Path,
                                                      mnt: Path) -> None:
    """A caller with group 3001 reads a group-3001 file and exits; a new process
    with the *same pid* and the same uid/gid but without that group must be
    refused, and one with it again served; each as natively."""
    tree = [Node("g", "f", 0o640, gid=3001, data=b"group 3001 only")]
    both(tree, backing, native)
    mount_credfs("--cache", "always")
    with_group, without = [2001, 3001], [2001]
    first, code = _fork_as(2001, 2001, with_group, _read_code(mnt / "g"))
    assert code == 0
    for groups in (without, with_group, without):
        for base in (mnt, native):
            got = _fork_at_pid(first, 2001, 2001, groups, _read_code(base / "g"))
            if got is None:
                pytest.skip(f"could not get pid {first} again (busy machine)")
            if base == mnt:
                through = got
            else:
                assert through == got, (groups, through, got)
        assert through == (0 if 3001 in groups else errno.EACCES), (groups, through)


def test_caller_in_a_child_pid_namespace_is_served_as_itself(
        mount_credfs: MountFactory, backing: Path, native: Path, mnt: Path) -> None:
    """alice as pid 1 of her own pid namespace: her pid there (1) is root's
    elsewhere, but credfs must use her pid as the daemon sees it: group files
    she may not read stay closed, what she creates is hers."""
    tree = [Node("rootgrp", "f", 0o640, data=b"group 0"),
            Node("g3001", "f", 0o640, gid=3001, data=b"group 3001"),
            Node("pub", "d", 0o1777)]
    both(tree, backing, native)
    mount_credfs()

    def run(base: Path) -> tuple[int, str]:
        script = (f"cat {base}/rootgrp; echo \"rc=$?\"; cat {base}/g3001; echo \"rc=$?\"; "
                  f"echo $$ > {base}/pub/mine; echo \"rc=$?\"")
        p = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "setpriv",
                            "--reuid", "2001", "--regid", "2001", "--groups", "2001,3001",
                            "--", "sh", "-c", script],
                           capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL, check=False)
        return p.returncode, p.stdout.replace(os.fspath(base), "BASE")

    assert run(mnt) == run(native)
    assert snapshot(backing) == snapshot(native)
    assert (backing / "pub/mine").read_text().strip() == "1"  # she really was pid 1


def test_invisible_callers_change_nothing(mount_credfs: MountFactory, backing: Path,
                                          mnt: Path, agents: dict[str, UserAgent]) -> None:
    """With the daemon in a pid namespace of its own, callers have no pid it can
    see: even root's chmod, chown, mknod, trusted.* and creates are refused
    (fail closed) and the backing tree does not change."""
    build_tree(backing, [Node("f", "f", 0o644, uid=2001, gid=2001, data=b"f"),
                         Node("pub", "d", 0o1777)])
    before = snapshot(backing)
    m = mount_credfs(kind=PidnsCredfsMount)
    for name in ("root", "alice"):
        a = agents[name]
        for op, rel, args in (("chmod", "f", (0o777,)), ("chown", "f", (0, 0)),
                              ("setxattr", "f", ("trusted.t", b"1")),
                              ("setxattr", "f", ("user.u", b"1")),
                              ("mknod", "pub/n", (stat.S_IFCHR | 0o666, os.makedev(1, 3))),
                              ("write", "pub/new", (b"x", os.O_CREAT)),
                              ("mkdir", "pub/d", ()), ("unlink", "f", ()),
                              ("rename", "f", (os.fspath(mnt / "pub/g"),))):
            got = a.do(op, os.fspath(mnt / rel), *args)
            assert got == ("err", errno.EACCES), (name, op, got)
    assert snapshot(backing) == before
    assert alive(m)


_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)


def _lease_breaking(path: Path) -> bool:
    """Is a lease on path being broken (someone is blocked opening it)?"""
    ino = os.stat(path).st_ino
    text = Path("/proc/locks").read_text()
    return any("LEASE" in line and ("BREAKING" in line or "UNLCK" in line)
               and f":{ino} " in line for line in text.splitlines())


def test_caller_killed_while_its_request_is_in_flight(mount_credfs: MountFactory,
                                                      backing: Path, mnt: Path,
                                                      agents: dict[str, UserAgent]) -> None:
    """alice's open for writing is held up in the backing filesystem (a lease
    that root holds on the backing file: the open waits for it to break), and
    alice is SIGKILLed right then. When the lease goes, the request completes
    for a caller that is gone: the daemon must not leak the descriptor it
    opened for her, must keep serving others, and must change nothing."""
    f = backing / "leased"
    f.write_bytes(b"original")
    f.chmod(0o666)
    m = mount_credfs("--cache", "none")
    assert m.pid is not None
    agents["bob"].call("stat", os.fspath(mnt))
    baseline = fd_count(m.pid)
    old_sigio = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the break notice is for us
    lease_fd = os.open(f, os.O_RDONLY)
    child = 0
    try:
        fcntl.fcntl(lease_fd, _F_SETLEASE, fcntl.F_RDLCK)
        child = os.fork()
        if child == 0:
            try:
                os.setgroups([2001])
                os.setresgid(2001, 2001, 2001)
                os.setresuid(2001, 2001, 2001)
                fd = os.open(mnt / "leased", os.O_WRONLY)
                os.write(fd, b"alice should be dead")
            finally:
                os._exit(0)
        assert wait_for(lambda: _lease_breaking(f), 15), "the open never reached the backing"
        os.kill(child, signal.SIGKILL)
        # Others are served while one worker waits on the lease.
        assert agents["bob"].do("read", os.fspath(mnt / "leased")) == ("ok", b"original")
    finally:
        with contextlib.suppress(OSError):
            fcntl.fcntl(lease_fd, _F_SETLEASE, fcntl.F_UNLCK)
        os.close(lease_fd)
        signal.signal(signal.SIGIO, old_sigio)
        if child:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and os.waitpid(child, os.WNOHANG) == (0, 0):
                time.sleep(0.05)
    assert f.read_bytes() == b"original"
    assert alive(m)
    assert wait_for(lambda: fd_count(m.pid) <= baseline + 2, 10, drop_caches), \
        f"daemon holds {fd_count(m.pid)} fds, baseline {baseline}: handle of a dead caller leaked"
    assert agents["bob"].do("write", os.fspath(mnt / "leased"), b"bob") == ("ok", 3)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


DISTINCT_CALLERS = 2000


def test_thousands_of_distinct_callers_keep_caches_bounded(mount_credfs: MountFactory,
                                                           backing: Path, mnt: Path) -> None:
    """2000 callers with distinct uids (30000...), each a process of its own
    doing a few stats, a listing and a read: the daemon's memory grows by a
    modest bound and its descriptors return to the baseline once the kernel
    forgets the inodes; each caller is still served as itself at the end."""
    build_tree(backing, [Node("pub", "d"), Node("pub/a", "f", 0o644, data=b"a"),
                         Node("pub/b", "f", 0o644, data=b"b"),
                         Node("mine", "f", 0o600, uid=31999, gid=31999, data=b"31999's")])
    m = mount_credfs("--cache", "none")
    assert m.pid is not None

    def body() -> int:
        try:
            for p in ("pub/a", "pub/b", "pub", "mine"):
                with contextlib.suppress(OSError):
                    os.stat(mnt / p)
            os.listdir(mnt / "pub")
            (mnt / "pub/a").read_bytes()
            try:
                (mnt / "mine").read_bytes()
                return 0 if os.getuid() == 31999 else 1
            except PermissionError:
                return 1 if os.getuid() == 31999 else 0
        except OSError:
            return 2

    _fork_as(30000, 30000, [30000], body)  # warm up imports and the daemon
    drop_caches()
    time.sleep(0.2)
    rss0, fds0 = _rss_kib(m.pid), fd_count(m.pid)
    bad = []
    start = time.monotonic()
    for i in range(DISTINCT_CALLERS):
        uid = 30000 + i
        _pid, code = _fork_as(uid, uid, [uid, 40000 + i % 7], body)
        if code != 0:
            bad.append((uid, code))
    elapsed = time.monotonic() - start
    rss1, fds1 = _rss_kib(m.pid), fd_count(m.pid)
    assert wait_for(lambda: fd_count(m.pid) <= fds0 + 4, 10, drop_caches, 0.25)
    fds2 = fd_count(m.pid)
    print(f"{DISTINCT_CALLERS} callers in {elapsed:.1f}s: RSS {rss0} -> {rss1} KiB, "
          f"fds {fds0} -> {fds1} -> {fds2} after drop_caches")
    assert not bad, bad[:10]
    assert rss1 - rss0 < 32 * 1024, f"RSS grew by {rss1 - rss0} KiB over {DISTINCT_CALLERS} callers"
    assert fds2 <= fds0 + 4
    assert alive(m)
