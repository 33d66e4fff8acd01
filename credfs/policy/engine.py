"""A loaded policy and the decision it makes for one request.

Precedence: the first rule in file order whose path patterns, operations,
identities and object conditions (type, owner) all match the request decides
it; placeholders in a pattern must equal the caller's values. When no rule
matches, the policy's [defaults] do.
A Policy is immutable: a reload builds a new one and swaps it in whole.
"""

from __future__ import annotations

import errno as errno_mod
import pwd
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from .apps import AppList
from .patterns import PathPattern

OPS = ("lookup", "list", "read", "write", "create", "delete", "rename", "setattr",
       "xattr", "access")
ERRNOS = {"EACCES": errno_mod.EACCES, "EPERM": errno_mod.EPERM, "ENOENT": errno_mod.ENOENT}

# How a rule acts: "caller", "mounter", or a fixed (uid, gid).
CredsSpec = str | tuple[int, int]

_CACHE_LIMIT = 1 << 16


def describe_creds(spec: CredsSpec) -> str:
    return spec if isinstance(spec, str) else f"{spec[0]}:{spec[1]}"


@dataclass(frozen=True, slots=True)
class IdRange:
    first: int
    last: int

    def __contains__(self, value: int) -> bool:
        return self.first <= value <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class IdentityDef:
    """Who a name in `who` stands for: a caller matches when every given key holds."""
    name: str
    line: int
    uids: tuple[IdRange, ...] | None = None
    gids: tuple[IdRange, ...] | None = None  # primary or supplementary
    apps: frozenset[str] | None = None  # packages; "*" = any listed app
    permissions: frozenset[str] = frozenset()  # the caller's app holds all of these

    def mismatch(self, caller: CallerFacts) -> str | None:
        """None when the caller is this identity, else the first reason it is not."""
        if self.uids is not None and not any(caller.uid in r for r in self.uids):
            return f"uid {caller.uid} not in {', '.join(map(str, self.uids))}"
        if self.gids is not None and not any(
                g in r for r in self.gids for g in (caller.gid, *caller.groups)):
            return f"no group in {', '.join(map(str, self.gids))}"
        if self.apps is not None:
            if not caller.packages:
                return f"uid {caller.uid} is not an app in the app list"
            if "*" not in self.apps and not caller.packages & self.apps:
                return f"app {','.join(sorted(caller.packages))} not in " \
                       f"{', '.join(sorted(self.apps))}"
        missing = self.permissions - caller.permissions
        if missing:
            return f"lacks {', '.join(sorted(missing))}"
        return None


@dataclass(frozen=True, slots=True)
class ObjectFacts:
    """What a rule may ask about the file a request is about."""
    is_dir: bool
    owner_uid: int | None  # the app (uid) recorded as its creator; None: none recorded
    new: bool = False  # being created by this request: its owner will be the caller


@dataclass(frozen=True)
class Rule:
    index: int  # 1-based, file order
    line: int
    name: str
    patterns: tuple[PathPattern, ...]
    ops: frozenset[str]
    who: tuple[str, ...] | None  # identity names; None: anyone
    allow: bool
    errno: int  # for deny
    creds: CredsSpec  # for allow
    filters: tuple[str, ...]
    type: str | None = None  # "dir" | "file" (anything else)
    owner: str | None = None  # "caller" | "other" (recorded creator is / is not the caller)

    def __post_init__(self) -> None:
        # Fast path for decide(): all patterns in one regex when nothing is bound,
        # and the decision this rule makes, built once.
        combined = None
        if not any(p.placeholders for p in self.patterns):
            combined = re.compile("|".join(f"(?:{p.regex.pattern})" for p in self.patterns),
                                  re.DOTALL)
        object.__setattr__(self, "combined", combined)
        object.__setattr__(self, "decision", Decision(self.allow, self.errno, self.creds,
                                                      self.filters, self))
        object.__setattr__(self, "who_set", frozenset(self.who or ()))

    @property
    def needs_object(self) -> bool:
        return self.type is not None or self.owner is not None

    @property
    def paths(self) -> str:
        return ", ".join(repr(p.text) for p in self.patterns)

    def match(self, path: str) -> dict[str, str] | None:
        for pattern in self.patterns:
            bindings = pattern.match(path)
            if bindings is not None:
                return bindings
        return None

    def object_matches(self, obj: ObjectFacts, caller: CallerFacts) -> bool:
        if self.type is not None and (self.type == "dir") != obj.is_dir:
            return False
        if self.owner is not None:
            mine = obj.new or (obj.owner_uid is not None and obj.owner_uid == caller.uid)
            return (self.owner == "caller") == mine
        return True

    def object_mismatch(self, obj: ObjectFacts, caller: CallerFacts) -> str | None:
        if self.type is not None and (self.type == "dir") != obj.is_dir:
            return f"not a {'directory' if self.type == 'dir' else 'file'}"
        if self.owner is not None:
            mine = obj.new or (obj.owner_uid is not None and obj.owner_uid == caller.uid)
            if (self.owner == "caller") != mine:
                who = "nobody recorded" if obj.owner_uid is None else f"uid {obj.owner_uid}"
                return f"owner is {who}, " + ("not the caller" if self.owner == "caller"
                                              else "the caller")
        return None

    @property
    def label(self) -> str:
        return f"rule {self.index}" + (f" ({self.name})" if self.name else "") + \
            f", line {self.line}"


