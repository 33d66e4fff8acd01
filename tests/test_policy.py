"""Policies (`--policy FILE`): rules decide per request, on real mounts, as real uids.

What a policy adds to caller mode is checked against what it says (hidden names
give ENOENT and are left out of listings, a deny gives the rule's errno, an
allow acts with the rule's credentials); everything a policy leaves alone is
checked against the kernel: the same operation by the same agent on a native
twin of the backing tree (workdir/native) must give the same outcome and leave
the same owners, modes and contents behind.

Also here: reloading on SIGHUP while files are open, and the `credfs check` /
`credfs explain` reports and `credfs mount`'s refusal of a bad policy.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from helpers.agents import Identity, Outcome, UserAgent
from helpers.cli import run_cli
from helpers.mounts import CredfsMount, is_mounted, kill_and_unmount
from helpers.trees import Node, build_tree, diff_snapshots, snapshot

POLICIES = Path(__file__).resolve().parent.parent / "policies"
SHARED = POLICIES / "shared-mount.toml"
CONTAINER = POLICIES / "container-volume.toml"
ALICE, BOB, CAROL = 2001, 2002, 2003
NOBODY = 65534  # has a passwd entry ("nobody"): the only agent {user} can match
LOG_TIMEOUT = 10.0
CREATE = os.O_CREAT | os.O_EXCL | os.O_WRONLY

MountFactory = Callable[..., CredfsMount]
AgentFactory = Callable[..., UserAgent]


# -- helpers -------------------------------------------------------------------


def write_policy(path: Path, text: str) -> Path:
    """Replace the file atomically: a reload never reads a half-written policy."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return path


def wait_log(m: CredfsMount, needle: str, count: int, timeout: float = LOG_TIMEOUT) -> None:
    """Wait (bounded) until the daemon's log holds needle at least count times."""
    deadline = time.monotonic() + timeout
    while m.log.count(needle) < count:
        if m.proc is None or m.proc.poll() is not None:
            pytest.fail(f"daemon exited while waiting for {needle!r}; log:\n{m.log}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {count}x {needle!r} in the log after {timeout} s; log:\n{m.log}")
        time.sleep(0.02)


def reload(m: CredfsMount, needle: str) -> None:
    """SIGHUP the daemon and wait for one more needle line than there was."""
    before = m.log.count(needle)
    assert m.pid is not None
    os.kill(m.pid, signal.SIGHUP)
    wait_log(m, needle, before + 1)


def build_both(backing: Path, native: Path, tree: Iterable[Node]) -> None:
    nodes = list(tree)
    build_tree(backing, nodes)
    build_tree(native, nodes)


class Rel(str):
    """An argument that is a path in the tree too (rename's target)."""


class Lit(str):
    """A first argument that is not a path in the tree (symlink's target)."""


class Twin:
    """The same operation by the same agent through the mount and on the native twin."""

    def __init__(self, mnt: Path, native: Path) -> None:
        self.mnt, self.native = mnt, native
        self.bad: list[str] = []

    def m(self, rel: str) -> str:
        return os.fspath(self.mnt / rel)

    def both(self, agent: UserAgent, op: str, rel: str, *args: Any) -> tuple[Outcome, Outcome]:
        """rel, and any further Rel argument, are mapped into each tree."""
        def on(root: Path) -> Outcome:
            first = rel if isinstance(rel, Lit) else Rel(rel)
            return agent.do(op, *(os.fspath(root / a) if isinstance(a, Rel) else a
                                  for a in (first, *args)))
        return on(self.mnt), on(self.native)

    def same(self, agent: UserAgent, op: str, rel: str, *args: Any) -> Outcome:
        """Record a mismatch with native; the mount's outcome."""
        got, want = self.both(agent, op, rel, *args)
        if got != want:
            self.bad.append(f"{agent.name} {op}({rel}{''.join(f', {a!r}' for a in args)}): "
                            f"mount {got} != native {want}")
        return got

    def expect(self, agent: UserAgent, op: str, rel: str, want: Outcome, *args: Any) -> None:
        """Through the mount only: the policy, not the kernel, decides this one."""
        got = agent.do(op, rel if isinstance(rel, Lit) else self.m(rel),
                       *(self.m(a) if isinstance(a, Rel) else a for a in args))
        if got != want:
            self.bad.append(f"{agent.name} {op}({rel}): mount {got}, policy says {want}")

    def finish(self, backing: Path) -> None:
        diff = diff_snapshots(snapshot(self.native), snapshot(backing))
        if diff:
            self.bad.append(f"backing tree differs from native (native != backing):\n{diff}")
        assert not self.bad, "\n".join(self.bad)


ENOENT: Outcome = ("err", 2)
EPERM: Outcome = ("err", 1)
EACCES: Outcome = ("err", 13)
OK_NONE: Outcome = ("ok", None)


# -- shipped policies -------------------------------------------------------------

SHARED_TREE = (
    Node("private", "d", 0o755),
    Node("private/2001", "d", 0o700, ALICE, ALICE),
    Node("private/2001/f", "f", 0o600, ALICE, ALICE, b"alice's\n"),
    # Mode bits would let everyone in: the policy hides it anyway.
    Node("private/2002", "d", 0o755, BOB, BOB),
    Node("private/2002/f", "f", 0o644, BOB, BOB, b"bob's\n"),
    Node("private/nobody", "d", 0o700, NOBODY, NOBODY),
    Node("private/nobody/f", "f", 0o600, NOBODY, NOBODY, b"nobody's\n"),
    Node("private/loose", "f", 0o644, 0, 0, b"a file, not a user's dir\n"),
    Node("pub", "d", 0o777),
    Node("pub/shared", "f", 0o644, 0, 0, b"shared\n"),
    Node("pub/bob700", "d", 0o700, BOB, BOB),
    Node("pub/bob700/f", "f", 0o644, BOB, BOB, b"in bob700\n"),
    Node("pub/sgid", "d", 0o2777, 0, 3001),
)


