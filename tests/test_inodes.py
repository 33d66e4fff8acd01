"""Inode lifetime, behind-the-back changes, fail-closed credentials, robustness
and capabilities, in caller mode.

- FORGET is honoured: the O_PATH descriptor the daemon keeps per inode is
  closed once the kernel forgets the inode (drop_caches), so the daemon's
  descriptor count returns to its baseline.
- The daemon says how many inodes it can hold, from its raised fd limit.
- Changes made directly in the backing directory while mounted are seen
  (immediately with --cache none, after the timeout with auto); an open file
  keeps reading its own data; a name replaced behind the back, even by a file
  that got the same inode number, never serves the other file's data.
- A caller the daemon cannot identify is refused (EACCES), unless
  --missing-groups nss; bad requests fail like natively and kill nothing.
- No caller ever borrows the daemon's capabilities.

The oracle is the kernel: the same operation by the same identity directly on
the backing directory (or on a native copy).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers.agents import Identity, Outcome, UserAgent
from helpers.mounts import STOP_TIMEOUT, CredfsMount

MountFactory = Callable[..., CredfsMount]
AgentFactory = Callable[..., UserAgent]

MANY = 2000
FD_SLACK = 16  # descriptors the daemon may open or close on its own (pipes, epoll...)
FORGET_TIMEOUT = 10.0
ROUNDS = 8  # inode-reuse rounds
AUTO_TIMEOUT = 1.0  # --cache auto's entry/attr timeout
CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 0, 1, 2, 3


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def drop_caches() -> None:
    """Evict unused dentries and inodes: the kernel FORGETs them to the daemon."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def wait_for(cond: Callable[[], bool], timeout: float, step: Callable[[], None] | None = None,
             interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if step is not None:
            step()
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def forget_all(m: CredfsMount, baseline: int) -> int:
    """Drop caches (repeatedly: FORGETs arrive asynchronously) until the daemon
    is back near its baseline descriptor count; the count it ended at."""
    assert m.pid is not None
    wait_for(lambda: fd_count(m.pid) <= baseline + FD_SLACK, FORGET_TIMEOUT, step=drop_caches,
             interval=0.25)
    return fd_count(m.pid)


def daemon_holds(pid: int, path: Path) -> bool:
    """Has the daemon a descriptor on path (or on the file that was there)?"""
    names = {os.fspath(path), f"{os.fspath(path)} (deleted)"}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in names:
                return True
    return False


def alive(m: CredfsMount) -> bool:
    return m.proc is not None and m.proc.poll() is None


# -- forget ---------------------------------------------------------------------------


@pytest.mark.parametrize("cache_mode", ["none", "always"])
def test_forget_closes_descriptors(cache_mode: str, mount_credfs: MountFactory, backing: Path,
                                   mnt: Path, agents: dict[str, UserAgent]) -> None:
    """2000 files looked up one by one, then listed with readdirplus (ls -l):
    each time the daemon holds a descriptor per inode, and lets them all go
    once the kernel evicts the inodes."""
    many = backing / "many"
    many.mkdir()
    for i in range(MANY):
        (many / f"f{i:04d}").touch()
    m = mount_credfs("--cache", cache_mode)
    assert m.pid is not None
    root = agents["root"]
    root.call("stat", os.fspath(mnt))
    baseline = fd_count(m.pid)
    for how in ("stat_count", "listdir_stat"):
        got = root.call(how, os.fspath(mnt / "many"))
        assert (got if how == "stat_count" else len(got)) == MANY
        peak = fd_count(m.pid)
        # The count is meaningful: every inode the kernel holds costs one fd.
        assert peak >= baseline + MANY, f"{how}: {peak} fds, baseline {baseline}"
        end = forget_all(m, baseline)
        assert end <= baseline + FD_SLACK, \
            f"{how}: after drop_caches the daemon still has {end} fds (baseline {baseline}, " \
            f"peak {peak}): FORGET not honoured"
    # And the inodes come back when used again.
    assert root.call("stat_count", os.fspath(mnt / "many")) == MANY
    assert alive(m)


def _has_cap_sys_resource() -> bool:
    status = Path("/proc/self/status").read_text()
    eff = int(re.search(r"^CapEff:\s+(\S+)", status, re.M)[1], 16)  # type: ignore[index]
    return bool(eff & (1 << 24))


