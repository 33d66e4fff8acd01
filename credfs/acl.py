"""Ids inside POSIX ACL xattr values, translated between view and backing.

system.posix_acl_access and system.posix_acl_default travel as the kernel's
binary posix_acl_xattr format: a little-endian u32 version (2), then entries
of tag u16, perm u16, id u32. Only ACL_USER and ACL_GROUP entries carry an id;
the others carry (u32)-1.

Reading (backing -> view) an id that the map does not cover shows it as the
overflow id 65534, as owners are shown. (An idmapped mount reports (u32)-1
there, but FUSE converts ACL values into kernel ids and refuses the whole
value, EINVAL, when one of them is -1: the ACL could not be read at all. A
process in a user namespace that does not map 65534 sees -1 all the same.)
Writing (view -> backing) an id outside the map refuses the whole value with
EINVAL, as the kernel refuses an id it cannot map; so a read-modify-write of
an ACL with such entries fails rather than silently giving them to 65534.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

from . import backing
from .idmap import OVERFLOW_ID, IdMapping

ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")

_VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
ACL_USER = 0x02
ACL_GROUP = 0x08


def _translate(value: bytes, uid: Callable[[int], int | None],
               gid: Callable[[int], int | None], unmapped: int | None) -> bytes:
    """Rewrite the ids of value; unmapped=None makes an unmapped id an error."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise OSError(errno.EINVAL, "malformed POSIX ACL value")
    (version,) = _HEADER.unpack_from(value)
    if version != _VERSION:
        raise OSError(errno.EOPNOTSUPP, f"POSIX ACL version {version}")
    out = bytearray(value)
    for off in range(_HEADER.size, len(value), _ENTRY.size):
        tag, perm, ident = _ENTRY.unpack_from(value, off)
        if tag == ACL_USER:
            mapped = uid(ident)
        elif tag == ACL_GROUP:
            mapped = gid(ident)
        else:
            continue
        if mapped is None:
            if unmapped is None:
                raise OSError(errno.EINVAL, f"ACL id {ident} is outside the id map")
            mapped = unmapped
        _ENTRY.pack_into(out, off, tag, perm, mapped)
    return bytes(out)


def to_view(name: bytes, value: bytes, idmap: IdMapping | None) -> bytes:
    """A value read from the backing store, as the mount shows it."""
    if idmap is None or name not in ACL_NAMES:
        return value
    return _translate(value, idmap.uids.to_view_or_none, idmap.gids.to_view_or_none,
                      OVERFLOW_ID)


def to_backing(name: bytes, value: bytes, idmap: IdMapping | None) -> bytes:
    """A value set through the mount, as the backing store must get it (or EINVAL)."""
    if idmap is None or name not in ACL_NAMES:
        return value
    return _translate(value, idmap.uids.to_backing, idmap.gids.to_backing, None)


def getxattr(fd: int, name: bytes, idmap: IdMapping | None) -> bytes:
    """backing.getxattr, with ACL ids shown as the mount shows ids (in the worker)."""
    return to_view(name, backing.getxattr(fd, name), idmap)


def setxattr(fd: int, name: bytes, value: bytes, idmap: IdMapping | None) -> None:
    """backing.setxattr, with ACL ids taken as the mount shows ids (in the worker)."""
    backing.setxattr(fd, name, to_backing(name, value, idmap))
