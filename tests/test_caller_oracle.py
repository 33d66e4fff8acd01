"""Caller mode against the kernel, case by hand-written case.

Two identical trees: N (workdir/native, used directly) and B (the backing
directory, used only through a credfs mount in caller mode with default
options). Every setup step is applied to both, as root, before the mount
starts. Then each operation runs in an agent (a real process with the user's
uid, gid and groups) once on N and once through the mount: the outcomes (value
or errno) must be equal, and N and B, read directly as root, must still be
equal afterwards: type, mode, owner, group, nlink, size, contents, symlink
target, device number, every xattr (POSIX ACLs included) and the times a test
set explicitly.

Mismatches are collected rather than raised at once, so that one run shows
every case that diverges; each test ends with Twin.finish(), which also
compares what root sees through the mount with N, and fails if anything
differed. Tests share one mount across many cases (mount start-up dominates
the run time), so each loops over users and cases itself.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers.agents import USERS as IDENTITIES
from helpers.agents import Identity, Outcome, UserAgent

USERS = ("alice", "bob", "carol", "root")  # root last: it may undo what others could not
UIDS = {name: IDENTITIES[name].uid for name in USERS}
GIDS = {name: IDENTITIES[name].gid for name in USERS}
ALICE, BOB, CAROL = UIDS["alice"], UIDS["bob"], UIDS["carol"]
DAVE = 2004  # owns things none of the agents owns; no agent runs as it
G_SHARED = 3001  # alice and bob (bob only through his supplementary list)
G_CAROL = 3002  # carol only
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
XATTR_CREATE, XATTR_REPLACE = 1, 2

# Times before this were set by a test and are compared exactly; later ones
# were set by the kernel to "now" and only compared as "recent".
_RECENT_NS = 1_500_000_000 * 10**9
OLD_TIMES = (100_000_000.0, 200_000_000.0)  # (atime, mtime) put on files by setup

MountFactory = Callable[..., Any]


class Rel(str):
    """A path relative to the tree root; Twin maps it into N or into the mount."""


# -- the state of a tree, read as root -----------------------------------------

def _when(ns: int) -> int | str:
    return ns if ns < _RECENT_NS else "recent"


def _describe(dfd: int, name: str) -> dict[str, Any]:
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    kind = stat.S_IFMT(st.st_mode)
    entry: dict[str, Any] = {
        "type": stat.filemode(st.st_mode)[0], "mode": oct(stat.S_IMODE(st.st_mode)),
        "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink,
        "mtime": _when(st.st_mtime_ns),
    }
    if kind != stat.S_IFDIR:
        # A directory's atime moves whenever someone lists it (this walk too).
        entry["atime"] = _when(st.st_atime_ns)
    if kind == stat.S_IFREG:
        entry["size"] = st.st_size
        # O_NOATIME: reading for the comparison must not change what is compared.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME, dir_fd=dfd)
        try:
            entry["data"] = os.read(fd, st.st_size + 1)
        finally:
            os.close(fd)
    elif kind == stat.S_IFLNK:
        entry["target"] = os.readlink(name, dir_fd=dfd)
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    # Through the descriptor's magic link: short paths however deep the tree is.
    magic = f"/proc/self/fd/{dfd}/{name}"
    entry["xattrs"] = {n: os.getxattr(magic, n, follow_symlinks=False)
                       for n in sorted(os.listxattr(magic, follow_symlinks=False))}
    return entry


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """Everything comparable under root, keyed by relative path ("." is root)."""
    out: dict[str, dict[str, Any]] = {}

    def walk(dfd: int, rel: str) -> None:
        for name in sorted(os.listdir(dfd)):
            sub = name if rel == "." else f"{rel}/{name}"
            out[sub] = _describe(dfd, name)
            if out[sub]["type"] == "d":
                cfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    walk(cfd, sub)
                finally:
                    os.close(cfd)

    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out["."] = _describe(top, ".")
        walk(top, ".")
    finally:
        os.close(top)
    return out


def diff_snapshots(native: dict[str, dict[str, Any]], back: dict[str, dict[str, Any]]
                   ) -> list[str]:
    out = []
    for rel in sorted(native.keys() | back.keys()):
        n, b = native.get(rel), back.get(rel)
        if n is None or b is None:
            out.append(f"{_short(rel)}: {'only in backing' if n is None else 'only native'}")
            continue
        for key in sorted(n.keys() | b.keys()):
            if n.get(key) != b.get(key):
                out.append(f"{_short(rel)}: {key} native={_short(n.get(key))} "
                           f"backing={_short(b.get(key))}")
    return out


def _short(v: object) -> str:
    s = v if isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else f"{s[:24]}...{s[-12:]}({len(s)} chars)"


def fmt(outcome: Outcome) -> str:
    status, value = outcome
    if status == "err":
        return errno.errorcode.get(value, str(value))
    return f"ok {_short(value)}" if value is not None else "ok"


# -- the pair of trees ------------------------------------------------------------

@dataclass
class Twin:
    native: Path
    backing: Path
    mnt: Path
    mount_factory: MountFactory
    agents: dict[str, UserAgent]
    problems: list[str] = field(default_factory=list)
    mounted: bool = False
    _last_diff: list[str] = field(default_factory=list)

    # Setup: as root, the same on both trees, before mount().

    def _both_paths(self, rel: str) -> tuple[Path, Path]:
        assert not self.mounted, "setup after mount() would bypass the mount's caches"
        return self.native / rel, self.backing / rel

    @staticmethod
    def _own(p: Path, mode: int, uid: int, gid: int) -> None:
        os.chown(p, uid, gid, follow_symlinks=False)
        os.chmod(p, mode)  # after chown, which clears setuid/setgid

    def mkdir(self, rel: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        for p in self._both_paths(rel):
            p.mkdir()
            self._own(p, mode, uid, gid)

    def file(self, rel: str, data: bytes = b"", mode: int = 0o644, uid: int = 0,
             gid: int = 0) -> None:
        for p in self._both_paths(rel):
            p.write_bytes(data)
            self._own(p, mode, uid, gid)

    def fifo(self, rel: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        for p in self._both_paths(rel):
            os.mkfifo(p)
            self._own(p, mode, uid, gid)

    def symlink(self, target: str, rel: str, uid: int = 0, gid: int = 0) -> None:
        for p in self._both_paths(rel):
            os.symlink(target, p)
            os.chown(p, uid, gid, follow_symlinks=False)

    def setfacl(self, rel: str, *args: str) -> None:
        for p in self._both_paths(rel):
            subprocess.run(["setfacl", *args, str(p)], check=True, capture_output=True,
                           timeout=10)

    def setxattr(self, rel: str, name: str, value: bytes) -> None:
        for p in self._both_paths(rel):
            os.setxattr(p, name, value, follow_symlinks=False)

    def utime(self, rel: str, times: tuple[float, float] = OLD_TIMES) -> None:
        for p in self._both_paths(rel):
            os.utime(p, times, follow_symlinks=False)

    def mount(self) -> None:
        diff = diff_snapshots(snapshot(self.native), snapshot(self.backing))
        assert not diff, f"setup left the trees different: {diff}"
        self.mount_factory()
        self.mounted = True

    # Operations: by an agent, on N and through the mount.

    def agent(self, who: str | UserAgent) -> UserAgent:
        return self.agents[who] if isinstance(who, str) else who

    def _map(self, root: Path, args: Iterable[Any]) -> list[Any]:
        return [str(root / a) if isinstance(a, Rel) else a for a in args]

    def both(self, who: str | UserAgent, op: str, *args: Any) -> tuple[Outcome, Outcome]:
        """Run op natively on N, then through the mount: (native, mounted) outcomes."""
        assert self.mounted
        agent = self.agent(who)
        native = agent.do(op, *self._map(self.native, args))
        mounted = agent.do(op, *self._map(self.mnt, args))
        return native, mounted

    def check(self, who: str | UserAgent, op: str, *args: Any, state: bool = True
              ) -> Outcome:
        """both(), recording any difference in outcome and (unless state=False,
        for operations that change nothing) in the trees afterwards. Returns the
        native outcome."""
        native, mounted = self.both(who, op, *args)
        label = f"{self.agent(who).name}: {op}({', '.join(_short(a) for a in args)})"
        if native != mounted:
            self.problems.append(f"{label}: native {fmt(native)}, through credfs "
                                 f"{fmt(mounted)}")
        if state:
            self.compare_state(label)
        return native

    def compare_state(self, label: str) -> None:
        diff = diff_snapshots(snapshot(self.native), snapshot(self.backing))
        # Report a difference once, where it appeared, not after every later step.
        new = [d for d in diff if d not in self._last_diff]
        if new:
            self.problems.append(f"after {label}: trees differ: " + "; ".join(new[:8]))
        self._last_diff = diff

    def finish(self) -> None:
        """Compare the mount's view (as root) with N's, then fail on any problem."""
        for rel in snapshot(self.native):
            self.check("root", "stat", Rel(rel), state=False)
        assert not self.problems, (f"{len(self.problems)} difference(s) between native "
                                   "and credfs:\n" + "\n".join(self.problems))


@pytest.fixture
def twin(workdir: Path, backing: Path, mnt: Path, mount_credfs: MountFactory,
         agents: dict[str, UserAgent]) -> Twin:
    native = workdir / "native"
    native.mkdir()
    native.chmod(0o755)  # as the backing fixture: root, 0755
    return Twin(native, backing, mnt, mount_credfs, agents)


def expect_both(outcomes: Iterable[Outcome], what: str) -> None:
    """Setup sanity: a group of cases must include both allowed and refused ones
    (natively), or it does not exercise what it claims to."""
    statuses = {o[0] for o in outcomes}
    assert statuses == {"ok", "err"}, f"{what}: native outcomes were only {statuses}"


# -- access(2) ---------------------------------------------------------------------

PERM_MODES = (0o000, 0o400, 0o200, 0o100, 0o040, 0o020, 0o010, 0o004, 0o002, 0o001, 0o750,
              0o705, 0o777)
OWNERS = ((ALICE, ALICE), (BOB, G_SHARED), (0, G_SHARED), (CAROL, G_CAROL))
ACCESS_MODES = (os.F_OK, os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK, os.R_OK | os.X_OK)


def test_access_matrix(twin: Twin) -> None:
    """access(2) for every user, mode bit, owner and group class, on files, on
    directories, and on a file inside each directory (search permission)."""
    twin.mkdir("m")
    objs = []
    for uid, gid in OWNERS:
        for mode in PERM_MODES:
            f, d = f"m/f{mode:03o}-{uid}-{gid}", f"m/d{mode:03o}-{uid}-{gid}"
            twin.file(f, b"data", mode, uid, gid)
            twin.mkdir(d, mode, uid, gid)
            # Created before d's mode bites: setup runs as root anyway.
            twin.file(f"{d}/inner", b"x", 0o644)
            objs += [f, d, f"{d}/inner"]
    twin.mount()
    seen = []
    for who in USERS:
        for rel in objs:
            for amode in ACCESS_MODES:
                seen.append(twin.check(who, "access_errno", Rel(rel), amode, state=False))
    expect_both(seen, "access")
    twin.finish()


# -- open flags ----------------------------------------------------------------------

OPEN_MODES = (0o600, 0o640, 0o604, 0o660, 0o606, 0o644, 0o666, 0o400)
WRITE_FLAGS = {
    "wronly": os.O_WRONLY, "rdwr": os.O_RDWR, "trunc": os.O_WRONLY | os.O_TRUNC,
    "append": os.O_WRONLY | os.O_APPEND, "creat": os.O_WRONLY | os.O_CREAT,
}


def test_open_flags(twin: Twin) -> None:
    """open(2) with each access mode and O_TRUNC/O_APPEND/O_CREAT/O_EXCL on files
    of every owner/group class, with the resulting contents compared."""
    twin.mkdir("o")
    twin.mkdir("o/w", 0o777)
    twin.mkdir("o/ro", 0o755)
    files = []
    for uid, gid in OWNERS:
        for mode in OPEN_MODES:
            f = f"o/f{mode:03o}-{uid}-{gid}"
            twin.file(f, b"0123456789", mode, uid, gid)
            files.append(f)
    for d in ("o/w", "o/ro"):
        for who in USERS:
            twin.symlink(f"target-{who}", f"{d}/dangle-{who}")
            twin.symlink(f"target-excl-{who}", f"{d}/dangle-excl-{who}")
    twin.mount()
    seen = []
    for who in USERS:
        for f in files:
            seen.append(twin.check(who, "read", Rel(f), state=False))
            for name, flags in WRITE_FLAGS.items():
                seen.append(twin.check(who, "write", Rel(f), f"<{who}:{name}>".encode(), flags))
            # Linux truncates on O_RDONLY|O_TRUNC, and checks write permission for it.
            twin.check(who, "open_close", Rel(f), os.O_RDONLY | os.O_TRUNC)
            twin.check(who, "open_close", Rel(f), os.O_RDONLY | os.O_CREAT, 0o600)
            twin.check(who, "open_close", Rel(f), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            twin.check(who, "truncate", Rel(f), 4)
        for d in ("o/w", "o/ro"):
            excl = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            twin.check(who, "open_close", Rel(f"{d}/excl-{who}"), excl, 0o640)
            twin.check(who, "open_close", Rel(f"{d}/excl-{who}"), excl, 0o640)
            twin.check(who, "open_close", Rel(f"{d}/creat-{who}"), os.O_RDONLY | os.O_CREAT,
                       0o604)
            twin.check(who, "write", Rel(f"{d}/creat-{who}"), b"appended", os.O_APPEND)
            # O_CREAT through a dangling symlink creates its target; with O_EXCL it
            # fails on the link itself.
            twin.check(who, "open_close", Rel(f"{d}/dangle-{who}"), os.O_WRONLY | os.O_CREAT,
                       0o640)
            twin.check(who, "open_close", Rel(f"{d}/dangle-excl-{who}"), excl, 0o640)
            twin.check(who, "open_close", Rel(d), os.O_WRONLY)
            twin.check(who, "open_close", Rel(d), os.O_RDONLY | os.O_DIRECTORY)
            twin.check(who, "open_close", Rel(f"{d}/creat-{who}"), os.O_RDONLY | os.O_DIRECTORY)
    expect_both(seen, "open")
    twin.finish()


def test_write_kills_setid(twin: Twin) -> None:
    """Writing or truncating (write, O_TRUNC, truncate) clears setuid, and setgid
    too unless the writer may keep it (a member of the group for a file without
    group x, or root with CAP_FSETID), on own and others' files."""
    twin.mkdir("k", 0o777)
    ops = ("write", "otrunc", "truncate")
    for who in USERS:
        for owner in ("own", "dave"):
            uid = UIDS[who] if owner == "own" else DAVE
            for mode in (0o6777, 0o2666, 0o4666):
                for op in ops:
                    twin.file(f"k/{owner}-{mode:o}-{op}-{who}", b"0123456789", mode, uid,
                              G_SHARED)
    twin.mount()
    for who in USERS:
        for owner in ("own", "dave"):
            for mode in (0o6777, 0o2666, 0o4666):
                base = f"k/{owner}-{mode:o}"
                twin.check(who, "write", Rel(f"{base}-write-{who}"), b"w")
                twin.check(who, "open_close", Rel(f"{base}-otrunc-{who}"),
                           os.O_WRONLY | os.O_TRUNC)
                twin.check(who, "truncate", Rel(f"{base}-truncate-{who}"), 3)
    twin.finish()


