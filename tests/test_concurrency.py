"""Several users hammer one caller-mode mount at once; no request may run as anyone else.

Five users - alice, bob, carol and two ad-hoc ones (dave 2004, erin 2005, each
with a group of their own) - each drive their own agent process from their own
thread, all at the same time, against one credfs mount (default cache, 4
workers, and again with 1 worker so that every request switches credentials on
the same thread). Each user:

- creates, writes, reads back, chmods, renames and deletes files, directories
  and symlinks in a shared 1777 directory, in a setgid 3777 directory, in a
  setgid group directory (if a member) and in a 0700 home directory of its own,
  and checks after each step that the object is owned by its uid, has the
  expected group (its own gid, the setgid directory's group, or the group it
  chowned to) and mode, and holds what it wrote; nothing of this may be refused;
- probes the other users' objects: lists and reads their public 0755/0644
  ones, and tries to list, read, write, truncate, chmod, chown, rename, unlink,
  setxattr and create in their 0700 homes, 0600 files and non-member group dir.
  Each probe's outcome must be the one the kernel gives the same agent on a
  native copy of the tree (recorded before the run: the refusals are real
  EACCES/EPERM there, the reads real successes).

Afterwards a root walk of the backing tree checks that every object named after
a user belongs to that user's uid (a request that ran with another identity
would have created it as someone else), has the expected group and mode, that
the set of such objects is exactly what the users think they made, and that no
private file was changed.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers.agents import Identity, Outcome, UserAgent
from helpers.mounts import CredfsMount

OPS_PER_USER = 300
RUN_TIMEOUT = 120.0  # bound on the whole parallel phase (it takes a few seconds)

ADHOC = {
    "dave": Identity("dave", 2004, 2004, (2004, 3004)),
    "erin": Identity("erin", 2005, 2005, (2005, 3005)),
}
UMASKS = {"alice": 0o022, "bob": 0o002, "carol": 0o022, "dave": 0o027, "erin": 0o077}
NAMES = tuple(UMASKS)

TEAM_GID = 3001  # alice and bob (bob only as a supplementary group)
SGID_GID = 3002  # carol's supplementary group; the others are not members


def secret_of(name: str) -> bytes:
    return f"secret of {name}\n".encode()


def build_tree(root: Path, idents: dict[str, Identity]) -> None:
    """The starting tree, built as root; the same for the native copy and the backing dir."""
    def mk(rel: str, mode: int, uid: int = 0, gid: int = 0, data: bytes | None = None) -> None:
        p = root / rel
        if data is None:
            p.mkdir()
        else:
            p.write_bytes(data)
        os.chown(p, uid, gid)
        os.chmod(p, mode)  # after chown, which clears setgid on files

    os.chmod(root, 0o755)
    mk("shared", 0o1777)
    mk("sgid", 0o3777, 0, SGID_GID)
    mk("team", 0o2770, 0, TEAM_GID)
    mk("home", 0o755)
    mk("pub", 0o755)
    for name, who in idents.items():
        mk(f"home/{name}", 0o700, who.uid, who.gid)
        mk(f"home/{name}/secret", 0o600, who.uid, who.gid, secret_of(name))
        mk(f"pub/{name}", 0o755, who.uid, who.gid)
        mk(f"pub/{name}/readme", 0o644, who.uid, who.gid, f"readme of {name}\n".encode())
        mk(f"shared/{name}-priv", 0o600, who.uid, who.gid, secret_of(name))


@dataclass(frozen=True)
class Probe:
    """An operation on another user's object; its native outcome is the expectation."""

    op: str
    args: tuple[Any, ...]  # strings starting with "@/" are paths below the tree root
    refused: bool  # what the setup means it to be; checked natively before the run

    def resolve(self, base: Path) -> tuple[Any, ...]:
        return tuple(os.path.join(base, a[2:]) if isinstance(a, str) and a.startswith("@/")
                     else a for a in self.args)


