"""The app list: which uid is which app, and what it was granted.

File format (one app per line, '#' starts a comment):

    PACKAGE UID [PERMISSION[,PERMISSION...]]

    com.example.camera   10057  READ_MEDIA_IMAGES,READ_MEDIA_VIDEO,ACCESS_MEDIA_LOCATION
    com.example.notes    10061

It is the first two columns of Android's packages.list plus the granted
permissions as a third. Several packages may share a uid (Android's
sharedUserId); a uid then has the union of their permissions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The permissions the media-provider rules use; others are accepted (a policy
# may name its own), but must look like permission names.
KNOWN_PERMISSIONS = (
    "READ_MEDIA_IMAGES", "READ_MEDIA_VIDEO", "READ_MEDIA_AUDIO",
    "ACCESS_MEDIA_LOCATION", "MANAGE_EXTERNAL_STORAGE",
)
_PERMISSION = re.compile(r"[A-Z][A-Z0-9_]*")
_PACKAGE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
MAX_ID = 2**32 - 2  # (uid_t)-1 is "no id"


@dataclass(frozen=True, slots=True)
class App:
    package: str
    uid: int
    permissions: frozenset[str]


@dataclass(frozen=True)
class AppList:
    apps: tuple[App, ...] = ()

    def __post_init__(self) -> None:
        by_uid: dict[int, list[App]] = {}
        for app in self.apps:
            by_uid.setdefault(app.uid, []).append(app)
        object.__setattr__(self, "_by_uid", {
            uid: (frozenset(a.package for a in apps),
                  frozenset().union(*(a.permissions for a in apps)))
            for uid, apps in by_uid.items()})

    def of_uid(self, uid: int) -> tuple[frozenset[str], frozenset[str]]:
        """(packages, permissions) of the app(s) running as uid; empty when none."""
        return self._by_uid.get(uid, (frozenset(), frozenset()))  # type: ignore[attr-defined]

    @property
    def packages(self) -> frozenset[str]:
        return frozenset(a.package for a in self.apps)


def check_permission(name: object) -> str | None:
    """None when name is a valid permission name, else why not."""
    if not isinstance(name, str) or not _PERMISSION.fullmatch(name):
        return f"{name!r} is not a permission name (expected e.g. READ_MEDIA_IMAGES)"
    return None


def check_package(name: object) -> str | None:
    if not isinstance(name, str) or not _PACKAGE.fullmatch(name):
        return f"{name!r} is not a package name (expected e.g. com.example.app)"
    return None


def parse_app_list(text: str) -> tuple[list[App], list[tuple[int, str]]]:
    """Apps, and (line, problem) for every bad line."""
    apps: list[App] = []
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) not in (2, 3):
            problems.append((lineno, f"expected 'PACKAGE UID [PERMISSION,...]', got {line!r}"))
            continue
        package, uid_text = fields[0], fields[1]
        bad = check_package(package)
        if bad:
            problems.append((lineno, bad))
            continue
        if not uid_text.isdigit() or int(uid_text) > MAX_ID:
            problems.append((lineno, f"uid {uid_text!r}: expected a number 0..{MAX_ID}"))
            continue
        if package in seen:
            problems.append((lineno, f"package {package} already listed on line "
                                     f"{seen[package]}"))
            continue
        perms = fields[2].split(",") if len(fields) == 3 else []
        bad_perms = [p for p in (check_permission(p) for p in perms) if p]
        if bad_perms:
            problems.append((lineno, "; ".join(bad_perms)))
            continue
        seen[package] = lineno
        apps.append(App(package, int(uid_text), frozenset(perms)))
    return apps, problems