# -- new objects: owner, group, mode, ACL ----------------------------------------------

NEW_DIRS = ("plain", "sgid", "gw", "dacl", "sgdacl")


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_new_objects(twin: Twin, users: dict[str, Identity],
                     make_agent: Callable[..., UserAgent], umask: int) -> None:
    """Files, dirs (and a dir inside them), symlinks, fifos, mknod'd files and
    hard links made by each user: in a plain dir, a setgid dir of group 3001, a
    group-writable dir, a dir with a default ACL and a setgid dir with one.
    Owner, group, mode and ACL xattrs are compared by the state check."""
    twin.mkdir("plain", 0o777)
    twin.mkdir("sgid", 0o2777, 0, G_SHARED)
    twin.mkdir("gw", 0o775, 0, G_SHARED)
    twin.mkdir("dacl", 0o777)
    twin.setfacl("dacl", "-d", "-m", f"g:{G_SHARED}:rwx")
    twin.mkdir("sgdacl", 0o2777, 0, G_SHARED)
    twin.setfacl("sgdacl", "-d", "-m", f"u:{CAROL}:rx,g:{G_CAROL}:rwx,o::---")
    twin.mount()
    seen = []
    for who in USERS:
        agent = make_agent(users[who], umask=umask)
        for d in NEW_DIRS:
            b = f"{d}/{who}"
            excl = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            seen.append(twin.check(agent, "open_close", Rel(f"{b}-file"), excl, 0o666))
            # Carol is not in group 3001: in the setgid dirs the kernel strips S_ISGID.
            twin.check(agent, "open_close", Rel(f"{b}-sgidfile"), excl, 0o2775)
            twin.check(agent, "mkdir", Rel(f"{b}-dir"), 0o777)
            twin.check(agent, "mkdir", Rel(f"{b}-dir/sub"), 0o750)
            twin.check(agent, "open_close", Rel(f"{b}-dir/sub/f"), excl, 0o664)
            twin.check(agent, "symlink", "target", Rel(f"{b}-link"))
            twin.check(agent, "mkfifo", Rel(f"{b}-fifo"), 0o666)
            twin.check(agent, "mknod", Rel(f"{b}-node"), stat.S_IFREG | 0o646)
            twin.check(agent, "link", Rel(f"{b}-file"), Rel(f"{b}-hard"))
            for suffix in ("file", "sgidfile", "dir", "dir/sub", "dir/sub/f", "link", "fifo",
                           "node", "hard"):
                twin.check(agent, "stat", Rel(f"{b}-{suffix}"), state=False)
                twin.check(agent, "getxattr", Rel(f"{b}-{suffix}"), "system.posix_acl_access",
                           state=False)
    expect_both(seen, "create in the test dirs")
    twin.finish()