def test_shared_mount_private_dirs(mount_credfs: MountFactory, backing: Path, mnt: Path,
                                   native: Path, agents: dict[str, UserAgent],
                                   make_agent: AgentFactory) -> None:
    """shared-mount.toml: your own private dir works as natively (by uid, and by
    user name for a user with a passwd entry); everyone else's does not exist;
    root sees all; the rest of the tree behaves exactly as natively."""
    assert pwd.getpwuid(NOBODY).pw_name == "nobody", "test needs the 'nobody' passwd entry"
    build_both(backing, native, SHARED_TREE)
    mount_credfs("--policy", str(SHARED), "--cache", "always")
    t = Twin(mnt, native)
    alice, bob, carol, root = (agents[n] for n in ("alice", "bob", "carol", "root"))
    nobody = make_agent(NOBODY, NOBODY, [NOBODY])

    # Own private dir: exactly as natively, including what gets created.
    for who, mine in ((alice, "private/2001"), (bob, "private/2002"),
                      (nobody, "private/nobody")):
        for op, rel, *args in (("stat", mine), ("listdir", mine), ("read", f"{mine}/f"),
                               ("stat", f"{mine}/f"), ("write", f"{mine}/new", b"n", CREATE),
                               ("mkdir", f"{mine}/sub", 0o750), ("stat", f"{mine}/new"),
                               ("rename", f"{mine}/new", Rel(f"{mine}/sub/moved")),
                               ("chmod", f"{mine}/f", 0o640), ("access_errno", mine, os.W_OK),
                               ("setxattr", f"{mine}/f", "user.k", b"v"),
                               ("getxattr", f"{mine}/f", "user.k"),
                               ("listdir", f"{mine}/sub"), ("unlink", f"{mine}/sub/moved")):
            t.same(who, op, rel, *args)

    # Everyone else's: does not exist, whatever the mode bits say.
    others = {alice: ("private/2002", "private/nobody"),
              bob: ("private/2001", "private/nobody"),
              carol: ("private/2001", "private/2002", "private/nobody"),
              nobody: ("private/2001", "private/2002")}
    for who, hidden in others.items():
        for d in hidden:
            for op, rel, *args in (("stat", d), ("stat", f"{d}/f"), ("read", f"{d}/f"),
                                   ("listdir", d), ("access_errno", d, os.F_OK),
                                   ("write", f"{d}/planted", b"x", CREATE),
                                   ("mkdir", f"{d}/planted_dir"), ("unlink", f"{d}/f"),
                                   ("chmod", d, 0o777), ("getxattr", f"{d}/f", "user.k")):
                t.expect(who, op, rel, ENOENT, *args)
    # ... and is left out of the listing of private/: only one's own shows
    # (private/loose too is "someone else's private directory").
    own = {alice: ["2001"], bob: ["2002"], carol: [], nobody: ["nobody"]}
    for who, names in own.items():
        t.expect(who, "listdir", "private", ("ok", names))
        t.expect(who, "getdents_names", "private", ("ok", sorted([".", "..", *names])))
    # A file directly in private/ is "everyone else's private directory" too.
    t.expect(alice, "stat", "private/loose", ENOENT)

    # The admins (uid 0) see everything, as natively.
    for op, rel in (("listdir", "private"), ("tree_state", "private"),
                    ("read", "private/2002/f")):
        t.same(root, op, rel)

    # Outside private/: as natively (owners, setgid dirs, another user's 0700 dir).
    for who in (alice, bob, carol):
        for op, rel, *args in (("listdir", "pub/bob700"), ("read", "pub/bob700/f"),
                               ("stat", "pub/bob700/f"),
                               ("write", f"pub/by{who.uid}", b"x", CREATE),
                               ("mkdir", f"pub/sgid/d{who.uid}"),
                               ("write", f"pub/sgid/f{who.uid}", b"y", CREATE),
                               ("write", "pub/bob700/g", b"z", CREATE),
                               ("unlink", "pub/shared"), ("access_errno", "pub/bob700", os.R_OK),
                               ("read", "pub/shared")):
            t.same(who, op, rel, *args)
    t.finish(backing)


def test_hidden_name_is_never_served_from_the_cache(
        mount_credfs: MountFactory, backing: Path, mnt: Path, native: Path,
        agents: dict[str, UserAgent]) -> None:
    """The caching rule, with --cache always: right after the owner (or root)
    looked up, opened or listed their private dir, another caller still gets
    ENOENT; the kernel never walks it through a cached name."""
    build_both(backing, native, SHARED_TREE)
    mount_credfs("--policy", str(SHARED), "--cache", "always")
    t = Twin(mnt, native)
    alice, bob, root = agents["alice"], agents["bob"], agents["root"]
    primers: list[tuple[UserAgent, str, str]] = [
        (alice, "stat", "private/2001/f"), (alice, "read", "private/2001/f"),
        (alice, "listdir_stat", "private/2001"), (root, "listdir_stat", "private"),
        (root, "stat", "private/2001/f"), (alice, "listdir_stat", "private"),
    ]
    for primer, op, rel in primers:
        assert primer.do(op, t.m(rel))[0] == "ok", f"{primer.name} {op} {rel}"
        for rel2 in ("private/2001", "private/2001/f"):
            got = bob.do("stat", t.m(rel2))
            if got != ENOENT:
                t.bad.append(f"after {primer.name} {op}({rel}): bob stat({rel2}) -> {got}")
        got = bob.do("listdir", t.m("private"))
        if got != ("ok", ["2002"]):
            t.bad.append(f"after {primer.name} {op}({rel}): bob listdir(private) -> {got}")
    # And the other way round: bob's refusal does not stick to alice.
    t.expect(alice, "read", "private/2001/f", ("ok", b"alice's\n"))
    assert not t.bad, "\n".join(t.bad)


def test_names_that_lead_into_a_hidden_dir(mount_credfs: MountFactory, backing: Path,
                                           mnt: Path, native: Path,
                                           agents: dict[str, UserAgent]) -> None:
    """A symlink bob makes to alice's private dir leads nowhere; a hard link
    alice makes to share one of her files is decided by the name it is reached
    by, whoever last looked up the other name (--cache always)."""
    build_both(backing, native, SHARED_TREE)
    mount_credfs("--policy", str(SHARED), "--cache", "always")
    t = Twin(mnt, native)
    alice, bob = agents["alice"], agents["bob"]
    t.same(bob, "symlink", Lit("../private/2001"), Rel("pub/to_alice"))
    t.expect(bob, "stat", "pub/to_alice/f", ENOENT)
    t.expect(bob, "listdir", "pub/to_alice", ENOENT)
    t.same(bob, "readlink", "pub/to_alice")
    t.same(alice, "link", "private/2001/f", Rel("pub/alices_link"))
    t.same(alice, "chmod", "pub/alices_link", 0o644)
    for primer in (alice, agents["root"], alice):
        # Someone reaches the file by its private name; bob still by the public one.
        assert primer.do("stat", t.m("private/2001/f"))[0] == "ok"
        t.same(bob, "read", "pub/alices_link")
        t.same(bob, "stat", "pub/alices_link")
        t.same(bob, "write", "pub/alices_link", b"no")
        t.expect(bob, "stat", "private/2001/f", ENOENT)
    t.finish(backing)


CONTAINER_TREE = (
    Node("lost+found", "d", 0o700),
    Node(".host", "d", 0o755),
    Node(".host/snap", "f", 0o644, 0, 0, b"snapshot\n"),
    Node(".hostname", "f", 0o644, 0, 0, b"not .host\n"),  # only a prefix of .host
    Node("data", "d", 0o777),
    Node("data/alice600", "f", 0o600, ALICE, ALICE, b"alice's\n"),
    Node("data/bobdir", "d", 0o700, BOB, BOB),
    Node("data/bobdir/f", "f", 0o644, BOB, BOB, b"bob's\n"),
    Node("data/sticky", "d", 0o1777),
    Node("data/sticky/bobs", "f", 0o666, BOB, BOB, b"x"),
    Node("top", "f", 0o664, 0, 3001, b"top\n"),
    Node("lnk", "l", 0o777, 0, 0, b".host/snap"),
)


