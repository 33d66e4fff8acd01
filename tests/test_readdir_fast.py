"""Listings from packed snapshots, and readdirplus entries without a node.

A snapshot of the backing directory is kept as ready-made FUSE_READDIR
records (scripts/pyfuse3-readpack.patch). In a readdirplus reply, a name gets
a node (a lookup as the opener, a descriptor, a kernel reference) only where
that can be of use: not when the kernel already got that inode from us by
that very name, and not when the name could not be cached anyway (a zero
timeout, a directory not everyone may search). Such names go with node id 0,
which the kernel lists exactly as a plain entry.

Oracles: the native twin (names, types, `ls -l`), a listing of the backing
directory itself (d_ino), and what a file replaced behind the mount's back
looks like natively.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
from helpers.agents import UserAgent
from helpers.mounts import CredfsMount
from test_inodes import FD_SLACK, fd_count, forget_all
from test_readdir_plain import NAME, Entry, _chunks, _fill, _flat, _name_type

pytestmark = pytest.mark.skipif(
    not hasattr(pyfuse3, "readdir_reply_packed"),
    reason="needs pyfuse3 built with scripts/pyfuse3-readpack.patch (packed listings)")

MountFactory = Callable[..., CredfsMount]
ALICE = 2001
SHARED_GROUP = 3001  # alice and bob


def _no_dots(entries: list[Entry]) -> list[Entry]:
    return sorted(e for e in entries if e[0] not in (".", ".."))


def _same_listing(agent: UserAgent, via: Path | str, native: Path, backing: Path) -> None:
    got = _chunks(agent, via)
    assert len(got) > 2, "expected a listing of several getdents chunks"
    flat = _flat(got)
    assert len(flat) == len({e[0] for e in flat}), "a name listed twice"
    assert _name_type(flat) == _name_type(_flat(_chunks(agent, native)))
    # d_ino: the backing directory lists the same inodes, in every chunk.
    assert _no_dots(flat) == _no_dots(_flat(_chunks(agent, backing)))


def test_listing_equals_native_cold_and_after_a_stat_pass(
        native: Path, backing: Path, mount_credfs: MountFactory,
        agents: dict[str, UserAgent]) -> None:
    """Names, d_type and d_ino over many chunks, and `ls -l`, when no name is
    known yet and when every name is (the first chunk, a readdirplus, then
    carries them without a node)."""
    for root in (native, backing):
        _fill(root / "big", 3000)
    m = mount_credfs()
    via = os.path.join(m.mountpoint, "big")
    for who in ("alice", "root"):
        agent = agents[who]
        _same_listing(agent, via, native / "big", backing / "big")
        assert agent.do("stat_count", via) == ("ok", 3004)
        _same_listing(agent, via, native / "big", backing / "big")
        ls = agent.do("listdir_stat", via)
        assert ls == agent.do("listdir_stat", os.fspath(native / "big")), who
        assert ls[0] == "ok" and len(ls[1]) == 3004


@pytest.mark.parametrize("case", ["private-dir", "cache-none"])
def test_uncacheable_names_get_no_node(case: str, native: Path, backing: Path,
                                       mount_credfs: MountFactory,
                                       agents: dict[str, UserAgent]) -> None:
    """Where no name could be cached (a directory not everyone may search, or
    --cache none), a cold listing's first chunk (a readdirplus) gives no name
    a node: the daemon opens no descriptor per name. Each user still lists
    and `ls -l`s as natively: alice (owner), bob (group), carol (refused)."""
    count = 3000
    for root in (native, backing):
        _fill(root / "d", count, mode=0o750 if case == "private-dir" else 0o755,
              owner=ALICE, group=SHARED_GROUP)
    m = mount_credfs(*(("--cache", "none") if case == "cache-none" else ()))
    assert m.pid is not None
    via = os.path.join(m.mountpoint, "d")
    agents["alice"].do("stat", via)
    before = fd_count(m.pid)
    got = _chunks(agents["alice"], via)
    grown = fd_count(m.pid) - before
    first = len(_no_dots(got[0]))
    assert first > 20 and len(_no_dots(_flat(got))) == count + 4
    # A few: the open directory's handle and the daemon's own.
    assert grown <= 8, f"{grown} descriptors for a listing ({first} names in chunk 1)"
    for who in ("alice", "bob", "carol"):
        agent = agents[who]
        want = agent.do("listdir_stat", os.fspath(native / "d"))
        assert agent.do("listdir_stat", via) == want, who
        if who != "carol":
            _same_listing(agent, via, native / "d", backing / "d")


def test_name_replaced_behind_the_back_lists_the_new_file(
        backing: Path, mount_credfs: MountFactory, agents: dict[str, UserAgent]) -> None:
    """A name the kernel has cached (--cache always: an hour, and no watch)
    is replaced on the backing directory between a stat pass and a listing.
    The listing (one readdirplus chunk) gives the new file's node, so an lstat
    after it shows the new file, as natively; a name renamed behind the back
    is listed under its new name and stats as natively too."""
    d = backing / "small"
    _fill(d, 40)
    m = mount_credfs("--cache", "always")
    via = Path(m.mountpoint) / "small"
    alice = agents["alice"]
    assert alice.do("stat_count", os.fspath(via)) == ("ok", 44)
    assert len(_chunks(alice, via)) == 1  # the whole listing is the readdirplus chunk
    replaced = [NAME.format(i) for i in range(0, 40, 5)]
    for name in replaced:
        tmp = d / f".new-{name}"
        tmp.write_bytes(b"x" * 123)
        tmp.chmod(0o600)
        os.rename(tmp, d / name)
    os.rename(d / NAME.format(1), d / "renamed-away")
    listed = {name: ino for name, ino, _t in _flat(_chunks(alice, via))}
    for name in [*replaced, "renamed-away"]:
        want = os.lstat(d / name)
        assert listed[name] == want.st_ino, name
        assert alice.do("stat_ino", os.fspath(via / name)) == ("ok", want.st_ino), name
        assert alice.do("stat", os.fspath(via / name)) == \
            alice.do("stat", os.fspath(d / name)), name


def test_references_balance(backing: Path, mount_credfs: MountFactory,
                            agents: dict[str, UserAgent]) -> None:
    """A cold listing gives the first chunk's names nodes; listing again,
    and after a stat pass, gives no more (the names are in the kernel by
    these names); once the kernel forgets the inodes the daemon holds no
    descriptor for any of them."""
    count = 3000
    _fill(backing / "many", count)
    m = mount_credfs()
    assert m.pid is not None
    via = os.path.join(m.mountpoint, "many")
    alice = agents["alice"]
    alice.do("stat", via)
    baseline = fd_count(m.pid)
    first = len(_no_dots(_chunks(alice, via)[0]))
    after_first = fd_count(m.pid)
    assert after_first >= baseline + first - 8, "the first chunk gave no nodes"
    assert len(_no_dots(_flat(_chunks(alice, via)))) == count + 4
    assert fd_count(m.pid) <= after_first + 8
    assert alice.do("stat_count", via) == ("ok", count + 4)
    peak = fd_count(m.pid)
    assert len(_no_dots(_flat(_chunks(alice, via)))) == count + 4
    assert fd_count(m.pid) <= peak + 8, "known names got nodes again"
    end = forget_all(m, baseline)
    assert end <= baseline + FD_SLACK, f"{end} fds after forget (baseline {baseline})"


@pytest.fixture
def no_dtype_fs(workdir: Path) -> Iterator[Path]:
    """A small ext4 without the filetype feature (every d_type is DT_UNKNOWN),
    loop-mounted under workdir; unmounted after the credfs mount on it."""
    image, root = workdir / "nodtype.img", workdir / "nodtype"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    root.mkdir()
    made = subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^filetype", os.fspath(image)],
                          capture_output=True, timeout=60)
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 -O ^filetype: {made.stderr.decode().strip()}")
    mounted = subprocess.run(["mount", "-o", "loop", os.fspath(image), os.fspath(root)],
                             capture_output=True, timeout=60)
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an image: {mounted.stderr.decode().strip()}")
    try:
        root.chmod(0o755)
        yield root
    finally:
        if subprocess.run(["umount", os.fspath(root)], timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", os.fspath(root)], timeout=60)
        image.unlink()


def test_listing_without_d_type(no_dtype_fs: Path, mount_credfs: MountFactory,
                                workdir: Path, agents: dict[str, UserAgent]) -> None:
    """On a filesystem that gives no d_type, each type is the opener's lstat
    of the name (as the list path does): names and types as natively."""
    for d in ("src", "native"):
        (no_dtype_fs / d).mkdir(mode=0o755)
        _fill(no_dtype_fs / d / "d", 1500)
    raw = _flat(_chunks(agents["root"], no_dtype_fs / "src" / "d"))
    assert {t for _n, _i, t in raw} == {0}, "the filesystem gives d_type after all"
    mnt = workdir / "nodtype-mnt"
    mnt.mkdir(mode=0o755)
    m = mount_credfs(source=no_dtype_fs / "src", mountpoint=mnt)
    via = os.path.join(m.mountpoint, "d")
    alice = agents["alice"]
    got = _flat(_chunks(alice, via))
    assert {t for _n, _i, t in got} >= {1, 4, 8, 10}  # fifo, dir, file, symlink
    want = alice.do("listdir_stat", os.fspath(no_dtype_fs / "native" / "d"))
    assert alice.do("listdir_stat", via) == want
    for name, _ino, d_type in got:
        if name not in (".", ".."):
            assert d_type << 12 == stat.S_IFMT(os.lstat(no_dtype_fs / "src" / "d" / name).st_mode)