# -- chmod, chown, utime ----------------------------------------------------------------

def test_chmod(twin: Twin) -> None:
    """chmod by the owner, a group member, a stranger and root; setgid asked by an
    owner outside the file's group (the kernel strips it), on files and dirs."""
    twin.mkdir("c", 0o777)
    for who in USERS:
        uid, gid = UIDS[who], GIDS[who]
        twin.file(f"c/own-{who}", b"x", 0o644, uid, gid)
        twin.file(f"c/own-suid-{who}", b"x", 0o644, uid, gid)
        twin.file(f"c/foreign-group-{who}", b"x", 0o644, uid, G_CAROL)
        twin.mkdir(f"c/foreign-group-dir-{who}", 0o755, uid, G_CAROL)
        twin.file(f"c/alices-{who}", b"x", 0o664, ALICE, G_SHARED)
        twin.file(f"c/daves-{who}", b"x", 0o666, DAVE, DAVE)
    twin.mount()
    seen = []
    for who in USERS:
        seen.append(twin.check(who, "chmod", Rel(f"c/own-{who}"), 0o600))
        twin.check(who, "chmod", Rel(f"c/own-suid-{who}"), 0o4755)
        twin.check(who, "chmod", Rel(f"c/foreign-group-{who}"), 0o2755)
        twin.check(who, "chmod", Rel(f"c/foreign-group-dir-{who}"), 0o2775)
        seen.append(twin.check(who, "chmod", Rel(f"c/alices-{who}"), 0o640))
        twin.check(who, "chmod", Rel(f"c/daves-{who}"), 0o600)
    expect_both(seen, "chmod")
    twin.finish()


