"""review21: adversarial review of parallel dirops and worker-read listings.

A directory on a backing device that is not local (NFS, CIFS, FUSE: here a
FUSE filesystem that answers only when let, helpers/slowdirfs.py, mounted
inside the backing tree) must never make the event loop wait: every other
caller would wait with it. Natively, a stat of a name elsewhere does not wait
for a listing that waits on a slow server.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import signal
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import slowdirfs
from helpers.helperfs import HelperFs

START_TIMEOUT = 15.0
# Far longer than a stat takes on any machine: a stat still waiting then waits
# on the slow one.
WAIT_TIMEOUT = 10.0


class SlowFs:
    """helpers/slowdirfs.py serving: armed, it holds its root's requests until
    released."""

    def __init__(self, fs: HelperFs) -> None:
        self.fs = fs
        self.proc = fs.proc

    def line(self, timeout: float = START_TIMEOUT) -> str:
        return self.fs.line(timeout)

    def arm(self) -> None:
        self.fs.signal(signal.SIGUSR2)
        assert self.line() == "armed", "slowdirfs was not armed"

    def release(self) -> None:
        self.fs.signal(signal.SIGUSR1)


@pytest.fixture
def serve_slowfs(helper_fs: Callable[..., HelperFs]) -> Callable[[Path], SlowFs]:
    return lambda mnt: SlowFs(helper_fs(slowdirfs.__file__, mnt))


class Call(threading.Thread):
    """fn(*args) in a thread: its result or its error once done."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.result: Any = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args, **self.kwargs)
        except OSError as exc:
            self.result = exc


def other_waits_not(fs: SlowFs, slow: Call, other_path: Path) -> os.stat_result:
    """Start slow (which waits on the slow filesystem), then stat other_path
    meanwhile: its result, asserting it did not wait for slow."""
    other = Call(os.stat, other_path)
    fs.arm()
    try:
        slow.start()
        assert fs.line() == "stalled", "the slow call never reached the slow filesystem"
        other.start()
        other.join(WAIT_TIMEOUT)
        assert not other.is_alive(), f"a stat of {other_path} waited on a slow backing device"
        assert slow.is_alive(), "the slow call was not slow: the test proves nothing"
    finally:
        fs.release()
        slow.join(WAIT_TIMEOUT)
        other.join(WAIT_TIMEOUT)
    assert not slow.is_alive(), "the slow call did not end once let"
    assert not isinstance(slow.result, OSError), slow.result
    assert isinstance(other.result, os.stat_result), other.result
    return other.result


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_GETDENTS64 = 217  # x86_64
_DIRENT_HEADER = struct.Struct("=QqHB")  # d_ino, d_off, d_reclen, d_type


def _listing_of(dir_fd: int) -> list[bytes]:
    """The names in an open directory, read with getdents64 alone: os.listdir
    would fstat the descriptor first (fdopendir), a GETATTR of its own."""
    names = _names_from(dir_fd, 0)
    if isinstance(names, OSError):
        raise names
    return sorted(n for n in names if n not in (b".", b".."))


def _slow_and_other(backing: Path, serve_slowfs: Callable[[Path], SlowFs]
                    ) -> tuple[Path, SlowFs]:
    """backing/d with a slow filesystem mounted on d/slow beside a file d/other."""
    d = backing / "d"
    (d / "slow").mkdir(parents=True)
    (d / "other").write_bytes(b"x")
    return d, serve_slowfs(d / "slow")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="getdents64 syscall number of x86_64")
def test_listing_a_slow_device_holds_up_no_one(
        backing: Path, mnt: Path, serve_slowfs: Callable[[Path], SlowFs],
        mount_credfs: Callable[..., object]) -> None:
    """readdir fstat()ed the open directory on the event loop (to size it),
    whatever its device: on a slow one every caller waited for it."""
    d, fs = _slow_and_other(backing, serve_slowfs)
    fd = os.open(d / "slow", os.O_RDONLY | os.O_DIRECTORY)
    try:
        lister = Call(_listing_of, fd)
        native = other_waits_not(fs, lister, d / "other")
        native_names = lister.result
    finally:
        os.close(fd)
    mount_credfs("--cache", "none")
    fd = os.open(mnt / "d" / "slow", os.O_RDONLY | os.O_DIRECTORY)
    try:
        lister = Call(_listing_of, fd)
        through = other_waits_not(fs, lister, mnt / "d" / "other")
    finally:
        os.close(fd)
    assert lister.result == native_names
    assert (through.st_ino, through.st_size) == (native.st_ino, native.st_size)


