"""Requests of one syscall: the caller read for the first serves the next.

open(O_CREAT) of a name the kernel holds no valid dentry for sends a LOOKUP
and, the name being absent, a CREATE; mkdir, mknod and symlink send a LOOKUP
and then MKDIR, MKNOD or SYMLINK. Both requests come from one syscall of one
thread, and a thread's credentials cannot change in the middle of its own
syscall: the groups and capabilities read from /proc/<tid>/status for the
LOOKUP are the second request's too. Reading them again costs a status read
(the kernel formats the whole file) for nothing.

The daemon sees requests, not syscalls. Two requests are taken for one
syscall only when all of these hold:
- the kernel numbered them consecutively. Request ids come from one counter
  per connection, STEP apart, drawn as each request is queued (a FORGET as it
  is read): consecutive ids mean nothing of anyone was queued in between.
- the first is a LOOKUP answered "no such name", the second makes that same
  name in that same directory, and both come from the same thread with the
  same fsuid and fsgid.
- the second cannot have come from a later syscall without a LOOKUP of its
  own. The kernel looks a name up afresh before making it unless it holds a
  valid "no such name" dentry. The first answer left none when it was an
  uncached ENOENT; an exclusive make ignores one (O_EXCL, and mkdir, mknod,
  symlink always: with LOOKUP_EXCL, fuse_dentry_revalidate drops a negative
  dentry). So a cached "no such name" followed by open(O_CREAT) without
  O_EXCL - the second syscall may have changed its groups before - does not
  qualify. A MKNOD of a regular file is not surely exclusive: once a CREATE
  was answered ENOSYS (a backing filesystem that cannot make files), the
  kernel sends MKNOD + OPEN for every open(O_CREAT) of the connection, the
  non-exclusive ones too (mknod_is_exclusive).

Anything else resolves the caller afresh. Request ids need a pyfuse3 built
with scripts/pyfuse3-unique.patch (RequestContext.unique); without them
nothing is ever taken for one syscall.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Protocol

STEP = 2  # between the ids of two requests queued one after the other (FUSE_REQ_ID_STEP)


class Context(Protocol):
    uid: int
    gid: int
    pid: int


def request_id(ctx: Context) -> int:
    """The kernel's id of ctx's request; 0 when pyfuse3 does not give it."""
    return getattr(ctx, "unique", 0)


def mknod_is_exclusive(mode: int) -> bool:
    """Does a MKNOD of mode surely come from an exclusive make? mknod(2) and
    mkfifo(3) always are, but a regular file may be an open(O_CREAT) without
    O_EXCL: the kernel turns those into MKNOD on a connection where CREATE
    got ENOSYS once (fuse_atomic_open, fc->no_create), and sends them with no
    LOOKUP of their own after a cached "no such name"."""
    return not stat.S_ISREG(mode)


@dataclass(frozen=True, slots=True)
class _Absent:
    unique: int
    tid: int
    uid: int
    gid: int
    parent: int
    name: bytes
    cached: bool  # answered with a negative entry the kernel keeps


class Continuations:
    """The latest LOOKUP answered "no such name", to recognise the make that
    continues its syscall."""

    def __init__(self) -> None:
        self._absent: _Absent | None = None

    def absent(self, ctx: Context, parent: int, name: bytes, cached: bool) -> None:
        """A LOOKUP of name in parent was answered "no such name"."""
        unique = request_id(ctx)
        if unique:
            self._absent = _Absent(unique, ctx.pid, ctx.uid, ctx.gid, parent, name, cached)

    def makes_after_lookup(self, ctx: Context, parent: int, name: bytes,
                           exclusive: bool) -> bool:
        """Is ctx's request, which makes name in parent (exclusive: O_EXCL, or
        a mkdir, mknod or symlink), the one that continues the syscall of that
        LOOKUP? Asked once per such request."""
        last, self._absent = self._absent, None
        unique = request_id(ctx)
        return (last is not None and unique != 0 and last.unique == unique - STEP
                and (last.tid, last.uid, last.gid) == (ctx.pid, ctx.uid, ctx.gid)
                and (last.parent, last.name) == (parent, name)
                and (exclusive or not last.cached))
