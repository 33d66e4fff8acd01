"""Bounded soak run: several users doing mixed operations on one credfs mount.

Run on demand, as root (stdlib only):
    .venv/bin/python benchmarks/soak.py [--minutes 3] [--users 4]
        [--creds caller|mounter | --policy FILE] [--cache auto] [--seed N]

It makes a temporary backing tree (0755 root, a sticky 1777 `shared/`, one
0755 `home/uUID/` per user), mounts credfs on it in the foreground (its own
subprocess, so its pid is known) and forks one process per user (uids 2001..,
each with its own group and the shared group 3001). Each user runs a seeded
random mix against an in-memory model of everything it made: create/write
(sizes up to 1 MiB, random offsets, appends, truncates), fsync, full, partial
and mmap reads compared with the model, rename (over its own names too), link,
unlink, symlink, mkdir/rmdir/rename of directories, chmod, stat/lstat/access
against the model, listings of its own directories, and attempts on the other
users' files that must fail as they fail natively (each such attempt is made
on the backing tree first, by the same process, and the errno must match).
At the end every user reads back everything through the mount and on the
backing tree, and the backing tree is walked: every entry must belong to the
user that made it.

The daemon's descriptors (/proc/PID/fd) and memory (VmRSS) are sampled after
a warm-up, every ~10 s, and at the end. The first and last samples are taken
with every user paused and after `echo 2 > /proc/sys/vm/drop_caches`, so the
kernel forgets the inodes it knew and the daemon can close their descriptors:
the two are directly comparable. Exit status 0 only when all of these PASS:
errors == 0, wrong owners == 0, descriptors back within --fd-slack of the
start, RSS growth below --rss-slack-mib (and the daemon still running).

A --policy must let these users do what caller mode lets them (the tree is
home/ and shared/, e.g. policies/shared-mount.toml): the checks expect native
outcomes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import mmap
import os
import random
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Shared-memory layout (an anonymous MAP_SHARED mapping made before fork):
# word 0 is the phase the parent sets; then, per user, three words the child
# sets: ops done, errors so far, the last phase it acknowledged.
PHASE_WAIT, PHASE_RUN, PHASE_PAUSE, PHASE_STOP = 0, 1, 2, 3
ACK_READY, ACK_PAUSED, ACK_RUNNING = 1, 2, 3
WORD = 8

MIB = 1 << 20
MAX_FILES = 48  # per user: keeps listings and the model small
MAX_BYTES = 24 * MIB  # per user, over all files
FILE_MODES = (0o600, 0o640, 0o644, 0o664, 0o660, 0o400, 0o444, 0o700, 0o755)
DIR_MODES = (0o700, 0o750, 0o755, 0o711, 0o770, 0o775)  # always u+rwx: the owner keeps working
UMASK = 0o022
PR_SET_PDEATHSIG = 1
SHARED_GROUP = 3001


class Stop(Exception):
    """SIGTERM in the parent: unwind through the clean-up like Ctrl-C."""


def ename(e: int | None) -> str:
    return errno.errorcode.get(e or 0, str(e))


# ---------------------------------------------------------------- shared state


class Board:
    """Phase and per-user counters in shared memory (aligned 8-byte words)."""

    def __init__(self, users: int) -> None:
        self.users = users
        self.mem = mmap.mmap(-1, WORD * (1 + 3 * users))

    def _get(self, i: int) -> int:
        return struct.unpack_from("q", self.mem, i * WORD)[0]

    def _set(self, i: int, v: int) -> None:
        struct.pack_into("q", self.mem, i * WORD, v)

    @property
    def phase(self) -> int:
        return self._get(0)

    @phase.setter
    def phase(self, v: int) -> None:
        self._set(0, v)

    def ops(self, u: int) -> int:
        return self._get(1 + 3 * u)

    def errors(self, u: int) -> int:
        return self._get(2 + 3 * u)

    def ack(self, u: int) -> int:
        return self._get(3 + 3 * u)

    def set_counts(self, u: int, ops: int, errors: int) -> None:
        self._set(1 + 3 * u, ops)
        self._set(2 + 3 * u, errors)

    def set_ack(self, u: int, v: int) -> None:
        self._set(3 + 3 * u, v)


# ---------------------------------------------------------------- one user


def pub_content(uid: int) -> bytes:
    """What every user's world-readable file holds: anyone can verify it."""
    return random.Random(f"pub-{uid}").randbytes(5000 + uid % 97)


@dataclass(eq=False)
class Inode:
    data: bytearray
    mode: int
    names: set[str] = field(default_factory=set)
    fixed: bool = False  # set up once; the others read these, random ops leave them alone