def test_a_stat_on_a_slow_device_holds_up_no_one(
        backing: Path, mnt: Path, serve_slowfs: Callable[[Path], SlowFs],
        mount_credfs: Callable[..., object]) -> None:
    """getattr fstat()ed the node's O_PATH descriptor on the event loop,
    whatever its device (found while reviewing the listing's fstat)."""
    d, fs = _slow_and_other(backing, serve_slowfs)
    fd = os.open(d / "slow", os.O_RDONLY | os.O_DIRECTORY)
    try:
        native = other_waits_not(fs, Call(os.fstat, fd), d / "other")
    finally:
        os.close(fd)
    mount_credfs("--cache", "none")  # no attribute cached: every fstat asks
    fd = os.open(mnt / "d" / "slow", os.O_RDONLY | os.O_DIRECTORY)
    try:
        slow = Call(os.fstat, fd)
        through = other_waits_not(fs, slow, mnt / "d" / "other")
    finally:
        os.close(fd)
    assert (through.st_ino, through.st_size) == (native.st_ino, native.st_size)
    assert isinstance(slow.result, os.stat_result)
    assert stat.S_ISDIR(slow.result.st_mode)


def _names_from(dir_fd: int, offset: int) -> list[bytes] | OSError:
    """Names getdents64 gives from a directory offset on (a resumed listing)."""
    os.lseek(dir_fd, offset, os.SEEK_SET)
    buf = ctypes.create_string_buffer(65536)
    names: list[bytes] = []
    while True:
        got = _libc.syscall(_SYS_GETDENTS64, dir_fd, buf, len(buf))
        if got < 0:
            err = ctypes.get_errno()
            return OSError(err, os.strerror(err))
        if got == 0:
            return names
        pos = 0
        while pos < got:
            _ino, _off, reclen, _type = _DIRENT_HEADER.unpack_from(buf.raw, pos)
            names.append(buf.raw[pos + _DIRENT_HEADER.size:pos + reclen].split(b"\0", 1)[0])
            pos += reclen


