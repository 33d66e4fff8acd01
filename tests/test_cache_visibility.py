"""The kernel's shared caches never carry one caller past a directory it cannot search.

Without default_permissions the kernel does not check search permission while
it walks cached dentries, and the dentry and attribute caches are shared by
every caller. So in caller mode, if alice (or root) looked up
``private/secret`` and the kernel kept that entry, bob could reach it without
credfs ever being asked. credfs caches an entry only when its parent is
searchable by everyone and invalidates cached names when a change through the
mount makes a directory searchable by fewer (see credfs/cache.py).

Every test here runs in each cache mode. The oracle is a native copy of the
same tree: the same operation by the same user on the copy must give the same
outcome (value or errno) as through the mount. The trees are built so that the
native outcome is a refusal, and a positive control shows that the same probes
do reach names where the kernel allows it, so none of this passes vacuously.

"At once" means what a user sees: once alice's chmod (or rename, or setfacl)
through the mount has returned, bob's next access is refused. The sequential
tests check that with bob acting after alice; the "while ... walks" tests with
bob walking the path back to back while alice makes the change, where natively
no walk that starts after the change returned gets through.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.agents import Identity, Outcome, UserAgent
from helpers.mounts import CredfsMount

MountFactory = Callable[..., CredfsMount]

CACHE_MODES = ("none", "auto", "always")
ACL_ACCESS = "system.posix_acl_access"

# Concurrent probes: how long the walker runs, how far into its run the change
# comes, and how many tries (while this was written a stale entry showed up in
# 2-15% of tries, depending on the case, so 80 tries find one almost surely).
WALK_SECONDS = 0.03
WALK_LEAD = 0.01
RACE_TRIES = 80
NATIVE_RACE_TRIES = 10
SEQUENTIAL_ROUNDS = 10


@pytest.fixture(params=CACHE_MODES)
def cache_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- trees ----------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    rel: str
    kind: str  # "dir", "file" or "link"
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    data: bytes = b""  # file contents, or the link target


def build(root: Path, nodes: Iterable[Node]) -> None:
    for n in nodes:
        p = root / n.rel
        if n.kind == "dir":
            p.mkdir()
        elif n.kind == "file":
            p.write_bytes(n.data)
        else:
            os.symlink(n.data, p)
        os.chown(p, n.uid, n.gid, follow_symlinks=False)
        if n.kind != "link":
            p.chmod(n.mode)


def setfacl(path: Path, spec: str) -> None:
    subprocess.run(["setfacl", "-m", spec, os.fspath(path)], check=True, timeout=30,
                   stdin=subprocess.DEVNULL, capture_output=True)


def contents(base: str, owner: int, group: int) -> list[Node]:
    """What sits in every directory under test: a file, a subdirectory (itself
    public) with a file, and a symlink."""
    return [
        Node(f"{base}/f", "file", 0o644, owner, group, f"data of {base}/f".encode()),
        Node(f"{base}/sub", "dir", 0o755, owner, group),
        Node(f"{base}/sub/g", "file", 0o644, owner, group, f"data of {base}/sub/g".encode()),
        Node(f"{base}/ln", "link", data=b"f"),
    ]


def probes(base: str) -> list[tuple[Any, ...]]:
    """Everything a caller might try on names inside base: (fsops name, rel, *args)."""
    return [
        ("stat", f"{base}/f"), ("read", f"{base}/f"), ("access", f"{base}/f", os.R_OK),
        ("stat", f"{base}/sub"), ("listdir", f"{base}/sub"),
        ("listdir_stat", f"{base}/sub"), ("stat", f"{base}/sub/g"),
        ("read", f"{base}/sub/g"), ("access", f"{base}/sub/g", os.R_OK),
        ("readlink", f"{base}/ln"), ("listdir", base), ("listdir_stat", base),
    ]


def refused(outcome: Outcome) -> bool:
    # access() reports a refusal as False rather than an errno.
    return outcome[0] == "err" or outcome == ("ok", False)


class Twin:
    """Runs an operation through the mount and on the native copy, same agent."""

    def __init__(self, mnt: Path, native: Path) -> None:
        self.mnt, self.native = mnt, native

    def both(self, agent: UserAgent, op: str, rel: str, *args: Any) -> tuple[Outcome, Outcome]:
        return (agent.do(op, os.fspath(self.mnt / rel), *args),
                agent.do(op, os.fspath(self.native / rel), *args))

    def mismatches(self, agent: UserAgent, checks: Sequence[tuple[Any, ...]], context: str,
                   expect_refused: bool | None = None) -> list[str]:
        """Run checks; describe every outcome that differs from native (and, when
        expect_refused is given, every native outcome that is not as the tree
        was built to give: that would be a broken test, not a credfs bug)."""
        bad = []
        for op, rel, *args in checks:
            got, want = self.both(agent, op, rel, *args)
            if expect_refused is not None and refused(want) != expect_refused:
                raise AssertionError(f"test tree wrong: native {op} {rel} by {agent.name} "
                                     f"gave {want}")
            if got != want:
                bad.append(f"{context}: {agent.name} {op}({rel}): mount {got} != native {want}")
        return bad


Primer = tuple[str, str, str]  # (agent name, fsops name, rel): someone else's access


def run_primed(twin: Twin, agents: dict[str, UserAgent], primers: Sequence[Primer],
               refused_users: Sequence[str], allowed_users: Sequence[str], base: str) -> None:
    """For each primer: the primer's user touches a name through the mount (and
    natively), then every probe by every refused and allowed user must match
    native, right away."""
    bad: list[str] = []
    checks = probes(base)
    # Before anyone primed anything, too.
    for name in refused_users:
        bad += twin.mismatches(agents[name], checks, "unprimed", expect_refused=True)
    for who, op, rel in primers:
        primer = agents[who]
        held: list[int] = []
        if op == "hold":  # keep the file open through the mount while others probe
            got = primer.do("open_fd", os.fspath(twin.mnt / rel))
            assert got[0] == "ok", f"primer {who} could not open {rel}: {got}"
            held.append(got[1])
        else:
            got, want = twin.both(primer, op, rel)
            assert got == want and got[0] == "ok", \
                f"primer {who} {op}({rel}): mount {got}, native {want}"
        context = f"after {who} {op}({rel})"
        for name in refused_users:
            bad += twin.mismatches(agents[name], checks, context, expect_refused=True)
        for name in allowed_users:
            bad += twin.mismatches(agents[name], checks, context, expect_refused=False)
        for fd in held:
            primer.call("close_fd", fd)
    assert not bad, "\n".join(bad)


def primers_for(base: str, *users: str) -> list[Primer]:
    out: list[Primer] = []
    for u in users:
        out += [(u, "stat", f"{base}/f"), (u, "read", f"{base}/f"), (u, "hold", f"{base}/f"),
                (u, "stat", f"{base}/sub/g"), (u, "readlink", f"{base}/ln"),
                (u, "listdir", base), (u, "listdir_stat", base),
                (u, "listdir_stat", f"{base}/sub")]
    return out


# -- static refusals --------------------------------------------------------------


def test_private_dir_stays_private(cache_mode: str, mount_credfs: MountFactory,
                                   backing: Path, mnt: Path, native: Path,
                                   users: dict[str, Identity],
                                   agents: dict[str, UserAgent]) -> None:
    """0700 dir of alice's inside a public dir: bob is refused everything inside,
    right after alice or root looked up, opened, listed or ls -l'ed it."""
    alice = users["alice"]
    tree = [Node("pub", "dir", 0o755), Node("pub/priv", "dir", 0o700, alice.uid, alice.gid),
            *contents("pub/priv", alice.uid, alice.gid)]
    for root in (backing, native):
        build(root, tree)
    mount_credfs("--cache", cache_mode)
    run_primed(Twin(mnt, native), agents, primers_for("pub/priv", "alice", "root"),
               refused_users=["bob", "carol"], allowed_users=[], base="pub/priv")