def test_container_volume(mount_credfs: MountFactory, backing: Path, mnt: Path, native: Path,
                          agents: dict[str, UserAgent]) -> None:
    """container-volume.toml: lost+found and .host do not exist for anyone (root
    too); everything else as natively."""
    build_both(backing, native, CONTAINER_TREE)
    mount_credfs("--policy", str(CONTAINER))
    t = Twin(mnt, native)
    visible = sorted(set(os.listdir(native)) - {"lost+found", ".host"})
    for who in agents.values():
        t.expect(who, "listdir", ".", ("ok", visible))
        for d in ("lost+found", ".host"):
            for op, rel, *args in (("stat", d), ("listdir", d), ("stat", f"{d}/snap"),
                                   ("read", f"{d}/snap"), ("write", f"{d}/new", b"x", CREATE),
                                   ("mkdir", f"{d}/sub"), ("chmod", d, 0o777)):
                t.expect(who, op, rel, ENOENT, *args)
        t.expect(who, "read", "lnk", ENOENT)  # following a symlink into .host
    for who in agents.values():
        for op, rel, *args in (("read", ".hostname"), ("readlink", "lnk"),
                               ("read", "data/alice600"), ("listdir", "data/bobdir"),
                               ("read", "data/bobdir/f"), ("write", "top", b"T"),
                               ("write", f"data/n{who.uid}", b"n", CREATE),
                               ("mkdir", f"data/d{who.uid}", 0o775),
                               ("chmod", "data/alice600", 0o644),
                               ("unlink", "data/sticky/bobs"),
                               ("truncate", "top", 2), ("stat", "top")):
            t.same(who, op, rel, *args)
    t.finish(backing)


def test_container_volume_with_an_id_map(mount_credfs: MountFactory, backing: Path,
                                         mnt: Path, make_agent: Callable[..., UserAgent]
                                         ) -> None:
    """container-volume.toml with --uid-map/--gid-map, as a container's volume
    is served: the caller's ids are mapped before anything is decided or done.
    A caller seen as 2001 acts as backing 1500: it creates files 1500 owns and
    sees them as its own; lost+found stays hidden; another caller of the
    container (2002, mapped to 1501) cannot read 1500's private file."""
    (backing / "lost+found").mkdir()
    (backing / "data").mkdir(mode=0o777)
    (backing / "data").chmod(0o1777)
    mount_credfs("--policy", str(CONTAINER), "--uid-map", "2001:1500:2",
                 "--gid-map", "2001:1500:2")
    alice = make_agent(2001, 2001, [2001])
    bob = make_agent(2002, 2002, [2002])
    assert alice.do("listdir", os.fspath(mnt)) == ("ok", ["data"])
    assert alice.do("stat", os.fspath(mnt / "lost+found"))[1] == ENOENT[1]
    assert alice.call("write", os.fspath(mnt / "data/mine"), b"x", CREATE) == 1
    assert alice.call("chmod", os.fspath(mnt / "data/mine"), 0o600) is None
    st = (backing / "data/mine").stat()
    assert (st.st_uid, st.st_gid) == (1500, 1500)  # the host identity owns it
    seen = alice.call("stat", os.fspath(mnt / "data/mine"))
    assert (seen["uid"], seen["gid"]) == (2001, 2001), seen  # the container sees its own
    assert bob.do("read", os.fspath(mnt / "data/mine")) == EACCES


# -- rule semantics, on a policy of our own --------------------------------------

RULES = """\
version = 1

[defaults]
action = "allow"

[identities.bobs]
uids = [2002]

[identities.range]
uids = ["2002-2010"]

[identities.g3003]
gids = [3003]

[identities.both]
uids = ["2001-2002"]
gids = [3001]

[identities.notalice]
uids = ["2002-2003", 65534]

[[rule]]
name = "narrow deny first"
path = "prec/a/secret"
action = "deny"
errno = "EPERM"

[[rule]]
name = "broad allow after"
path = "prec/a/**"

[[rule]]
name = "narrow allow first"
path = "prec/b/open"
ops = ["lookup", "read"]

[[rule]]
name = "broad deny after"
path = "prec/b/*"
ops = ["read", "write"]
action = "deny"
errno = "EACCES"

[[rule]]
name = "bob only"
path = "prec/c/**"
who = "bobs"
action = "deny"
errno = "EPERM"

[[rule]]
name = "writes only"
path = "prec/c/**"
ops = ["write"]
action = "deny"
errno = "EACCES"

[[rule]]
path = "errs/eacces"
action = "deny"
errno = "EACCES"

[[rule]]
path = "errs/eperm"
action = "deny"
errno = "EPERM"

[[rule]]
path = "errs/enoent"
action = "deny"
errno = "ENOENT"

[[rule]]
name = "hidden from all but alice"
path = "hid/secret/**"
who = "notalice"
action = "deny"
errno = "ENOENT"
"""

# One allow + one deny per identity (the loop writes them): only that identity gets in.
IDENTITY_RULES = "".join(f"""
[[rule]]
path = "ids/{name}/**"
who = "{name}"

[[rule]]
path = "ids/{name}/**"
action = "deny"
errno = "EACCES"
""" for name in ("range", "g3003", "both"))

RULES_TREE = (
    Node("prec", "d", 0o777),
    *(Node(f"prec/{d}", "d", 0o777) for d in "abc"),
    *(Node(f"prec/{f}", "f", 0o666, 0, 0, f.encode()) for f in
      ("a/secret", "a/other", "b/open", "b/other", "c/f")),
    Node("errs", "d", 0o755),
    *(Node(f"errs/{e}", "f", 0o644, 0, 0, b"e") for e in ("eacces", "eperm", "enoent", "fine")),
    Node("hid", "d", 0o755),
    Node("hid/secret", "d", 0o755),
    Node("hid/secret/f", "f", 0o644, 0, 0, b"secret\n"),
    Node("hid/open", "f", 0o644, 0, 0, b"open\n"),
    Node("ids", "d", 0o755),
    *(Node(f"ids/{n}", "d", 0o755) for n in ("range", "g3003", "both")),
    *(Node(f"ids/{n}/f", "f", 0o644, 0, 0, n.encode()) for n in ("range", "g3003", "both")),
)


@pytest.fixture
def rules_policy(workdir: Path) -> Path:
    return write_policy(workdir / "rules.toml", RULES + IDENTITY_RULES)


def test_rules_policy_is_valid(rules_policy: Path) -> None:
    got = run_cli("check", rules_policy)
    assert got.returncode == 0, got.stdout + got.stderr
    assert "valid: 16 rules, 5 identities" in got.stdout


def test_first_match_wins(mount_credfs: MountFactory, backing: Path, mnt: Path, native: Path,
                          rules_policy: Path, agents: dict[str, UserAgent]) -> None:
    """An earlier narrower deny beats a later allow, an earlier narrower allow a
    later deny; a rule whose who or ops do not match is skipped."""
    build_both(backing, native, RULES_TREE)
    mount_credfs("--policy", str(rules_policy))
    t = Twin(mnt, native)
    alice, bob = agents["alice"], agents["bob"]
    for who in (alice, bob, agents["carol"]):
        t.expect(who, "stat", "prec/a/secret", EPERM)
        t.expect(who, "read", "prec/a/secret", EPERM)
        t.same(who, "read", "prec/a/other")
        t.same(who, "write", "prec/a/other", b"w")
        t.same(who, "read", "prec/b/open")
        # "narrow allow first" does not cover write: "broad deny after" does.
        t.expect(who, "write", "prec/b/open", EACCES, b"w")
        t.expect(who, "read", "prec/b/other", EACCES)
        t.same(who, "stat", "prec/b/other")  # lookup: no rule covers it
    for who in (alice, agents["carol"]):
        t.same(who, "read", "prec/c/f")  # "bob only" skipped, "writes only" does not cover read
        t.expect(who, "write", "prec/c/f", EACCES, b"w")
        t.same(who, "listdir", "prec/c")
    t.expect(bob, "read", "prec/c/f", EPERM)
    t.expect(bob, "stat", "prec/c", EPERM)  # "prec/c/**" matches prec/c itself
    assert not t.bad, "\n".join(t.bad)