def test_chown(twin: Twin) -> None:
    """chown to self, to another uid, to a group the caller is or is not in, of
    another's file, and of a setuid/setgid file (which loses the bits)."""
    twin.mkdir("o", 0o777)
    cases = ("self", "other", "ingroup", "outgroup", "both", "suid", "alices")
    for who in USERS:
        for c in cases:
            if c == "alices":
                twin.file(f"o/{c}-{who}", b"x", 0o644, ALICE, ALICE)
            else:
                twin.file(f"o/{c}-{who}", b"x", 0o6755 if c == "suid" else 0o644, UIDS[who],
                          GIDS[who])
    twin.mount()
    in_group = {"alice": G_SHARED, "bob": G_SHARED, "carol": G_CAROL, "root": G_SHARED}
    out_group = {"alice": G_CAROL, "bob": G_CAROL, "carol": G_SHARED, "root": G_CAROL}
    seen = []
    for who in USERS:
        other = BOB if who == "alice" else ALICE
        seen.append(twin.check(who, "chown", Rel(f"o/self-{who}"), UIDS[who], -1))
        seen.append(twin.check(who, "chown", Rel(f"o/other-{who}"), other, -1))
        twin.check(who, "chown", Rel(f"o/ingroup-{who}"), -1, in_group[who])
        twin.check(who, "chown", Rel(f"o/outgroup-{who}"), -1, out_group[who])
        twin.check(who, "chown", Rel(f"o/both-{who}"), UIDS[who], in_group[who])
        twin.check(who, "chown", Rel(f"o/suid-{who}"), -1, in_group[who])
        twin.check(who, "chown", Rel(f"o/alices-{who}"), UIDS[who], GIDS[who])
    expect_both(seen, "chown")
    twin.finish()


def test_utime(twin: Twin) -> None:
    """utime with explicit times (owner only) and with None, "touch" (owner or
    anyone who may write), by owner, writer-not-owner, stranger and root."""
    twin.mkdir("u", 0o777)
    kinds = {"own": None, "writable": 0o666, "readonly": 0o644}
    for who in USERS:
        for kind, mode in kinds.items():
            for op in ("explicit", "touch"):
                rel = f"u/{kind}-{op}-{who}"
                if mode is None:
                    twin.file(rel, b"x", 0o644, UIDS[who], GIDS[who])
                else:
                    twin.file(rel, b"x", mode, DAVE, DAVE)
                twin.utime(rel)
    twin.mount()
    seen = []
    for who in USERS:
        for kind in kinds:
            seen.append(twin.check(who, "utime", Rel(f"u/{kind}-explicit-{who}"),
                                   (1_000_000_000.0, 1_100_000_000.5)))
            seen.append(twin.check(who, "utime", Rel(f"u/{kind}-touch-{who}"), None))
    expect_both(seen, "utime")
    twin.finish()


def test_utime_explicit_current_time(twin: Twin) -> None:
    """Explicit times that happen to equal the current time still need ownership
    (only UTIME_NOW / NULL is the writer's "touch")."""
    twin.mkdir("u", 0o777)
    for who in USERS:
        twin.file(f"u/writable-{who}", b"x", 0o666, DAVE, DAVE)
        twin.utime(f"u/writable-{who}")
    twin.mount()
    for who in USERS:
        now = float(int(time.time()))
        twin.check(who, "utime", Rel(f"u/writable-{who}"), (now, now))
    twin.finish()


# -- sticky directories, hard links, renames -------------------------------------------

def test_sticky_dir(twin: Twin) -> None:
    """In 1777 dirs (one root's, one bob's): unlink, rename, rename-over and rmdir
    of one's own and of others' entries (all writable by everyone)."""
    for d, uid in (("s", 0), ("sb", BOB)):
        twin.mkdir(d, 0o1777, uid, uid)
        for owner in USERS:
            for actor in USERS:
                for op in ("u", "r", "t"):
                    twin.file(f"{d}/{owner}-{actor}-{op}", f"{owner}".encode(), 0o666,
                              UIDS[owner], GIDS[owner])
                twin.file(f"{d}/{actor}-own-for-{owner}", b"mine", 0o666, UIDS[actor],
                          GIDS[actor])
                twin.mkdir(f"{d}/{owner}-{actor}-d", 0o777, UIDS[owner], GIDS[owner])
    twin.mount()
    seen = []
    for d in ("s", "sb"):
        for actor in USERS:
            for owner in USERS:
                seen.append(twin.check(actor, "unlink", Rel(f"{d}/{owner}-{actor}-u")))
                twin.check(actor, "rename", Rel(f"{d}/{owner}-{actor}-r"),
                           Rel(f"{d}/{owner}-{actor}-r-moved"))
                # Replacing someone else's entry is a removal too.
                twin.check(actor, "rename", Rel(f"{d}/{actor}-own-for-{owner}"),
                           Rel(f"{d}/{owner}-{actor}-t"))
                twin.check(actor, "rmdir", Rel(f"{d}/{owner}-{actor}-d"))
    expect_both(seen, "sticky unlink")
    twin.finish()