def test_log_states_inode_capacity_from_raised_fd_limit(mount_credfs: MountFactory) -> None:
    """"up to ~N inodes (RLIMIT_NOFILE M)", and the daemon's limits are M: every
    inode the kernel knows costs the daemon a descriptor. With CAP_SYS_RESOURCE
    (root, normally) it raises soft and hard limits to fs.nr_open, the kernel's
    ceiling, also when started with a low hard limit (at a login's hard limit,
    creating files would fail with EMFILE once that many are cached); without
    it (this sandbox's root lacks it) it raises its soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    privileged = _has_cap_sys_resource()
    start_hard = min(hard, 4096) if privileged else hard  # lowered only if it can come back
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), start_hard))  # inherited
    try:
        m = mount_credfs()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert m.pid is not None
    # The mount shows up a moment before the daemon logs its start line.
    deadline = time.monotonic() + 10
    while not (found := re.search(r"up to ~(\d+) inodes \(RLIMIT_NOFILE (\d+)\)", m.log)) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert found, f"no inode capacity in the log:\n{m.log}"
    n, logged = int(found[1]), int(found[2])
    limits = Path(f"/proc/{m.pid}/limits").read_text()
    row = re.search(r"^Max open files\s+(\S+)\s+(\S+)", limits, re.M)
    assert row, limits
    if privileged:
        expect = int(Path("/proc/sys/fs/nr_open").read_text())
    else:
        expect = hard if hard != resource.RLIM_INFINITY else int(row[2])
    assert logged == expect, f"logged RLIMIT_NOFILE {logged}, expected {expect} " \
        f"(CAP_SYS_RESOURCE: {privileged}; started with hard limit {start_hard})"
    assert (row[1], row[2]) == (str(logged), str(logged)), \
        f"daemon limits soft={row[1]} hard={row[2]}, logged {logged}"
    assert 0 < n < logged


# -- changes behind the mount's back ---------------------------------------------------


def view(agent: UserAgent, root: Path, rel: str) -> dict[str, Outcome]:
    """What agent sees of directory root/rel: the listing, and stat and read of
    every name in it (and of a few names that should not be there)."""
    d = root / rel
    out: dict[str, Outcome] = {".": agent.do("listdir", os.fspath(d)),
                               "./stat": agent.do("stat", os.fspath(d))}
    names = set(out["."][1]) if out["."][0] == "ok" else set()
    for name in sorted(names | {"new", "renamed", "newdir", "newdir2", "gone"}):
        out[name] = agent.do("stat", os.fspath(d / name))
        if out[name][0] == "ok" and stat.S_ISREG(out[name][1]["mode"]):
            out[f"{name}/data"] = agent.do("read", os.fspath(d / name))
    return out


def assert_same_view(agent: UserAgent, mnt: Path, backing: Path, rel: str, step: str) -> None:
    got, want = view(agent, mnt, rel), view(agent, backing, rel)
    diff = {k: (got.get(k), want.get(k)) for k in sorted(set(got) | set(want))
            if got.get(k) != want.get(k)}
    assert not diff, f"{step}: {agent.name}, {{name: (mount, native)}}: {diff}"


@pytest.mark.parametrize("cache_mode", ["none", "auto"])
def test_changes_behind_the_back_are_seen(cache_mode: str, mount_credfs: MountFactory,
                                          backing: Path, mnt: Path,
                                          agents: dict[str, UserAgent]) -> None:
    """Create, rename and remove files and a directory directly in the backing
    dir while mounted: with --cache none the mount shows each change at once;
    with auto, once the 1 s timeout has run out (each step waits it out)."""
    d = backing / "d"
    d.mkdir()
    (d / "gone").write_bytes(b"to be removed")
    (d / "stays").write_bytes(b"stays")
    mount_credfs("--cache", cache_mode)
    wait = (lambda: time.sleep(AUTO_TIMEOUT + 0.25)) if cache_mode == "auto" else (lambda: None)
    users = [agents["alice"], agents["root"]]

    def check(step: str) -> None:
        wait()
        for a in users:
            assert_same_view(a, mnt, backing, "d", step)

    check("before")  # everything is looked up (and cached, for auto) first
    (d / "new").write_bytes(b"created behind the back")
    (d / "newdir").mkdir()
    (d / "newdir" / "inner").write_bytes(b"inner")
    check("after create")
    os.rename(d / "new", d / "renamed")
    os.rename(d / "newdir", d / "newdir2")
    check("after rename")
    for a in users:
        assert_same_view(a, mnt, backing, "d/newdir2", "after rename, inside the dir")
    (d / "renamed").unlink()
    (d / "gone").unlink()
    (d / "newdir2" / "inner").unlink()
    (d / "newdir2").rmdir()
    check("after remove")


def test_open_file_deleted_behind_the_back_reads_its_data(mount_credfs: MountFactory,
                                                          backing: Path, mnt: Path,
                                                          agents: dict[str, UserAgent]) -> None:
    """alice holds the file open through the mount and natively; root removes it
    directly in the backing dir; both descriptors still read the same data and
    report the same attributes (nlink 0)."""
    f = backing / "held"
    f.write_bytes(b"held data")
    f.chmod(0o644)
    mount_credfs("--cache", "none")
    alice = agents["alice"]
    via_mount = alice.call("open_fd", os.fspath(mnt / "held"))
    native = alice.call("open_fd", os.fspath(f))
    try:
        f.unlink()
        assert alice.do("stat", os.fspath(mnt / "held")) == alice.do("stat", os.fspath(f))
        assert alice.do("pread_fd", via_mount, 100) == alice.do("pread_fd", native, 100) \
            == ("ok", b"held data")
        assert alice.do("fstat_fd", via_mount) == alice.do("fstat_fd", native)
        assert alice.call("fstat_fd", native)["nlink"] == 0
    finally:
        alice.call("close_fd", via_mount)
        alice.call("close_fd", native)


@pytest.mark.parametrize("cache_mode", ["none", "auto"])
def test_name_replaced_behind_the_back_never_serves_other_data(
        cache_mode: str, mount_credfs: MountFactory, backing: Path, mnt: Path,
        agents: dict[str, UserAgent]) -> None:
    """victim (data OLD) is held open through the mount; behind the back it is
    removed, many files are created and deleted (freed inode numbers get handed
    out again) and a new victim (data NEW) is created. The holder reads OLD (or gets
    ESTALE/ENOENT), never NEW; a fresh open reads NEW and reaches the new inode.
    Then again without a holder, letting the daemon forget the old inode so that
    its number can go to the new file."""
    d = backing / "d"
    d.mkdir()
    victim = d / "victim"
    victim.write_bytes(b"OLD")
    m = mount_credfs("--cache", cache_mode)
    assert m.pid is not None
    alice = agents["alice"]
    mv = os.fspath(mnt / "d/victim")
    settle = (lambda: time.sleep(AUTO_TIMEOUT + 0.25)) if cache_mode == "auto" else (lambda: None)

    def churn() -> None:  # the freed inode could be reused: make it likely
        for i in range(200):
            (d / f"churn{i}").touch()
        for i in range(200):
            (d / f"churn{i}").unlink()

    held = alice.call("open_fd", mv)
    try:
        assert alice.call("pread_fd", held, 100) == b"OLD"
        victim.unlink()
        churn()
        victim.write_bytes(b"NEW")
        got = alice.do("pread_fd", held, 100)
        assert got in (("ok", b"OLD"), ("err", errno.ESTALE), ("err", errno.ENOENT)), \
            f"holder read {got}"
        settle()
        assert alice.do("read", mv) == ("ok", b"NEW")
        assert alice.call("stat_ino", mv) == victim.stat().st_ino
    finally:
        alice.call("close_fd", held)

    # Without a holder: the daemon lets go of the old inode (FORGET), so the
    # backing filesystem can give its number to the new file (ext4 hands out the
    # lowest free number of the group: fill the holes below first), which must
    # still read NEW. drop_caches also empties the kernel's dentry cache, so
    # no round waits for a timeout.
    pid = m.pid
    reused = 0
    for i in range(ROUNDS):
        old, new = f"OLD{i}".encode(), f"NEW{i}".encode()
        victim.unlink()
        assert wait_for(lambda: not daemon_holds(pid, victim), FORGET_TIMEOUT, drop_caches)
        for j in range(50):
            (d / f"fill{i}-{j}").touch()
        victim.write_bytes(old)
        assert alice.do("read", mv) == ("ok", old), f"round {i}"
        old_ino = victim.stat().st_ino
        victim.unlink()
        assert wait_for(lambda: not daemon_holds(pid, victim), FORGET_TIMEOUT, drop_caches), \
            f"round {i}: the daemon never let go of the removed file"
        victim.write_bytes(new)
        reused += victim.stat().st_ino == old_ino
        assert alice.do("read", mv) == ("ok", new), \
            f"round {i}: inode number reused: {victim.stat().st_ino == old_ino}"
        assert alice.call("stat_ino", mv) == victim.stat().st_ino
    # Not asserted (the backing filesystem decides), but the point of the loop.
    print(f"inode number reused in {reused} of {ROUNDS} rounds")


# -- fail-closed credentials -------------------------------------------------------


class PidnsCredfsMount(CredfsMount):
    """The daemon in a pid namespace of its own (a child of ours), so that none
    of our processes has a pid there: their requests carry pid 0.

    No new mount namespace: the FUSE mount is made in ours, and the daemon's
    /proc/self still works through our procfs."""

    @property
    def argv(self) -> list[str]:
        return ["unshare", "--pid", "--fork", "--kill-child=SIGTERM", *super().argv]

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        # unshare itself does not pass SIGTERM on: signal the daemon (its child).
        if self.proc is not None and self.proc.poll() is None:
            for child in _children(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, 15)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        return super().stop(timeout)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
            out += [int(c) for c in text.split()]
    return out


@pytest.fixture
def pidns_mount(mount_credfs: Callable[..., CredfsMount]) -> Callable[..., CredfsMount]:
    return lambda *args: mount_credfs(*args, kind=PidnsCredfsMount)


def groups_tree(backing: Path) -> None:
    (backing / "public").write_bytes(b"world-readable")
    (backing / "public").chmod(0o644)
    (backing / "group").write_bytes(b"for group 3001")
    os.chown(backing / "group", 0, 3001)
    (backing / "group").chmod(0o640)


def test_invisible_caller_is_refused_by_default(pidns_mount: Callable[..., CredfsMount],
                                               backing: Path, mnt: Path,
                                               agents: dict[str, UserAgent]) -> None:
    """Callers with no pid in the daemon's pid namespace: their groups and
    capabilities cannot be read, so every request fails with EACCES, even a
    read of a world-readable file, even for root."""
    groups_tree(backing)
    m = pidns_mount()
    for name in ("alice", "root"):
        a = agents[name]
        assert a.do("read", os.fspath(backing / "public")) == ("ok", b"world-readable")
        for op, rel in (("read", "public"), ("stat", "public"), ("listdir", "."),
                        ("write", "new")):
            args: tuple[Any, ...] = (b"x", os.O_CREAT) if op == "write" else ()
            assert a.do(op, os.fspath(mnt / rel), *args) == ("err", 13), (name, op, rel)
    assert not (backing / "new").exists()
    assert "not visible in the daemon's pid namespace" in m.log


def test_invisible_caller_with_nss_groups(pidns_mount: Callable[..., CredfsMount],
                                         backing: Path, mnt: Path,
                                         make_agent: AgentFactory,
                                         users: dict[str, Identity],
                                         agents: dict[str, UserAgent]) -> None:
    """With --missing-groups nss the same callers are served, with the groups of
    the group database: alice has no passwd entry, so just her gid (3001 is
    gone), and no capabilities. Oracle: a native agent with exactly those."""
    groups_tree(backing)
    pidns_mount("--missing-groups", "nss")
    alice = users["alice"]
    as_nss = make_agent(alice.uid, alice.gid, [alice.gid])
    for op, rel in (("read", "public"), ("read", "group"), ("stat", "group"),
                    ("listdir", ".")):
        got = agents["alice"].do(op, os.fspath(mnt / rel))
        assert got == as_nss.do(op, os.fspath(backing / rel)), (op, rel, got)
    assert agents["alice"].do("read", os.fspath(mnt / "group")) == ("err", 13)
    assert agents["alice"].do("read", os.fspath(backing / "group"))[0] == "ok"


def test_caller_in_nested_pid_namespace_is_visible(mount_credfs: MountFactory, backing: Path,
                                                   mnt: Path) -> None:
    """The other way round: a caller in a child pid namespace (unshare --pid)
    still has a pid in the daemon's namespace, so credfs reads its real groups
    and serves it exactly as natively (here: the group-3001 file)."""
    groups_tree(backing)
    mount_credfs()

    def cat(path: Path) -> tuple[int, str]:
        p = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "setpriv",
                            "--reuid", "2001", "--regid", "2001", "--groups", "2001,3001,3003",
                            "--", "cat", os.fspath(path)],
                           capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL, check=False)
        return p.returncode, p.stdout

    for rel in ("public", "group"):
        assert cat(mnt / rel) == cat(backing / rel), rel


# -- bad requests -------------------------------------------------------------------


def test_bad_requests_fail_like_natively_and_kill_nothing(mount_credfs: MountFactory,
                                                          backing: Path, mnt: Path,
                                                          workdir: Path,
                                                          agents: dict[str, UserAgent]) -> None:
    """Overlong names, oversized xattrs, huge offsets, unknown xattr namespaces,
    renames the VFS refuses and a whiteout rename: each gives the native outcome
    (and the same resulting tree), the daemon logs no internal error, stays up
    and keeps serving other users."""
    native = workdir / "native"
    for root in (backing, native):
        root.mkdir(exist_ok=True)
        root.chmod(0o777)
        (root / "f").write_bytes(b"data")
        (root / "f").chmod(0o666)
        (root / "d").mkdir()
        (root / "d").chmod(0o777)
        (root / "d/sub").mkdir()
        (root / "w").write_bytes(b"whiteout me")
    m = mount_credfs("--cache", "auto")
    alice, root_agent = agents["alice"], agents["root"]
    name255, name256, name1025 = "n" * 255, "n" * 256, "n" * 1025
    cases: list[tuple[UserAgent, str, tuple[Any, ...]]] = [
        (alice, "stat", ("{r}/" + name256,)),
        (alice, "stat", ("{r}/" + name1025,)),
        (alice, "write", ("{r}/" + name256, b"x", os.O_CREAT)),
        (alice, "mkdir", ("{r}/" + name256,)),
        (alice, "write", ("{r}/" + name255, b"x", os.O_CREAT)),
        (alice, "symlink", ("t" * 4095, "{r}/longlink")),
        (alice, "symlink", ("t" * 4096, "{r}/longlink2")),
        (alice, "setxattr", ("{r}/f", "user.big", b"v" * 65536)),
        (alice, "setxattr", ("{r}/f", "user.big", b"v" * 65537)),
        (alice, "setxattr", ("{r}/f", "user." + "x" * 250, b"v")),
        (alice, "setxattr", ("{r}/f", "user." + "x" * 251, b"v")),
        (alice, "setxattr", ("{r}/f", "nosuchns.x", b"v")),
        (alice, "getxattr", ("{r}/f", "nosuchns.x")),
        (alice, "pwrite", ("{r}/f", b"x", 1 << 62)),
        (alice, "truncate", ("{r}/f", 1 << 62)),
        (alice, "rename", ("{r}/d", "{r}/d/sub/d")),  # into its own subdirectory
        (alice, "rename", ("{r}/d/sub/..", "{r}/x")),
        (alice, "rename2", ("{r}/f", "{r}/g", 3)),  # NOREPLACE|EXCHANGE together
        # RENAME_WHITEOUT: leaves a 0/0 char device behind (unprivileged since 5.8).
        (alice, "rename2", ("{r}/w", "{r}/w2", 4)),
        (root_agent, "rename2", ("{r}/w", "{r}/w2", 4)),
        (alice, "read", ("{r}/d",)),
    ]
    bad = []
    for agent, op, args in cases:
        got = agent.do(op, *(a.format(r=mnt) if isinstance(a, str) else a for a in args))
        want = agent.do(op, *(a.format(r=native) if isinstance(a, str) else a for a in args))
        if got != want:
            shown = tuple(a[:40] + "..." if isinstance(a, str) and len(a) > 40 else
                          a if not isinstance(a, bytes) else f"<{len(a)} bytes>" for a in args)
            bad.append(f"{agent.name} {op}{shown}: mount {got} != native {want}")
    # The mount root itself: the VFS refuses before credfs hears of it.
    got = root_agent.do("rename", os.fspath(mnt), os.fspath(workdir / "moved"))
    assert got[0] == "err", f"renaming the mount root: {got}"
    assert alive(m), f"the daemon died:\n{m.log}"
    assert root_agent.call("tree_state", os.fspath(mnt)) == \
        root_agent.call("tree_state", os.fspath(native))
    assert not bad, "\n".join(bad)
    assert "internal error" not in m.log, m.log
    for name in ("bob", "carol"):
        assert agents[name].do("read", os.fspath(mnt / "f")) == ("ok", b"data"), name


# -- capabilities --------------------------------------------------------------------


def test_unprivileged_caller_never_has_daemon_capabilities(
        mount_credfs: MountFactory, backing: Path, mnt: Path, workdir: Path,
        users: dict[str, Identity], agents: dict[str, UserAgent]) -> None:
    """As alice: mknod a char device, set a trusted.* xattr, give her file to
    bob, read root's 0600 file: refused exactly as natively, nothing changed."""
    native = workdir / "native"
    alice, bob = users["alice"], users["bob"]
    for root in (backing, native):
        root.mkdir(exist_ok=True)
        root.chmod(0o777)
        (root / "hers").write_bytes(b"alice's")
        os.chown(root / "hers", alice.uid, alice.gid)
        (root / "roots").write_bytes(b"root only")
        (root / "roots").chmod(0o600)
    mount_credfs()
    a = agents["alice"]
    cases: list[tuple[str, tuple[Any, ...]]] = [
        ("mknod", ("{r}/dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))),
        ("mknod", ("{r}/blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))),
        ("setxattr", ("{r}/hers", "trusted.x", b"v")),
        ("setxattr", ("{r}/hers", "security.capability", b"\x01\x00\x00\x02" + b"\0" * 16)),
        ("chown", ("{r}/hers", bob.uid, -1)),
        ("chown", ("{r}/hers", -1, 3002)),  # a group she is not in
        ("read", ("{r}/roots",)),
        ("write", ("{r}/roots", b"x")),
        ("chmod", ("{r}/roots", 0o666)),
    ]
    for op, args in cases:
        got = a.do(op, *(x.format(r=mnt) if isinstance(x, str) else x for x in args))
        want = a.do(op, *(x.format(r=native) if isinstance(x, str) else x for x in args))
        assert got == want and want[0] == "err", (op, got, want)
    root = agents["root"]
    assert root.call("tree_state", os.fspath(mnt)) == root.call("tree_state", os.fspath(native))


def test_root_without_dac_capabilities_is_refused(mount_credfs: MountFactory, backing: Path,
                                                  mnt: Path, workdir: Path,
                                                  users: dict[str, Identity],
                                                  make_agent: AgentFactory) -> None:
    """A root process that dropped CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH,
    CAP_FOWNER and CAP_CHOWN is uid 0 without root's powers: credfs must use its
    capabilities, not its uid, and refuse it as natively."""
    native = workdir / "native"
    alice = users["alice"]
    for root in (backing, native):
        root.mkdir(exist_ok=True)
        (root / "secret").write_bytes(b"alice's secret")
        os.chown(root / "secret", alice.uid, alice.gid)
        (root / "secret").chmod(0o600)
        (root / "priv").mkdir()
        (root / "priv/f").write_bytes(b"inside")
        os.chown(root / "priv", alice.uid, alice.gid)
        (root / "priv").chmod(0o700)
    mount_credfs()
    weak = make_agent(0, 0, [0])
    cap_eff = int(weak.call("drop_caps",
                            [CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER]), 16)
    assert cap_eff & 0b1111 == 0, f"CapEff {cap_eff:#x}"
    cases: list[tuple[str, tuple[Any, ...]]] = [
        ("read", ("{r}/secret",)),
        ("write", ("{r}/secret", b"x")),
        ("access_errno", ("{r}/secret", os.R_OK)),
        ("stat", ("{r}/priv/f",)),
        ("listdir", ("{r}/priv",)),
        ("chmod", ("{r}/secret", 0o644)),
        ("chown", ("{r}/secret", 0, 0)),
    ]
    for op, args in cases:
        got = weak.do(op, *(x.format(r=mnt) if isinstance(x, str) else x for x in args))
        want = weak.do(op, *(x.format(r=native) if isinstance(x, str) else x for x in args))
        assert got == want and want[0] == "err", (op, got, want)
    # Control: a full root agent reads it, through the mount and natively.
    full = make_agent(0, 0, [0])
    assert full.do("read", os.fspath(mnt / "secret")) == full.do(
        "read", os.fspath(native / "secret")) == ("ok", b"alice's secret")