def test_errno_choice_and_hiding(mount_credfs: MountFactory, backing: Path, mnt: Path,
                                 native: Path, rules_policy: Path,
                                 agents: dict[str, UserAgent]) -> None:
    """Each errno reaches the caller; only ENOENT also hides the name from listings."""
    build_both(backing, native, RULES_TREE)
    mount_credfs("--policy", str(rules_policy))
    t = Twin(mnt, native)
    for who in agents.values():
        for name, err in (("eacces", EACCES), ("eperm", EPERM), ("enoent", ENOENT)):
            for op in ("stat", "read", "access_errno"):
                t.expect(who, op, f"errs/{name}", err, *([os.R_OK] if op == "access_errno"
                                                         else []))
        t.same(who, "read", "errs/fine")
        t.expect(who, "listdir", "errs", ("ok", ["eacces", "eperm", "fine"]))
        # `ls -l`: the listed but denied names fail their stat with the rule's errno.
        t.expect(who, "listdir_stat", "errs", ("ok", [
            ("eacces", EACCES), ("eperm", EPERM),
            ("fine", ("ok", os.stat(native / "errs/fine").st_mode))]))
    assert not t.bad, "\n".join(t.bad)


VAULT_POLICY = """\
[[rule]]
name = "nobody gets to the vault (and so to anything in it)"
path = "vault"
action = "deny"
errno = "EACCES"
"""


@pytest.mark.parametrize("cache", ["none", "auto", "always"])
def test_denied_name_stays_denied_after_a_listing(cache: str, mount_credfs: MountFactory,
                                                 backing: Path, mnt: Path, workdir: Path,
                                                 agents: dict[str, UserAgent]) -> None:
    """A name whose lookup is denied (EACCES, not hidden) is listed, but listing
    its directory must not let the kernel cache it: stat still fails, and
    nothing below it can be reached by walking through it."""
    policy = write_policy(workdir / "vault.toml", VAULT_POLICY)
    build_tree(backing, [Node("vault", "d", 0o755),
                         Node("vault/secret", "f", 0o644, 0, 0, b"secret\n")])
    mount_credfs("--policy", str(policy), "--cache", cache)
    bob = agents["bob"]
    got = {"before": bob.do("read", os.fspath(mnt / "vault/secret"))}
    assert bob.do("listdir", os.fspath(mnt)) == ("ok", ["vault"])
    assert agents["root"].do("listdir_stat", os.fspath(mnt))[0] == "ok"  # readdirplus
    got["after listing: stat vault"] = bob.do("stat", os.fspath(mnt / "vault"))
    got["after listing: read vault/secret"] = bob.do("read", os.fspath(mnt / "vault/secret"))
    assert got == {"before": EACCES, "after listing: stat vault": EACCES,
                   "after listing: read vault/secret": EACCES}


def test_hiding_per_caller_with_cache(mount_credfs: MountFactory, backing: Path, mnt: Path,
                                      native: Path, rules_policy: Path,
                                      agents: dict[str, UserAgent],
                                      make_agent: AgentFactory) -> None:
    """hid/secret exists for alice (and root) only. With --cache always, right
    after alice looked it up or listed hid/, bob still gets ENOENT; and his
    refusal never sticks to alice."""
    build_both(backing, native, RULES_TREE)
    mount_credfs("--policy", str(rules_policy), "--cache", "always")
    t = Twin(mnt, native)
    alice, bob, carol = agents["alice"], agents["bob"], agents["carol"]
    nobody = make_agent(NOBODY, NOBODY, [NOBODY])
    for primer_op, primer_rel in (("stat", "hid/secret/f"), ("listdir_stat", "hid"),
                                  ("listdir_stat", "hid/secret"), ("read", "hid/secret/f")):
        t.same(alice, primer_op, primer_rel)
        for who in (bob, carol, nobody):
            t.expect(who, "stat", "hid/secret", ENOENT)
            t.expect(who, "read", "hid/secret/f", ENOENT)
            t.expect(who, "listdir", "hid", ("ok", ["open"]))
        t.same(alice, "read", "hid/secret/f")
        t.same(alice, "listdir", "hid")
        t.same(agents["root"], "listdir", "hid")
    assert not t.bad, "\n".join(t.bad)


def test_identity_matching(mount_credfs: MountFactory, backing: Path, mnt: Path,
                           native: Path, rules_policy: Path, make_agent: AgentFactory,
                           users: dict[str, Identity]) -> None:
    """uid ranges (bounds included), gids (primary or supplementary), and every
    given key must hold."""
    build_both(backing, native, RULES_TREE)
    mount_credfs("--policy", str(rules_policy))
    t = Twin(mnt, native)
    # (uid, gid, groups) -> the identities it is
    callers: dict[tuple[int, int, tuple[int, ...]], set[str]] = {
        (ALICE, ALICE, (2001, 3001, 3003)): {"g3003", "both"},
        (BOB, BOB, (2002, 3001)): {"range", "both"},
        (CAROL, CAROL, (2003, 3002)): {"range"},
        (2010, 2010, (2010,)): {"range"},  # last of the range
        (2011, 2011, (2011,)): set(),  # one past it
        (5000, 3003, (5000,)): {"g3003"},  # primary gid only
        (5001, 5001, (5001, 3003)): {"g3003"},  # supplementary only
        (ALICE, ALICE, (ALICE,)): set(),  # alice's uid without group 3001: not "both"
        (2002, 3001, (2002,)): {"range", "both"},  # 3001 as the primary gid
    }
    for (uid, gid, groups), ids in callers.items():
        who = make_agent(uid, gid, list(groups))
        who.name = f"{uid}:{gid}:{','.join(map(str, groups))}"
        for name in ("range", "g3003", "both"):
            if name in ids:
                t.same(who, "read", f"ids/{name}/f")
            else:
                t.expect(who, "read", f"ids/{name}/f", EACCES)
    assert not t.bad, "\n".join(t.bad)


# Each operation class denied (EPERM) for the names in its own directory only:
# what a request is counted as (see credfs/operations.py) shows in which calls fail.
OP_DIRS = ("lookup", "list", "read", "write", "create", "delete", "rename", "setattr",
           "xattr", "access")
OPS_POLICY = "".join(f"""
[[rule]]
path = "op/{op}/*"
ops = ["{op}"]
action = "deny"
errno = "EPERM"
""" for op in OP_DIRS)


