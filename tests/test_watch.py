"""Changes made behind the mount's back, with `--cache auto` (credfs/watch.py).

With the watch running, names and attributes on the backing filesystem are
cached for up to a minute, and every change made directly on the backing tree
must still show through the mount at once - as soon as the daemon has read
its fanotify event. "At once" is checked with a bounded wait (a few seconds,
far below the one-minute timeout, so a missing invalidation fails the test);
the first test shows that the cache really outlives the old one-second
timeout, so that the others do not pass merely because it ran out.

The oracle is the backing tree itself (or its native twin for permission
outcomes): what a user sees through the mount after the change must be what
they see natively.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.agents import Outcome, UserAgent
from helpers.mounts import CredfsMount
from helpers.trees import FILE_CAPS

from credfs import watch

MountFactory = Callable[..., CredfsMount]

SEEN_WITHIN = 5.0  # seconds: the watch reads its events every few milliseconds


def until(probe: Callable[[], Any], want: Any, within: float = SEEN_WITHIN) -> Any:
    """probe() until it returns want (bounded); the last value either way."""
    deadline = time.monotonic() + within
    got = probe()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.02)
        got = probe()
    return got


def short(path: Path) -> tuple[int, int, int, int, int]:
    st = os.stat(path, follow_symlinks=False)
    return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink)


def outcome(agent: UserAgent, op: str, path: Path, *args: Any) -> Outcome:
    return agent.do(op, os.fspath(path), *args)


@pytest.fixture
def tree(backing: Path) -> Path:
    """pub/ (searchable by all) holding d/ (alice's, public) with a file."""
    d = backing / "pub" / "d"
    d.mkdir(parents=True)
    (backing / "pub").chmod(0o755)
    d.chmod(0o755)
    (d / "f").write_bytes(b"first\n")
    (d / "f").chmod(0o644)
    for p in (d, d / "f"):
        os.chown(p, 2001, 2001)
    return backing


def watched(mount: CredfsMount) -> None:
    line = mount.start_line()
    assert "backing changes watched with fanotify" in line, line


def test_cache_outlives_the_old_timeout(tree: Path, mnt: Path,
                                        mount_credfs: MountFactory) -> None:
    """Guard for the tests below: a change fanotify cannot report (a write
    through a shared mapping, made directly on the backing file) is not seen
    through the mount 1.5 s later, so the kernel really serves the cached
    attributes beyond the one second it used to."""
    watched(mount_credfs())
    f = tree / "pub/d/f"
    # Held open through the mount: pins the kernel's dentry and inode, so that
    # a drop_caches elsewhere on the machine cannot evict them (a fresh lookup
    # would refetch the attributes and fail this for the wrong reason).
    pin = os.open(mnt / "pub/d/f", os.O_RDONLY)
    before = os.fstat(pin).st_mtime_ns
    time.sleep(0.05)  # a later mtime, whatever the clock's granularity
    fd = os.open(f, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as m:
            m[0:1] = b"F"
    finally:
        os.close(fd)
    assert os.stat(f).st_mtime_ns != before, "the mapped write did not touch mtime natively"
    time.sleep(1.5)
    try:
        assert os.stat(mnt / "pub/d/f").st_mtime_ns == before, \
            "the mount refetched attributes within 1.5 s: the watch tests would prove nothing"
    finally:
        os.close(pin)


def test_attribute_changes_show_at_once(tree: Path, mnt: Path,
                                        mount_credfs: MountFactory) -> None:
    watched(mount_credfs())
    f, via = tree / "pub/d/f", mnt / "pub/d/f"
    assert short(via) == short(f)
    f.chmod(0o600)
    assert until(lambda: short(via), short(f)) == short(f), "chmod"
    os.chown(f, 2002, 2002)
    assert until(lambda: short(via), short(f)) == short(f), "chown"
    with open(f, "ab") as out:
        out.write(b"appended behind the back\n")
    assert until(lambda: short(via), short(f)) == short(f), "append"
    os.link(f, tree / "pub/hard")
    assert until(lambda: short(via), short(f)) == short(f), "link count"
    assert via.read_bytes() == f.read_bytes()


def test_names_removed_or_replaced_show_at_once(tree: Path, mnt: Path,
                                                mount_credfs: MountFactory) -> None:
    watched(mount_credfs())
    d, via = tree / "pub/d", mnt / "pub/d"
    (d / "gone").write_bytes(b"x")
    (d / "moved").write_bytes(b"y")
    (d / "replaced").write_bytes(b"old")
    for name in ("gone", "moved", "replaced"):
        os.stat(via / name)  # cached now
    (d / "gone").unlink()
    assert until(lambda: os.path.lexists(via / "gone"), False) is False, "unlink"
    (d / "moved").rename(tree / "pub/moved-here")
    assert until(lambda: os.path.lexists(via / "moved"), False) is False, "rename away"
    assert (mnt / "pub/moved-here").read_bytes() == b"y"
    new = d / "new"
    new.write_bytes(b"new contents")
    new.rename(d / "replaced")
    want = os.stat(d / "replaced").st_ino
    assert until(lambda: os.stat(via / "replaced").st_ino, want) == want, "rename over"
    assert (via / "replaced").read_bytes() == b"new contents"
    (d / "late").write_bytes(b"z")
    want_dir = short(d)
    assert until(lambda: short(via), want_dir) == want_dir, "directory attributes"
    assert sorted(os.listdir(via)) == sorted(os.listdir(d))


@pytest.mark.parametrize("change", ["chmod", "acl"])
def test_directory_made_private_refuses_at_once(
        change: str, tree: Path, native: Path, mnt: Path, mount_credfs: MountFactory,
        agents: dict[str, UserAgent]) -> None:
    """bob reached pub/d/f (so its name is cached); alice's directory is then
    made unsearchable for bob directly on the backing store. bob must be
    refused through the mount as natively, although the kernel had the name."""
    watched(mount_credfs())
    subprocess.run(["cp", "-a", os.fspath(tree / "pub"), os.fspath(native)], check=True,
                   timeout=30)
    bob = agents["bob"]
    for root in (mnt, native):
        assert outcome(bob, "stat", root / "pub/d/f")[0] == "ok"
        assert outcome(bob, "read", root / "pub/d/f") == ("ok", b"first\n")
    for root in (tree, native):
        if change == "chmod":
            (root / "pub/d").chmod(0o700)
        else:
            subprocess.run(["setfacl", "-m", "u:2002:---", os.fspath(root / "pub/d")],
                           check=True, timeout=30, capture_output=True)
    for op in ("stat", "read"):
        want = outcome(bob, op, native / "pub/d/f")
        assert want[0] == "err", f"test tree wrong: native {op} gave {want}"
        got = until(lambda op=op: outcome(bob, op, mnt / "pub/d/f"), want)
        assert got == want, f"{op} after {change} behind the back: mount {got}, native {want}"


def test_mounter_mode_permission_checks_see_backing_chmod(
        tree: Path, mnt: Path, mount_credfs: MountFactory,
        agents: dict[str, UserAgent]) -> None:
    """In mounter mode the kernel checks callers against cached attributes
    (default_permissions): a chmod behind the back must reach those."""
    watched(mount_credfs("--creds", "mounter"))
    bob = agents["bob"]
    via = mnt / "pub/d/f"
    assert outcome(bob, "read", via) == ("ok", b"first\n")
    (tree / "pub/d/f").chmod(0o600)
    want = outcome(bob, "read", tree / "pub/d/f")
    assert want[0] == "err"
    assert until(lambda: outcome(bob, "read", via), want) == want


def test_other_modes_do_not_watch(tree: Path, mnt: Path, mount_credfs: MountFactory) -> None:
    for mode in ("none", "always"):
        m = mount_credfs("--cache", mode)
        line = m.start_line()
        assert f"cache {mode} (timeout" in line and "watched" not in line, line
        m.stop()


@pytest.fixture
def tiny_event_queue() -> Any:
    """fanotify groups made while this is in force queue at most 16 events
    (the daemon's group is made at mount; restored right after)."""
    knob = Path("/proc/sys/fs/fanotify/max_queued_events")
    old = knob.read_text()
    knob.write_text("16")
    try:
        yield lambda: knob.write_text(old)
    finally:
        knob.write_text(old)


def test_lost_events_drop_every_cached_name(
        tree: Path, native: Path, mnt: Path, mount_credfs: MountFactory,
        agents: dict[str, UserAgent], tiny_event_queue: Callable[[], None]) -> None:
    """When the kernel's event queue overflows, credfs cannot know what it
    missed: a directory made private among a burst of changes must still
    refuse bob, and the daemon says what happened."""
    mount = mount_credfs()
    tiny_event_queue()
    watched(mount)
    bob = agents["bob"]
    assert outcome(bob, "stat", mnt / "pub/d/f")[0] == "ok"
    burst = tree / "burst"
    burst.mkdir()
    # The daemon is stopped while the changes are made, so its 16-event queue
    # overflows whatever the disk's speed (it keeps up with a slow burst).
    assert mount.pid is not None
    os.kill(mount.pid, signal.SIGSTOP)
    try:
        for i in range(200):
            (burst / str(i)).write_bytes(b"")
        (tree / "pub/d").chmod(0o700)
    finally:
        os.kill(mount.pid, signal.SIGCONT)
    subprocess.run(["cp", "-a", os.fspath(tree / "pub"), os.fspath(native)], check=True,
                   timeout=30)
    want = outcome(bob, "stat", native / "pub/d/f")
    assert want[0] == "err"
    assert until(lambda: outcome(bob, "stat", mnt / "pub/d/f"), want) == want
    assert until(lambda: "fanotify queue overflow" in mount.log, True), mount.log[-2000:]


def test_missing_names_appear_when_made_behind_the_back(
        tree: Path, mnt: Path, mount_credfs: MountFactory,
        agents: dict[str, UserAgent]) -> None:
    """A name that is not there may be cached as such (a negative entry) in a
    directory everyone may search; made directly on the backing store, it
    must show through the mount at once, for everyone."""
    watched(mount_credfs())
    bob = agents["bob"]
    d = tree / "pub/d"
    for name in ("file", "dir", "link", "moved-in"):
        for _ in range(2):
            assert outcome(bob, "stat", mnt / "pub/d" / name) == \
                outcome(bob, "stat", d / name)
            assert outcome(bob, "stat", d / name)[1] == 2  # ENOENT natively
    (d / "file").write_bytes(b"made behind the back")
    (d / "dir").mkdir()
    os.symlink("file", d / "link")
    (tree / "pub/elsewhere").write_bytes(b"moved")
    (tree / "pub/elsewhere").rename(d / "moved-in")
    for name in ("file", "dir", "link", "moved-in"):
        want = outcome(bob, "stat", d / name)
        assert want[0] == "ok"
        assert until(lambda n=name: outcome(bob, "stat", mnt / "pub/d" / n), want) == want, name


def test_missing_name_in_private_directory_is_not_shared(
        tree: Path, native: Path, mnt: Path, mount_credfs: MountFactory,
        agents: dict[str, UserAgent]) -> None:
    """alice may search her 0700 directory and learns a name is not there; bob
    may not search it and must get EACCES, not alice's ENOENT from a cache -
    also after a public directory holding a cached missing name becomes
    private behind the back."""
    watched(mount_credfs())
    (tree / "pub/priv").mkdir()
    os.chown(tree / "pub/priv", 2001, 2001)
    (tree / "pub/priv").chmod(0o700)
    subprocess.run(["cp", "-a", os.fspath(tree / "pub"), os.fspath(native)], check=True,
                   timeout=30)
    alice, bob = agents["alice"], agents["bob"]
    for rel in ("pub/priv/missing", "pub/d/missing"):
        for who in (alice, bob, alice, bob):
            got, want = outcome(who, "stat", mnt / rel), outcome(who, "stat", native / rel)
            assert got == want, f"{who.name} stat {rel}: mount {got}, native {want}"
    assert outcome(bob, "stat", native / "pub/priv/missing")[0] == "err"
    for root in (tree, native):
        (root / "pub/d").chmod(0o700)
    want = outcome(bob, "stat", native / "pub/d/missing")
    assert want != outcome(alice, "stat", native / "pub/d/missing"), "test tree wrong"
    assert until(lambda: outcome(bob, "stat", mnt / "pub/d/missing"), want) == want


def test_capabilities_set_behind_the_back_show_at_once(
        tree: Path, native: Path, mnt: Path, mount_credfs: MountFactory,
        agents: dict[str, UserAgent]) -> None:
    """The kernel asks for security.capability before every write, and credfs
    remembers that a file has none. Capabilities set on it directly on the
    backing store must show through the mount at once, and set through the
    mount at once too; alice's next write clears them as natively."""
    mount = mount_credfs()
    watched(mount)
    subprocess.run(["cp", "-a", os.fspath(tree / "pub"), os.fspath(native)], check=True,
                   timeout=30)
    alice = agents["alice"]
    caps = "security.capability"
    for root in (mnt, native):
        f = root / "pub/d/f"
        assert outcome(alice, "write", f, b"second\n") == ("ok", 7)
        assert outcome(alice, "getxattr", f, caps)[0] == "err"
    for root in (tree, native):
        os.setxattr(root / "pub/d/f", caps, FILE_CAPS)
    want = outcome(alice, "getxattr", native / "pub/d/f", caps)
    assert want == ("ok", FILE_CAPS), want
    got = until(lambda: outcome(alice, "getxattr", mnt / "pub/d/f", caps), want)
    assert got == want, f"capabilities set behind the back: mount {got}"
    for root in (mnt, native):
        assert outcome(alice, "write", root / "pub/d/f", b"third\n") == ("ok", 6)
    assert os.listxattr(tree / "pub/d/f") == os.listxattr(native / "pub/d/f")
    assert caps not in os.listxattr(tree / "pub/d/f")
    # Through the mount: no event comes back for the daemon's own change.
    assert outcome(alice, "getxattr", mnt / "pub/d/f", caps)[0] == "err"
    os.setxattr(mnt / "pub/d/f", caps, FILE_CAPS)
    assert os.getxattr(mnt / "pub/d/f", caps) == FILE_CAPS


def test_directory_made_private_caches_no_new_name(
        tree: Path, native: Path, mnt: Path, mount_credfs: MountFactory,
        agents: dict[str, UserAgent]) -> None:
    """credfs remembers that a directory is searchable by everyone. Made
    private behind the back, a name alice looks up in it afterwards must not
    be cached: bob, who may no longer search it, must be refused as natively."""
    watched(mount_credfs())
    (tree / "pub/d/later").write_bytes(b"later\n")
    subprocess.run(["cp", "-a", os.fspath(tree / "pub"), os.fspath(native)], check=True,
                   timeout=30)
    alice, bob = agents["alice"], agents["bob"]
    assert outcome(bob, "stat", mnt / "pub/d/f")[0] == "ok"  # pub/d: seen public
    # Held open: the daemon keeps the directory's node, and what it remembered
    # of it, through the kernel dropping every cached name below.
    pin = os.open(mnt / "pub/d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for root in (tree, native):
            (root / "pub/d").chmod(0o700)
        want = outcome(bob, "stat", native / "pub/d/f")
        assert want[0] == "err"
        # The watch has read the change once bob's cached name refuses him.
        assert until(lambda: outcome(bob, "stat", mnt / "pub/d/f"), want) == want
        for root in (mnt, native):
            assert outcome(alice, "stat", root / "pub/d/later")[0] == "ok"
        want = outcome(bob, "stat", native / "pub/d/later")
        assert want[0] == "err"
        assert outcome(bob, "stat", mnt / "pub/d/later") == want
    finally:
        os.close(pin)


@pytest.fixture
def tmpfs(workdir: Path) -> Iterator[Path]:
    """A private tmpfs: its file handles carry no inode number, so the watch
    decodes them (open_by_handle_at) and keeps them in its handle cache; and
    nothing else on the machine makes events on it."""
    fs = workdir / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,nr_inodes=32k,mode=755",
                    "credfs-test", os.fspath(fs)], check=True, timeout=30)
    try:
        yield fs
    finally:
        subprocess.run(["umount", "-l", os.fspath(fs)], check=False, timeout=30)


def test_handles_without_inode_numbers_are_decoded(
        tmpfs: Path, mnt: Path, mount_credfs: MountFactory) -> None:
    """ext4's file handles carry the inode number, which watch.py reads
    itself; tmpfs's do not, and are turned back into inodes by the kernel
    (open_by_handle_at, in a helper thread as the daemon). A chmod behind the
    back of a tmpfs backing shows at once all the same."""
    (tmpfs / "f").write_bytes(b"x")
    (tmpfs / "f").chmod(0o644)
    watched(mount_credfs(source=tmpfs))
    via = mnt / "f"
    assert short(via) == short(tmpfs / "f")
    (tmpfs / "f").chmod(0o600)
    assert until(lambda: short(via), short(tmpfs / "f")) == short(tmpfs / "f")


def test_directory_made_private_while_the_handle_cache_turns_over(
        tmpfs: Path, native: Path, mnt: Path, mount_credfs: MountFactory,
        agents: dict[str, UserAgent]) -> None:
    """bob reached pub/d/f, so the kernel holds its names; alice's pub/d is
    then made unsearchable directly on the backing store (chmod 0700), in the
    same batch of events as a change to a file the watch has not seen before,
    while its handle cache is full and pub/d's handle is the oldest in it.
    bob must be refused as natively within the watch's few milliseconds: the
    chmod's event must not be lost because the cache made room for the new
    handle before the batch's events were matched to nodes."""
    fill = watch._HANDLE_CACHE - 2  # with pub/d and m/: the cache exactly full
    for root in (tmpfs, native):
        d = root / "pub" / "d"
        d.mkdir(parents=True, mode=0o755)
        (d / "f").write_bytes(b"alice's\n")
        os.chown(d, 2001, 2001)
        os.chown(d / "f", 2001, 2001)
    m = tmpfs / "m"
    m.mkdir()
    names = [f"x{i}" for i in range(fill)] + ["new"]
    for name in names:
        (m / name).write_bytes(b"")
    mount = mount_credfs(source=tmpfs)
    line = mount.start_line()
    assert "backing changes watched with fanotify" in line, line
    bob = agents["bob"]
    assert bob.do("read", os.fspath(mnt / "pub/d/f")) == ("ok", b"alice's\n")
    last = mnt / "m" / names[fill - 1]
    assert os.stat(last).st_mode & 0o777 == 0o644  # its attributes are cached now

    # pub/d's handle enters the watch's cache first (a change that changes nothing)...
    (tmpfs / "pub/d").chmod(0o755)
    time.sleep(0.2)
    # ...then m/ and `fill` files' handles after it: the cache is full.
    for name in names[:fill]:
        (m / name).chmod(0o600)
    assert until(lambda: os.stat(last).st_mode & 0o777, 0o600) == 0o600, "fill not seen"

    # One batch: a handle never seen (room is made for it) and pub/d's chmod.
    (m / "new").chmod(0o600)
    for root in (tmpfs, native):
        (root / "pub/d").chmod(0o700)
    want = bob.do("read", os.fspath(native / "pub/d/f"))
    assert want[0] == "err", f"test wrong: native gave {want}"
    got = until(lambda: bob.do("read", os.fspath(mnt / "pub/d/f")), want)
    assert got == want, f"bob read through the mount after pub/d was made private: {got}"


@pytest.mark.parametrize("passthrough", ["auto", "never"])
def test_contents_rewritten_behind_the_back_show_at_once(
        passthrough: str, tree: Path, mnt: Path, mount_credfs: MountFactory) -> None:
    """Same size, and the old mtime put back: the kernel's own check (size
    and mtime, auto_inval_data) sees nothing, so only the daemon's
    invalidation can drop pages the kernel cached (--passthrough never: every
    open uses the page cache). With passthrough the kernel holds no page of
    the file, and invalidating its attributes is all there is to do (watch.py,
    Inode.paged)."""
    watched(mount_credfs("--passthrough", passthrough))
    f, via = tree / "pub/d/f", mnt / "pub/d/f"
    old = f.read_bytes()
    assert via.read_bytes() == old  # now in the kernel's page cache, if it uses one
    st = os.stat(f)
    new = old.upper()
    assert new != old and len(new) == len(old)
    with open(f, "r+b") as out:
        out.write(new)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert until(via.read_bytes, new) == new