@dataclass(frozen=True, slots=True)
class Decision:
    allow: bool
    errno: int
    creds: CredsSpec
    filters: tuple[str, ...]
    rule: Rule | None  # None: the defaults decided
    # The deciding rule depends on the object (type, owner) and none was given:
    # look at the object, then decide again with it.
    needs_object: bool = False

    @property
    def hides(self) -> bool:
        return not self.allow and self.errno == errno_mod.ENOENT


@dataclass(frozen=True)
class CallerFacts:
    """What the policy may ask about a caller, taken per request."""
    uid: int
    gid: int
    groups: tuple[int, ...]
    packages: frozenset[str] = frozenset()
    permissions: frozenset[str] = frozenset()
    identities: frozenset[str] = frozenset()  # the policy's identities this caller is

    @property
    def user(self) -> str | None:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return None

    def placeholder_mismatch(self, bindings: dict[str, str]) -> str | None:
        for name, value in bindings.items():
            if name == "uid" and value != str(self.uid):
                return f"{{uid}}={value} is not the caller's uid {self.uid}"
            if name == "user" and value != self.user:
                return f"{{user}}={value} is not the caller's user name ({self.user})"
            if name == "package" and value not in self.packages:
                have = ",".join(sorted(self.packages)) or "no app"
                return f"{{package}}={value} is not the caller's app ({have})"
        return None


@dataclass(frozen=True)
class Defaults:
    allow: bool = True
    errno: int = errno_mod.EACCES
    creds: CredsSpec = "caller"
    filters: tuple[str, ...] = ()