def _op_battery(base: str) -> list[tuple[set[str], str, tuple[Any, ...]]]:
    """(the op classes that refuse it, fsops name, args: Rel = a path in the tree)."""
    def r(name: str) -> Rel:
        return Rel(f"{base}/{name}")
    return [
        ({"lookup"}, "stat", (r("f"),)),
        ({"lookup"}, "readlink", (r("ln"),)),
        ({"lookup", "list"}, "listdir", (r("d"),)),
        ({"lookup", "read"}, "read", (r("f"),)),
        ({"lookup", "write"}, "write", (r("f"), b"w")),
        ({"lookup", "read", "write"}, "open_close", (r("f"), os.O_RDWR)),
        ({"lookup", "read", "write"}, "open_close", (r("f"), os.O_RDONLY | os.O_TRUNC)),
        ({"lookup", "write"}, "truncate", (r("f"), 1)),
        ({"lookup", "create"}, "write", (r("new"), b"n", CREATE)),
        ({"lookup", "create"}, "mkdir", (r("newd"),)),
        ({"lookup", "create"}, "symlink", (Lit("f"), r("newl"))),
        ({"lookup", "create", "read", "write"}, "link", (r("f"), r("newh"))),
        ({"lookup", "delete"}, "unlink", (r("u"),)),
        ({"lookup", "delete"}, "rmdir", (r("dd"),)),
        ({"lookup", "rename"}, "rename", (r("r"), r("r2"))),
        ({"lookup", "setattr"}, "chmod", (r("f"), 0o640)),
        ({"lookup", "setattr"}, "utime", (r("f"), (1e8, 2e8))),
        ({"lookup", "xattr"}, "setxattr", (r("f"), "user.k", b"v")),
        ({"lookup"}, "getxattr", (r("f"), "user.k")),
        ({"lookup"}, "listxattr", (r("f"),)),
        ({"lookup", "access"}, "access_errno", (r("f"), os.F_OK)),
        ({"lookup", "access", "read"}, "access_errno", (r("f"), os.R_OK)),
        ({"lookup", "access", "write"}, "access_errno", (r("f"), os.W_OK)),
        ({"lookup", "access", "list"}, "access_errno", (r("d"), os.R_OK)),
        ({"lookup", "access", "create"}, "access_errno", (r("d"), os.W_OK)),
        ({"lookup", "access"}, "access_errno", (r("d"), os.X_OK)),
    ]


def test_op_mapping(mount_credfs: MountFactory, backing: Path, mnt: Path, native: Path,
                    workdir: Path, agents: dict[str, UserAgent]) -> None:
    """Which system calls each op class covers: in op/OP/ only the calls counted
    as OP are refused (with the rule's EPERM); every other call there, and
    everything in the other directories, as natively."""
    policy = write_policy(workdir / "ops.toml", OPS_POLICY)
    tree = [Node("op", "d", 0o755)]
    for op in OP_DIRS:
        tree += [Node(f"op/{op}", "d", 0o777),
                 Node(f"op/{op}/f", "f", 0o666, ALICE, ALICE, b"data\n"),
                 Node(f"op/{op}/d", "d", 0o777), Node(f"op/{op}/ln", "l", data=b"f"),
                 Node(f"op/{op}/u", "f", 0o666), Node(f"op/{op}/dd", "d", 0o777),
                 Node(f"op/{op}/r", "f", 0o666)]
    build_both(backing, native, tree)
    mount_credfs("--policy", str(policy))
    t = Twin(mnt, native)
    alice = agents["alice"]
    for op in OP_DIRS:
        for refused_by, fn, args in _op_battery(f"op/{op}"):
            if op in refused_by:
                t.expect(alice, fn, args[0], EPERM, *args[1:])
            else:
                t.same(alice, fn, args[0], *args[1:])
    # Natively the refused calls changed what they name: compare everything else.
    touched = {str(a) for op in OP_DIRS for refused_by, _fn, args in _op_battery(f"op/{op}")
               if op in refused_by for a in args if isinstance(a, Rel)}
    got_state, want_state = snapshot(backing), snapshot(native)
    diff = diff_snapshots({k: v for k, v in want_state.items() if k not in touched},
                          {k: v for k, v in got_state.items() if k not in touched})
    assert not t.bad and not diff, "\n".join([*t.bad, diff])


APPS_POLICY = """\
[apps]
list = "apps.list"

[apps.package."com.example.inline"]
uid = 10070
permissions = ["READ_MEDIA_IMAGES"]

[identities.images]
apps = "*"
permissions = ["READ_MEDIA_IMAGES"]

[[rule]]
name = "each app its own dir"
path = "media/{package}/**"

[[rule]]
name = "shared pictures for apps granted images"
path = "media/pictures/**"
who = "images"

[[rule]]
path = "media/*/**"
action = "deny"
errno = "ENOENT"
"""
APP_LIST = """\
# package uid permissions
com.example.cam 10057 READ_MEDIA_IMAGES,ACCESS_MEDIA_LOCATION
com.example.notes 10061
com.example.cam.helper 10057
"""


def test_apps_and_package_placeholder(mount_credfs: MountFactory, backing: Path, mnt: Path,
                                      native: Path, workdir: Path,
                                      make_agent: AgentFactory) -> None:
    """Identities by app and permission (the app list file and inline apps), and
    {package}, which binds any of the packages sharing the caller's uid."""
    (workdir / "apps.list").write_text(APP_LIST)
    policy = write_policy(workdir / "apps.toml", APPS_POLICY)
    dirs = ("com.example.cam", "com.example.cam.helper", "com.example.notes",
            "com.example.inline", "pictures")
    build_both(backing, native, [Node("media", "d", 0o755),
                                 *(Node(f"media/{d}", "d", 0o777) for d in dirs),
                                 *(Node(f"media/{d}/f", "f", 0o644, 0, 0, d.encode())
                                   for d in dirs)])
    mount_credfs("--policy", str(policy))
    t = Twin(mnt, native)
    sees = {10057: {"com.example.cam", "com.example.cam.helper", "pictures"},
            10061: {"com.example.notes"},
            10070: {"com.example.inline", "pictures"},
            2001: set()}  # not an app
    for uid, visible in sees.items():
        who = make_agent(uid, uid, [uid])
        t.expect(who, "listdir", "media", ("ok", sorted(visible)))
        for d in dirs:
            if d in visible:
                t.same(who, "read", f"media/{d}/f")
                t.same(who, "write", f"media/{d}/by{uid}", b"x", CREATE)
            else:
                t.expect(who, "read", f"media/{d}/f", ENOENT)
    t.finish(backing)


# -- credentials per rule -------------------------------------------------------

CREDS_POLICY = """\
[[rule]]
path = "cr/caller/**"
creds = "caller"

[[rule]]
path = "cr/fixed/**"
creds = "5000:5001"

[[rule]]
path = "cr/mounter/**"
creds = "mounter"
"""

CREDS_TREE = (
    Node("cr", "d", 0o755),
    Node("cr/caller", "d", 0o777),
    # Only the fixed identity may write here: alice gets in because the rule says so.
    Node("cr/fixed", "d", 0o700, 5000, 5001),
    Node("cr/mounter", "d", 0o777),
)


