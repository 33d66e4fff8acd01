"""Kernel FUSE passthrough (issue 7): reads and writes of open files go from
the kernel to the backing file without the daemon, and nothing about them
differs from native but what the README names.

Whether the daemon was bypassed is read off the kernel's own accounting of the
daemon's I/O (/proc/<pid>/io rchar/wchar: every byte the daemon reads from or
writes to any file, /dev/fuse included). The rest compares with the kernel's
answers on the native twin, as everywhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
from helpers.agents import UserAgent
from helpers.mounts import CredfsMount
from helpers.trees import FILE_CAPS, Node, build_tree, diff_snapshots, snapshot

MountFactory = Callable[..., CredfsMount]

pytestmark = pytest.mark.skipif(
    not hasattr(pyfuse3.FileInfo(), "backing_id"),
    reason="pyfuse3 built without passthrough (scripts/build-pyfuse3.sh could not run)")

BIG = 32 << 20


def daemon_io(m: CredfsMount) -> int:
    """Bytes the daemon has read and written through syscalls, all threads."""
    assert m.pid is not None
    fields = dict(line.split(": ") for line in
                  Path(f"/proc/{m.pid}/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


def both(tree: list[Node], backing: Path, native: Path) -> None:
    build_tree(backing, tree)
    build_tree(native, tree)


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_reads_and_writes_bypass_the_daemon(mode: str, mount_credfs: MountFactory,
                                            backing: Path, mnt: Path,
                                            agents: dict[str, UserAgent]) -> None:
    """With passthrough the daemon moves none of a 32 MiB file's bytes in either
    direction; with --passthrough never it moves all of them (so the measure can
    tell). The data and owner are the same either way."""
    both_tree = [Node("pub", "d", 0o1777)]
    build_tree(backing, both_tree)
    m = mount_credfs("--passthrough", mode)
    assert (f"passthrough {'on' if mode == 'auto' else 'off'}") in m.start_line()
    alice = agents["alice"]
    data = os.urandom(1 << 20) * (BIG >> 20)
    before = daemon_io(m)
    assert alice.call("write", os.fspath(mnt / "pub" / "big"), data,
                      os.O_WRONLY | os.O_CREAT | os.O_EXCL) == BIG
    got = alice.call("read", os.fspath(mnt / "pub" / "big"))
    moved = daemon_io(m) - before
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert (backing / "pub" / "big").read_bytes() == data
    assert (backing / "pub" / "big").stat().st_uid == 2001
    if mode == "auto":
        assert moved < BIG // 8, moved
    else:
        assert moved >= 2 * BIG, moved


def test_setid_bits_with_mixed_writers(mount_credfs: MountFactory, backing: Path,
                                       native: Path, mnt: Path,
                                       agents: dict[str, UserAgent]) -> None:
    """One file open at once by a reader (passthrough), by root holding
    CAP_FSETID (whose writes keep setuid: it may not share the passthrough file,
    so it gets direct I/O) and then by bob (whose write clears setuid): every
    open succeeds, every reader sees every write, and the modes and data end
    as natively."""
    tree = [Node("prog", "f", 0o4777, uid=2001, gid=2001, data=b"0" * 64)]
    both(tree, backing, native)
    mount_credfs()  # the suite's default --caller-caps: root acts with its capabilities
    alice, root, bob = agents["alice"], agents["root"], agents["bob"]
    for base in (mnt, native):
        f = os.fspath(base / "prog")
        reader = alice.call("open_fd", f, os.O_RDONLY)
        writer = root.call("open_fd", f, os.O_WRONLY)
        assert root.call("fd_write", writer, b"root was here") == 13
        assert alice.call("pread_fd", reader, 13) == b"root was here"
        mode_after_root = stat.S_IMODE(os.stat(base / "prog").st_mode)
        assert bob.call("write", f, b"bob") == 3
        assert alice.call("pread_fd", reader, 13) == b"bobt was here"
        root.call("close_fd", writer)
        alice.call("close_fd", reader)
        if base == mnt:
            through = mode_after_root
        else:
            assert through == mode_after_root == 0o4777
    assert snapshot(backing) == snapshot(native), diff_snapshots(snapshot(backing),
                                                                 snapshot(native))


def test_each_writer_writes_as_itself(mount_credfs: MountFactory, backing: Path,
                                      mnt: Path, agents: dict[str, UserAgent]) -> None:
    """A file is registered with its first writer's own credentials, so root's
    writes (uid 0, CAP_FSETID, the suite's --caller-caps) bypass the daemon
    too, where a shared neutral registrar had to send them through it; once
    root has closed it, alice's writes are registered as alice, and what each
    reads is what the other wrote."""
    build_tree(backing, [Node("f", "f", 0o666, uid=2001, gid=2001, data=b"A" * 8192)])
    m = mount_credfs()
    root, alice = agents["root"], agents["alice"]
    f = os.fspath(mnt / "f")
    data = os.urandom(1 << 20) * (BIG >> 20)
    before = daemon_io(m)
    assert root.call("write", f, data) == BIG
    assert daemon_io(m) - before < BIG // 8
    assert alice.call("write", f, b"B" * 8192) == 8192
    fd = root.call("open_fd", f, os.O_RDWR)
    try:
        assert root.call("pread_fd", fd, 8192) == b"B" * 8192
    finally:
        root.call("close_fd", fd)
    assert (backing / "f").read_bytes() == b"B" * 8192 + data[8192:]


def test_exec_and_mmap_while_others_hold_it_open(mount_credfs: MountFactory, backing: Path,
                                                 mnt: Path,
                                                 agents: dict[str, UserAgent]) -> None:
    """A program run by several users while one of them holds it open (the
    kernel maps it through the one backing file all opens share), and shared
    mmap reads by two users at once."""
    true = shutil.which("true")
    assert true is not None
    data = bytes(range(256)) * 64
    build_tree(backing, [Node("bin", "d", 0o755),
                         Node("shared", "f", 0o644, uid=2001, gid=2001, data=data)])
    shutil.copy(true, backing / "bin" / "true")
    os.chmod(backing / "bin" / "true", 0o755)
    mount_credfs()
    alice, bob, root = agents["alice"], agents["bob"], agents["root"]
    prog = os.fspath(mnt / "bin" / "true")
    held = alice.call("open_fd", prog, os.O_RDONLY)
    try:
        for who in (alice, bob, root):
            assert who.call("exec_status", prog) == 0
    finally:
        alice.call("close_fd", held)
    ranges = [(0, 100), (4000, 300), (len(data) - 50, 50)]
    want = [data[o:o + n] for o, n in ranges]
    assert alice.call("mmap_ranges", os.fspath(mnt / "shared"), ranges, True) == want
    assert bob.call("mmap_ranges", os.fspath(mnt / "shared"), ranges, True) == want


def test_mounter_mode_registers_as_the_mounter(mount_credfs: MountFactory, backing: Path,
                                               mnt: Path,
                                               agents: dict[str, UserAgent]) -> None:
    """In mounter mode passthrough reads and writes run as the mounter
    (overlayfs's override_creds), and the bytes still bypass the daemon."""
    os.chown(backing, 1023, 1023)
    backing.chmod(0o777)
    m = mount_credfs("--creds", "mounter", "--mounter", "1023:1023", caller_caps=False)
    assert "reads and writes as the mounter, uid=1023 gid=1023" in m.start_line()
    alice = agents["alice"]
    data = os.urandom(BIG)
    f = os.fspath(mnt / "new")
    before = daemon_io(m)
    assert alice.call("write", f, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL) == BIG
    assert alice.call("read", f) == data
    assert daemon_io(m) - before < BIG // 8


@pytest.mark.parametrize("who", ["alice", "root"])
def test_close_without_flush_keeps_mapped_writes(who: str, mount_credfs: MountFactory,
                                                 backing: Path, native: Path, mnt: Path,
                                                 agents: dict[str, UserAgent]) -> None:
    """On a local backing the kernel sends no FLUSH at close (FOPEN_NOFLUSH).
    Data written through a shared mapping still reaches the backing file by
    the time close returns, as natively: through the backing file for alice's
    passthrough open, through the page cache for root's (its writes are not an
    ordinary user's)."""
    tree = [Node("f", "f", 0o666, uid=2001, gid=2001, data=b"." * 10000)]
    both(tree, backing, native)
    m = mount_credfs()
    assert "close sends no FLUSH" in m.start_line()
    a = agents[who]
    for base in (mnt, native):
        a.call("mmap_write_close", os.fspath(base / "f"), 4096, b"mapped write")
    assert (backing / "f").read_bytes() == (native / "f").read_bytes()
    assert (backing / "f").read_bytes()[4096:4108] == b"mapped write"


# VFS_CAP_REVISION_2 with the effective flag, CAP_NET_RAW permitted.
@pytest.mark.parametrize(("who", "op", "args"), [
    ("alice", "write", (b"x",)),            # passthrough, registered as alice: clears it
    ("root", "write", (b"x",)),             # root's write goes through the daemon
    ("alice", "truncate", (3,)),
    ("root", "chown", (2002, 2002)),
    ("alice", "removexattr", ("security.capability",)),  # asked for: refused as natively
    ("bob", "write", (b"x",)),                   # may not write: refused, caps stay
])
def test_file_capabilities_cleared_as_natively(who: str, op: str, args: tuple[object, ...],
                                               mount_credfs: MountFactory, backing: Path,
                                               native: Path, mnt: Path,
                                               agents: dict[str, UserAgent]) -> None:
    """A write, truncate or chown removes security.capability (and setuid
    bits) exactly as natively: the kernel leaves it to credfs
    (FUSE_HANDLE_KILLPRIV_V2), and credfs's backing operations do it as the
    caller, or as the registration (the opener's own) for passthrough writes."""
    tree = [Node("prog", "f", 0o755, uid=2001, gid=2001, data=b"program")]
    both(tree, backing, native)
    for base in (backing, native):
        os.setxattr(base / "prog", "security.capability", FILE_CAPS)
    mount_credfs()
    a = agents[who]
    assert a.do(op, os.fspath(mnt / "prog"), *args) == \
        a.do(op, os.fspath(native / "prog"), *args)
    assert snapshot(backing) == snapshot(native), diff_snapshots(snapshot(backing),
                                                                 snapshot(native))
    assert os.listxattr(backing / "prog") == os.listxattr(native / "prog")
