"""uid/gid mapping (--uid-map/--gid-map) on real mounts, from real user namespaces.

The set-up is a container's: a user namespace whose ids 0..65535 are host ids
100000..165535 (CONTAINER below). credfs, mounted by root in the init
namespace, maps view 100000 (the container's root) to the host user 1500, view
101000..101002 (container uids 1000..1002) to alice, bob and carol (2001..2003),
and gids the same way plus view 103001..103002 to the groups 3001..3002.

The oracle is the kernel: the same operations done natively on an identical
twin tree by the *backing* identity the map gives each container process must
have the same outcomes, and leave the backing tree exactly as natively.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.agents import UserAgent
from helpers.fsops import tree_state
from helpers.trees import Node, build_tree
from helpers.userns import NsAgent
from hypothesis import given
from hypothesis import strategies as st

from credfs.idmap import OVERFLOW_ID, IdMap, IdMapError, IdMapping

NS_BASE = 100000
CONTAINER = [(0, NS_BASE, 65536)]  # the user namespace's uid_map and gid_map
HOST = 1500  # "the host user": the backing identity of the container's root
ALICE, BOB = 2001, 2002
UID_MAP = f"{NS_BASE}:{HOST}:1,{NS_BASE + 1000}:{ALICE}:3"
GID_MAP = f"{NS_BASE}:{HOST}:1,{NS_BASE + 1000}:{ALICE}:3,{NS_BASE + 3001}:3001:2"
MAP_ARGS = ("--uid-map", UID_MAP, "--gid-map", GID_MAP)
MAPPING = IdMapping.parse(UID_MAP, GID_MAP)
assert MAPPING is not None

TREE: tuple[Node, ...] = (
    Node("home", "d", 0o755, HOST, HOST),
    Node("home/own", "f", 0o644, HOST, HOST, b"mine"),
    Node("home/setid", "f", 0o6755, HOST, HOST, b"suid"),
    Node("secret", "f", 0o600, 0, 0, b"root only"),
    Node("shared", "f", 0o660, 0, 3001, b"group 3001"),
    Node("other", "f", 0o640, 0, 3002, b"group 3002"),
    Node("public", "d", 0o1777, 0, 0),
    Node("sgid", "d", 0o2777, 0, 3001),
    Node("rootdir", "d", 0o755, 0, 0),
    Node("alices", "f", 0o644, ALICE, ALICE, b"alice's"),
    Node("acl", "f", 0o640, HOST, HOST, b"acl", acl="u:2001:r,u:4000:r,g:3001:r"),
)


def inner(backing_id: int, idmap: IdMap) -> int:
    """How a backing id looks to a process inside CONTAINER (what stat shows there)."""
    view = idmap.to_view(backing_id)
    return view - NS_BASE if NS_BASE <= view < NS_BASE + 65536 else OVERFLOW_ID


# -- the map itself --------------------------------------------------------------


@pytest.mark.parametrize(("spec", "message"), [
    ("1:2", "--uid-map range '1:2': expected MOUNT_ID:BACKING_ID:COUNT"),
    ("a:b:c", "--uid-map range 'a:b:c': expected MOUNT_ID:BACKING_ID:COUNT"),
    ("-1:2:3", "--uid-map range '-1:2:3': expected MOUNT_ID:BACKING_ID:COUNT"),
    ("1:2:3,", "--uid-map '1:2:3,': expected MOUNT_ID:BACKING_ID:COUNT[,...] (an empty range)"),
    ("0:1000:0", "--uid-map range '0:1000:0': COUNT must be at least 1"),
    ("4294967290:0:10", "--uid-map range '4294967290:0:10': MOUNT_ID+COUNT-1 = 4294967299"),
    ("0:4294967295:1", "--uid-map range '0:4294967295:1': BACKING_ID+COUNT-1 = 4294967295"),
    ("0:1000:10,5:2000:10", "--uid-map: ranges 0:1000:10 and 5:2000:10 overlap on the mount"),
    ("0:1000:10,100:1009:1", "--uid-map: ranges 0:1000:10 and 100:1009:1 overlap on the backing"),
    (",".join(f"{i}:{i}:1" for i in range(341)), "--uid-map: 341 ranges, at most 340"),
])
def test_malformed_maps_are_refused_with_a_clear_message(spec: str, message: str) -> None:
    with pytest.raises(IdMapError) as exc:
        IdMap.parse(spec, "--uid-map")
    assert str(exc.value).startswith(message), str(exc.value)


_ranges = st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(1, 6)),
                   min_size=1, max_size=5)


@given(_ranges, st.integers(0, 60))
def test_map_lookups_agree_with_a_plain_table(ranges: list[tuple[int, int, int]],
                                               probe: int) -> None:
    views = [set(range(v, v + n)) for v, _b, n in ranges]
    backs = [set(range(b, b + n)) for _v, b, n in ranges]
    spec = ",".join(f"{v}:{b}:{n}" for v, b, n in ranges)
    overlapping = any(x & y for s in (views, backs) for i, x in enumerate(s)
                      for y in s[i + 1:])
    if overlapping:
        with pytest.raises(IdMapError, match="overlap"):
            IdMap.parse(spec, "--uid-map")
        return
    m = IdMap.parse(spec, "--uid-map")
    table = {v + k: b + k for v, b, n in ranges for k in range(n)}
    assert m.to_backing(probe) == table.get(probe)
    reverse = {b: v for v, b in table.items()}
    assert m.to_view(probe) == reverse.get(probe, OVERFLOW_ID)


# -- fixtures --------------------------------------------------------------------


@pytest.fixture
def twin(backing: Path, native: Path) -> tuple[Path, Path]:
    for root in (backing, native):
        build_tree(root, TREE)
    return backing, native


NsFactory = Callable[..., NsAgent]


@pytest.fixture
def ns_agent() -> Iterator[NsFactory]:
    """ns_agent(uid, gid, groups) inside CONTAINER; closed at teardown."""
    made: list[NsAgent] = []

    def factory(uid: int, gid: int, groups: list[int], umask: int = 0o022) -> NsAgent:
        a = NsAgent(CONTAINER, CONTAINER, uid, gid, groups, umask)
        made.append(a)
        return a

    yield factory
    for a in made:
        a.close()


def _backing_identity(uid: int, gid: int, groups: list[int]) -> tuple[int, int, list[int]]:
    """The backing identity a container process (inner ids) is given by MAPPING."""
    buid = MAPPING.uids.to_backing(uid + NS_BASE)
    bgid = MAPPING.gids.to_backing(gid + NS_BASE)
    assert buid is not None and bgid is not None
    bgroups = [b for g in groups if (b := MAPPING.gids.to_backing(g + NS_BASE)) is not None]
    return buid, bgid, bgroups


# -- what a container sees and may do ------------------------------------------------


def test_owners_inside_are_the_mapped_ones(twin: tuple[Path, Path], mnt: Path,
                                           mount_credfs: Any, ns_agent: NsFactory) -> None:
    backing, _native = twin
    mount_credfs(*MAP_ARGS)
    croot = ns_agent(0, 0, [0])
    seen = {}
    want = {}
    for node in (Node(".", "d"), *TREE):
        st_b = os.lstat(backing / node.path)
        want[node.path] = (inner(st_b.st_uid, MAPPING.uids), inner(st_b.st_gid, MAPPING.gids))
        status, value = croot.do("stat", str(mnt / node.path))
        assert status == "ok", (node.path, value)
        seen[node.path] = (value["uid"], value["gid"])
    assert seen == want
    # The everyday promise: the host user's directory is the container root's own...
    assert seen["home"] == (0, 0)
    # ...alice's file is the container's uid 1000, and host root's is the overflow id.
    assert seen["alices"] == (1000, 1000)
    assert seen["secret"] == (OVERFLOW_ID, OVERFLOW_ID)
    # Seen from the host (the daemon's namespace) ids are the view ids, 65534 unmapped.
    assert os.stat(mnt / "home").st_uid == NS_BASE
    assert os.stat(mnt / "secret").st_uid == OVERFLOW_ID


# Operations by a container process, with ids in chown given as *backing* ids
# (translated to the container's ids for the process inside).
OPS: list[tuple[str, tuple[Any, ...]]] = [
    ("read", ("home/own",)),
    ("write", ("home/own", b"changed")),
    ("read", ("secret",)),
    ("write", ("secret", b"x")),
    ("read", ("shared",)),
    ("write", ("shared", b"group write")),
    ("read", ("other",)),
    ("read", ("alices",)),
    ("write", ("alices", b"x")),
    ("open_close", ("home/new", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640)),
    ("open_close", ("rootdir/new", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640)),
    ("open_close", ("public/{who}-file", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o666)),
    ("mkdir", ("public/{who}-dir", 0o777)),
    ("open_close", ("sgid/{who}-file", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o666)),
    ("mkdir", ("sgid/{who}-dir", 0o777)),
    ("symlink", ("own", "home/link")),
    ("mkfifo", ("home/fifo", 0o600)),
    ("chmod", ("home/own", 0o600)),
    ("chmod", ("secret", 0o644)),
    ("chown", ("home/own", -1, 3001)),
    ("chown", ("home/own", HOST, HOST)),
    ("chown", ("home/own", BOB, -1)),
    ("chown", ("alices", -1, 3001)),
    ("truncate", ("home/setid", 1)),
    ("utime", ("shared",)),
    ("utime", ("secret",)),
    ("rename", ("home/new", "home/renamed")),
    ("unlink", ("public/{who}-file",)),
    ("unlink", ("alices",)),
    ("rmdir", ("public/{who}-dir",)),
    ("access", ("secret", os.R_OK)),
    ("access", ("shared", os.W_OK)),
]


def _path_args(root: Path, name: str, args: tuple[Any, ...], who: str) -> tuple[Any, ...]:
    out: list[Any] = []
    for i, a in enumerate(args):
        is_target = name == "symlink" and i == 0  # stored as given, never resolved here
        if isinstance(a, str) and (i == 0 or "/" in a) and not is_target:
            a = str(root / a.format(who=who))
        out.append(a)
    return tuple(out)


def _inside_chown(args: tuple[Any, ...]) -> tuple[Any, ...]:
    path, uid, gid = args
    return (path, -1 if uid == -1 else inner(uid, MAPPING.uids),
            -1 if gid == -1 else inner(gid, MAPPING.gids))


@pytest.mark.parametrize(("uid", "gid", "groups"), [
    (0, 0, [0, 3001]),  # the container's root: the host user 1500, with group 3001
    (1000, 1000, [1000, 3001, 3003]),  # container uid 1000: alice, 3003 is not mapped
    (0, 0, [0]),  # the container's root without group 3001
], ids=["root+3001", "uid1000", "root"])
def test_container_process_has_exactly_its_backing_identitys_rights(
        twin: tuple[Path, Path], mnt: Path, mount_credfs: Any, ns_agent: NsFactory,
        make_agent: Any, uid: int, gid: int, groups: list[int]) -> None:
    backing, native = twin
    mount_credfs(*MAP_ARGS, "--cache", "none")
    inside = ns_agent(uid, gid, groups)
    buid, bgid, bgroups = _backing_identity(uid, gid, groups)
    oracle = make_agent(buid, bgid, bgroups)
    assert inside.do("whoami")[1]["uid"] == (uid, uid, uid)
    who = f"u{uid}"
    mismatches = []
    for name, args in OPS:
        args_in = _path_args(mnt, name, args, who)
        args_native = _path_args(native, name, args, who)
        if name == "chown":
            args_in = _inside_chown(args_in)
        got, want = inside.do(name, *args_in), oracle.do(name, *args_native)
        if got != want:
            mismatches.append((name, args, got, want))
    assert not mismatches, "\n".join(map(repr, mismatches))
    got_tree, want_tree = tree_state(str(backing)), tree_state(str(native))
    assert got_tree.keys() == want_tree.keys()
    assert {p: got_tree[p] for p in got_tree if got_tree[p] != want_tree[p]} == \
        {p: want_tree[p] for p in got_tree if got_tree[p] != want_tree[p]}
    # And from inside, every owner is the native one, mapped.
    inside_owners = {p: (s[1]["uid"], s[1]["gid"]) for p in want_tree
                     if (s := inside.do("stat", str(mnt / p)))[0] == "ok"}
    assert inside_owners == {
        p: (inner(want_tree[p]["uid"], MAPPING.uids), inner(want_tree[p]["gid"], MAPPING.gids))
        for p in want_tree if oracle.do("stat", str(native / p))[0] == "ok"}


def test_chown_inside_the_map_works_and_outside_fails_with_einval(
        twin: tuple[Path, Path], mnt: Path, mount_credfs: Any, ns_agent: NsFactory) -> None:
    backing, _native = twin
    mount_credfs(*MAP_ARGS)
    croot = ns_agent(0, 0, [0, 3001])
    own = str(mnt / "home/own")
    assert croot.do("chown", own, -1, 3001) == ("ok", None)  # view 103001 -> backing 3001
    assert os.stat(backing / "home/own").st_gid == 3001
    assert croot.do("chown", own, 0, 0) == ("ok", None)  # its own ids: 1500:1500
    assert (os.stat(backing / "home/own").st_uid, os.stat(backing / "home/own").st_gid) \
        == (HOST, HOST)
    # Inside the container namespace but outside credfs' map: nothing to set.
    for uid, gid in ((5, -1), (-1, 5), (1003, -1), (65000, 65000)):
        assert croot.do("chown", own, uid, gid) == ("err", 22), (uid, gid)
    assert (os.stat(backing / "home/own").st_uid, os.stat(backing / "home/own").st_gid) \
        == (HOST, HOST)


def test_host_root_chowns_through_the_map(twin: tuple[Path, Path], mnt: Path,
                                          mount_credfs: Any) -> None:
    """Root, mapped to itself, chowns with view ids; backing ids are not view ids."""
    backing, _ = twin
    mount_credfs("--uid-map", f"0:0:1,{UID_MAP}", "--gid-map", f"0:0:1,{GID_MAP}")
    os.chown(mnt / "home/own", NS_BASE + 1001, NS_BASE + 3002)
    st_b = os.stat(backing / "home/own")
    assert (st_b.st_uid, st_b.st_gid) == (BOB, 3002)
    with pytest.raises(OSError) as exc:
        os.chown(mnt / "home/own", 1500, -1)  # a backing id, not a view id
    assert exc.value.errno == 22


def test_callers_outside_the_map_are_refused(twin: tuple[Path, Path], mnt: Path,
                                             mount_credfs: Any, ns_agent: NsFactory,
                                             make_agent: Any) -> None:
    m = mount_credfs(*MAP_ARGS)
    stranger = ns_agent(5, 5, [5])  # host 100005: not in credfs' map
    assert stranger.do("stat", str(mnt / "home/own")) == ("err", 13)
    host_user = make_agent(HOST, HOST, [HOST])  # the backing id itself is no view id
    assert host_user.do("listdir", str(mnt)) == ("err", 13)
    assert "outside the mount's uid map" in m.log


def test_new_objects_get_the_mapped_backing_owner(
        twin: tuple[Path, Path], mnt: Path, mount_credfs: Any, ns_agent: NsFactory) -> None:
    backing, _ = twin
    mount_credfs(*MAP_ARGS)
    croot = ns_agent(0, 0, [0, 3001])
    c1000 = ns_agent(1000, 1000, [1000])
    assert croot.do("write", str(mnt / "home/made"), b"x", os.O_CREAT) == ("ok", 1)
    assert croot.do("mkdir", str(mnt / "sgid/rdir")) == ("ok", None)
    assert c1000.do("write", str(mnt / "public/a"), b"x", os.O_CREAT) == ("ok", 1)
    assert c1000.do("symlink", "a", str(mnt / "public/l")) == ("ok", None)
    owners = {p: (os.lstat(backing / p).st_uid, os.lstat(backing / p).st_gid)
              for p in ("home/made", "sgid/rdir", "public/a", "public/l")}
    assert owners == {"home/made": (HOST, HOST), "sgid/rdir": (HOST, 3001),
                      "public/a": (ALICE, ALICE), "public/l": (ALICE, ALICE)}
    # ...and they look like their creators' own from inside.
    assert c1000.do("stat", str(mnt / "public/a"))[1]["uid"] == 1000
    assert croot.do("stat", str(mnt / "sgid/rdir"))[1]["gid"] == 3001


def test_supplementary_groups_are_mapped(twin: tuple[Path, Path], mnt: Path,
                                         mount_credfs: Any, ns_agent: NsFactory,
                                         make_agent: Any) -> None:
    mount_credfs(*MAP_ARGS)
    _, native = twin
    # Inside 3001 is view 103001, backing 3001; inside 3002 is backing 3002.
    with_3001 = ns_agent(0, 0, [0, 3001, 3009])  # 3009: in the namespace, not in credfs' map
    without = ns_agent(0, 0, [0, 3002])
    assert with_3001.do("read", str(mnt / "shared")) == ("ok", b"group 3001")
    assert without.do("read", str(mnt / "shared")) == \
        make_agent(HOST, HOST, [HOST, 3002]).do("read", str(native / "shared"))
    assert without.do("read", str(mnt / "other")) == ("ok", b"group 3002")
    assert with_3001.do("read", str(mnt / "other")) == ("err", 13)


# -- ACLs ---------------------------------------------------------------------------

_ACL_HEADER = struct.pack("<I", 2)
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
NO_ID = 0xFFFFFFFF


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return _ACL_HEADER + b"".join(struct.pack("<HHI", *e) for e in entries)


def _entries(value: bytes) -> list[tuple[int, int, int]]:
    return [struct.unpack_from("<HHI", value, off) for off in range(4, len(value), 8)]


def test_acl_entries_are_mapped_both_ways(twin: tuple[Path, Path], mnt: Path,
                                          mount_credfs: Any, ns_agent: NsFactory,
                                          make_agent: Any) -> None:
    backing, _ = twin
    mount_credfs(*MAP_ARGS)
    croot = ns_agent(0, 0, [0])
    status, value = croot.do("getxattr", str(mnt / "acl"), "system.posix_acl_access")
    assert status == "ok"
    named = {(tag, ident) for tag, _perm, ident in _entries(value) if tag in (2, 8)}
    # 2001 is the container's 1000, 3001 its 3001; 4000 is outside credfs' map: it is
    # shown as the overflow id, which the container's namespace does not map either,
    # so the kernel shows it there as -1, as it shows unmapped ACL ids on idmapped mounts.
    assert named == {(ACL_USER, 1000), (ACL_USER, NO_ID), (ACL_GROUP, 3001)}
    # From the host the view ids show: the overflow id for 4000.
    status, host_view = make_agent(NS_BASE, NS_BASE, [NS_BASE]).do(
        "getxattr", str(mnt / "acl"), "system.posix_acl_access")
    assert {(t, i) for t, _p, i in _entries(host_view) if t in (2, 8)} == {
        (ACL_USER, NS_BASE + 1000), (ACL_USER, OVERFLOW_ID), (ACL_GROUP, NS_BASE + 3001)}

    new = _acl((ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 4, 1001), (ACL_GROUP_OBJ, 4, NO_ID),
               (ACL_GROUP, 4, 3002), (ACL_MASK, 4, NO_ID), (ACL_OTHER, 0, NO_ID))
    assert croot.do("setxattr", str(mnt / "acl"), "system.posix_acl_access", new) == \
        ("ok", None)
    stored = os.getxattr(backing / "acl", "system.posix_acl_access")
    assert {(t, i) for t, _p, i in _entries(stored) if t in (2, 8)} == {
        (ACL_USER, BOB), (ACL_GROUP, 3002)}
    # An id the container has but credfs does not map cannot be written.
    outside = new.replace(struct.pack("<HHI", ACL_USER, 4, 1001),
                          struct.pack("<HHI", ACL_USER, 4, 7))
    assert croot.do("setxattr", str(mnt / "acl"), "system.posix_acl_access", outside) == \
        ("err", 22)
    assert os.getxattr(backing / "acl", "system.posix_acl_access") == stored


# -- mounter mode -----------------------------------------------------------------------


def test_mounter_mode_checks_the_mapped_view_and_creates_as_the_mapped_caller(
        twin: tuple[Path, Path], mnt: Path, mount_credfs: Any, ns_agent: NsFactory) -> None:
    backing, _ = twin
    os.setxattr(backing / "secret", "system.posix_acl_access",
                _acl((ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 4, HOST), (ACL_GROUP_OBJ, 0, NO_ID),
                     (ACL_MASK, 4, NO_ID), (ACL_OTHER, 0, NO_ID)))
    (backing / "secret2").write_bytes(b"no acl")
    (backing / "secret2").chmod(0o600)
    mount_credfs(*MAP_ARGS, "--creds", "mounter", "--cache", "none")
    croot = ns_agent(0, 0, [0])
    stranger = ns_agent(5, 5, [5])
    # The kernel checks the container's root (view 100000) against the mapped view:
    # the ACL entry for 1500 is its entry; a root-only file is not its own.
    assert croot.do("read", str(mnt / "secret")) == ("ok", b"root only")
    assert croot.do("read", str(mnt / "secret2")) == ("err", 13)
    assert croot.do("write", str(mnt / "home/own"), b"ok") == ("ok", 2)
    assert croot.do("chmod", str(mnt / "secret2"), 0o644) == ("err", 1)
    # The root mounter creates as the caller, mapped to its backing identity.
    assert croot.do("write", str(mnt / "public/m"), b"x", os.O_CREAT) == ("ok", 1)
    st_b = os.stat(backing / "public/m")
    assert (st_b.st_uid, st_b.st_gid) == (HOST, HOST)
    assert croot.do("stat", str(mnt / "public/m"))[1]["uid"] == 0
    # A caller with no backing id cannot own what it would create.
    assert stranger.do("write", str(mnt / "public/s"), b"x", os.O_CREAT) == ("err", 75)
    assert not (backing / "public/s").exists()
    assert stat.S_IMODE(os.stat(backing / "secret2").st_mode) == 0o600


def test_mounter_mode_refuses_the_overflow_id_as_a_caller(
        twin: tuple[Path, Path], mnt: Path, mount_credfs: Any, make_agent: Any) -> None:
    """65534 stands for "unmapped" in the view: a caller that is 65534 would be
    taken by the kernel's check for the owner of every unmapped file."""
    backing, _ = twin
    (backing / "public/nobodys").write_bytes(b"x")
    os.chmod(backing / "public/nobodys", 0o600)  # owned by root: unmapped, shown as 65534
    mount_credfs(*MAP_ARGS, "--creds", "mounter")
    nobody = make_agent(OVERFLOW_ID, OVERFLOW_ID, [OVERFLOW_ID])
    assert os.stat(mnt / "public/nobodys").st_uid == OVERFLOW_ID
    assert nobody.do("read", str(mnt / "public/nobodys")) == ("err", 13)
    assert nobody.do("chmod", str(mnt / "public/nobodys"), 0o666) == ("err", 13)
    assert stat.S_IMODE(os.stat(backing / "public/nobodys").st_mode) == 0o600


def test_no_map_is_the_identity(twin: tuple[Path, Path], mnt: Path, mount_credfs: Any,
                                agents: dict[str, UserAgent]) -> None:
    mount_credfs()
    alice = agents["alice"]
    assert alice.do("stat", str(mnt / "alices"))[1]["uid"] == ALICE
    assert os.stat(mnt / "secret").st_uid == 0