def _owner(p: Path) -> tuple[int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid


def test_credentials_per_rule(mount_credfs: MountFactory, backing: Path, mnt: Path,
                              native: Path, workdir: Path, agents: dict[str, UserAgent]
                              ) -> None:
    """Who owns what a rule lets the caller create: caller -> the caller (as
    natively); "UID:GID" -> that identity; mounter (root) -> the caller's
    fsuid/fsgid, like overlayfs; mounter --mounter 4000:4000 -> 4000:4000."""
    policy = write_policy(workdir / "creds.toml", CREDS_POLICY)
    build_both(backing, native, CREDS_TREE)
    alice = agents["alice"]
    native_file = native / "cr/caller/f"
    alice.call("write", os.fspath(native_file), b"x", CREATE)
    alice.call("mkdir", os.fspath(native / "cr/caller/d"))
    natively = _owner(native_file)
    assert natively == (ALICE, ALICE)

    m = mount_credfs("--policy", str(policy))
    got: dict[str, Any] = {}
    for sub in ("caller", "fixed", "mounter"):
        got[f"{sub}/f"] = alice.do("write", os.fspath(mnt / f"cr/{sub}/f"), b"x", CREATE)
        got[f"{sub}/d"] = alice.do("mkdir", os.fspath(mnt / f"cr/{sub}/d"))
    assert all(v == ("ok", 1) or v == OK_NONE for v in got.values()), got
    owners = {k: _owner(backing / "cr" / k) for k in got}
    assert owners == {
        "caller/f": natively, "caller/d": _owner(native / "cr/caller/d"),
        "fixed/f": (5000, 5001), "fixed/d": (5000, 5001),
        "mounter/f": natively, "mounter/d": natively,
    }
    # The fixed identity acts, not alice: her own rights do not matter there...
    assert alice.do("read", os.fspath(mnt / "cr/fixed/f")) == ("ok", b"x")
    assert alice.do("listdir", os.fspath(native / "cr/fixed")) == EACCES
    m.stop()

    for k in got:
        p = backing / "cr" / k
        os.rmdir(p) if p.is_dir() else os.unlink(p)
    mount_credfs("--policy", str(policy), "--mounter", "4000:4000")
    assert alice.do("write", os.fspath(mnt / "cr/mounter/f"), b"x", CREATE) == ("ok", 1)
    assert alice.do("mkdir", os.fspath(mnt / "cr/mounter/d")) == OK_NONE
    assert alice.do("write", os.fspath(mnt / "cr/caller/f"), b"x", CREATE) == ("ok", 1)
    assert {k: _owner(backing / "cr" / k) for k in ("mounter/f", "mounter/d", "caller/f")} \
        == {"mounter/f": (4000, 4000), "mounter/d": (4000, 4000), "caller/f": natively}


# -- reload -------------------------------------------------------------------------

RELOADED = "policy reloaded from"
REFUSED = "policy reload refused"

DENY_ALICE_READS = """\
[identities.alice]
uids = [2001]

[[rule]]
path = "rl/**"
who = "alice"
ops = ["read"]
action = "deny"
errno = "EPERM"
"""


def test_reload_while_in_use(mount_credfs: MountFactory, backing: Path, mnt: Path,
                             workdir: Path, agents: dict[str, UserAgent]) -> None:
    """SIGHUP: an open file keeps its decision, new opens get the new one; an
    invalid file is refused (reason logged) and the old policy stays; the
    daemon serves throughout."""
    build_tree(backing, [Node("rl", "d", 0o755), Node("rl/f", "f", 0o644, 0, 0, b"data\n")])
    policy = write_policy(workdir / "p.toml", "version = 1\n")
    m = mount_credfs("--policy", str(policy))
    alice, bob = agents["alice"], agents["bob"]
    f = os.fspath(mnt / "rl/f")
    fd = alice.call("open_fd", f)
    dfd = alice.call("open_fd", os.fspath(mnt / "rl"), os.O_RDONLY | os.O_DIRECTORY)

    write_policy(policy, DENY_ALICE_READS)
    reload(m, RELOADED)
    assert alice.do("pread_fd", fd, 100) == ("ok", b"data\n")  # opened before: still allowed
    assert alice.do("read", f) == EPERM  # a new open: the new policy
    assert alice.do("stat", f)[0] == "ok"  # lookup is not a read
    assert bob.do("read", f) == ("ok", b"data\n")

    # An invalid file: refused with its reason, the previous policy stays in force.
    write_policy(policy, DENY_ALICE_READS.replace('errno = "EPERM"', 'errno = "EWHATEVER"'))
    reload(m, REFUSED)
    assert re.search(rf"ERROR .*{REFUSED}: {re.escape(str(policy))}:9: errno: 'EWHATEVER'",
                     m.log), m.log
    assert alice.do("read", f) == EPERM
    assert alice.do("pread_fd", fd, 100) == ("ok", b"data\n")
    assert bob.do("read", f) == ("ok", b"data\n")

    # Back to allowing: new opens work again, the old fds too.
    write_policy(policy, "version = 1\n")
    reload(m, RELOADED)
    assert alice.do("read", f) == ("ok", b"data\n")
    assert alice.do("pread_fd", fd, 100) == ("ok", b"data\n")
    alice.call("close_fd", fd)
    alice.call("close_fd", dfd)
    assert m.proc is not None and m.proc.poll() is None
    assert is_mounted(mnt)


HIDE_RL_FROM_BOB = """\
[identities.bob]
uids = [2002]

[[rule]]
path = "rl/**"
who = "bob"
action = "deny"
errno = "ENOENT"
"""


@pytest.mark.parametrize("cache", ["none", "always"])
def test_reload_that_hides_a_cached_name(cache: str, mount_credfs: MountFactory,
                                         backing: Path, mnt: Path, workdir: Path,
                                         agents: dict[str, UserAgent]) -> None:
    """A name everyone could look up (so the kernel may cache it) becomes hidden
    from bob by a reload: bob gets ENOENT on his very next lookup, as a name
    decided per caller is never cached."""
    build_tree(backing, [Node("rl", "d", 0o755), Node("rl/f", "f", 0o644, 0, 0, b"data\n")])
    policy = write_policy(workdir / "p.toml", "version = 1\n")
    m = mount_credfs("--policy", str(policy), "--cache", cache)
    bob = agents["bob"]
    for rel in ("rl", "rl/f"):
        assert bob.do("stat", os.fspath(mnt / rel))[0] == "ok"
    write_policy(policy, HIDE_RL_FROM_BOB)
    reload(m, RELOADED)
    got = {rel: bob.do("stat", os.fspath(mnt / rel)) for rel in ("rl", "rl/f")}
    assert got == {"rl": ENOENT, "rl/f": ENOENT}
    assert bob.do("listdir", os.fspath(mnt)) == ("ok", [])


# -- credfs check / explain / mount refusal ----------------------------------------

GOOD_HEAD = "version = 1\n\n[identities.staff]\nuids = [2001]\n\n"

# (name, policy text, app list text or None, [(file, line, key words)], problem count)
# file "P" is the policy, "A" the app list.
BAD_CASES: list[tuple[str, str, str | None, list[tuple[str, int, tuple[str, ...]]]]] = [
    ("bad_toml", GOOD_HEAD + '[[rule]]\npath = "x"\naction = allow\n', None,
     [("P", 8, ("not valid TOML",))]),
    ("unknown_key", GOOD_HEAD + '[[rule]]\npath = "x"\nacton = "deny"\n', None,
     [("P", 8, ("rule 1", "unknown key 'acton'", "action"))]),
    ("unknown_top_key", 'rules = 3\n' + GOOD_HEAD, None,
     [("P", 1, ("unknown key 'rules'",))]),
    ("bad_pattern_doublestar", GOOD_HEAD + '[[rule]]\nname = "n"\npath = "a/b**"\n', None,
     [("P", 8, ("rule 1", "'**' must be a whole segment"))]),
    ("bad_pattern_absolute", GOOD_HEAD + '[[rule]]\npath = "/etc"\n', None,
     [("P", 7, ("leading '/'",))]),
    ("bad_pattern_bracket", GOOD_HEAD + '[[rule]]\npath = "a/[bc"\n', None,
     [("P", 7, ("unclosed '['",))]),
    ("unknown_placeholder", GOOD_HEAD + '[[rule]]\npath = "home/{name}/**"\n', None,
     [("P", 7, ("unknown placeholder {name}", "uid"))]),
    ("unknown_identity", GOOD_HEAD + '[[rule]]\npath = "x"\nwho = ["staff", "stuff"]\n',
     None, [("P", 8, ("unknown identity 'stuff'", "staff"))]),
    ("bad_errno", GOOD_HEAD + '[[rule]]\npath = "x"\naction = "deny"\nerrno = "EIO"\n', None,
     [("P", 9, ("errno", "'EIO'", "EACCES", "EPERM", "ENOENT"))]),
    ("bad_default_errno", '[defaults]\naction = "deny"\nerrno = 13\n', None,
     [("P", 3, ("errno", "EACCES"))]),
    ("bad_creds", GOOD_HEAD + '[[rule]]\npath = "x"\ncreds = "root"\n', None,
     [("P", 8, ("creds", "'root'", "caller", "mounter", "UID:GID"))]),
    ("bad_creds_gid", GOOD_HEAD + '[[rule]]\npath = "x"\ncreds = "1000:"\n', None,
     [("P", 8, ("creds", "'1000:'"))]),
    ("unknown_op", GOOD_HEAD + '[[rule]]\npath = "x"\nops = ["read", "exec"]\n', None,
     [("P", 8, ("unknown operation 'exec'", "lookup"))]),
    ("bad_uid_range", "[identities.x]\nuids = [1, \"10-5\"]\n", None,
     [("P", 2, ("uids", "'10-5'", "range"))]),
    ("bad_uid_negative", "[identities.x]\ngids = [-1]\n", None,
     [("P", 2, ("gids", "-1"))]),
    ("missing_app_list", '[apps]\nlist = "nosuch.list"\n', None,
     [("P", 2, ("apps.list", "cannot read", "nosuch.list", "No such file"))]),
    ("bad_app_list_line", '[apps]\nlist = "apps.list"\n',
     "# comment\ncom.example.a 10001 READ_MEDIA_IMAGES\ncom.example.b ten\n",
     [("A", 3, ("uid 'ten'",))]),
    ("bad_app_list_perm", '[apps]\nlist = "apps.list"\n',
     "com.example.a 10001 read_media\n",
     [("A", 1, ("'read_media'", "permission"))]),
    ("deny_with_creds", GOOD_HEAD + '[[rule]]\npath = "x"\naction = "deny"\ncreds = "caller"\n',
     None, [("P", 9, ("creds only applies to allow rules",))]),
    ("unknown_filter", '[defaults]\nfilters = ["redact"]\n', None,
     [("P", 2, ("unknown filter 'redact'",))]),
    ("bad_version", "version = 2\n", None, [("P", 1, ("version", "1"))]),
    ("several", GOOD_HEAD + '[[rule]]\npath = "x"\nops = ["nap"]\n\n[[rule]]\npath = "y"\n'
     'who = "ghost"\n', None,
     [("P", 8, ("unknown operation 'nap'",)), ("P", 12, ("unknown identity 'ghost'",))]),
]


def _write_case(workdir: Path, name: str, text: str, app_list: str | None) -> Path:
    d = workdir / name
    d.mkdir()
    if app_list is not None:
        (d / "apps.list").write_text(app_list)
    return write_policy(d / "policy.toml", text)


@pytest.mark.parametrize(("name", "text", "app_list", "problems"), BAD_CASES,
                         ids=[c[0] for c in BAD_CASES])
def test_check_reports_each_mistake(name: str, text: str, app_list: str | None,
                                    problems: list[tuple[str, int, tuple[str, ...]]],
                                    workdir: Path) -> None:
    path = _write_case(workdir, name, text, app_list)
    got = run_cli("check", path)
    assert got.returncode == 1, got
    lines = got.stdout.splitlines()
    n = len(problems)
    assert lines[-1] == f"{path}: invalid ({n} problem{'s' if n != 1 else ''})", got.stdout
    assert len(lines) == n + 1, got.stdout
    for line, (which, lineno, words) in zip(lines, problems, strict=False):
        file = path if which == "P" else path.parent / "apps.list"
        assert line.startswith(f"{file}:{lineno}: "), f"{line!r}: wanted {file}:{lineno}"
        for w in words:
            assert w in line, f"{w!r} not in {line!r}"


@pytest.mark.parametrize("policy", [SHARED, CONTAINER], ids=["shared", "container"])
def test_check_shipped_policies(policy: Path) -> None:
    got = run_cli("check", policy)
    assert got.returncode == 0, got
    rules = policy.read_text().count("[[rule]]")
    assert re.fullmatch(rf"{re.escape(str(policy))}: valid: {rules} rules, \d+ identities, "
                        r"0 apps; default: allow as caller\n", got.stdout), got.stdout


def test_check_app_lists(workdir: Path) -> None:
    """A valid policy with an app list file and inline apps."""
    (workdir / "apps.list").write_text("com.example.a 10001 READ_MEDIA_IMAGES\n"
                                       "com.example.b 10002\n")
    p = write_policy(workdir / "p.toml", '[apps]\nlist = "apps.list"\n'
                     '[apps.package."com.example.c"]\nuid = 10003\n'
                     '[identities.photo]\napps = "*"\npermissions = ["READ_MEDIA_IMAGES"]\n')
    got = run_cli("check", p)
    assert (got.returncode, got.stdout) == (0, f"{p}: valid: 0 rules, 1 identities, 3 apps; "
                                               "default: allow as caller\n")


def test_mount_refuses_invalid_policy(backing: Path, mnt: Path, workdir: Path) -> None:
    bad = _write_case(workdir, "bad", GOOD_HEAD + '[[rule]]\npath = "x"\nwho = "ghost"\n', None)
    try:
        got = run_cli("mount", backing, mnt, "--policy", bad, "--foreground")
        assert got.returncode == 2, got
        assert "invalid policy" in got.stderr
        assert f"{bad}:8: rule 1: who: unknown identity 'ghost'" in got.stderr, got.stderr
        assert not is_mounted(mnt)
        # Daemonizing: refused the same way, before forking.
        got = run_cli("mount", backing, mnt, "--policy", bad)
        assert got.returncode == 2 and "unknown identity 'ghost'" in got.stderr, got
        assert not is_mounted(mnt)
        # A policy that cannot be read at all.
        got = run_cli("mount", backing, mnt, "--policy", workdir / "nosuch.toml", "-f")
        assert got.returncode == 2 and "cannot read" in got.stderr, got
        assert not is_mounted(mnt)
    finally:
        kill_and_unmount(mnt)


@pytest.mark.parametrize("creds", ["caller", "mounter"])
def test_mount_refuses_creds_with_policy(creds: str, backing: Path, mnt: Path) -> None:
    try:
        got = run_cli("mount", backing, mnt, "--policy", SHARED, "--creds", creds, "-f")
        assert got.returncode == 2, got
        assert "--creds" in got.stderr and "--policy" in got.stderr, got.stderr
        assert not is_mounted(mnt)
    finally:
        kill_and_unmount(mnt)


def explain(policy: Path, *args: str) -> tuple[int, str]:
    got = run_cli("explain", "--policy", policy, *args)
    assert got.stderr == "", got.stderr
    return got.returncode, got.stdout


def _field(out: str, name: str) -> str:
    m = re.search(rf"^{name}:\s+(.*)$", out, re.M)
    assert m, f"no {name}: line in\n{out}"
    return m.group(1)


def test_explain_decisions(rules_policy: Path) -> None:
    """explain: an allow, a deny, a hidden path, a placeholder match, the
    defaults, and a rule skipped for its who/ops."""
    code, out = explain(rules_policy, "--uid", "2001", "--op", "read", "prec/a/other")
    assert code == 0
    assert "rule 1 (narrow deny first), line" in out and "path does not match" in out
    assert re.search(r"rule 2 \(broad allow after\), line \d+: matches$", out, re.M), out
    assert _field(out, "decision") == "allow as caller"
    assert re.fullmatch(r"rule 2 \(broad allow after\), line \d+", _field(out, "by"))
    assert _field(out, "acting") == "the caller: uid=2001 gid=2001 groups=2001"
    assert _field(out, "filters") == "none"

    code, out = explain(rules_policy, "--uid", "2001", "--op", "write", "prec/b/open")
    assert "rule 3 (narrow allow first), line" in out and "does not cover write" in out
    assert _field(out, "decision") == "deny EACCES"
    assert _field(out, "by").startswith("rule 4 (broad deny after)")
    assert "acting:" not in out

    code, out = explain(rules_policy, "--uid", "2002", "--gid", "2002", "--groups", "2002,3001",
                        "--op", "lookup", "hid/secret/f")
    assert _field(out, "decision").startswith("deny ENOENT (hidden")
    assert _field(out, "by").startswith("rule 10 (hidden from all but alice)")
    assert "gid=2002 groups=2002,3001" in _field(out, "request")

    code, out = explain(rules_policy, "--uid", "2001", "--op", "lookup", "hid/secret/f")
    assert "not notalice: uid 2001 not in 2002-2003, 65534" in out, out
    assert _field(out, "decision") == "allow as caller"
    assert _field(out, "by") == "the [defaults] (no rule matched)"

    # A rule skipped for who: "bob only" does not decide for carol.
    code, out = explain(rules_policy, "--uid", "2003", "--op", "write", "prec/c/f")
    assert "not bobs: uid 2003 not in 2002" in out
    assert _field(out, "by").startswith("rule 6 (writes only)")

    # Identity by gid.
    code, out = explain(rules_policy, "--uid", "5000", "--gid", "5000", "--groups", "5000",
                        "--op", "read", "ids/g3003/f")
    assert "no group in 3003" in out
    assert _field(out, "decision") == "deny EACCES"


def test_explain_shipped_and_placeholders(workdir: Path) -> None:
    code, out = explain(SHARED, "--uid", "2001", "--gid", "2001", "--groups", "2001",
                        "--op", "read", "private/2001/notes")
    assert code == 0
    assert "{uid}=2001" in out and "matches ({uid}=2001)" in out, out
    assert _field(out, "decision") == "allow as caller"
    assert _field(out, "by") == "rule 3 (your own private directory, by uid), line 32"
    # nobody has a passwd entry: {user} binds.
    code, out = explain(SHARED, "--uid", str(NOBODY), "--op", "list", "private/nobody")
    assert "(nobody)" in _field(out, "request")
    assert "matches ({user}=nobody)" in out
    assert _field(out, "by").startswith("rule 2 (your own private directory, by user name)")
    code, out = explain(SHARED, "--uid", "2002", "--op", "lookup", "private/2001")
    assert "{uid}=2001 is not the caller's uid 2002" in out
    assert _field(out, "decision") == "deny ENOENT (hidden: lookup gives ENOENT, listings " \
                                      "leave it out)"
    assert _field(out, "by") == "rule 4 (everyone else's private directory does not exist), " \
                                "line 36"
    code, out = explain(SHARED, "--uid", "0", "--op", "delete", "private/2001/x")
    assert _field(out, "by").startswith("rule 1 (admins see every private directory)")
    code, out = explain(CONTAINER, "--uid", "2001", "--op", "lookup", "lost+found")
    assert _field(out, "decision").startswith("deny ENOENT (hidden")
    code, out = explain(CONTAINER, "--uid", "2001", "--op", "create", "data/x")
    assert _field(out, "by") == "the [defaults] (no rule matched)"

    creds = write_policy(workdir / "creds.toml", CREDS_POLICY)
    code, out = explain(creds, "--uid", "2001", "--op", "create", "cr/fixed/x")
    assert _field(out, "decision") == "allow as 5000:5001"
    assert _field(out, "acting") == "the fixed identity uid=5000 gid=5001 groups=5001, " \
                                    "no capabilities"
    code, out = explain(creds, "--uid", "2001", "--mounter", "4000:4000", "--op", "create",
                        "cr/mounter/x")
    assert _field(out, "decision") == "allow as mounter"
    assert _field(out, "acting").startswith("the mounter: uid=4000 gid=4000")


def test_explain_counts_only_rules_it_skipped_by_name() -> None:
    """The "(N rules for other top-level names not considered)" note must not
    count rules after the deciding one: in shared-mount.toml all four rules are
    under private/."""
    _code, out = explain(SHARED, "--uid", "2001", "--op", "read", "private/2001/x")
    assert "for other top-level names" not in out, out
    _code, out = explain(SHARED, "--uid", "2001", "--op", "read", "pub/x")
    assert "(4 rules for other top-level names not considered)" in out


def test_explain_bad_input(workdir: Path) -> None:
    bad = _write_case(workdir, "bad", '[[rule]]\npath = "a/**b"\n', None)
    got = run_cli("explain", "--policy", bad, "--uid", "1", "--op", "read", "a")
    assert got.returncode == 1
    assert f"{bad}:2: " in got.stdout and "invalid; nothing to explain" in got.stdout
    got = run_cli("explain", "--policy", SHARED, "--uid", "1", "--op", "read", "a/../b")
    assert got.returncode == 2 and "relative to the mount root" in got.stdout
    got = run_cli("explain", "--policy", SHARED, "--uid", "1", "--op", "exec", "a")
    assert got.returncode == 2 and "invalid choice" in got.stderr