def test_group_class_refuses_even_when_other_may_search(
        cache_mode: str, mount_credfs: MountFactory, backing: Path, mnt: Path, native: Path,
        agents: dict[str, UserAgent]) -> None:
    """Mode 0705, group 3001: bob and alice (both in 3001) are refused although
    "other" (carol) may search: the kernel does not fall through to "other"."""
    tree = [Node("pub", "dir", 0o755), Node("pub/grp", "dir", 0o705, 0, 3001),
            *contents("pub/grp", 0, 0)]
    for root in (backing, native):
        build(root, tree)
    mount_credfs("--cache", cache_mode)
    run_primed(Twin(mnt, native), agents, primers_for("pub/grp", "carol", "root"),
               refused_users=["bob", "alice"], allowed_users=["carol"], base="pub/grp")


def test_named_acl_entry_refuses(cache_mode: str, mount_credfs: MountFactory,
                                 backing: Path, mnt: Path, native: Path,
                                 users: dict[str, Identity],
                                 agents: dict[str, UserAgent]) -> None:
    """A 0755 dir with `u:2002:---`: only bob is refused; alice and carol are not,
    and their lookups must not open the way for him."""
    alice, bob = users["alice"], users["bob"]
    tree = [Node("pub", "dir", 0o755), Node("pub/acl", "dir", 0o755, alice.uid, alice.gid),
            *contents("pub/acl", alice.uid, alice.gid)]
    for root in (backing, native):
        build(root, tree)
        setfacl(root / "pub/acl", f"u:{bob.uid}:---")
    mount_credfs("--cache", cache_mode)
    run_primed(Twin(mnt, native), agents, primers_for("pub/acl", "alice", "carol", "root"),
               refused_users=["bob"], allowed_users=["carol", "alice"], base="pub/acl")