def test_hardlink_protection(twin: Twin) -> None:
    """fs.protected_hardlinks: linking a file one does not own needs read and
    write access to it, and never works for setuid or setgid-executable files."""
    if Path("/proc/sys/fs/protected_hardlinks").read_text().strip() != "1":
        pytest.skip("fs.protected_hardlinks is off")
    twin.mkdir("h", 0o777)
    sources = {
        "a644": (0o644, ALICE, ALICE), "a666": (0o666, ALICE, ALICE),
        "a600": (0o600, ALICE, ALICE), "a4755": (0o4755, ALICE, ALICE),
        "a2755": (0o2755, ALICE, G_SHARED), "a2745": (0o2745, ALICE, G_SHARED),
        "r600": (0o600, 0, 0), "g660": (0o660, DAVE, G_SHARED),
    }
    for name, (mode, uid, gid) in sources.items():
        twin.file(f"h/{name}", b"x", mode, uid, gid)
    twin.mkdir("h/dir", 0o777, ALICE, ALICE)
    twin.mkdir("h/ro", 0o755)
    twin.mount()
    seen = []
    for who in USERS:
        for name in (*sources, "dir"):
            seen.append(twin.check(who, "link", Rel(f"h/{name}"), Rel(f"h/{who}-{name}")))
        # Into a directory the caller may not write.
        twin.check(who, "link", Rel("h/a666"), Rel(f"h/ro/{who}"))
        # Onto an existing name.
        twin.check(who, "link", Rel("h/a666"), Rel("h/a644"))
    expect_both(seen, "link")
    twin.finish()


def test_rename_rmdir(twin: Twin) -> None:
    """rename/renameat2/rmdir: unwritable parents, non-empty dirs, NOREPLACE,
    EXCHANGE, type mismatches, and moving another user's directory elsewhere
    (which needs write permission on the directory itself, for its "..")."""
    twin.mkdir("ro", 0o755)
    twin.file("ro/f", b"f")
    twin.mkdir("ro/d")
    twin.mkdir("w", 0o777)
    twin.mkdir("w2", 0o777)
    for who in USERS:
        u, g = UIDS[who], GIDS[who]
        twin.mkdir(f"w/{who}-full", 0o755, u, g)
        twin.file(f"w/{who}-full/x", b"x", 0o644, u, g)
        twin.mkdir(f"w/{who}-empty", 0o755, u, g)
        for n in ("n1", "n2", "x", "y", "file", "mv"):
            twin.file(f"w/{who}-{n}", f"{who}-{n}".encode(), 0o644, u, g)
        twin.mkdir(f"w/{who}-xd", 0o755, u, g)
        twin.mkdir(f"w/{who}-dir", 0o755, u, g)
        twin.mkdir(f"w/{who}-dir2", 0o755, u, g)
        twin.file(f"w/{who}-dir2/z", b"z", 0o644, u, g)
        twin.mkdir(f"w/alices-dir-for-{who}", 0o755, ALICE, ALICE)
    twin.mount()
    seen = []
    for who in USERS:
        seen.append(twin.check(who, "rename", Rel("ro/f"), Rel(f"ro/g-{who}")))
        twin.check(who, "rmdir", Rel("ro/d"))
        twin.check(who, "rmdir", Rel(f"w/{who}-full"))
        twin.check(who, "rmdir", Rel(f"w/{who}-empty"))
        twin.check(who, "rename2", Rel(f"w/{who}-n1"), Rel(f"w/{who}-n2"), RENAME_NOREPLACE)
        twin.check(who, "rename2", Rel(f"w/{who}-n1"), Rel(f"w/{who}-n3"), RENAME_NOREPLACE)
        twin.check(who, "rename2", Rel(f"w/{who}-x"), Rel(f"w/{who}-y"), RENAME_EXCHANGE)
        twin.check(who, "rename2", Rel(f"w/{who}-x"), Rel(f"w/{who}-xd"), RENAME_EXCHANGE)
        twin.check(who, "rename2", Rel(f"w/{who}-x"), Rel(f"w/{who}-nothere"),
                   RENAME_EXCHANGE)
        twin.check(who, "rename", Rel(f"w/{who}-file"), Rel(f"w/{who}-dir"))
        twin.check(who, "rename", Rel(f"w/{who}-dir"), Rel(f"w/{who}-file"))
        twin.check(who, "rename", Rel(f"w/{who}-dir"), Rel(f"w/{who}-dir2"))
        twin.check(who, "rename", Rel(f"w/{who}-dir"), Rel(f"w/{who}-dir/inside"))
        twin.check(who, "rename", Rel(f"w/{who}-mv"), Rel(f"ro/{who}-mv"))
        seen.append(twin.check(who, "rename", Rel(f"w/alices-dir-for-{who}"),
                               Rel(f"w2/alices-dir-for-{who}")))
        twin.check(who, "rename", Rel(f"w/{who}-xd"), Rel(f"w2/{who}-xd"))
        twin.check(who, "rmdir", Rel("w"))
    expect_both(seen, "rename")
    twin.finish()


# -- xattrs ------------------------------------------------------------------------------