def probes_for(me: str, idents: dict[str, Identity]) -> list[Probe]:
    uid = idents[me].uid
    out: list[Probe] = []
    for other in NAMES:
        if other == me:
            continue
        priv, secret = f"@/shared/{other}-priv", f"@/home/{other}/secret"
        out += [
            Probe("listdir", (f"@/pub/{other}",), False),
            Probe("read", (f"@/pub/{other}/readme",), False),
            Probe("stat", (priv,), False),
            Probe("listdir", (f"@/home/{other}",), True),
            Probe("stat", (secret,), True),
            Probe("read", (secret,), True),
            Probe("write", (secret, b"pwned", os.O_WRONLY | os.O_APPEND), True),
            Probe("open_close", (f"@/home/{other}/new", os.O_WRONLY | os.O_CREAT, 0o644), True),
            Probe("mkdir", (f"@/pub/{other}/new",), True),
            Probe("read", (priv,), True),
            Probe("write", (priv, b"pwned", os.O_WRONLY | os.O_APPEND), True),
            Probe("truncate", (priv, 0), True),
            Probe("unlink", (priv,), True),
            Probe("rename", (priv, f"@/shared/{me}-stolen"), True),
            Probe("chmod", (priv, 0o666), True),
            Probe("chown", (priv, uid, -1), True),
            Probe("setxattr", (priv, "user.pwned", b"1"), True),
            Probe("utime", (priv, None), True),
            Probe("utime", (priv, (1.0, 1.0)), True),
        ]
    if TEAM_GID not in idents[me].groups:
        out += [Probe("listdir", ("@/team",), True),
                Probe("open_close", (f"@/team/{me}-x", os.O_WRONLY | os.O_CREAT, 0o644), True)]
    return out


@dataclass
class Expect:
    kind: str  # "file", "dir" or "symlink"
    uid: int
    gid: int
    mode: int | None  # permission bits incl. setgid; None for symlinks
    data: bytes | None = None


