"""Requests of one syscall: the caller read for the first serves the next.

open(O_CREAT) of a name the kernel holds no valid dentry for sends a LOOKUP
and, the name being absent, a CREATE; mkdir, mknod and symlink send a LOOKUP
and then MKDIR, MKNOD or SYMLINK. Both requests come from one syscall of one
thread, and a thread's credentials cannot change in the middle of its own
syscall: the groups and capabilities read from /proc/<tid>/status for the
LOOKUP are the second request's too. Reading them again costs a status read
(the kernel formats the whole file) for nothing.

The daemon sees requests, not syscalls. A make is taken for the syscall of
a LOOKUP when it makes that same name in that same directory, from the same
thread with the same fsuid and fsgid, the LOOKUP having answered "no such
name", and one of these holds:
- the make is exclusive: O_EXCL, and mkdir, mknod and symlink always (with
  LOOKUP_EXCL, fuse_dentry_revalidate drops any dentry, so the kernel looks
  the name up within the make's own syscall), and that LOOKUP is the
  thread's latest. A thread's requests are one at a time (it waits in each),
  every LOOKUP replaces what was kept of the thread's previous one, and an
  exclusive make's own LOOKUP comes right before it: so the latest is that
  one, however other threads' requests interleave. A MKNOD of a regular
  file is not surely exclusive: once a CREATE was answered ENOSYS (a backing
  filesystem that cannot make files), the kernel sends MKNOD + OPEN for every
  open(O_CREAT) of the connection, the non-exclusive ones too
  (mknod_is_exclusive).
- the make is not exclusive, the LOOKUP's answer left the kernel no "no such
  name" dentry to keep (an uncached ENOENT), and the kernel numbered the two
  consecutively. Request ids come from one counter per connection, STEP
  apart, drawn as each request is queued (a FORGET as it is read):
  consecutive ids mean nothing of anyone was queued in between. Without
  that, another thread's LOOKUP of the name, answered with a cached "no such
  name", could let a later syscall of the first thread - which may have
  changed its groups since - send its CREATE with no LOOKUP of its own.

Anything else resolves the caller afresh. Request ids need a pyfuse3 built
with scripts/pyfuse3-unique.patch (RequestContext.unique); without them
nothing is ever taken for one syscall.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Protocol

from .creds import Credentials

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


# Threads whose latest LOOKUP is kept at most: a thread's record lasts only
# until its next request, so more would only keep records of threads gone.
MAX_THREADS = 1024


@dataclass(frozen=True, slots=True)
class _Absent:
    unique: int
    uid: int
    gid: int
    parent: int
    name: bytes
    cached: bool  # answered with a negative entry the kernel keeps
    caller: Credentials  # what the LOOKUP's caller was resolved to


class Continuations:
    """Each thread's latest LOOKUP answered "no such name", to recognise the
    make that continues its syscall."""

    def __init__(self) -> None:
        self._absent: dict[int, _Absent] = {}  # tid -> its latest LOOKUP, if absent

    def lookup(self, ctx: Context) -> None:
        """A LOOKUP of ctx's thread begins: what was kept of its previous one
        is over, whatever this one answers."""
        if self._absent:
            self._absent.pop(ctx.pid, None)

    def absent(self, ctx: Context, parent: int, name: bytes, cached: bool,
               caller: Credentials | None) -> None:
        """ctx's LOOKUP of name in parent was answered "no such name";
        caller: who it was resolved to be (None: nobody, nothing to carry)."""
        unique = request_id(ctx)
        if unique and caller is not None:
            if len(self._absent) >= MAX_THREADS:
                del self._absent[next(iter(self._absent))]  # the oldest
            self._absent[ctx.pid] = _Absent(unique, ctx.uid, ctx.gid, parent, name, cached,
                                            caller)

    def makes_after_lookup(self, ctx: Context, parent: int, name: bytes,
                           exclusive: bool) -> Credentials | None:
        """The caller of the LOOKUP whose syscall ctx's request, which makes
        name in parent (exclusive: O_EXCL, or a mkdir, mknod or symlink),
        continues; None when it may not continue one. Asked once per such
        request."""
        last = self._absent.pop(ctx.pid, None) if self._absent else None
        unique = request_id(ctx)
        if last is None or not unique or (last.uid, last.gid, last.parent, last.name) != \
                (ctx.uid, ctx.gid, parent, name):
            return None
        if exclusive or (last.unique == unique - STEP and not last.cached):
            return last.caller
        return None