def test_xattrs(twin: Twin) -> None:
    """user.* as owner and as a reader who may not write, on files, dirs and a
    fifo; trusted.* as users (invisible, EPERM) and root."""
    twin.mkdir("x", 0o755)
    twin.file("x/af", b"a", 0o644, ALICE, ALICE)
    twin.mkdir("x/ad", 0o755, ALICE, ALICE)
    twin.file("x/bf", b"b", 0o600, BOB, BOB)
    twin.fifo("x/fifo", 0o666, ALICE, ALICE)
    for rel in ("x/af", "x/ad", "x/bf"):
        twin.setxattr(rel, "user.pre", b"pre")
        for who in USERS:
            twin.setxattr(rel, f"user.rm-{who}", b"rm")
    twin.setxattr("x/af", "trusted.pre", b"t")
    twin.mount()
    seen = []
    for who in USERS:
        for rel in ("x/af", "x/ad", "x/bf"):
            seen.append(twin.check(who, "getxattr", Rel(rel), "user.pre", state=False))
            twin.check(who, "getxattr", Rel(rel), "user.missing", state=False)
            twin.check(who, "listxattr", Rel(rel), state=False)
            seen.append(twin.check(who, "setxattr", Rel(rel), f"user.by-{who}", b"v"))
            twin.check(who, "removexattr", Rel(rel), f"user.rm-{who}")
            twin.check(who, "removexattr", Rel(rel), "user.missing")
        twin.check(who, "getxattr", Rel("x/af"), "trusted.pre", state=False)
        twin.check(who, "setxattr", Rel("x/af"), f"trusted.by-{who}", b"t")
        twin.check(who, "listxattr", Rel("x/af"), state=False)
        twin.check(who, "setxattr", Rel("x/fifo"), "user.f", b"v")
        twin.check(who, "getxattr", Rel("x/fifo"), "user.f", state=False)
    expect_both(seen, "xattrs")
    twin.finish()


@pytest.mark.xfail(strict=True, reason=(
    "pyfuse3 3.5 emulates XATTR_CREATE/XATTR_REPLACE with a getxattr before a plain "
    "setxattr and never passes the flags on: a reader who may not write gets "
    "EEXIST/ENODATA where the kernel says EACCES (documented in the README)"))
def test_xattr_create_replace(twin: Twin) -> None:
    """setxattr with XATTR_CREATE onto an existing name and XATTR_REPLACE of a
    missing one, by the owner and by readers who may not write (for whom the
    permission check comes first natively: EACCES, not EEXIST/ENODATA)."""
    twin.mkdir("x", 0o755)
    twin.file("x/af", b"a", 0o644, ALICE, ALICE)
    twin.mkdir("x/ad", 0o755, ALICE, ALICE)
    for rel in ("x/af", "x/ad"):
        twin.setxattr(rel, "user.pre", b"pre")
    twin.mount()
    seen = []
    for who in USERS:
        for rel in ("x/af", "x/ad"):
            seen.append(twin.check(who, "setxattr", Rel(rel), "user.pre", b"new", XATTR_CREATE))
            twin.check(who, "setxattr", Rel(rel), f"user.new-{who}", b"new", XATTR_CREATE)
            twin.check(who, "setxattr", Rel(rel), f"user.nope-{who}", b"new", XATTR_REPLACE)
            seen.append(twin.check(who, "setxattr", Rel(rel), "user.pre", f"{who}".encode(),
                                   XATTR_REPLACE))
    expect_both(seen, "xattr flags")
    twin.finish()


# -- POSIX ACLs, groups -----------------------------------------------------------------

def _read_write_access(twin: Twin, who: str, rel: str) -> list[Outcome]:
    out = [twin.check(who, "read", Rel(rel), state=False),
           twin.check(who, "write", Rel(rel), f"<{who}>".encode())]
    for amode in (os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK):
        out.append(twin.check(who, "access_errno", Rel(rel), amode, state=False))
    twin.check(who, "stat", Rel(rel), state=False)
    return out


def test_acl_only(twin: Twin) -> None:
    """Access granted only by an ACL entry (0600 file, u:carol:rw), and refused
    only by one (named user ---, named group ---), on files and directories.
    Each pass runs in both user orders, so a name cached for one user is then
    tried by another."""
    twin.mkdir("a", 0o755)
    twin.file("a/grant", b"g", 0o600, ALICE, ALICE)
    twin.setfacl("a/grant", "-m", f"u:{CAROL}:rw")
    twin.file("a/deny", b"d", 0o644, ALICE, ALICE)
    twin.setfacl("a/deny", "-m", f"u:{CAROL}:---")
    twin.file("a/gdeny", b"gd", 0o644, ALICE, ALICE)
    twin.setfacl("a/gdeny", "-m", f"g:{G_SHARED}:---")
    twin.mkdir("a/dir", 0o700, ALICE, ALICE)
    twin.file("a/dir/f", b"in", 0o644, ALICE, ALICE)
    twin.setfacl("a/dir", "-m", f"u:{CAROL}:rx")
    twin.mkdir("a/xdeny", 0o755, ALICE, ALICE)
    twin.file("a/xdeny/f", b"in", 0o644, ALICE, ALICE)
    twin.setfacl("a/xdeny", "-m", f"u:{CAROL}:---")
    twin.mount()
    seen = []
    for order in (USERS, tuple(reversed(USERS))):
        for who in order:
            for rel in ("a/grant", "a/deny", "a/gdeny", "a/dir/f", "a/xdeny/f"):
                seen += _read_write_access(twin, who, rel)
            for d in ("a/dir", "a/xdeny"):
                twin.check(who, "listdir", Rel(d), state=False)
                twin.check(who, "access_errno", Rel(d), os.X_OK, state=False)
            twin.check(who, "getxattr", Rel("a/grant"), "system.posix_acl_access", state=False)
    expect_both(seen, "ACL cases")
    twin.finish()


