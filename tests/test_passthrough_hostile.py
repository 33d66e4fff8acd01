"""Trying to break FUSE passthrough (issue 7): a caller must get nothing
through a passthrough open file that it would not get natively, and lose
nothing a native open gives it but what the README names.

Oracles: the kernel on the native twin (caller mode), the same mount with
`--passthrough never` (mounter mode and the media policy), the backing
filesystem's own accounting (free blocks of a private tmpfs for backing files
the kernel still holds), and the daemon's descriptor table.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import test_android_media as am
from helpers.agents import UserAgent
from helpers.mounts import CredfsMount
from helpers.trees import Node, build_tree, diff_snapshots, snapshot

MountFactory = Callable[..., CredfsMount]
AgentFactory = Callable[..., UserAgent]

pytestmark = pytest.mark.skipif(
    not hasattr(pyfuse3.FileInfo(), "backing_id"),
    reason="pyfuse3 built without passthrough (scripts/build-pyfuse3.sh could not run)")

NOBODY = 65534  # the uid and gid of "nobody"
BOUND = 60.0  # seconds any wait below may take


def both(tree: list[Node], backing: Path, native: Path) -> None:
    build_tree(backing, tree)
    build_tree(native, tree)


def same_trees(backing: Path, native: Path) -> None:
    a, b = snapshot(backing), snapshot(native)
    assert a == b, diff_snapshots(a, b)


def passthrough_on(m: CredfsMount) -> None:
    """The start-up line says passthrough is on (it may land just after the
    mount appears: waited for, bounded)."""
    assert "passthrough on" in m.start_line(BOUND), m.log


# --- append-only, O_DIRECT, rename/unlink while open, fallocate, copy ------------


@contextlib.contextmanager
def append_only(*paths: Path) -> Iterator[None]:
    """chattr +a on paths for the block (and -a after, or the tree cannot be removed)."""
    try:
        for p in paths:
            subprocess.run(["chattr", "+a", os.fspath(p)], check=True, timeout=30)
        yield
    finally:
        for p in paths:
            subprocess.run(["chattr", "-a", os.fspath(p)], check=False, timeout=30)


@pytest.mark.parametrize("caller_caps", [True, False])
def test_append_only_file_stays_append_only(caller_caps: bool, mount_credfs: MountFactory,
                                            backing: Path, native: Path, mnt: Path,
                                            agents: dict[str, UserAgent]) -> None:
    """An append-only file (chattr +a) opened O_APPEND for a passthrough write:
    clearing O_APPEND with fcntl and writing must not overwrite its start. The
    FUSE inode carries no S_APPEND flag, so the kernel lets the fcntl through
    on the mount; what holds the line is the backing file, opened with the
    caller's flags, whose own O_APPEND still governs passthrough writes."""
    tree = [Node("log", "f", 0o666, uid=2001, gid=2001, data=b"first line\n")]
    both(tree, backing, native)
    passthrough_on(mount_credfs(caller_caps=caller_caps))
    alice = agents["alice"]
    outcomes = {}
    with append_only(backing / "log", native / "log"):
        for base in (mnt, native):
            f = os.fspath(base / "log")
            assert alice.do("open_fd", f, os.O_WRONLY)[0] == "err"  # needs O_APPEND
            fd = alice.call("open_fd", f, os.O_WRONLY | os.O_APPEND)
            try:
                outcomes[base] = (alice.do("fd_setfl", fd, 0),
                                  alice.do("fd_write", fd, b"XXXX", 0),
                                  alice.do("fd_append", fd, b"tail\n"))
            finally:
                alice.call("close_fd", fd)
        assert (backing / "log").read_bytes().startswith(b"first line\n")
    same_trees(backing, native)
    # The fcntl itself is allowed through the mount (EPERM natively): a
    # difference of the FUSE layer, which does not know the backing flag.
    assert outcomes[mnt][1:] == outcomes[native][1:]