@dataclass
class Policy:
    source: str
    rules: tuple[Rule, ...]
    identities: dict[str, IdentityDef]
    apps: AppList
    defaults: Defaults
    _by_first: dict[str, tuple[Rule, ...]] = field(default_factory=dict, repr=False)
    _wild: tuple[Rule, ...] = ()
    _decisions: dict[tuple[object, ...], Decision] = field(default_factory=dict, repr=False)
    _uniform: dict[str, bool] = field(default_factory=dict, repr=False)
    _facts: dict[tuple[int, int, tuple[int, ...]], CallerFacts] = field(
        default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Rules indexed by a literal first segment; each list keeps file order
        # with the rules whose first segment is a wildcard merged in.
        def firsts(rule: Rule) -> set[str | None]:
            return {p.first_literal for p in rule.patterns}

        self._wild = tuple(r for r in self.rules if None in firsts(r))
        every = set().union(*map(firsts, self.rules)) - {None}
        self._by_first = {
            f: tuple(r for r in self.rules if firsts(r) & {f, None}) for f in every}
        self._default = Decision(self.defaults.allow, self.defaults.errno,
                                 self.defaults.creds, self.defaults.filters, None)

    @property
    def creds_used(self) -> set[CredsSpec]:
        return {r.creds for r in self.rules if r.allow} | {self.defaults.creds}

    @property
    def records_owners(self) -> bool:
        """Does any rule ask who created a file? Then creates record it."""
        return any(r.owner is not None for r in self.rules)

    def caller(self, uid: int, gid: int, groups: tuple[int, ...]) -> CallerFacts:
        key = (uid, gid, groups)
        facts = self._facts.get(key)
        if facts is None:
            packages, perms = self.apps.of_uid(uid)
            facts = CallerFacts(uid, gid, groups, packages, perms)
            names = frozenset(n for n, i in self.identities.items() if i.mismatch(facts) is None)
            facts = CallerFacts(uid, gid, groups, packages, perms, names)
            if len(self._facts) >= _CACHE_LIMIT:
                self._facts.clear()
            self._facts[key] = facts
        return facts

    def candidates(self, path: str) -> tuple[Rule, ...]:
        """The rules that may match path, in file order (indexed by first segment)."""
        return self._candidates(path)

    def _candidates(self, path: str) -> tuple[Rule, ...]:
        return self._by_first.get(path.partition("/")[0], self._wild)

    def _who_mismatch(self, rule: Rule, caller: CallerFacts) -> str | None:
        if rule.who is None:
            return None
        reasons = []
        for name in rule.who:
            why = self.identities[name].mismatch(caller)
            if why is None:
                return None
            reasons.append(f"not {name}: {why}")
        return "; ".join(reasons)

    def decide(self, op: str, path: str, caller: CallerFacts,
               obj: ObjectFacts | None = None) -> Decision:
        key = (op, path, caller, obj)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._first_match(op, path, caller, obj)
            if len(self._decisions) >= _CACHE_LIMIT:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    def _first_match(self, op: str, path: str, caller: CallerFacts,
                     obj: ObjectFacts | None) -> Decision:
        """decide() without the cache: what trace() finds, without the words."""
        for rule in self._candidates(path):
            if op not in rule.ops:
                continue
            if rule.who is not None and caller.identities.isdisjoint(rule.who_set):
                continue
            if rule.combined is not None:
                if rule.combined.fullmatch(path) is None:
                    continue
            else:
                bindings = rule.match(path)
                if bindings is None or caller.placeholder_mismatch(bindings):
                    continue
            if rule.needs_object:
                if obj is None:
                    return Decision(False, errno_mod.EACCES, "caller", (), rule, True)
                if not rule.object_matches(obj, caller):
                    continue
            return rule.decision
        return self._default

    def trace(self, op: str, path: str, caller: CallerFacts, obj: ObjectFacts | None = None
              ) -> Iterator[tuple[Decision | None, tuple[Rule, str]]]:
        """Each candidate rule in order with why it did or did not decide; a
        Decision for the one that did (the iteration stops there)."""
        for rule in self._candidates(path):
            if op not in rule.ops:
                yield None, (rule, f"does not cover {op}")
                continue
            bindings = rule.match(path)
            if bindings is None:
                yield None, (rule, f"path does not match {rule.paths}")
                continue
            why = self._who_mismatch(rule, caller) or caller.placeholder_mismatch(bindings)
            if why:
                yield None, (rule, why)
                continue
            if rule.needs_object:
                if obj is None:
                    yield Decision(False, errno_mod.EACCES, "caller", (), rule, True), \
                        (rule, "depends on the file's type or owner")
                    return
                why = rule.object_mismatch(obj, caller)
                if why:
                    yield None, (rule, why)
                    continue
            bound = ", ".join(f"{{{k}}}={v}" for k, v in bindings.items())
            yield Decision(rule.allow, rule.errno, rule.creds, rule.filters, rule), \
                (rule, "matches" + (f" ({bound})" if bound else ""))
            return

    def default_decision(self) -> Decision:
        return self._default

    def lookup_uniform(self, path: str) -> bool:
        """Is looking up path allowed to every caller alike? Only then may the
        kernel cache the name for all callers (its dentry cache is shared, and
        walks through cached names do not ask us)."""
        uniform = self._uniform.get(path)
        if uniform is None:
            uniform = self.defaults.allow
            for rule in self._candidates(path):
                if "lookup" not in rule.ops or rule.match(path) is None:
                    continue
                # Only an allow may be cached: a refused name must be asked about
                # on every walk, or walks through it would skip the refusal.
                uniform = rule.allow and rule.who is None and rule.owner is None and \
                    not any(p.placeholders for p in rule.patterns)
                if not uniform or rule.type is None:
                    break
                # A type condition is the same for everyone, but when it does
                # not hold a later rule decides: that one must be uniform too.
            if len(self._uniform) >= _CACHE_LIMIT:
                self._uniform.clear()
            self._uniform[path] = uniform
        return uniform