def test_public_tree_is_reachable_by_everyone(cache_mode: str, mount_credfs: MountFactory,
                                              backing: Path, mnt: Path, native: Path,
                                              agents: dict[str, UserAgent]) -> None:
    """Positive control: the same probes succeed, for everyone, where the kernel
    allows them (also after someone else cached the names)."""
    tree = [Node("pub", "dir", 0o755), Node("pub/open", "dir", 0o755, 2001, 2001),
            *contents("pub/open", 2001, 2001)]
    for root in (backing, native):
        build(root, tree)
    mount_credfs("--cache", cache_mode)
    run_primed(Twin(mnt, native), agents, primers_for("pub/open", "root"),
               refused_users=[], allowed_users=["alice", "bob", "carol", "root"],
               base="pub/open")


def test_always_cache_really_serves_from_the_kernel(mount_credfs: MountFactory,
                                                    backing: Path, mnt: Path,
                                                    agents: dict[str, UserAgent]) -> None:
    """Guard for the tests below: with --cache always a name under a public dir is
    served from the kernel's cache without asking credfs, so a chmod behind the
    mount's back is not seen (documented: bounded by the timeout). Were this not
    so, the refusals after a chmod or rename through the mount would prove
    nothing about credfs' invalidation."""
    build(backing, [Node("pub", "dir", 0o755), Node("pub/d", "dir", 0o755, 2001, 2001),
                    *contents("pub/d", 2001, 2001)])
    mount_credfs("--cache", "always")
    bob = agents["bob"]
    assert bob.do("stat", os.fspath(mnt / "pub/d/f"))[0] == "ok"
    (backing / "pub/d").chmod(0o700)  # behind the back
    assert refused(bob.do("stat", os.fspath(backing / "pub/d/f")))
    assert bob.do("stat", os.fspath(mnt / "pub/d/f"))[0] == "ok", \
        "the kernel asked credfs again: the cache tests below would pass vacuously"


# -- changes through the mount: sequential ------------------------------------------