@pytest.mark.parametrize("who", ["alice", "root"])
def test_o_direct_reads_and_writes(who: str, mount_credfs: MountFactory, backing: Path,
                                   native: Path, mnt: Path,
                                   agents: dict[str, UserAgent]) -> None:
    """O_DIRECT opens (passthrough for alice; the page cache for root) read back
    what they wrote, aligned, as natively."""
    tree = [Node("d", "f", 0o666, uid=2001, gid=2001, data=b"\0" * 16384)]
    both(tree, backing, native)
    passthrough_on(mount_credfs())
    data = os.urandom(8192)
    a = agents[who]
    got = {base: a.do("odirect_write_read", os.fspath(base / "d"), data)
           for base in (mnt, native)}
    assert got[mnt] == got[native] == ("ok", data)
    same_trees(backing, native)


@pytest.mark.parametrize("gone", ["unlink", "rename"])
def test_write_and_map_after_the_name_is_gone(gone: str, mount_credfs: MountFactory,
                                              backing: Path, native: Path, mnt: Path,
                                              agents: dict[str, UserAgent]) -> None:
    """A passthrough open file keeps working after its name is unlinked or
    renamed away: write, read and mmap see the same as natively."""
    tree = [Node("pub", "d", 0o777), Node("pub/f", "f", 0o666, uid=2001, gid=2001,
                                         data=b"." * 5000)]
    both(tree, backing, native)
    passthrough_on(mount_credfs())
    alice = agents["alice"]
    out = {}
    for base in (mnt, native):
        other = None if gone == "unlink" else os.fspath(base / "pub" / "g")
        out[base] = alice.do("while_gone", os.fspath(base / "pub" / "f"), other,
                             b"written after")
    assert out[mnt] == out[native]
    assert out[mnt][0] == "ok"
    same_trees(backing, native)


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


@pytest.mark.parametrize("mode", [0, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE])
@pytest.mark.parametrize("who", ["alice", "bob"])
def test_fallocate(mode: int, who: str, mount_credfs: MountFactory, backing: Path,
                   native: Path, mnt: Path, agents: dict[str, UserAgent]) -> None:
    """fallocate(2) (which passthrough does not cover: the daemon does it, as
    the opener) allocates or punches as natively, and on a setuid file of
    alice's that bob may write clears the bit as natively. (pyfuse3 3.5 has no
    fallocate handler; the patched one does.)"""
    tree = [Node("f", "f", 0o666, uid=2001, gid=2001, data=b"x" * 8192),
            Node("s", "f", 0o4777, uid=2001, gid=2001, data=b"y" * 8192)]
    both(tree, backing, native)
    passthrough_on(mount_credfs())
    a = agents[who]
    for name in ("f", "s"):
        got = a.do("fallocate", os.fspath(mnt / name), mode, 0, 1 << 16)
        assert got == a.do("fallocate", os.fspath(native / name), mode, 0, 1 << 16)
        assert got[0] == "ok"
    same_trees(backing, native)


def test_copy_file_range_and_sendfile(mount_credfs: MountFactory, backing: Path,
                                      native: Path, mnt: Path,
                                      agents: dict[str, UserAgent]) -> None:
    """copy_file_range between two passthrough files of the mount, and
    sendfile out of one, give what they give natively; the copy is bob's."""
    data = os.urandom(300_000)
    tree = [Node("pub", "d", 0o777), Node("pub/src", "f", 0o644, uid=2001, gid=2001,
                                         data=data)]
    both(tree, backing, native)
    passthrough_on(mount_credfs())
    bob = agents["bob"]
    for base in (mnt, native):
        assert bob.call("copy_range", os.fspath(base / "pub" / "src"),
                        os.fspath(base / "pub" / "dst"), 1000, 200_000) == 200_000
        assert bob.call("sendfile_read", os.fspath(base / "pub" / "dst"), 7, 150_000) == \
            data[1007:151_007]
    same_trees(backing, native)


# --- setid bits --------------------------------------------------------------------


SETID_CASES = [
    # (file group, mode set while bob's passthrough write is open)
    (NOBODY, 0o4666),
    (NOBODY, 0o2676),
    (NOBODY, 0o2666),   # setgid without group execute, group of the old neutral registrar
    (3001, 0o2666),     # bob is in the group: kept (a neutral registrar cleared it)
    (3002, 0o2666),     # bob is not: cleared
    (3002, 0o6777),
]