def test_permission_changes_through_mount(twin: Twin) -> None:
    """Permissions narrowed through the mount (chmod, an ACL set as the
    system.posix_acl_access xattr, a rename into a private dir) apply at once to
    names another user has just looked up (and the kernel may have cached); ACLs
    are set by the owner only, and chmod rewrites the ACL mask."""
    twin.mkdir("c", 0o777)  # alice may move things out of it
    twin.mkdir("c/aclsrc", 0o755)
    twin.setfacl("c/aclsrc", "-m", f"u:{CAROL}:---")
    for d in ("chmod", "acl", "top", "top/mid", "pub"):
        twin.mkdir(f"c/{d}", 0o755, ALICE, ALICE)
    twin.mkdir("c/priv", 0o700, ALICE, ALICE)
    for d in ("chmod", "acl", "top/mid", "pub"):
        twin.file(f"c/{d}/f", b"f", 0o644, ALICE, ALICE)
    twin.file("c/aclfile", b"a", 0o644, ALICE, ALICE)
    twin.file("c/maskfile", b"m", 0o664, ALICE, ALICE)
    twin.setfacl("c/maskfile", "-m", f"u:{CAROL}:rw")
    acl_deny_carol = os.getxattr(twin.native / "c/aclsrc", "system.posix_acl_access")
    twin.mount()
    watched = ("c/chmod/f", "c/acl/f", "c/top/mid/f", "c/pub/f", "c/priv/pub/f", "c/aclfile")

    def look() -> dict[str, str]:
        """carol's native access(R_OK) status per watched path (after bob's)."""
        seen = {}
        for who in ("bob", "carol"):
            for rel in watched:
                twin.check(who, "stat", Rel(rel), state=False)
                seen[rel] = twin.check(who, "access_errno", Rel(rel), os.R_OK,
                                       state=False)[0]
        return seen

    before = look()
    twin.check("alice", "chmod", Rel("c/chmod"), 0o700)
    look()
    twin.check("carol", "setxattr", Rel("c/acl"), "system.posix_acl_access", acl_deny_carol)
    twin.check("bob", "setxattr", Rel("c/aclfile"), "system.posix_acl_access", acl_deny_carol)
    twin.check("alice", "setxattr", Rel("c/acl"), "system.posix_acl_access", acl_deny_carol)
    twin.check("alice", "setxattr", Rel("c/aclfile"), "system.posix_acl_access",
               acl_deny_carol)
    look()
    twin.check("alice", "chmod", Rel("c/top"), 0o700)
    look()
    twin.check("alice", "rename", Rel("c/pub"), Rel("c/priv/pub"))
    after = look()
    # Setup sanity: every narrowing took carol's access away natively.
    assert [before[r] for r in watched] == ["ok"] * 4 + ["err", "ok"], before
    assert set(after.values()) == {"err"}, after
    for who in ("alice", "bob", "carol"):
        twin.check(who, "read", Rel("c/aclfile"), state=False)
        twin.check(who, "getxattr", Rel("c/acl"), "system.posix_acl_access", state=False)
    # The group class of a file with an ACL is its mask: chmod narrows the
    # named entries, and removing the ACL is the owner's business too.
    twin.check("carol", "chmod", Rel("c/maskfile"), 0o644)
    twin.check("alice", "chmod", Rel("c/maskfile"), 0o644)
    twin.check("carol", "write", Rel("c/maskfile"), b"c")
    twin.check("carol", "removexattr", Rel("c/maskfile"), "system.posix_acl_access")
    twin.check("alice", "removexattr", Rel("c/maskfile"), "system.posix_acl_access")
    twin.finish()


def test_group_classes(twin: Twin) -> None:
    """A group reached only through the supplementary list (bob's 3001), and the
    group class refusing where "other" would allow (mode 0705/0604, group 3001:
    bob and alice refused, carol allowed)."""
    twin.mkdir("g", 0o755)
    twin.file("g/f0640", b"secret", 0o640, 0, G_SHARED)
    twin.file("g/f0660", b"shared", 0o660, 0, G_SHARED)
    twin.file("g/f0604", b"others", 0o604, 0, G_SHARED)
    for mode in (0o705, 0o750, 0o770):
        d = f"g/d{mode:03o}"
        twin.mkdir(d, mode, 0, G_SHARED)
        twin.file(f"{d}/f", b"inside", 0o666)
    twin.mount()
    seen = []
    for order in (USERS, tuple(reversed(USERS))):
        for who in order:
            for rel in ("g/f0640", "g/f0660", "g/f0604"):
                seen += _read_write_access(twin, who, rel)
            for d in ("g/d705", "g/d750", "g/d770"):
                twin.check(who, "listdir", Rel(d), state=False)
                seen += _read_write_access(twin, who, f"{d}/f")
                twin.check(who, "open_close", Rel(f"{d}/new-{who}"),
                           os.O_WRONLY | os.O_CREAT, 0o644)
    expect_both(seen, "group classes")
    twin.finish()


# -- device nodes, unsearchable dirs, exec --------------------------------------------

def test_mknod(twin: Twin) -> None:
    """A char device (1,3) by root (allowed) and by users (EPERM natively); fifos
    and regular files by mknod are anyone's."""
    twin.mkdir("dev", 0o777)
    twin.mount()
    seen = []
    for who in USERS:
        seen.append(twin.check(who, "mknod", Rel(f"dev/null-{who}"), stat.S_IFCHR | 0o666,
                               os.makedev(1, 3)))
        twin.check(who, "mknod", Rel(f"dev/blk-{who}"), stat.S_IFBLK | 0o600,
                   os.makedev(7, 0))
        twin.check(who, "mknod", Rel(f"dev/fifo-{who}"), stat.S_IFIFO | 0o640)
        twin.check(who, "mkfifo", Rel(f"dev/mkfifo-{who}"), 0o600)
        twin.check(who, "mknod", Rel(f"dev/reg-{who}"), stat.S_IFREG | 0o600)
        for name in ("null", "blk", "fifo", "mkfifo", "reg"):
            twin.check(who, "stat", Rel(f"dev/{name}-{who}"), state=False)
    expect_both(seen, "mknod of a char device")
    twin.finish()