def test_chmod_through_mount_refuses_at_once(cache_mode: str, mount_credfs: MountFactory,
                                             backing: Path, mnt: Path, native: Path,
                                             users: dict[str, Identity],
                                             agents: dict[str, UserAgent]) -> None:
    """bob looks names up in alice's 0755 dir (they get cached); alice chmods it
    to 0700 through the mount; as soon as her chmod returns, bob is refused
    everything inside, as natively. Then back to 0755, and again."""
    alice = users["alice"]
    tree = [Node("chm", "dir", 0o755, alice.uid, alice.gid),
            *contents("chm", alice.uid, alice.gid)]
    for root in (backing, native):
        build(root, tree)
    mount_credfs("--cache", cache_mode)
    twin, a, bob = Twin(mnt, native), agents["alice"], agents["bob"]
    bad: list[str] = []
    for rnd in range(SEQUENTIAL_ROUNDS):
        bad += twin.mismatches(bob, probes("chm"), f"round {rnd}, 0755", expect_refused=False)
        for mode in (0o700, 0o711, 0o750):  # owner-only, x without r, group only
            got, want = twin.both(a, "chmod", "chm", mode)
            assert got == want == ("ok", None)
            # No expect_refused: under 0711 bob may still search chm (though
            # not list it); the native outcome decides each probe.
            bad += twin.mismatches(bob, probes("chm"), f"round {rnd}, after chmod {mode:#o}")
            got, want = twin.both(a, "chmod", "chm", 0o755)
            assert got == want == ("ok", None)
            bad += twin.mismatches(bob, probes("chm")[:3], f"round {rnd}, back to 0755",
                                   expect_refused=False)
    assert not bad, "\n".join(bad[:40])


def acl_denying(uid: int) -> bytes:
    """The system.posix_acl_access value of a 0755 dir with `u:UID:---`, as
    setfacl writes it (made on a scratch dir; the xattr format is the kernel's)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        os.chmod(d, 0o755)
        setfacl(Path(d), f"u:{uid}:---")
        return os.getxattr(d, ACL_ACCESS)


def test_acl_set_through_mount_refuses_at_once(cache_mode: str, mount_credfs: MountFactory,
                                               backing: Path, mnt: Path, native: Path,
                                               users: dict[str, Identity],
                                               agents: dict[str, UserAgent]) -> None:
    """Like the chmod case, with alice adding `u:bob:---` (setfacl) through the
    mount after bob's names were cached; and removing it again."""
    alice, bob_id = users["alice"], users["bob"]
    tree = [Node("pub", "dir", 0o755), Node("pub/acl", "dir", 0o755, alice.uid, alice.gid),
            *contents("pub/acl", alice.uid, alice.gid)]
    for root in (backing, native):
        build(root, tree)
    mount_credfs("--cache", cache_mode)
    twin, a, bob = Twin(mnt, native), agents["alice"], agents["bob"]
    value = acl_denying(bob_id.uid)
    bad: list[str] = []
    for rnd in range(SEQUENTIAL_ROUNDS):
        bad += twin.mismatches(bob, probes("pub/acl"), f"round {rnd}, no ACL",
                               expect_refused=False)
        got, want = twin.both(a, "setxattr", "pub/acl", ACL_ACCESS, value)
        assert got == want == ("ok", None)
        bad += twin.mismatches(bob, probes("pub/acl"), f"round {rnd}, after setfacl",
                               expect_refused=True)
        got, want = twin.both(a, "removexattr", "pub/acl", ACL_ACCESS)
        assert got == want == ("ok", None)
    assert not bad, "\n".join(bad[:40])