@pytest.mark.parametrize(("group", "mode"), SETID_CASES)
@pytest.mark.parametrize("caller_caps", [True, False])
def test_setid_set_while_open_is_never_kept_beyond_native(
        group: int, mode: int, caller_caps: bool, mount_credfs: MountFactory, backing: Path,
        native: Path, mnt: Path, agents: dict[str, UserAgent]) -> None:
    """bob holds a passthrough write open; root then sets setuid/setgid bits;
    bob writes. The file is registered with bob's own credentials, so the
    write leaves exactly the bits it leaves natively."""
    tree = [Node("f", "f", 0o666, uid=2001, gid=group, data=b"0" * 64)]
    both(tree, backing, native)
    passthrough_on(mount_credfs(caller_caps=caller_caps))
    bob = agents["bob"]
    kept = {}
    for base, under in ((mnt, backing), (native, native)):
        fd = bob.call("open_fd", os.fspath(base / "f"), os.O_WRONLY)
        try:
            os.chmod(under / "f", mode)
            assert bob.call("fd_write", fd, b"bob") == 3
        finally:
            bob.call("close_fd", fd)
        kept[base] = stat.S_IMODE(os.stat(under / "f").st_mode) & 0o6000
    assert kept[mnt] == kept[native], (oct(kept[mnt]), oct(kept[native]))


# --- leaks -------------------------------------------------------------------------


def daemon_fds(m: CredfsMount) -> int:
    assert m.pid is not None
    return len(os.listdir(f"/proc/{m.pid}/fd"))


def free_blocks(p: Path) -> int:
    return os.statvfs(p).f_bfree


