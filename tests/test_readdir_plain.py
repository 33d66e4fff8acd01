"""Plain readdir (FUSE_READDIR) next to readdirplus: the kernel asks for
readdirplus for the first chunk of a listing and after lookups in the
directory, for a plain readdir otherwise (READDIRPLUS_AUTO). Plain chunks
carry names, d_ino and d_type, and make no node, lookup or descriptor in the
daemon.

Oracles: a listing of the backing directory itself (d_ino: the same inodes),
the native twin (names, types, `ls -l`), and what the kernel does to a
listing natively while names come and go.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
from helpers.agents import UserAgent
from helpers.mounts import CredfsMount

pytestmark = pytest.mark.skipif(
    not hasattr(pyfuse3, "readdir_reply_plain"),
    reason="needs pyfuse3 built with scripts/pyfuse3-readdir.patch (plain readdir)")

MountFactory = Callable[..., CredfsMount]
Entry = tuple[str, int, int]  # name, d_ino, d_type
NAME = "entry-with-a-longish-name-{:05d}"


def _fill(d: Path, count: int, mode: int = 0o755, owner: int = 0, group: int = 0) -> None:
    """count files, and a few of every other type among them."""
    d.mkdir()
    for i in range(count):
        (d / NAME.format(i)).touch()
    (d / "subdir").mkdir()
    (d / "link").symlink_to("subdir")
    (d / "dangling").symlink_to("nowhere")
    os.mkfifo(d / "fifo")
    os.chown(d, owner, group)
    d.chmod(mode)


def _chunks(agent: UserAgent, path: Path | str, changes: list[tuple[str, str]] | None = None
            ) -> list[list[Entry]]:
    out = agent.do("getdents_chunks", os.fspath(path), changes)
    assert out[0] == "ok", (path, out)
    return out[1]


def _flat(chunks: list[list[Entry]]) -> list[Entry]:
    return [e for chunk in chunks for e in chunk]


def _no_dots(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if e[0] not in (".", "..")]


def _name_type(entries: list[Entry]) -> list[tuple[str, int]]:
    return sorted((name, d_type) for name, _ino, d_type in entries)


def test_plain_listing_equals_backing(native: Path, backing: Path, mount_credfs: MountFactory,
                                      agents: dict[str, UserAgent]) -> None:
    """Names, d_type and d_ino of a few thousand entries, over many chunks."""
    for root in (native, backing):
        _fill(root / "big", 3000)
    m = mount_credfs()
    for who in ("alice", "root"):
        got = _chunks(agents[who], os.path.join(m.mountpoint, "big"))
        assert len(got) > 2, "expected a listing of several getdents chunks"
        flat = _flat(got)
        assert len(flat) == len({e[0] for e in flat}), "a name listed twice"
        # d_ino: the backing directory lists the same inodes.
        assert sorted(_no_dots(flat)) == sorted(_no_dots(_flat(_chunks(agents[who],
                                                                       backing / "big"))))
        assert _name_type(flat) == _name_type(_flat(_chunks(agents[who], native / "big")))


def test_ls_l_equals_native(native: Path, backing: Path, mount_credfs: MountFactory,
                            agents: dict[str, UserAgent]) -> None:
    """A listing followed by an lstat of every name (the part of the listing
    read plainly has no nodes: each lstat looks its name up)."""
    for root in (native, backing):
        _fill(root / "big", 2000)
    m = mount_credfs()
    for who in ("alice", "root"):
        got = agents[who].do("listdir_stat", os.path.join(m.mountpoint, "big"))
        assert got == agents[who].do("listdir_stat", os.fspath(native / "big")), who
        assert got[0] == "ok" and len(got[1]) == 2004


def test_readable_not_searchable(native: Path, backing: Path, mount_credfs: MountFactory,
                                 agents: dict[str, UserAgent]) -> None:
    """r without x for bob (other): every name and type is listed as natively,
    and each lstat is refused as natively. The first chunk is a readdirplus
    whose names go without a node (scripts/pyfuse3-readpack.patch: every
    chunk carries the backing d_ino) or get placeholder nodes (their d_ino is
    the placeholder's); plain chunks carry the backing d_ino."""
    for root in (native, backing):
        _fill(root / "rx", 1500, mode=0o704)
    m = mount_credfs()
    bob = agents["bob"]
    got = _chunks(bob, os.path.join(m.mountpoint, "rx"))
    assert len(got) > 2
    assert _name_type(_flat(got)) == _name_type(_flat(_chunks(bob, native / "rx")))
    backing_ino = {name: ino for name, ino, _t in _flat(_chunks(bob, backing / "rx"))}
    packed = hasattr(pyfuse3, "readdir_reply_packed")
    for name, ino, _t in _no_dots(_flat(got if packed else got[1:])):
        assert ino == backing_ino[name], name
    ls = bob.do("listdir_stat", os.path.join(m.mountpoint, "rx"))
    assert ls == bob.do("listdir_stat", os.fspath(native / "rx"))
    assert ls[0] == "ok" and {r for _n, r in ls[1]} == {("err", 13)}


def test_names_coming_and_going_during_a_listing(native: Path, backing: Path,
                                                 mount_credfs: MountFactory,
                                                 agents: dict[str, UserAgent]) -> None:
    """After the first chunk, names are created and removed (some not yet
    listed). As natively: no name twice, every name present throughout listed,
    a new name at most once; the next listing shows exactly the new state."""
    for root in (native, backing):
        _fill(root / "busy", 2000)
    m = mount_credfs()
    alice = agents["alice"]
    (native / "busy").chmod(0o777)
    (backing / "busy").chmod(0o777)
    removed = [NAME.format(i) for i in range(0, 2000, 7)]
    added = [f"new-{i:04d}" for i in range(300)]
    before = {n for n, _i, _t in _flat(_chunks(alice, native / "busy"))}
    for root in (native / "busy", Path(m.mountpoint) / "busy"):
        changes = [("unlink", os.fspath(root / n)) for n in removed] + \
            [("create", os.fspath(root / n)) for n in added]
        names = [n for n, _i, _t in _flat(_chunks(alice, root, changes))]
        counts = Counter(names)
        assert [n for n, c in counts.items() if c > 1] == [], root
        assert (before - set(removed)) - set(names) == set(), root
        assert set(names) <= before | set(added), root
        after = {n for n, _i, _t in _flat(_chunks(alice, root))}
        assert after == (before - set(removed)) | set(added), root


HIDING_POLICY = """\
[identities.notalice]
uids = ["2002-2003", 65534]

[[rule]]
name = "secrets hidden from all but alice"
path = "big/secret-*"
who = "notalice"
action = "deny"
errno = "ENOENT"
"""


def test_policy_hidden_names_stay_hidden(backing: Path, workdir: Path,
                                         mount_credfs: MountFactory,
                                         agents: dict[str, UserAgent]) -> None:
    """Names a policy hides from the opener appear in no chunk, plain or plus;
    alice, whom the rule leaves alone, lists them all."""
    _fill(backing / "big", 2000)
    secrets = {f"secret-{i:04d}" for i in range(0, 2000, 10)}
    for name in secrets:
        (backing / "big" / name).touch()
    policy = workdir / "hide.toml"
    policy.write_text(HIDING_POLICY)
    policy.chmod(0o644)
    m = mount_credfs("--policy", os.fspath(policy))
    everything = {n for n, _i, _t in _flat(_chunks(agents["root"], backing / "big"))}
    for who, want in (("bob", everything - secrets), ("carol", everything - secrets),
                      ("alice", everything)):
        got = _chunks(agents[who], os.path.join(m.mountpoint, "big"))
        assert len(got) > 2
        names = [n for n, _i, _t in _flat(got)]
        assert len(names) == len(set(names)) and set(names) == want, who
        ls = agents[who].do("listdir_stat", os.path.join(m.mountpoint, "big"))
        assert ls[0] == "ok" and {n for n, _r in ls[1]} == want - {".", ".."}, who


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_plain_listing_opens_no_descriptor_per_name(backing: Path, mount_credfs: MountFactory,
                                                    agents: dict[str, UserAgent]) -> None:
    """Only the first chunk (readdirplus) gives names nodes, each holding an
    O_PATH descriptor in the daemon; the plain chunks hold none."""
    count = 3000
    _fill(backing / "many", count)
    m = mount_credfs()
    assert m.pid is not None
    before = _open_fds(m.pid)
    got = _chunks(agents["alice"], os.path.join(m.mountpoint, "many"))
    assert len(_no_dots(_flat(got))) == count + 4
    first = len(_no_dots(got[0]))
    grown = _open_fds(m.pid) - before
    # A few more: the directory's own node, its open handle (released soon after).
    assert grown <= first + 8, f"{grown} descriptors for {count} names ({first} in chunk 1)"
    # The names listed plainly are there all the same.
    st = os.lstat(os.path.join(m.mountpoint, "many", NAME.format(count - 1)))
    assert stat.S_ISREG(st.st_mode)