def test_dir_read_without_search(twin: Twin) -> None:
    """A directory with r but not x for the caller lists its names but refuses
    every lookup in it; one with x but not r is the other way round."""
    twin.mkdir("rx", 0o755)
    twin.mkdir("rx/r", 0o744)
    twin.file("rx/r/a", b"a", 0o644)
    twin.mkdir("rx/r/sub", 0o755)
    twin.symlink("a", "rx/r/ln")
    twin.mkdir("rx/x", 0o711)
    twin.file("rx/x/a", b"a", 0o644)
    twin.mkdir("rx/x/sub", 0o755)
    twin.mkdir("rx/ar", 0o740, 0, G_SHARED)  # r without x for the group only
    twin.file("rx/ar/a", b"a", 0o644)
    twin.mount()
    seen = []
    for order in (USERS, tuple(reversed(USERS))):
        for who in order:
            for d in ("rx/r", "rx/x", "rx/ar"):
                seen.append(twin.check(who, "listdir", Rel(d), state=False))
                for name in ("a", "sub", "ln"):
                    seen.append(twin.check(who, "stat", Rel(f"{d}/{name}"), state=False))
                twin.check(who, "read", Rel(f"{d}/a"), state=False)
                twin.check(who, "access_errno", Rel(f"{d}/a"), os.F_OK, state=False)
                twin.check(who, "listdir", Rel(f"{d}/sub"), state=False)
                twin.check(who, "readlink", Rel(f"{d}/ln"), state=False)
    expect_both(seen, "listing and lookups")
    twin.finish()


SCRIPT = b"#!/bin/sh\nexit 7\n"


def _exec_cases(twin: Twin, scripts: dict[str, tuple[int, int, int]],
                binaries: dict[str, int]) -> list[Outcome]:
    for name, (mode, uid, gid) in scripts.items():
        twin.file(f"bin/{name}", SCRIPT, mode, uid, gid)
    true = Path("/bin/true").read_bytes()
    for name, mode in binaries.items():
        twin.file(f"bin/{name}", true, mode)
    twin.mount()
    seen = []
    for who in USERS:
        for name in (*scripts, *binaries):
            seen.append(twin.check(who, "exec_status", Rel(f"bin/{name}"), state=False))
    return seen


def test_exec(twin: Twin) -> None:
    """execve of scripts and of a binary with different x bits and owners: 0744
    root's is refused to users natively (EACCES) and must be through the mount
    too."""
    twin.mkdir("bin", 0o755)
    seen = _exec_cases(
        twin,
        {"s744": (0o744, 0, 0), "s755": (0o755, 0, 0), "s644": (0o644, 0, 0),
         "s750g": (0o750, 0, G_SHARED), "s705g": (0o705, 0, G_SHARED),
         "s700a": (0o700, ALICE, ALICE)},
        {"true744": 0o744, "true755": 0o755, "true750": 0o750})
    expect_both(seen, "exec")
    twin.finish()


def test_exec_execute_only(twin: Twin) -> None:
    """An execute-only file (0711): execve needs no read permission natively (the
    kernel reads a binary itself), so the binary runs for everyone and the script
    reaches its interpreter (which then cannot read it)."""
    twin.mkdir("bin", 0o755)
    seen = _exec_cases(twin, {"s711": (0o711, 0, 0)}, {"true711": 0o711})
    assert all(o[0] == "ok" for o in seen), seen
    twin.finish()


# -- long names and paths; statfs --------------------------------------------------

def test_long_names_and_paths(twin: Twin) -> None:
    """255-byte names work, 256-byte names give ENAMETOOLONG; a ~4000-byte path
    of nested dirs works through the mount; symlink targets of 1000 and 4095
    bytes, and 4096 (too long)."""
    twin.mkdir("n", 0o777)
    twin.mount()
    for length in (255, 256):
        twin.check("alice", "open_close", Rel(f"n/{'f' * length}"),
                   os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        twin.check("alice", "stat", Rel(f"n/{'f' * length}"), state=False)
        twin.check("alice", "mkdir", Rel(f"n/{'d' * length}"))
        twin.check("alice", "symlink", "t", Rel(f"n/{'l' * length}"))
        twin.check("alice", "rename", Rel(f"n/{'f' * 255}"), Rel(f"n/{'r' * length}"))
    twin.check("alice", "listdir", Rel("n"), state=False)

    # Nested dirs up to the longest path the kernel takes (PATH_MAX - 1 = 4095
    # bytes, absolute) on the side with the longer root, then one more level that
    # takes both sides over it.
    longest_root = max(len(str(twin.native)), len(str(twin.mnt))) + 1
    shortest_root = min(len(str(twin.native)), len(str(twin.mnt))) + 1
    rel = "n/deep"
    twin.check("alice", "mkdir", Rel(rel))
    level = 0
    while (room := 4095 - longest_root - len(rel) - 1 - len("/ff")) >= 4:
        rel = f"{rel}/{level:03d}{'x' * (min(room, 200) - 3)}"
        level += 1
        twin.check("alice", "mkdir", Rel(rel))
    deep_file = f"{rel}/ff"
    assert 4090 <= longest_root + len(deep_file) <= 4095
    twin.check("alice", "write", Rel(deep_file), b"deep", os.O_CREAT)
    twin.check("alice", "read", Rel(deep_file), state=False)
    twin.check("alice", "stat", Rel(deep_file), state=False)
    twin.check("alice", "listdir", Rel(rel), state=False)
    too_long = f"{rel}/{'y' * 200}"
    assert shortest_root + len(too_long) > 4096
    twin.check("alice", "mkdir", Rel(too_long))
    twin.check("alice", "stat", Rel(too_long), state=False)

    for length in (1000, 4095, 4096):
        target = ("abcdefg/" * 600)[:length]
        twin.check("alice", "symlink", target, Rel(f"n/target{length}"))
        twin.check("alice", "readlink", Rel(f"n/target{length}"), state=False)
    twin.finish()


def test_statfs(twin: Twin) -> None:
    """statfs through the mount reports the backing filesystem: sizes exactly,
    free counts within a small tolerance (other activity moves them)."""
    twin.mount()
    native, mounted = twin.both("alice", "statvfs", Rel("."))
    assert native[0] == mounted[0] == "ok", (native, mounted)
    direct = os.statvfs(twin.backing)
    for key in ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax"):
        assert mounted[1][key] == native[1][key] == getattr(direct, key), key
    for key, total in (("f_bfree", "f_blocks"), ("f_bavail", "f_blocks"),
                       ("f_ffree", "f_files"), ("f_favail", "f_files")):
        slack = max(native[1][total] // 100, 1024)
        assert abs(mounted[1][key] - native[1][key]) <= slack, (key, native, mounted)
    twin.finish()