def wait_for(what: str, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND
    while not done():
        assert time.monotonic() < deadline, f"not within {BOUND}s: {what}"
        Path("/proc/sys/vm/drop_caches").write_text("2")
        time.sleep(0.2)


@pytest.fixture
def tmpfs_backing(backing: Path) -> Iterator[Path]:
    """backing as a private tmpfs: its free blocks count only this test's files."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0777", "credfs-pt-test",
                    os.fspath(backing)], check=True, timeout=30)
    try:
        yield backing
    finally:
        subprocess.run(["umount", "-l", os.fspath(backing)], check=False, timeout=30)


FILES = 2000


def test_forgotten_nodes_release_backing_files(mount_credfs: MountFactory, tmpfs_backing: Path,
                                               mnt: Path,
                                               agents: dict[str, UserAgent]) -> None:
    """Thousands of files opened once each through passthrough, then dropped:
    when the kernel forgets their nodes, the daemon's descriptors return to
    their baseline and the backing files are released (a backing id the daemon
    never closed keeps its file open in the kernel: the blocks of the deleted
    files would stay in use)."""
    for i in range(FILES):
        (tmpfs_backing / f"f{i}").write_bytes(b"%d" % i * 4096)
    (tmpfs_backing / "warm").write_bytes(b"w")
    m = mount_credfs()
    passthrough_on(m)
    # One open first: the daemon makes some plumbing (a wake-up pipe) on first use.
    assert agents["alice"].call("open_read_close_each", [os.fspath(mnt / "warm")]) == 1
    Path("/proc/sys/vm/drop_caches").write_text("2")
    empty = free_blocks(tmpfs_backing)
    base_fds = daemon_fds(m)
    paths = [os.fspath(mnt / f"f{i}") for i in range(FILES)]
    assert agents["alice"].call("open_read_close_each", paths, timeout=300) == FILES
    assert daemon_fds(m) > base_fds + FILES // 2  # an O_PATH descriptor per node held
    # Deleted behind the mount: only a file something still holds keeps its blocks.
    for i in range(FILES):
        (tmpfs_backing / f"f{i}").unlink()
    wait_for("daemon descriptors back to baseline", lambda: daemon_fds(m) <= base_fds)
    gone = empty + FILES  # at least one block a file
    wait_for("backing files released", lambda: free_blocks(tmpfs_backing) >= gone)
    assert "closing backing id" not in m.log


# --- races -------------------------------------------------------------------------


def test_mixed_opens_of_one_file_never_fail(mount_credfs: MountFactory, backing: Path,
                                            native: Path, mnt: Path,
                                            make_agent: AgentFactory) -> None:
    """Many opens of one file at once, by different users: readers, mmap
    readers, writers that may share the passthrough file (alice, bob) and one
    that may not (root with CAP_FSETID: direct I/O while others pass through,
    the page cache while it is alone). The kernel fails an open whose mode
    disagrees with the inode's (EIO); natively nothing here fails."""
    size = 65536
    tree = [Node("f", "f", 0o666, uid=2001, gid=2001, data=b"A" * size)]
    both(tree, backing, native)
    passthrough_on(mount_credfs())
    roles = [(2001, "r"), (2002, "m"), (2003, "r"), (2001, "w"), (2002, "w"), (0, "w"),
             (0, "r"), (2003, "m")]
    workers = [(make_agent(uid, uid, [uid]), mode) for uid, mode in roles]
    for base in (mnt, native):
        results: list[Any] = [None] * len(workers)
        barrier = threading.Barrier(len(workers))

        def run(i: int, a: UserAgent, mode: str, base: Path = base,
                barrier: threading.Barrier = barrier, results: list[Any] = results) -> None:
            barrier.wait(timeout=BOUND)
            results[i] = a.do("churn", os.fspath(base / "f"), 150, mode, size, timeout=300)

        threads = [threading.Thread(target=run, args=(i, a, mode))
                   for i, (a, mode) in enumerate(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
        errors = [(roles[i], r) for i, r in enumerate(results)
                  if r[0] != "ok" or any(o[0] == "err" for o in r[1])]
        assert errors == [], (base, errors)


# --- the media provider: redacted readers while the owner writes through passthrough --


android = am.android  # the same fixtures as test_android_media (media mounter mode)
samples = am.samples
media_files = am.media_files


@am.needs_media_tools
def test_redacted_reader_while_owner_writes_in_place(android: am.Android,
                                                     media_files: dict[str, str],
                                                     samples: dict[str, bytes]) -> None:
    """camera (the owner) holds its photo open for a passthrough write and
    rewrites it in place with another location; viewer (no location
    permission) holds it open through the redacting view and has read it
    (so its page cache is filled), and reads again by pread on the held
    descriptor, by a mapping of it and by fresh opens. viewer only ever gets
    the redacted bytes, gallery (entitled) the new ones."""
    assert android.mount is not None
    passthrough_on(android.mount)
    p = android.p(media_files["everything.jpg"])
    a, b = samples["everything.jpg"], samples["moved.jpg"]
    assert len(a) == len(b) and a != b
    scratch = android.workdir / "scratch.jpg"
    scratch.write_bytes(b)
    red = am.redacted_bytes(scratch)
    assert red != b
    size = len(a)
    held = android.call("viewer", "open_fd", p)
    writer = android.call("camera", "open_fd", p, os.O_WRONLY)
    try:
        assert android.call("viewer", "pread_fd", held, size) == red
        assert android.call("viewer", "mmap_fd_read", held, size) == red
        assert android.call("gallery", "read", p) == a
        for off in range(0, size, 4096):  # piece by piece, as a camera app saves
            assert android.call("camera", "fd_write", writer, b[off:off + 4096], off) > 0
        assert android.call("gallery", "read", p) == b
        seen = {android.call("viewer", "pread_fd", held, size),
                android.call("viewer", "mmap_fd_read", held, size),
                android.call("viewer", "read", p),
                b"|".join(android.call("viewer", "mmap_ranges", p, [(0, size)], True))}
    finally:
        android.call("camera", "close_fd", writer)
        android.call("viewer", "close_fd", held)
    assert seen == {red}
    assert android.call("viewer", "read", p) == red
    assert (android.backing / media_files["everything.jpg"]).read_bytes() == b
