"""Who is authoritative for entries and attributes, and for how long.

The kernel's dentry and attribute caches are shared by every caller, and
without default_permissions the kernel does not check search permission while
walking a cached dentry. So a cached entry could carry one caller past a
directory that only another caller may search.

The rule that prevents it: a name is cached (positive entry timeout) only when
its parent directory is searchable by everyone - the x bit set for owner,
group and other, and no access ACL that could deny someone. A path walk then
can only skip the daemon on steps that every caller is allowed to take; the
first step through a directory that someone may not search has a zero entry
timeout, so the kernel asks the daemon again, as that caller. When a change
made through the mount (chmod, chown, ACL change) makes a directory
searchable by fewer, its cached names are invalidated at once; a rename
through the mount invalidates the moved name when it lands in such a
directory. Changes made directly on the backing directory are seen when the
timeout runs out.

Attributes are never used for permission decisions in caller mode (every
open, access and name lookup is decided by the backing filesystem as the
caller), so their timeout only bounds how stale a stat may be.
"""

from __future__ import annotations

import enum
import stat
from dataclasses import dataclass


class CacheMode(enum.Enum):
    NONE = "none"
    AUTO = "auto"
    ALWAYS = "always"


@dataclass(frozen=True, slots=True)
class CachePolicy:
    mode: CacheMode
    timeout: float  # seconds an entry or attribute may be served from the kernel cache
    keep_page_cache: bool

    @classmethod
    def for_mode(cls, mode: CacheMode) -> CachePolicy:
        if mode is CacheMode.NONE:
            return cls(mode, 0.0, False)
        if mode is CacheMode.AUTO:
            return cls(mode, 1.0, True)
        return cls(mode, 3600.0, True)

    def entry_timeout(self, parent_searchable_by_all: bool) -> float:
        return self.timeout if parent_searchable_by_all else 0.0

    @property
    def attr_timeout(self) -> float:
        return self.timeout


def searchable_by_all(mode: int, has_access_acl: bool) -> bool:
    """True when no caller can be refused search permission on this directory.

    Owner, group and other all need x: the kernel checks the class the caller
    falls in (owner, then group, then other) and does not fall through, so a
    directory of mode 0701 refuses its group. A named ACL entry could refuse a
    particular user or group too.
    """
    return stat.S_ISDIR(mode) and mode & 0o111 == 0o111 and not has_access_acl