class User:
    """A forked process running as one uid, checking every result against its model."""

    def __init__(self, idx: int, uid: int, all_uids: list[int], mnt: str, src: str,
                 seed: int, board: Board, protected_hardlinks: bool) -> None:
        self.idx, self.uid, self.gid = idx, uid, uid
        self.others = [u for u in all_uids if u != uid]
        self.mnt, self.src = mnt, src
        self.rnd = random.Random(seed * 100003 + uid)
        self.board = board
        self.protected_hardlinks = protected_hardlinks
        self.home = f"home/u{uid}"
        self.prefix = f"shared/u{uid}-"
        self.files: dict[str, Inode] = {}
        self.dirs: dict[str, int] = {self.home: 0o755}  # own dirs -> mode
        self.symlinks: dict[str, str] = {}
        self.counter = 0
        self.ops = 0
        self.nerrors = 0
        self.details: list[str] = []
        self.by_op: dict[str, int] = {}
        self.t0 = time.monotonic()

    # -- bookkeeping

    def m(self, rel: str) -> str:
        return f"{self.mnt}/{rel}"

    def b(self, rel: str) -> str:
        return f"{self.src}/{rel}"

    def err(self, op: str, path: str, what: str) -> None:
        self.nerrors += 1
        if len(self.details) < 20:
            self.details.append(f"t={time.monotonic() - self.t0:.1f}s uid {self.uid} {op} "
                                f"{path}: {what}")
        self.board.set_counts(self.idx, self.ops, self.nerrors)

    def new_name(self, d: str, kind: str = "f") -> str:
        self.counter += 1
        base = f"{kind}{self.counter}"
        return self.prefix + base if d == "shared" else f"{d}/{base}"

    def own_dirs(self) -> list[str]:
        return [*self.dirs, "shared"]

    def total_bytes(self) -> int:
        return sum(len(i.data) for i in {id(i): i for i in self.files.values()}.values())

    def pick_file(self) -> tuple[str, Inode] | None:
        names = [n for n, i in self.files.items() if not i.fixed]
        if not names:
            return None
        n = self.rnd.choice(names)
        return n, self.files[n]

    def size(self) -> int:
        r = self.rnd.random()
        if r < 0.3:
            return self.rnd.randint(0, 4096)
        if r < 0.8:
            return self.rnd.randint(0, 128 << 10)
        return self.rnd.randint(0, MIB)

    # -- checked primitives

    def open_file(self, op: str, name: str, ino: Inode, flags: int) -> int | None:
        """Open as the owner; the model says whether the owner bits allow it."""
        acc = flags & os.O_ACCMODE
        need_r = acc in (os.O_RDONLY, os.O_RDWR)
        need_w = acc in (os.O_WRONLY, os.O_RDWR) or bool(flags & os.O_TRUNC)
        allowed = (not need_r or ino.mode & 0o400) and (not need_w or ino.mode & 0o200)
        try:
            fd = os.open(self.m(name), flags | os.O_CLOEXEC)
        except OSError as e:
            if allowed or e.errno != errno.EACCES:
                self.err(op, name, f"open {flags:#o} (mode {ino.mode:o}): {ename(e.errno)}")
            return None
        if not allowed:
            os.close(fd)
            self.err(op, name, f"open {flags:#o} succeeded on mode {ino.mode:o}, expected EACCES")
            return None
        return fd

    def write_all(self, fd: int, buf: bytes, off: int | None) -> None:
        view = memoryview(buf)
        done = 0
        while done < len(buf):
            n = (os.write(fd, view[done:]) if off is None
                 else os.pwrite(fd, view[done:], off + done))
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n

    def read_all(self, fd: int) -> bytes:
        chunks = []
        while True:
            c = os.read(fd, 256 << 10)
            if not c:
                return b"".join(chunks)
            chunks.append(c)

    def compare(self, op: str, name: str, got: bytes, want: bytes | bytearray,
                off: int = 0) -> None:
        if got == want:
            return
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                     min(len(got), len(want)))
        self.err(op, name, f"data mismatch at offset {off + first}: read {len(got)} bytes, "
                           f"expected {len(want)}")

    def check_stat(self, op: str, rel: str, st: os.stat_result, kind: str, mode: int,
                   size: int | None = None, nlink: int | None = None) -> None:
        want_fmt = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK}[kind]
        got = {"fmt": stat.S_IFMT(st.st_mode), "owner": (st.st_uid, st.st_gid)}
        want = {"fmt": want_fmt, "owner": (self.uid, self.gid)}
        if kind != "l":
            got["mode"], want["mode"] = oct(stat.S_IMODE(st.st_mode)), oct(mode)
        if size is not None:
            got["size"], want["size"] = st.st_size, size
        if nlink is not None:
            got["nlink"], want["nlink"] = st.st_nlink, nlink
        if got != want:
            self.err(op, rel, f"stat {got} != model {want}")

    def expected_listing(self, d: str) -> set[str]:
        names = [*self.files, *self.symlinks, *(x for x in self.dirs if x != self.home)]
        return {n.rsplit("/", 1)[1] for n in names if n.rsplit("/", 1)[0] == d}

    # -- setup and final verification

    def setup(self) -> None:
        """Fixed files the other users try to reach: 0600 secrets and a 0644 public one."""
        for rel, mode, data in ((f"{self.home}/secret", 0o600, b"secret %d" % self.uid),
                                (f"{self.prefix}secret", 0o600, b"secret %d" % self.uid),
                                (f"{self.prefix}pub", 0o644, pub_content(self.uid))):
            fd = os.open(self.m(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            try:
                self.write_all(fd, data, None)
            finally:
                os.close(fd)
            self.files[rel] = Inode(bytearray(data), mode, {rel}, fixed=True)

    def verify_all(self) -> None:
        """Everything in the model, through the mount and on the backing tree."""
        for name, ino in self.files.items():
            for where, path in (("mount", self.m(name)), ("backing", self.b(name))):
                try:
                    if ino.mode & 0o400:
                        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                        try:
                            self.compare(f"final read ({where})", name, self.read_all(fd),
                                         ino.data)
                        finally:
                            os.close(fd)
                    self.check_stat(f"final stat ({where})", name, os.lstat(path), "f",
                                    ino.mode, len(ino.data), len(ino.names))
                except OSError as e:
                    self.err(f"final ({where})", name, ename(e.errno))
        for name, target in self.symlinks.items():
            for where, path in (("mount", self.m(name)), ("backing", self.b(name))):
                try:
                    if os.readlink(path) != target:
                        self.err(f"final readlink ({where})", name, "target differs")
                    self.check_stat(f"final lstat ({where})", name, os.lstat(path), "l", 0)
                except OSError as e:
                    self.err(f"final ({where})", name, ename(e.errno))
        for d in self.own_dirs():
            for where, path in (("mount", self.m(d)), ("backing", self.b(d))):
                try:
                    self.check_listing(f"final listing ({where})", d, os.listdir(path))
                    if d != "shared":
                        self.check_stat(f"final stat ({where})", d, os.lstat(path), "d",
                                        self.dirs[d])
                except OSError as e:
                    self.err(f"final ({where})", d, ename(e.errno))

    def check_listing(self, op: str, d: str, got_names: list[str]) -> None:
        got = set(got_names)
        if len(got) != len(got_names):
            self.err(op, d, "duplicate names in listing")
        if d == "shared":
            got = {n for n in got if n.startswith(f"u{self.uid}-")}
        want = self.expected_listing(d)
        if got != want:
            self.err(op, d, f"listing: extra {sorted(got - want)[:5]}, "
                            f"missing {sorted(want - got)[:5]}")

    # -- the operations

    def op_create(self) -> None:
        d = self.rnd.choice(self.own_dirs())
        name = self.new_name(d)
        mode = self.rnd.choice(FILE_MODES)
        data = self.rnd.randbytes(self.size())
        fd = os.open(self.m(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        ino = Inode(bytearray(), mode & ~UMASK, {name})
        self.files[name] = ino
        try:
            self.write_all(fd, data, None)
            ino.data[:] = data
            if self.rnd.random() < 0.3:
                os.fsync(fd)
            st = os.fstat(fd)
            self.check_stat("create fstat", name, st, "f", ino.mode, len(data), 1)
        finally:
            os.close(fd)

    def op_write_at(self) -> None:
        picked = self.pick_file()
        if picked is None:
            return self.op_create()
        name, ino = picked
        fd = self.open_file("write_at", name, ino, self.rnd.choice((os.O_WRONLY, os.O_RDWR)))
        if fd is None:
            return None
        try:
            off = self.rnd.randint(0, len(ino.data) + (64 << 10))
            buf = self.rnd.randbytes(self.rnd.randint(1, 256 << 10))
            self.write_all(fd, buf, off)
            if off > len(ino.data):
                ino.data.extend(bytes(off - len(ino.data)))
            ino.data[off:off + len(buf)] = buf
            if self.rnd.random() < 0.3:
                os.fsync(fd)
        finally:
            os.close(fd)
        return None

    def op_append(self) -> None:
        picked = self.pick_file()
        if picked is None:
            return self.op_create()
        name, ino = picked
        fd = self.open_file("append", name, ino, os.O_WRONLY | os.O_APPEND)
        if fd is None:
            return None
        try:
            buf = self.rnd.randbytes(self.rnd.randint(1, 64 << 10))
            self.write_all(fd, buf, None)
            ino.data.extend(buf)
            if self.rnd.random() < 0.3:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        return None

    def op_truncate(self) -> None:
        picked = self.pick_file()
        if picked is None:
            return None
        name, ino = picked
        new = self.rnd.choice((0, self.rnd.randint(0, len(ino.data) + 1),
                               len(ino.data) + self.rnd.randint(1, 128 << 10)))
        how = self.rnd.choice(("path", "fd", "o_trunc"))
        if how == "path":
            allowed = bool(ino.mode & 0o200)
            try:
                os.truncate(self.m(name), new)
            except OSError as e:
                if allowed or e.errno != errno.EACCES:
                    self.err("truncate", name, f"mode {ino.mode:o}: {ename(e.errno)}")
                return None
            if not allowed:
                self.err("truncate", name, f"succeeded on mode {ino.mode:o}")
        else:
            flags = os.O_WRONLY | (os.O_TRUNC if how == "o_trunc" else 0)
            fd = self.open_file("truncate", name, ino, flags)
            if fd is None:
                return None
            try:
                if how == "o_trunc":
                    new = 0
                else:
                    os.ftruncate(fd, new)
            finally:
                os.close(fd)
        if new <= len(ino.data):
            del ino.data[new:]
        else:
            ino.data.extend(bytes(new - len(ino.data)))
        return None

    def op_fsync(self) -> None:
        picked = self.pick_file()
        if picked is None:
            return None
        name, ino = picked
        fd = self.open_file("fsync", name, ino, os.O_RDONLY)
        if fd is not None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def op_read(self) -> None:
        picked = self.pick_file() if self.rnd.random() < 0.9 else None
        if picked is None:
            picked = self.rnd.choice([(n, i) for n, i in self.files.items() if i.fixed])
        name, ino = picked
        fd = self.open_file("read", name, ino, os.O_RDONLY)
        if fd is not None:
            try:
                self.compare("read", name, self.read_all(fd), ino.data)
            finally:
                os.close(fd)

    def op_pread(self) -> None:
        picked = self.pick_file()
        if picked is None:
            return None
        name, ino = picked
        fd = self.open_file("pread", name, ino, os.O_RDONLY)
        if fd is None:
            return None
        try:
            for _ in range(4):
                off = self.rnd.randint(0, len(ino.data) + 10)
                n = self.rnd.randint(0, 200 << 10)
                self.compare("pread", name, os.pread(fd, n, off), ino.data[off:off + n], off)
        finally:
            os.close(fd)
        return None

    def op_mmap(self) -> None:
        picked = self.pick_file()
        if picked is None or not picked[1].data:
            return None
        name, ino = picked
        fd = self.open_file("mmap", name, ino, os.O_RDONLY)
        if fd is None:
            return None
        try:
            with mmap.mmap(fd, len(ino.data), prot=mmap.PROT_READ) as mm:
                if self.rnd.random() < 0.5:
                    self.compare("mmap", name, mm[:], ino.data)
                else:
                    off = self.rnd.randrange(len(ino.data))
                    n = self.rnd.randint(1, 64 << 10)
                    self.compare("mmap", name, mm[off:off + n], ino.data[off:off + n], off)
        finally:
            os.close(fd)
        return None

    def op_stat(self) -> None:
        r = self.rnd.random()
        if r < 0.7 and self.files:
            name = self.rnd.choice(list(self.files))
            ino = self.files[name]
            st = os.stat(self.m(name)) if self.rnd.random() < 0.5 else os.lstat(self.m(name))
            self.check_stat("stat", name, st, "f", ino.mode, len(ino.data), len(ino.names))
        elif r < 0.85 and self.symlinks:
            name = self.rnd.choice(list(self.symlinks))
            self.check_stat("lstat", name, os.lstat(self.m(name)), "l", 0)
        else:
            d = self.rnd.choice(list(self.dirs))
            self.check_stat("stat", d, os.stat(self.m(d)), "d", self.dirs[d])

    def op_access(self) -> None:
        picked = self.pick_file()
        if picked is None:
            return None
        name, ino = picked
        for bit, mode_bit in ((os.R_OK, 0o400), (os.W_OK, 0o200), (os.X_OK, 0o100)):
            if os.access(self.m(name), bit) != bool(ino.mode & mode_bit):
                self.err("access", name, f"access({bit}) on mode {ino.mode:o}")
        return None

    def op_rename(self) -> None:
        picked = self.pick_file()
        if picked is None:
            return None
        name, ino = picked
        targets = [n for n, i in self.files.items() if not i.fixed and n != name]
        if targets and self.rnd.random() < 0.4:
            target = self.rnd.choice(targets)
        else:
            target = self.new_name(self.rnd.choice(self.own_dirs()))
        os.rename(self.m(name), self.m(target))
        old = self.files.get(target)
        if old is ino:
            return None  # two links of one inode: rename does nothing (POSIX)
        if old is not None:
            old.names.discard(target)
        del self.files[name]
        ino.names.discard(name)
        ino.names.add(target)
        self.files[target] = ino
        return None

    def op_link(self) -> None:
        picked = self.pick_file()
        if picked is None or len(picked[1].names) >= 4:
            return None
        name, ino = picked
        new = self.new_name(self.rnd.choice(self.own_dirs()))
        os.link(self.m(name), self.m(new))
        self.files[new] = ino
        ino.names.add(new)
        return None

    def op_unlink(self) -> None:
        if self.symlinks and self.rnd.random() < 0.15:
            name = self.rnd.choice(list(self.symlinks))
            os.unlink(self.m(name))
            del self.symlinks[name]
            return None
        picked = self.pick_file()
        if picked is None:
            return None
        name, ino = picked
        os.unlink(self.m(name))
        del self.files[name]
        ino.names.discard(name)
        return None

    def op_symlink(self) -> None:
        d = self.rnd.choice(self.own_dirs())
        name = self.new_name(d, "l")
        target = self.rnd.choice(("f1", "../x", "/nonexistent/y", "d2/f3", "a" * 200))
        os.symlink(target, self.m(name))
        self.symlinks[name] = target
        if os.readlink(self.m(name)) != target:
            self.err("readlink", name, "target differs")

    def op_mkdir(self) -> None:
        parents = [d for d in self.dirs if d.count("/") < 4]
        d = self.new_name(self.rnd.choice(parents), "d")
        mode = self.rnd.choice(DIR_MODES)
        os.mkdir(self.m(d), mode)
        self.dirs[d] = mode & ~UMASK

    def dir_is_empty(self, d: str) -> bool:
        return not self.expected_listing(d)

    def op_rmdir(self) -> None:
        empty = [d for d in self.dirs if d != self.home and self.dir_is_empty(d)]
        if not empty:
            return None
        d = self.rnd.choice(empty)
        os.rmdir(self.m(d))
        del self.dirs[d]
        return None

    def op_rename_dir(self) -> None:
        subdirs = [d for d in self.dirs if d != self.home]
        if not subdirs:
            return None
        src = self.rnd.choice(subdirs)
        parents = [d for d in self.dirs if d != src and not d.startswith(src + "/")
                   and d.count("/") < 4]
        dst = self.new_name(self.rnd.choice(parents), "d")
        os.rename(self.m(src), self.m(dst))

        def moved(p: str) -> str:
            return dst + p[len(src):] if p == src or p.startswith(src + "/") else p

        self.dirs = {moved(d): mode for d, mode in self.dirs.items()}
        self.symlinks = {moved(n): t for n, t in self.symlinks.items()}
        files: dict[str, Inode] = {}
        for n, ino in self.files.items():
            files[moved(n)] = ino
        for ino in {id(i): i for i in self.files.values()}.values():
            ino.names = {moved(n) for n in ino.names}
        self.files = files
        return None

    def op_chmod(self) -> None:
        if self.rnd.random() < 0.8:
            picked = self.pick_file()
            if picked is None:
                return None
            name, ino = picked
            mode = self.rnd.choice(FILE_MODES)
            os.chmod(self.m(name), mode)
            ino.mode = mode
            self.check_stat("chmod", name, os.stat(self.m(name)), "f", mode, len(ino.data),
                            len(ino.names))
        else:
            d = self.rnd.choice(list(self.dirs))
            mode = self.rnd.choice(DIR_MODES)
            os.chmod(self.m(d), mode)
            self.dirs[d] = mode
            self.check_stat("chmod", d, os.stat(self.m(d)), "d", mode)
        return None

    def op_readdir(self) -> None:
        d = self.rnd.choice(self.own_dirs())
        if self.rnd.random() < 0.5:
            self.check_listing("readdir", d, os.listdir(self.m(d)))
            return
        with os.scandir(self.m(d)) as it:
            entries = list(it)
        self.check_listing("scandir", d, [e.name for e in entries])
        prefix = "" if d == "shared" else d + "/"
        for e in entries:
            rel = f"shared/{e.name}" if d == "shared" else prefix + e.name
            if d == "shared" and not e.name.startswith(f"u{self.uid}-"):
                continue
            want = ("f" if rel in self.files else "l" if rel in self.symlinks
                    else "d" if rel in self.dirs else "?")
            got = ("l" if e.is_symlink() else "d" if e.is_dir(follow_symlinks=False)
                   else "f" if e.is_file(follow_symlinks=False) else "?")
            if want != got:
                self.err("scandir", rel, f"type {got}, model {want}")

    def op_cross(self) -> None:
        """Another user's files: refused exactly as natively (sticky dir, modes)."""
        if not self.others:
            return
        o = self.rnd.choice(self.others)
        ohome, opre = f"home/u{o}", f"shared/u{o}-"
        mine = self.new_name(self.home)
        attempts = [
            ("read 0600 (home)", errno.EACCES,
             lambda p: os.close(os.open(p(f"{ohome}/secret"), os.O_RDONLY))),
            ("read 0600 (shared)", errno.EACCES,
             lambda p: os.close(os.open(p(f"{opre}secret"), os.O_RDONLY))),
            ("write 0644", errno.EACCES,
             lambda p: os.close(os.open(p(f"{opre}pub"), os.O_WRONLY))),
            ("truncate 0644", errno.EACCES, lambda p: os.truncate(p(f"{opre}pub"), 0)),
            ("unlink in sticky dir", errno.EPERM, lambda p: os.unlink(p(f"{opre}pub"))),
            ("rename from sticky dir", errno.EPERM,
             lambda p: os.rename(p(f"{opre}secret"), p(mine))),
            ("chmod", errno.EPERM, lambda p: os.chmod(p(f"{opre}pub"), 0o666)),
            ("create in other's home", errno.EACCES,
             lambda p: os.close(os.open(p(f"{ohome}/intruder-{self.uid}"),
                                        os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))),
        ]
        if self.protected_hardlinks:
            attempts.append(("link to 0600", errno.EPERM,
                             lambda p: os.link(p(f"{opre}secret"), p(mine))))
        what, expected, fn = self.rnd.choice(attempts)
        results = []
        for p in (self.b, self.m):  # native first: the kernel's answer is the oracle
            try:
                fn(p)
                results.append("ok")
            except OSError as e:
                results.append(ename(e.errno))
        native, mounted = results
        if native != ename(expected) or mounted != native:
            self.err("cross-user", f"u{o}: {what}",
                     f"through credfs {mounted}, natively {native} (expected {ename(expected)})")
        # What is allowed must work and show the other's data and ownership.
        path = self.m(f"{opre}pub")
        with open(path, "rb") as f:
            self.compare("cross-user read 0644", f"{opre}pub", f.read(), pub_content(o))
        st = os.stat(path)
        if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != (o, o, 0o644):
            self.err("cross-user stat", f"{opre}pub",
                     f"{st.st_uid}:{st.st_gid} {stat.S_IMODE(st.st_mode):o}, "
                     f"expected {o}:{o} 644")

    WEIGHTS: tuple[tuple[str, int], ...] = (
        ("create", 10), ("write_at", 10), ("append", 6), ("truncate", 5), ("fsync", 3),
        ("read", 12), ("pread", 8), ("mmap", 6), ("stat", 10), ("access", 3),
        ("rename", 5), ("link", 3), ("unlink", 6), ("symlink", 2), ("mkdir", 2),
        ("rmdir", 2), ("rename_dir", 1), ("chmod", 4), ("readdir", 6), ("cross", 8),
    )

    def step(self) -> None:
        names, weights = zip(*self.WEIGHTS, strict=True)
        op = self.rnd.choices(names, weights)[0]
        nfiles = sum(1 for i in self.files.values() if not i.fixed)
        if op in ("create", "link", "symlink") and nfiles + len(self.symlinks) >= MAX_FILES:
            op = "unlink"
        elif op in ("write_at", "append", "create") and self.total_bytes() > MAX_BYTES:
            op = "truncate" if self.rnd.random() < 0.5 else "unlink"
        self.by_op[op] = self.by_op.get(op, 0) + 1
        try:
            getattr(self, f"op_{op}")()
        except OSError as e:
            self.err(op, e.filename or "", f"unexpected {ename(e.errno)} ({e.strerror})")
        except Exception as e:
            self.err(op, "", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
        self.ops += 1

    def run(self, deadline: float) -> None:
        board = self.board
        while True:
            phase = board.phase
            if phase == PHASE_STOP or time.monotonic() > deadline:
                break
            if phase != PHASE_RUN:
                board.set_ack(self.idx, ACK_PAUSED if phase == PHASE_PAUSE else ACK_READY)
                time.sleep(0.02)
                continue
            board.set_ack(self.idx, ACK_RUNNING)
            self.step()
            board.set_counts(self.idx, self.ops, self.nerrors)
        self.verify_all()
        board.set_counts(self.idx, self.ops, self.nerrors)


def child_main(user: User, groups: list[int], deadline: float, out_fd: int) -> None:
    """In the forked child: drop to the user, run, report one JSON line, _exit."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir("/")
        os.setgroups(groups)
        os.setgid(user.gid)
        os.setuid(user.uid)
        os.umask(UMASK)
        # Die with the parent (set after setuid: a credential change clears it).
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:
            raise SystemExit("parent gone")
        try:
            user.setup()
        except OSError as e:
            user.err("setup", e.filename or "", ename(e.errno))
        user.board.set_ack(user.idx, ACK_READY)
        user.run(deadline)
        code = 0
    except BaseException as e:
        user.err("child", "", f"{type(e).__name__}: {e}")
    finally:
        with contextlib.suppress(BaseException):
            result = {"uid": user.uid, "ops": user.ops, "errors": user.nerrors,
                      "details": user.details, "by_op": user.by_op,
                      "files": len(user.files), "dirs": len(user.dirs),
                      "symlinks": len(user.symlinks), "bytes": user.total_bytes()}
            os.write(out_fd, json.dumps(result).encode() + b"\n")
        os._exit(code)


# ---------------------------------------------------------------- the daemon


def mounted_fuse(mnt: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            if left.split(" ")[4] == mnt and right.startswith("fuse"):
                return True
    return False


def daemon_sample(pid: int) -> tuple[int, int, int]:
    """(open descriptors, VmRSS in KiB, threads)"""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return fds, rss, threads


def drop_caches_and_settle(pid: int, timeout: float = 20.0) -> tuple[int, int, int]:
    """Let the kernel forget the mount's inodes; wait until the daemon's fd count is still."""
    os.sync()
    deadline = time.monotonic() + timeout
    last, still_since = -1, time.monotonic()
    rounds = 0
    while time.monotonic() < deadline:
        if rounds < 3:  # a parent dentry is freed only after its children: a few passes
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
            rounds += 1
        fds = daemon_sample(pid)[0]
        if fds != last:
            last, still_since = fds, time.monotonic()
        elif time.monotonic() - still_since >= 1.5 and rounds >= 3:
            break
        time.sleep(0.25)
    return daemon_sample(pid)


def start_daemon(src: str, mnt: str, extra: list[str], log_path: str,
                 timeout: float = 20.0) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "credfs", "mount", src, mnt, "--foreground", *extra]
    with open(log_path, "ab") as log:
        # Own session: Ctrl-C reaches us, not the daemon; we stop it by pid.
        proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not mounted_fuse(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"credfs did not mount (exit {proc.poll()}); log:\n"
                               + Path(log_path).read_text(errors="replace"))
        time.sleep(0.05)
    return proc


def stop_daemon(proc: subprocess.Popen[bytes] | None, mnt: str) -> int | None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # credfs unmounts (lazily if busy) and exits
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
    for _ in range(3):
        if not os.path.exists(mnt) or not mounted_fuse(mnt):
            break
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(["umount", "-l", mnt], timeout=10, capture_output=True, check=False)
    return proc.returncode if proc is not None else None


# ---------------------------------------------------------------- the run


def owner_check(src: str, uids: list[int]) -> tuple[int, list[str], dict[str, int]]:
    """Every entry below home/uUID and every shared/uUID-* must be UID:UID."""
    checked, wrong, kinds = 0, [], {"files": 0, "dirs": 0, "symlinks": 0}
    prefixes = {f"u{u}-": u for u in uids}

    def check(path: str, uid: int) -> None:
        nonlocal checked
        st = os.lstat(path)
        checked += 1
        kind = ("dirs" if stat.S_ISDIR(st.st_mode) else "symlinks" if stat.S_ISLNK(st.st_mode)
                else "files")
        kinds[kind] += 1
        if (st.st_uid, st.st_gid) != (uid, uid):
            wrong.append(f"{os.path.relpath(path, src)}: {st.st_uid}:{st.st_gid}, "
                         f"expected {uid}:{uid}")

    for u in uids:
        home = f"{src}/home/u{u}"
        check(home, u)
        for dirpath, dirnames, filenames in os.walk(home):
            for n in dirnames + filenames:
                check(os.path.join(dirpath, n), u)
    for n in os.listdir(f"{src}/shared"):
        owner = next((u for p, u in prefixes.items() if n.startswith(p)), None)
        if owner is None:
            wrong.append(f"shared/{n}: not made by any user")
        else:
            check(f"{src}/shared/{n}", owner)
    for n in os.listdir(f"{src}/home"):
        if n not in {f"u{u}" for u in uids}:
            wrong.append(f"home/{n}: not made by any user")
    return checked, wrong, kinds


def fmt_sample(s: tuple[int, int, int]) -> str:
    return f"fds {s[0]:4d}  rss {s[1] / 1024:7.1f} MiB  threads {s[2]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="main phase (after warm-up)")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds before the baseline")
    ap.add_argument("--users", type=int, default=4)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--creds", choices=("caller", "mounter"), default=None)
    mode.add_argument("--policy", help="policy file passed to credfs (instead of --creds)")
    ap.add_argument("--cache", choices=("none", "auto", "always"), default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--fd-slack", type=int, default=8,
                    help="descriptors allowed above the baseline at the end")
    ap.add_argument("--rss-slack-mib", type=float, default=32.0,
                    help="RSS growth allowed from the baseline to the end")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (for a post-mortem)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("soak.py needs root: it mounts FUSE and runs as several uids")
    if not 1 <= args.users <= 50:
        sys.exit("--users: 1..50")
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    extra = ["--cache", args.cache]
    if args.policy:
        extra += ["--policy", os.path.abspath(args.policy)]
    else:
        extra += ["--creds", args.creds or "caller"]
    if args.workers:
        extra += ["--workers", str(args.workers)]
    with open("/proc/sys/fs/protected_hardlinks") as f:
        protected_hardlinks = f.read().strip() == "1"

    def on_term(_s: int, _f: object) -> None:
        raise Stop()

    signal.signal(signal.SIGTERM, on_term)
    uids = [2001 + i for i in range(args.users)]
    tmp = tempfile.mkdtemp(prefix="credfs-soak-", dir=os.environ.get("CREDFS_TEST_TMPDIR", "/tmp"))
    os.chmod(tmp, 0o755)
    src, mnt = f"{tmp}/src", f"{tmp}/mnt"
    log_path = f"{tmp}/credfs.log"
    proc: subprocess.Popen[bytes] | None = None
    children: dict[int, tuple[int, int]] = {}  # pid -> (user index, read end of its pipe)
    board = Board(args.users)
    failed: list[str] = []
    try:
        os.mkdir(src, 0o755)
        os.mkdir(mnt, 0o755)
        os.mkdir(f"{src}/shared")
        os.chmod(f"{src}/shared", 0o1777)
        os.mkdir(f"{src}/home", 0o755)
        for u in uids:
            os.mkdir(f"{src}/home/u{u}", 0o755)
            os.chown(f"{src}/home/u{u}", u, u)
        proc = start_daemon(src, mnt, extra, log_path)
        pid = proc.pid
        print(f"credfs soak: {args.users} users (uids {uids[0]}..{uids[-1]}), "
              f"{' '.join(extra)}, seed {seed}, warm-up {args.warmup:g} s + "
              f"{args.minutes:g} min; daemon pid {pid}; tree {tmp}", flush=True)
        hard_deadline = time.monotonic() + args.warmup + args.minutes * 60 + 120
        for i, u in enumerate(uids):
            r, w = os.pipe()
            user = User(i, u, uids, mnt, src, seed, board, protected_hardlinks)
            cpid = os.fork()
            if cpid == 0:
                os.close(r)
                child_main(user, [u, SHARED_GROUP, 3100 + i], hard_deadline, w)
            os.close(w)
            children[cpid] = (i, r)

        def wait_acks(want: int, timeout: float, what: str) -> None:
            deadline = time.monotonic() + timeout
            while any(board.ack(i) != want for i in range(args.users)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"users did not {what} within {timeout:g} s")
                time.sleep(0.05)

        wait_acks(ACK_READY, 60, "set up")
        t_start = time.monotonic()
        samples: list[tuple[float, str, tuple[int, int, int]]] = []
        last_counts = [0] * args.users
        last_t = time.monotonic()

        def progress(label: str) -> None:
            nonlocal last_t
            now = time.monotonic()
            counts = [board.ops(i) for i in range(args.users)]
            rates = [(c - lc) / max(now - last_t, 1e-6) for c, lc in zip(counts, last_counts,
                                                                          strict=True)]
            last_counts[:] = counts
            last_t = now
            errs = sum(board.errors(i) for i in range(args.users))
            s = daemon_sample(pid)
            print(f"[{now - t_start:5.0f}s] {label:6s} ops/s " +
                  " ".join(f"u{u}:{r:4.0f}" for u, r in zip(uids, rates, strict=True)) +
                  f" | ops {sum(counts)} errors {errs} | {fmt_sample(s)}", flush=True)

        def run_for(seconds: float, label: str) -> None:
            end = time.monotonic() + seconds
            next_sample = time.monotonic() + 10
            while (left := end - time.monotonic()) > 0:
                time.sleep(min(5.0, left))
                if proc.poll() is not None:
                    raise RuntimeError(f"credfs exited with {proc.returncode} during the run")
                progress(label)
                if label == "main" and time.monotonic() >= next_sample - 0.5:
                    samples.append((time.monotonic() - t_start, "run", daemon_sample(pid)))
                    next_sample += 10

        board.phase = PHASE_RUN
        run_for(args.warmup, "warmup")
        board.phase = PHASE_PAUSE
        wait_acks(ACK_PAUSED, 120, "pause")
        base = drop_caches_and_settle(pid)
        samples.append((time.monotonic() - t_start, "start", base))
        print(f"baseline (users paused, caches dropped): {fmt_sample(base)}", flush=True)
        board.phase = PHASE_RUN
        run_for(args.minutes * 60, "main")
        board.phase = PHASE_STOP
        print("stopping; every user verifies everything it made ...", flush=True)

        results: list[dict] = []
        deadline = time.monotonic() + 180
        pending = dict(children)
        bufs: dict[int, bytes] = {}
        while pending and time.monotonic() < deadline:
            fds = {r: cpid for cpid, (_i, r) in pending.items()}
            ready, _, _ = select.select(list(fds), [], [], 1.0)
            for r in ready:
                chunk = os.read(r, 1 << 16)
                if chunk:
                    bufs[r] = bufs.get(r, b"") + chunk
                    continue
                cpid = fds[r]
                idx = pending.pop(cpid)[0]
                os.close(r)
                _, status = os.waitpid(cpid, 0)  # it closed its pipe: it is exiting
                children.pop(cpid)
                try:
                    results.append(json.loads(bufs.get(r, b"").decode()))
                except ValueError:
                    failed.append(f"uid {uids[idx]}: no result (exit status {status})")
                if os.waitstatus_to_exitcode(status) != 0:
                    failed.append(f"user process {cpid} exited with "
                                  f"{os.waitstatus_to_exitcode(status)}")
        if pending:
            failed.append(f"{len(pending)} user process(es) did not finish in time")

        total_ops = sum(r["ops"] for r in results)
        total_errors = sum(r["errors"] for r in results)
        elapsed = time.monotonic() - t_start
        print(f"\nops: {total_ops} in {elapsed:.0f} s ({total_ops / elapsed:.0f}/s)")
        for r in sorted(results, key=lambda r: r["uid"]):
            top = ", ".join(f"{k} {v}" for k, v in sorted(r["by_op"].items()))
            print(f"  uid {r['uid']}: {r['ops']} ops, {r['errors']} errors; at the end "
                  f"{r['files']} names, {r['symlinks']} symlinks, {r['dirs']} dirs, "
                  f"{r['bytes'] / MIB:.1f} MiB\n    {top}")
        details = [d for r in results for d in r["details"]]
        for d in details[:10]:
            print(f"  ERROR {d}")

        checked, wrong, kinds = owner_check(src, uids)
        print(f"owners: {checked} entries checked ({kinds['files']} files, {kinds['dirs']} "
              f"dirs, {kinds['symlinks']} symlinks), {len(wrong)} wrong")
        for w in wrong[:10]:
            print(f"  WRONG OWNER {w}")

        alive = proc.poll() is None
        end = drop_caches_and_settle(pid) if alive else (0, 0, 0)
        samples.append((time.monotonic() - t_start, "end", end))
        print("\ndaemon samples (start and end: users paused, caches dropped):")
        for t, label, s in samples:
            print(f"  {t:6.0f}s {label:5s} {fmt_sample(s)}")
        dfd, drss = end[0] - base[0], (end[1] - base[1]) / 1024
        peak = max(s[1] for _t, _l, s in samples) / 1024
        run = [(t, s[1] / 1024) for t, label, s in samples if label == "run"]
        if len(run) >= 3:  # least squares: a leak climbs steadily, a high-water mark levels off
            mt = sum(t for t, _ in run) / len(run)
            mr = sum(r for _, r in run) / len(run)
            slope = (sum((t - mt) * (r - mr) for t, r in run)
                     / sum((t - mt) ** 2 for t, _ in run)) * 60
            half = len(run) // 2
            print(f"  rss trend during the run: {slope:+.1f} MiB/min (first half "
                  f"{run[half - 1][1] - run[0][1]:+.1f} MiB, second half "
                  f"{run[-1][1] - run[half][1]:+.1f} MiB)")
        print(f"  start -> end: fds {base[0]} -> {end[0]} ({dfd:+d}), rss "
              f"{base[1] / 1024:.1f} -> {end[1] / 1024:.1f} MiB ({drss:+.1f} MiB; peak "
              f"{peak:.1f} MiB), threads {base[2]} -> {end[2]}")
        log = Path(log_path).read_text(errors="replace")
        bad_log = [ln for ln in log.splitlines() if " WARNING " in ln or " ERROR " in ln
                   or "Traceback" in ln]
        print(f"daemon log: {len(log.splitlines())} lines, {len(bad_log)} warnings/errors")
        for ln in bad_log[:5]:
            print(f"  {ln}")

        checks = [
            ("errors == 0", total_errors == 0 and not failed,
             f"{total_errors} errors" + (f"; {'; '.join(failed)}" if failed else "")),
            ("wrong owners == 0", not wrong, f"{len(wrong)} of {checked}"),
            ("daemon alive", alive, "" if alive else f"exit {proc.returncode}"),
            (f"fds flat (end <= start + {args.fd_slack})", alive and dfd <= args.fd_slack,
             f"{base[0]} -> {end[0]}"),
            (f"memory flat (rss growth < {args.rss_slack_mib:g} MiB)",
             alive and drss < args.rss_slack_mib, f"{drss:+.1f} MiB"),
        ]
        print()
        for name, ok, info in checks:
            print(f"{'PASS' if ok else 'FAIL'}: {name}  ({info})")
        return 0 if all(ok for _n, ok, _i in checks) else 1
    except (KeyboardInterrupt, Stop):
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # the clean-up itself must finish
            signal.signal(signum, signal.SIG_IGN)
        board.phase = PHASE_STOP
        # Users still running get a bounded chance to stop, then SIGKILL by pid.
        deadline = time.monotonic() + 10
        while children and time.monotonic() < deadline:
            for cpid in list(children):
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(cpid, os.WNOHANG)[0]:
                        os.close(children.pop(cpid)[1])
            time.sleep(0.05)
        for cpid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(cpid, signal.SIGKILL)
        code = stop_daemon(proc, mnt)
        for cpid, (_i, r) in list(children.items()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(cpid, 0)  # killed, and the mount is gone: returns
            os.close(r)
        if code not in (None, 0):
            print(f"credfs exited with {code}; log tail:\n"
                  + "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-20:]),
                  file=sys.stderr)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        elif not mounted_fuse(mnt):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"{mnt} still mounted: left {tmp} in place", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
