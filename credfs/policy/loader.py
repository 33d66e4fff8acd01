"""Reading and validating a policy file.

Every problem is collected (not just the first) with the line it is on and
what was expected, so `credfs check` can show them all at once; a policy with
any problem is never used.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from typing import Any

from .apps import App, AppList, check_package, check_permission, parse_app_list
from .engine import ERRNOS, OPS, CredsSpec, Defaults, IdentityDef, IdRange, Policy, Rule
from .locate import Locator, TablePath
from .patterns import PatternError, compile_pattern

MAX_ID = 2**32 - 2
MAX_RULES = 100_000

_TOP_KEYS = {"version", "defaults", "apps", "identities", "paths", "rule"}
_DEFAULT_KEYS = {"action", "errno", "creds", "filters"}
_APPS_KEYS = {"list", "package"}
_APP_KEYS = {"uid", "permissions"}
_IDENTITY_KEYS = {"uids", "gids", "apps", "permissions"}
_RULE_KEYS = {"name", "path", "who", "ops", "action", "errno", "creds", "filters", "type",
              "owner"}


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else \
            f"{self.file}: {self.message}"


class PolicyError(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


def known_filters() -> frozenset[str]:
    from ..filters import FILTERS  # the data filters compiled into this credfs
    return frozenset(FILTERS)


class _Loader:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.locate = Locator(text)
        self.problems: list[Problem] = []
        self.named_paths: dict[str, list[str]] = {}

    def problem(self, table: TablePath, key: str | None, message: str,
                line: int | None = None) -> None:
        self.problems.append(Problem(self.path, self.locate.line(table, key)
                                     if line is None else line, message))

    def unknown_keys(self, table: TablePath, value: dict[str, Any], allowed: set[str],
                     what: str) -> None:
        for key in value:
            if key not in allowed:
                self.problem(table, key, f"{what}: unknown key {key!r}; expected one of "
                                         f"{', '.join(sorted(allowed))}")

    # -- pieces ---------------------------------------------------------------

    def ids(self, table: TablePath, key: str, value: Any) -> tuple[IdRange, ...] | None:
        items = value if isinstance(value, list) else [value]
        out = []
        for item in items:
            if isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= MAX_ID:
                out.append(IdRange(item, item))
                continue
            if isinstance(item, str):
                first, dash, last = item.partition("-")
                if first.isdigit() and (not dash or last.isdigit()):
                    lo, hi = int(first), int(last if dash else first)
                    if lo <= hi <= MAX_ID:
                        out.append(IdRange(lo, hi))
                        continue
            self.problem(table, key, f"{key}: {item!r}: expected an id 0..{MAX_ID} or a "
                                     "range \"FIRST-LAST\"")
            return None
        return tuple(out)

    def creds(self, table: TablePath, value: Any) -> CredsSpec | None:
        if value in ("caller", "mounter"):
            return str(value)
        if isinstance(value, str):
            uid, colon, gid = value.partition(":")
            if colon and uid.isdigit() and gid.isdigit() and \
                    int(uid) <= MAX_ID and int(gid) <= MAX_ID:
                return int(uid), int(gid)
        self.problem(table, "creds", f"creds: {value!r}: expected \"caller\", \"mounter\" "
                                     "or \"UID:GID\"")
        return None

    def action(self, table: TablePath, value: Any) -> bool | None:
        if value in ("allow", "deny"):
            return value == "allow"
        self.problem(table, "action", f"action: {value!r}: expected \"allow\" or \"deny\"")
        return None

    def errno(self, table: TablePath, value: Any) -> int | None:
        if isinstance(value, str) and value in ERRNOS:
            return ERRNOS[value]
        self.problem(table, "errno", f"errno: {value!r}: expected one of "
                                     f"{', '.join(ERRNOS)}")
        return None

    def filters(self, table: TablePath, value: Any) -> tuple[str, ...] | None:
        known = known_filters()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(table, "filters", "filters: expected a list of filter names")
            return None
        bad = [v for v in value if v not in known]
        if bad:
            self.problem(table, "filters", f"filters: unknown filter {bad[0]!r}; expected "
                                           f"one of {', '.join(sorted(known)) or '(none)'}")
            return None
        return tuple(value)

    def string_list(self, table: TablePath, key: str, value: Any) -> list[str] | None:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            self.problem(table, key, f"{key}: expected a string or a list of strings")
            return None
        return items

    # -- sections -------------------------------------------------------------

    def defaults(self, value: Any) -> Defaults:
        table: TablePath = ("defaults",)
        if not isinstance(value, dict):
            self.problem((), "defaults", "defaults: expected a table")
            return Defaults()
        self.unknown_keys(table, value, _DEFAULT_KEYS, "[defaults]")
        allow = self.action(table, value.get("action", "allow"))
        errno = self.errno(table, value["errno"]) if "errno" in value else None
        creds = self.creds(table, value.get("creds", "caller"))
        filters = self.filters(table, value.get("filters", []))
        d = Defaults()
        return Defaults(d.allow if allow is None else allow, errno or d.errno,
                        creds or d.creds, filters or ())

    def apps(self, value: Any) -> AppList:
        table: TablePath = ("apps",)
        if not isinstance(value, dict):
            self.problem((), "apps", "apps: expected a table")
            return AppList()
        self.unknown_keys(table, value, _APPS_KEYS, "[apps]")
        apps: list[App] = []
        if "list" in value:
            apps += self.app_list_file(table, value["list"])
        inline = value.get("package", {})
        if not isinstance(inline, dict):
            self.problem(table, "package", "apps.package: expected tables "
                                           "[apps.package.\"NAME\"]")
            inline = {}
        for package, spec in inline.items():
            t: TablePath = ("apps", "package", package)
            bad = check_package(package)
            if bad or not isinstance(spec, dict):
                self.problem(t, None, bad or f"apps.package.{package}: expected a table")
                continue
            self.unknown_keys(t, spec, _APP_KEYS, f"[apps.package.\"{package}\"]")
            uid = spec.get("uid")
            if not isinstance(uid, int) or isinstance(uid, bool) or not 0 <= uid <= MAX_ID:
                self.problem(t, "uid", f"apps.package.{package}.uid: expected an id "
                                       f"0..{MAX_ID}, got {uid!r}")
                continue
            perms = self.string_list(t, "permissions", spec.get("permissions", [])) or []
            bad_perms = [p for p in map(check_permission, perms) if p]
            if bad_perms:
                self.problem(t, "permissions", f"permissions: {bad_perms[0]}")
                continue
            apps.append(App(package, uid, frozenset(perms)))
        names = [a.package for a in apps]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            self.problem(table, None, f"app {dup} is defined twice")
        return AppList(tuple(apps))

    def app_list_file(self, table: TablePath, value: Any) -> list[App]:
        if not isinstance(value, str) or not value:
            self.problem(table, "list", "apps.list: expected the path of an app list file")
            return []
        path = value if os.path.isabs(value) else \
            os.path.join(os.path.dirname(os.path.abspath(self.path)), value)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            self.problem(table, "list", f"apps.list: cannot read {path}: {reason}")
            return []
        apps, problems = parse_app_list(text)
        self.problems += [Problem(path, line, msg) for line, msg in problems]
        return apps

    def identities(self, value: Any, apps: AppList) -> dict[str, IdentityDef]:
        if not isinstance(value, dict):
            self.problem((), "identities", "identities: expected tables [identities.NAME]")
            return {}
        out = {}
        for name, spec in value.items():
            t: TablePath = ("identities", name)
            line = self.locate.line(t)
            if name == "*" or not isinstance(spec, dict):
                self.problem(t, None, f"identities.{name}: expected a table of "
                                      f"{', '.join(sorted(_IDENTITY_KEYS))}")
                continue
            self.unknown_keys(t, spec, _IDENTITY_KEYS, f"[identities.{name}]")
            if not set(spec) & _IDENTITY_KEYS:
                self.problem(t, None, f"identities.{name}: says nothing; give at least one of "
                                      f"{', '.join(sorted(_IDENTITY_KEYS))}")
                continue
            uids = self.ids(t, "uids", spec["uids"]) if "uids" in spec else None
            gids = self.ids(t, "gids", spec["gids"]) if "gids" in spec else None
            app_names: frozenset[str] | None = None
            if "apps" in spec:
                names = self.string_list(t, "apps", spec["apps"]) or []
                unknown = [n for n in names if n != "*" and n not in apps.packages]
                if unknown:
                    self.problem(t, "apps", f"apps: {unknown[0]!r} is not in the app list")
                app_names = frozenset(names)
            perms = self.string_list(t, "permissions", spec.get("permissions", [])) or []
            bad = [p for p in map(check_permission, perms) if p]
            if bad:
                self.problem(t, "permissions", f"permissions: {bad[0]}")
            out[name] = IdentityDef(name, line, uids, gids, app_names, frozenset(perms))
        return out

    def rules(self, value: Any, identities: dict[str, IdentityDef]) -> list[Rule]:
        if not isinstance(value, list):
            self.problem((), "rule", "rule: expected [[rule]] tables")
            return []
        if len(value) > MAX_RULES:
            self.problem((), "rule", f"{len(value)} rules: at most {MAX_RULES}")
            return []
        out = []
        for i, spec in enumerate(value):
            t: TablePath = ("rule", i)
            where = f"rule {i + 1}"
            if not isinstance(spec, dict):
                self.problem(t, None, f"{where}: expected a table")
                continue
            before = len(self.problems)
            self.unknown_keys(t, spec, _RULE_KEYS, where)
            name = spec.get("name", "")
            if not isinstance(name, str):
                self.problem(t, "name", f"{where}: name: expected a string")
            if "path" not in spec:
                self.problem(t, None, f"{where}: no path; every rule needs one "
                                      "(\"**\" matches everything)")
                continue
            paths = self.expand_paths(t, self.string_list(t, "path", spec["path"]), where)
            if not paths:
                if paths is not None:
                    self.problem(t, "path", f"{where}: path: an empty list matches nothing")
                continue
            try:
                patterns = tuple(compile_pattern(p, f"{where}: path") for p in paths)
            except PatternError as exc:
                self.problem(t, "path", str(exc))
                continue
            type_ = self.choice(t, "type", spec.get("type"), ("dir", "file"), where)
            owner = self.choice(t, "owner", spec.get("owner"), ("caller", "other"), where)
            ops = self.ops(t, spec.get("ops", "*"), where)
            who = self.who(t, spec.get("who", "*"), identities, where)
            allow = self.action(t, spec.get("action", "allow"))
            errno, creds, filters = 0, "caller", ()
            if allow is False:
                for key in ("creds", "filters"):
                    if key in spec:
                        self.problem(t, key, f"{where}: {key} only applies to allow rules")
                errno = self.errno(t, spec.get("errno", "EACCES")) or 0
            elif allow:
                if "errno" in spec:
                    self.problem(t, "errno", f"{where}: errno only applies to deny rules")
                creds = self.creds(t, spec.get("creds", "caller")) or "caller"
                filters = self.filters(t, spec.get("filters", [])) or ()
            if len(self.problems) == before and ops is not None:
                out.append(Rule(i + 1, self.locate.line(t), name if isinstance(name, str)
                                else "", patterns, ops, who, bool(allow), errno, creds,
                                filters, type_, owner))
        return out

    def path_sets(self, value: Any) -> None:
        """[paths]: named lists of patterns that rules name as "@NAME"."""
        if not isinstance(value, dict):
            self.problem((), "paths", "paths: expected a table of NAME = [patterns]")
            return
        for name, patterns in value.items():
            items = self.string_list(("paths",), name, patterns)
            if items is None:
                continue
            try:
                for p in items:
                    compile_pattern(p, f"paths.{name}")
            except PatternError as exc:
                self.problem(("paths",), name, str(exc))
                continue
            self.named_paths[name] = items

    def expand_paths(self, table: TablePath, paths: list[str] | None, where: str
                     ) -> list[str] | None:
        if paths is None:
            return None
        out = []
        for p in paths:
            if not p.startswith("@"):
                out.append(p)
            elif p[1:] in self.named_paths:
                out += self.named_paths[p[1:]]
            else:
                self.problem(table, "path", f"{where}: path: unknown path set {p!r}; defined: "
                                            f"{', '.join(sorted(self.named_paths)) or '(none)'}")
                return None
        return out

    def choice(self, table: TablePath, key: str, value: Any, allowed: tuple[str, ...],
               where: str) -> str | None:
        if value is None or value in allowed:
            return value
        self.problem(table, key, f"{where}: {key}: {value!r}: expected "
                                 f"{' or '.join(repr(a) for a in allowed)}")
        return None

    def ops(self, table: TablePath, value: Any, where: str) -> frozenset[str] | None:
        names = self.string_list(table, "ops", value)
        if names is None:
            return None
        if "*" in names:
            return frozenset(OPS)
        bad = [n for n in names if n not in OPS]
        if bad:
            self.problem(table, "ops", f"{where}: ops: unknown operation {bad[0]!r}; expected "
                                       f"\"*\" or any of {', '.join(OPS)}")
            return None
        return frozenset(names)

    def who(self, table: TablePath, value: Any, identities: dict[str, IdentityDef],
            where: str) -> tuple[str, ...] | None:
        names = self.string_list(table, "who", value)
        if names is None or "*" in names:
            return None
        for n in names:
            if n not in identities:
                self.problem(table, "who", f"{where}: who: unknown identity {n!r}; defined: "
                                           f"{', '.join(sorted(identities)) or '(none)'} "
                                           "(or \"*\" for anyone)")
        return tuple(names)


def parse_policy(path: str, text: str) -> Policy:
    """The policy in text (read from path), or PolicyError with every problem."""
    loader = _Loader(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line N, column M)".
        msg = str(exc)
        line = 0
        if "(at line " in msg:
            tail = msg.rsplit("(at line ", 1)[1]
            line = int(tail.split(",", 1)[0]) if tail.split(",", 1)[0].isdigit() else 0
            msg = msg.rsplit(" (at line ", 1)[0]
        raise PolicyError([Problem(path, line, f"not valid TOML: {msg}")]) from None
    loader.unknown_keys((), data, _TOP_KEYS, "policy")
    version = data.get("version", 1)
    if version != 1:
        loader.problem((), "version", f"version: {version!r}: this credfs reads version 1")
    defaults = loader.defaults(data.get("defaults", {}))
    apps = loader.apps(data.get("apps", {}))
    identities = loader.identities(data.get("identities", {}), apps)
    loader.path_sets(data.get("paths", {}))
    rules = loader.rules(data.get("rule", []), identities)
    if loader.problems:
        raise PolicyError(loader.problems)
    return Policy(os.path.abspath(path), tuple(rules), identities, apps, defaults)


def load_policy(path: str) -> Policy:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise PolicyError([Problem(path, 0, f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise PolicyError([Problem(path, 0, "not UTF-8 text")]) from None
    return parse_policy(path, text)