@dataclass
class Worker:
    """One user's run: its agent, its objects, and what went wrong."""

    name: str
    ident: Identity
    agent: UserAgent
    mnt: Path
    probes: list[tuple[Probe, Outcome]]
    rng: random.Random
    objects: dict[str, Expect] = field(default_factory=dict)  # rel path -> expectation
    errors: list[str] = field(default_factory=list)
    history: list[str] = field(default_factory=list)
    counter: int = 0

    def path(self, rel: str) -> str:
        return os.path.join(self.mnt, rel)

    def do(self, op: str, *args: Any) -> Outcome:
        out = self.agent.do(op, *args)
        self.history.append(f"{op}{args!r} -> {out!r}"[:200])
        return out

    def fail(self, what: str) -> None:
        recent = "\n    ".join(self.history[-8:])
        self.errors.append(f"{self.name}: {what}\n  last operations:\n    {recent}")

    def must(self, op: str, *args: Any) -> Any:
        """An operation on the user's own objects: nothing here may be refused."""
        status, value = self.do(op, *args)
        if status != "ok":
            self.fail(f"{op}{args!r} refused with {os.strerror(value)} ({value})")
            raise _Stop
        return value

    def new_name(self, where: str, tag: str) -> str:
        self.counter += 1
        return f"{where}/{self.name}-{tag}{self.counter}"

    def check(self, rel: str) -> None:
        """Owner, group, type, mode (and contents) of one of our objects, as we see it."""
        exp = self.objects[rel]
        st = self.must("stat", self.path(rel))
        got = (stat.S_IFMT(st["mode"]), st["uid"], st["gid"])
        want = ({"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}[exp.kind],
                exp.uid, exp.gid)
        if got != want:
            self.fail(f"{rel}: (type, uid, gid) {got} != expected {want}")
        if exp.mode is not None and stat.S_IMODE(st["mode"]) != exp.mode:
            self.fail(f"{rel}: mode {stat.S_IMODE(st['mode']):#o} != expected {exp.mode:#o}")
        if exp.data is not None and self.must("read", self.path(rel)) != exp.data:
            self.fail(f"{rel}: contents differ from what was written")

    def own(self, kind: str | None = None) -> list[str]:
        return sorted(r for r, e in self.objects.items() if kind is None or e.kind == kind)

    # -- the actions ---------------------------------------------------------

    def create_file(self, where: str) -> None:
        rel = self.new_name(where, "f")
        data = f"{rel} by {self.name}\n".encode()
        self.must("write", self.path(rel), data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        self.objects[rel] = Expect("file", self.ident.uid, self.group_in(where),
                                   0o666 & ~UMASKS[self.name], data)
        self.check(rel)

    def make_dir(self, where: str) -> None:
        rel = self.new_name(where, "d")
        self.must("mkdir", self.path(rel), 0o777)
        mode = 0o777 & ~UMASKS[self.name]
        if where in ("sgid", "team"):
            mode |= stat.S_ISGID  # a directory inherits its parent's setgid bit
        self.objects[rel] = Expect("dir", self.ident.uid, self.group_in(where), mode)
        self.check(rel)

    def make_symlink(self, where: str) -> None:
        rel = self.new_name(where, "l")
        self.must("symlink", f"target-of-{self.name}", self.path(rel))
        self.objects[rel] = Expect("symlink", self.ident.uid, self.group_in(where), None)
        self.check(rel)

    def group_in(self, where: str) -> int:
        return {"sgid": SGID_GID, "team": TEAM_GID}.get(where, self.ident.gid)

    def rewrite(self) -> None:
        files = self.own("file")
        if files:
            rel = self.rng.choice(files)
            data = f"rewritten {self.counter} by {self.name}\n".encode()
            self.must("write", self.path(rel), data, os.O_WRONLY | os.O_TRUNC)
            self.objects[rel].data = data
            self.check(rel)

    def chmod(self) -> None:
        files = self.own("file")
        if files:
            rel = self.rng.choice(files)
            mode = self.rng.choice((0o600, 0o640, 0o644, 0o604, 0o660))
            self.must("chmod", self.path(rel), mode)
            self.objects[rel].mode = mode
            self.check(rel)

    def chgrp(self) -> None:
        # To any of our own groups: allowed for the owner, whoever else is busy.
        files = self.own("file")
        if files:
            rel = self.rng.choice(files)
            gid = self.rng.choice(self.ident.groups)
            self.must("chown", self.path(rel), -1, gid)
            self.objects[rel].gid = gid
            self.check(rel)

    def rename(self) -> None:
        mine = [r for r in self.own() if "/" in r and r.split("/")[0] in ("shared", "sgid")]
        if mine:
            old = self.rng.choice(mine)
            new = self.new_name(old.split("/")[0], "r")
            self.must("rename", self.path(old), self.path(new))
            self.objects[new] = self.objects.pop(old)
            self.check(new)

    def delete(self) -> None:
        mine = self.own()
        if mine:
            rel = self.rng.choice(mine)
            self.must("rmdir" if self.objects[rel].kind == "dir" else "unlink", self.path(rel))
            del self.objects[rel]
            if self.do("stat", self.path(rel))[0] != "err":
                self.fail(f"{rel} still there after its removal")

    def read_secrets(self) -> None:
        # The owner's own lookups put its private names where a cache could keep
        # them: the others' probes of the same names must still be refused.
        for rel in (f"home/{self.name}/secret", f"shared/{self.name}-priv"):
            if self.must("read", self.path(rel)) != secret_of(self.name):
                self.fail(f"{rel}: not the owner's secret")

    def probe(self) -> None:
        p, native = self.rng.choice(self.probes)
        got = self.do(p.op, *p.resolve(self.mnt))
        if got != native:
            self.fail(f"probe {p.op}{p.args!r}: native {native!r}, credfs {got!r}")

    def run(self, n_ops: int) -> None:
        places = ["shared", "sgid", f"home/{self.name}"]
        if TEAM_GID in self.ident.groups:
            places.append("team")
        actions: list[tuple[int, Callable[[], None]]] = [
            (4, lambda: self.create_file(self.rng.choice(places))),
            (2, lambda: self.make_dir(self.rng.choice(places))),
            (1, lambda: self.make_symlink(self.rng.choice(places))),
            (2, self.rewrite), (2, self.chmod), (1, self.chgrp), (2, self.rename),
            (2, self.delete), (1, self.read_secrets), (6, self.probe),
        ]
        weights = [w for w, _ in actions]
        try:
            for _ in range(n_ops):
                self.rng.choices([a for _, a in actions], weights)[0]()
            for rel in self.own():  # everything we still have is still as we left it
                self.check(rel)
        except _Stop:
            pass
        except Exception as e:  # an agent that died or timed out: report, don't hang
            self.fail(f"{type(e).__name__}: {e}")


class _Stop(Exception):
    """A must() failed: this user's run ends (its report is in errors)."""


def native_expectations(native: Path, agents: dict[str, UserAgent],
                        idents: dict[str, Identity]) -> dict[str, list[tuple[Probe, Outcome]]]:
    """Every probe, once, natively, by the same agent: the outcome credfs must give."""
    out: dict[str, list[tuple[Probe, Outcome]]] = {}
    wrong = []
    for name in NAMES:
        out[name] = []
        for p in probes_for(name, idents):
            o = agents[name].do(p.op, *p.resolve(native))
            if (o[0] == "err") != p.refused:
                wrong.append(f"{name}: {p.op}{p.args!r} natively {o!r}")
            out[name].append((p, o))
    # The setup is meant to refuse exactly the probes marked refused (with
    # EACCES/EPERM): if the kernel disagrees, the tree is not what we think.
    assert not wrong, "native probes not as designed:\n" + "\n".join(wrong)
    return out


def walk(root: Path) -> dict[str, os.stat_result]:
    found: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            found[os.path.relpath(p, root)] = os.lstat(p)
    return found


@pytest.mark.parametrize("workers", ["4", "1"])
def test_many_users_at_once(workers: str, workdir: Path, backing: Path, mnt: Path,
                            users: dict[str, Identity],
                            make_agent: Callable[..., UserAgent],
                            mount_credfs: Callable[..., CredfsMount]) -> None:
    idents = {n: users[n] for n in ("alice", "bob", "carol")} | ADHOC
    native = workdir / "native"
    native.mkdir()
    build_tree(native, idents)
    build_tree(backing, idents)
    agents = {n: make_agent(idents[n], umask=UMASKS[n]) for n in NAMES}
    for n, a in agents.items():
        assert a.call("whoami")["uid"] == (idents[n].uid,) * 3
    expected = native_expectations(native, agents, idents)
    shutil.rmtree(native)  # from here on only the backing tree counts

    mount_credfs("--workers", workers)  # default cache: entries below 1777 dirs are cached
    runs = [Worker(n, idents[n], agents[n], mnt, expected[n], random.Random(f"{n}-{workers}"))
            for n in NAMES]
    threads = [threading.Thread(target=w.run, args=(OPS_PER_USER,), name=f"user-{w.name}")
               for w in runs]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, RUN_TIMEOUT - (time.monotonic() - start)))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        for a in agents.values():  # unblocks the threads (their agents die)
            a.close()
        pytest.fail(f"users still running after {RUN_TIMEOUT} s: {stuck}")
    errors = [e for w in runs for e in w.errors]
    assert not errors, f"{len(errors)} problems:\n" + "\n".join(errors[:10])

    # Root walk of the BACKING tree: an object named after a user must be that
    # user's, exactly as the user recorded it - and nothing else of that name.
    uid_of = {n: idents[n].uid for n in NAMES}
    made = {rel: exp for w in runs for rel, exp in w.objects.items()}
    tree = walk(backing)
    problems = []
    named = {rel for rel in tree
             if (rel.count("/") == 1 and rel.split("/")[0] in ("shared", "sgid", "team")
                 and not rel.endswith("-priv"))
             or (rel.count("/") == 2 and rel.startswith("home/")
                 and not rel.endswith("/secret"))}
    for rel in sorted(named | set(made)):
        st = tree.get(rel)
        exp = made.get(rel)
        owner = os.path.basename(rel).split("-")[0]
        if st is None or exp is None:
            problems.append(f"{rel}: on disk {st is not None}, made by a user {exp is not None}")
            continue
        if st.st_uid != uid_of.get(owner) or st.st_uid != exp.uid or st.st_gid != exp.gid:
            problems.append(f"{rel}: uid {st.st_uid} gid {st.st_gid}, expected uid "
                            f"{uid_of.get(owner)} gid {exp.gid}")
        if exp.mode is not None and stat.S_IMODE(st.st_mode) != exp.mode:
            problems.append(f"{rel}: mode {stat.S_IMODE(st.st_mode):#o} != {exp.mode:#o}")
    # Nobody changed anyone's private files (the probes tried).
    for n in NAMES:
        for rel in (f"home/{n}/secret", f"shared/{n}-priv"):
            st = tree[rel]
            data = (backing / rel).read_bytes()
            if (st.st_uid, stat.S_IMODE(st.st_mode), data) != (uid_of[n], 0o600, secret_of(n)):
                problems.append(f"{rel} changed: uid {st.st_uid} mode {st.st_mode:#o} {data!r}")
            if os.listxattr(backing / rel):
                problems.append(f"{rel} got xattrs {os.listxattr(backing / rel)}")
    for rel, st in tree.items():
        if rel.endswith("-stolen") or rel.endswith("/new"):
            problems.append(f"{rel} exists (uid {st.st_uid}): a refused probe succeeded")
    assert not problems, "backing tree after the run:\n" + "\n".join(problems[:20])