def test_rename_into_private_dir_refuses_at_once(cache_mode: str, mount_credfs: MountFactory,
                                                 backing: Path, mnt: Path, native: Path,
                                                 users: dict[str, Identity],
                                                 agents: dict[str, UserAgent]) -> None:
    """bob caches names in a public dir (pub/x/..., pub/lone); alice renames pub/x
    and pub/lone into her 0700 dir through the mount; right after, bob is
    refused them under their new names (and finds nothing under the old)."""
    alice = users["alice"]
    u, g = alice.uid, alice.gid
    tree = [Node("pub", "dir", 0o755, u, g), Node("priv", "dir", 0o700, u, g),
            Node("pub/x", "dir", 0o755, u, g), *contents("pub/x", u, g),
            Node("pub/lone", "file", 0o644, u, g, b"lone data")]
    for root in (backing, native):
        build(root, tree)
    mount_credfs("--cache", cache_mode)
    twin, a, bob = Twin(mnt, native), agents["alice"], agents["bob"]
    moves = (("pub/x", "priv/x"), ("pub/lone", "priv/lone"))
    bad: list[str] = []
    for rnd in range(SEQUENTIAL_ROUNDS):
        before = [*probes("pub/x"), ("stat", "pub/lone"), ("read", "pub/lone")]
        bad += twin.mismatches(bob, before, f"round {rnd}, public", expect_refused=False)
        for src, dst in moves:
            for root in (mnt, native):
                assert a.do("rename", os.fspath(root / src), os.fspath(root / dst)) \
                    == ("ok", None)
        after = [*probes("priv/x"), ("stat", "priv/lone"), ("read", "priv/lone")]
        bad += twin.mismatches(bob, after, f"round {rnd}, moved in", expect_refused=True)
        bad += twin.mismatches(bob, before, f"round {rnd}, old names", expect_refused=True)
        for src, dst in moves:
            for root in (mnt, native):
                assert a.do("rename", os.fspath(root / dst), os.fspath(root / src)) \
                    == ("ok", None)
    assert not bad, "\n".join(bad[:40])


# -- changes through the mount while the other caller is walking ---------------------


@dataclass
class RaceResult:
    tries: int = 0
    leaky_tries: int = 0  # tries where a lookup started after the change succeeded
    leaked_lookups: int = 0
    latest_leak_us: float = 0.0  # how long after the change returned
    readable_after_walk: int = 0  # leaky tries where the read right after the walk worked
    readable_later: int = 0  # ... and LATER seconds after that, still

    def summary(self) -> str:
        return (f"{self.leaky_tries}/{self.tries} tries: {self.leaked_lookups} lookups that "
                f"started after the change had returned succeeded, the latest "
                f"{self.latest_leak_us:.0f} us after it; the walker could read the file "
                f"right after its walk (~{(WALK_SECONDS - WALK_LEAD) * 1000:.0f} ms after the "
                f"change) in {self.readable_after_walk} tries, and {LATER} s later still in "
                f"{self.readable_later}")


LATER = 0.2  # re-check of a leak: does it last (a missed invalidation) or not (a late one)?


def _walk(walker: UserAgent, path: Path, out: list[Any]) -> None:
    try:
        out.append(walker.call("stat_loop", os.fspath(path), WALK_SECONDS))
    except BaseException as e:  # reported by the main thread
        out.append(e)


def race(walker: UserAgent, walk_path: Path, read_path: Path, change: Callable[[], int],
         reset: Callable[[], None], tries: int) -> RaceResult:
    """Per try: reset() (which also lets the walker cache the names), then the
    walker lstat()s walk_path back to back while change() runs; change returns
    the CLOCK_MONOTONIC ns at which the change had returned. Any lookup that
    started after that and succeeded got past a refusal; in such a try the
    walker also tries to read read_path once its walk has ended."""
    res = RaceResult()
    for _ in range(tries):
        reset()
        samples: list[Any] = []
        t = threading.Thread(target=_walk, args=(walker, walk_path, samples))
        t.start()
        try:
            time.sleep(WALK_LEAD)  # let the walker get going; not a timing assertion
            done = change()
        finally:
            t.join(timeout=60)
        assert samples and not isinstance(samples[0], BaseException), \
            f"the walker failed: {samples}"
        late = [start - done for start, err in samples[0] if start > done and err == 0]
        res.tries += 1
        if late:
            res.leaky_tries += 1
            res.leaked_lookups += len(late)
            res.latest_leak_us = max(res.latest_leak_us, max(late) / 1000)
            if not refused(walker.do("read", os.fspath(read_path))):
                res.readable_after_walk += 1
                time.sleep(LATER)
                res.readable_later += not refused(walker.do("read", os.fspath(read_path)))
    return res