HIDING_POLICY = """\
version = 1
[defaults]
action = "allow"

[[rule]]
path = "d/secret"
action = "deny"
errno = "ENOENT"

[[rule]]
path = "d/mine"
owner = "caller"
action = "allow"
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="getdents64 syscall number of x86_64")
def test_a_failed_listing_pass_leaves_no_hidden_name_behind(
        workdir: Path, backing: Path, mnt: Path, serve_slowfs: Callable[[Path], SlowFs],
        mount_credfs: Callable[..., object]) -> None:
    """readdir kept the unfiltered snapshot in the handle before the policy
    filtered it: when filtering failed (here the probe of a dead FUSE mount
    in the directory: ENOTCONN), a listing resumed at an offset (lseek, then
    getdents) was served from it, hidden names and all."""
    d = backing / "d"
    (d / "dead").mkdir(parents=True)
    (d / "secret").write_bytes(b"s")
    (d / "other").write_bytes(b"o")
    fs = serve_slowfs(d / "dead")
    fs.proc.kill()  # its mount stays, dead: every use of it fails with ENOTCONN
    fs.proc.wait(timeout=START_TIMEOUT)
    policy = workdir / "hiding.toml"
    policy.write_text(HIDING_POLICY)
    mount_credfs("--policy", str(policy))
    fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = _names_from(fd, 0)
        resumed = _names_from(fd, 2)  # past "." and ".."
    finally:
        os.close(fd)
    for got in (first, resumed):
        assert isinstance(got, OSError) or b"secret" not in got, \
            f"the hidden name was listed: {got}"


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "owner-policy"])
def test_a_dead_mount_in_a_directory_leaves_its_listing_as_natively(
        workdir: Path, native: Path, backing: Path, mnt: Path,
        serve_slowfs: Callable[[Path], SlowFs], mount_credfs: Callable[..., object],
        policy: bool) -> None:
    """Natively a directory with a dead FUSE mount in it lists, dead name and
    all (getdents looks at no file). Through credfs too, also when a policy
    rule asks for owners and the dead name's owner cannot be probed: one name
    that cannot be looked at is decided without its file, the others as
    always - a hidden name stays hidden."""
    for top in (native, backing):
        (top / "d" / "dead").mkdir(parents=True)
        (top / "d" / "secret").write_bytes(b"s")
        (top / "d" / "other").write_bytes(b"o")
    for top in (native, backing):
        fs = serve_slowfs(top / "d" / "dead")
        fs.proc.kill()  # its mount stays, dead: every use of it fails with ENOTCONN
        fs.proc.wait(timeout=START_TIMEOUT)
    args: list[str] = []
    if policy:
        (workdir / "hiding.toml").write_text(HIDING_POLICY)
        args = ["--policy", str(workdir / "hiding.toml")]
    mount_credfs(*args)
    want = sorted(os.listdir(native / "d"))
    assert want == ["dead", "other", "secret"]
    if policy:
        want.remove("secret")
    assert sorted(os.listdir(mnt / "d")) == want
    assert sorted(e.name for e in os.scandir(mnt / "d")) == want


# -- one directory, many callers at once ------------------------------------------

HAMMER_FILES = 1500  # names of 40 bytes: ~72 KiB of ext4 entries, read by a worker
HAMMER_ROUNDS = 250


def _deleted_descriptors(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.endswith(" (deleted)"):
            out.append(target)
    return out


@pytest.mark.parametrize("inline", ["auto", "never"])
def test_one_directory_many_callers_balances_lookups(
        backing: Path, mnt: Path, mount_credfs: Callable[..., Any],
        agents: dict[str, Any], make_agent: Callable[..., Any], users: dict[str, Any],
        inline: str) -> None:
    """Lookups, plain and readdirplus listings (a directory large enough to be
    read by a worker), stats and reads in one directory from several uids at
    once, names made and removed meanwhile (with --inline never every handler
    waits on a worker, as on a backing that is not local): no caller sees an
    error or a name that was never there, and once everything is removed
    through the mount, every descriptor the daemon held for it is closed (each
    lookup reference given was forgotten once, no more: a double forget would
    show as ESTALE above)."""
    from credfs import listing
    d = backing / "d"
    d.mkdir()
    d.chmod(0o777 | stat.S_ISVTX)
    ids = [users["alice"], users["bob"], users["carol"]]
    names = []
    for i in range(HAMMER_FILES):
        name = f"file-{i:05d}-" + "n" * 29
        p = d / name
        p.write_bytes(b"data %d" % i)
        who = ids[i % 3]
        os.chown(p, who.uid, who.gid)
        p.chmod((0o644, 0o600, 0o640)[i // 3 % 3])
        names.append(name)
    for i in range(20):
        sub = d / f"dir-{i:02d}"
        sub.mkdir()
        sub.chmod((0o755, 0o700, 0o704, 0o711)[i % 4])
        names.append(sub.name)
    assert os.stat(d).st_size > listing.INLINE_MAX_BYTES, "not read by a worker"
    m = mount_credfs("--inline", inline)
    through = str(mnt / "d")
    hammerers = [agents["alice"], agents["bob"], agents["carol"], agents["root"],
                 make_agent(users["bob"])]
    churner = make_agent(users["carol"])
    calls = [Call(a.do, "hammer_dir", through, names, HAMMER_ROUNDS, seed, timeout=300)
             for seed, a in enumerate(hammerers)]
    calls.append(Call(churner.do, "churn_names", through, 400, timeout=300))
    for c in calls:
        c.start()
    for c in calls:
        c.join(320)
    assert not any(c.is_alive() for c in calls), "an agent never finished"
    problems = []
    for a, c in zip([*hammerers, churner], calls, strict=True):
        status, value = c.result
        if status != "ok":
            problems.append(f"{a.name}: {value}")
        elif isinstance(value, dict) and (value["errors"] or value["strangers"]):
            problems.append(f"{a.name}: {value['errors']} {value['strangers'][:5]}")
    assert not problems, problems
    assert sorted(os.listdir(mnt / "d")) == sorted(os.listdir(d))
    # Everything removed through the mount: the kernel forgets every node of it.
    pid = m.pid
    assert pid is not None
    shutil.rmtree(mnt / "d")
    deadline = time.monotonic() + 30
    while _deleted_descriptors(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _deleted_descriptors(pid)
    assert not left, f"{len(left)} descriptors of removed files still held: {left[:5]}"
    log = m.log
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]