def test_chmod_while_other_caller_walks(cache_mode: str, mount_credfs: MountFactory,
                                        backing: Path, mnt: Path, native: Path,
                                        users: dict[str, Identity],
                                        agents: dict[str, UserAgent]) -> None:
    """bob keeps stat()ing chm/f while alice chmods chm from 0755 to 0700 through
    the mount. Natively no stat that starts after her chmod returned succeeds;
    through the mount none may either (a stale dentry would let bob in, and
    then on to the file's data). bob's walks look chm itself up again and
    again (entries in the mount root are not cached here), concurrently with
    the chmod, as any walk does once entries expire."""
    alice = users["alice"]
    tree = [Node("chm", "dir", 0o755, alice.uid, alice.gid),
            *contents("chm", alice.uid, alice.gid)]
    for root in (backing, native):
        build(root, tree)
    mount_credfs("--cache", cache_mode)
    a, bob = agents["alice"], agents["bob"]

    def run(root: Path, tries: int) -> RaceResult:
        def reset() -> None:
            a.call("chmod", os.fspath(root / "chm"), 0o755)
            assert bob.do("stat", os.fspath(root / "chm/f"))[0] == "ok"  # now cached

        return race(bob, root / "chm/f", root / "chm/f",
                    change=lambda: int(a.call("chmod_timed", os.fspath(root / "chm"), 0o700)),
                    reset=reset, tries=tries)

    nat = run(native, NATIVE_RACE_TRIES)
    assert nat.leaky_tries == 0, f"natively: {nat.summary()}"
    got = run(mnt, RACE_TRIES)
    assert got.leaky_tries == 0, f"through the mount (--cache {cache_mode}): {got.summary()}"


def test_rename_while_other_caller_walks(cache_mode: str, mount_credfs: MountFactory,
                                         backing: Path, mnt: Path, native: Path,
                                         users: dict[str, Identity],
                                         agents: dict[str, UserAgent]) -> None:
    """bob keeps stat()ing priv/x/f (refused: not there yet) while alice renames
    pub/x to priv/x through the mount. Natively he is refused throughout; no
    stat that starts after her rename returned may succeed through the mount."""
    alice = users["alice"]
    u, g = alice.uid, alice.gid
    tree = [Node("pub", "dir", 0o755, u, g), Node("priv", "dir", 0o700, u, g),
            Node("pub/x", "dir", 0o755, u, g), *contents("pub/x", u, g)]
    for root in (backing, native):
        build(root, tree)
    mount_credfs("--cache", cache_mode)
    a, bob = agents["alice"], agents["bob"]

    def run(root: Path, tries: int) -> RaceResult:
        def reset() -> None:
            if (backing if root == mnt else native).joinpath("priv/x").exists():
                a.call("rename", os.fspath(root / "priv/x"), os.fspath(root / "pub/x"))
            # bob caches pub/x/f under its public name first.
            assert bob.do("stat", os.fspath(root / "pub/x/f"))[0] == "ok"

        return race(bob, root / "priv/x/f", root / "priv/x/f",
                    change=lambda: int(a.call("rename_timed", os.fspath(root / "pub/x"),
                                              os.fspath(root / "priv/x"))),
                    reset=reset, tries=tries)

    nat = run(native, NATIVE_RACE_TRIES)
    assert nat.leaky_tries == 0, f"natively: {nat.summary()}"
    got = run(mnt, RACE_TRIES)
    assert got.leaky_tries == 0, f"through the mount (--cache {cache_mode}): {got.summary()}"
