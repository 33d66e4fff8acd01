"""Who is asking: the caller's credentials, read live from the kernel.

The FUSE request header carries the calling thread's fsuid, fsgid and thread
id. Supplementary groups and capabilities are not in it; they come from
/proc/<tid>/status of the calling thread, read for every request (no cache of
what it says: groups and capabilities can change between two calls of the
same thread; the file itself is kept open for the next read, see
_StatusFiles).

When they cannot be read - the caller is not visible in the daemon's pid
namespace (tid 0), it exited, or its tid now belongs to a thread with other
ids - the request fails closed, unless the mount was started with
``--missing-groups nss``, which takes the groups from the group database
instead and never grants capabilities.
"""

from __future__ import annotations

import errno
import os
import pwd
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .continuation import request_id
from .creds import CredentialError, Credentials
from .idmap import IdMapping


class RequestContext(Protocol):
    uid: int
    gid: int
    pid: int
    umask: int


_OWN_USERNS = os.stat("/proc/self/ns/user").st_ino


_STATUS_CHUNK = 8192  # a status is ~1.5 KiB; a long Groups: line needs more reads
_KEPT_STATUS_FILES = 64  # recent callers' status files kept open, per thread


class _StatusFiles(threading.local):
    """Open /proc/<tid>/status files of recent callers, most recent last.

    A status file is made afresh by every read from its start, so a file kept
    open answers as a new one would, minus the open and the close (about a
    third of the cost). It stays bound to the thread it was opened for: once
    that thread has exited, reading gives ESRCH, even if its tid now belongs
    to another thread, which is then opened anew. Per thread of the daemon
    (in practice the event-loop thread): no descriptor is shared. All are
    closed when the daemon goes idle (close_status_files).
    """

    def __init__(self) -> None:
        self.fds: OrderedDict[int, int] = OrderedDict()


_status_files = _StatusFiles()


def _read_status(tid: int) -> bytes:
    """All of /proc/<tid>/status, read now. Read to the end: a caller in hundreds
    of groups has a Groups: line longer than any fixed buffer, and a cut line
    would give it a wrong last group (a prefix of its digits) and lose the others."""
    fds = _status_files.fds
    fd = fds.pop(tid, None)
    if fd is not None:
        try:
            data = _read_from_start(fd)
        except OSError:
            os.close(fd)  # that thread is gone (ESRCH): its tid may be another's now
        else:
            fds[tid] = fd
            return data
    try:
        fd = _open_status(tid)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            raise  # our shortage, not the caller's: the caller gets this errno
        raise CredentialError(f"caller tid {tid} is gone ({exc.strerror})") from exc
    try:
        data = _read_from_start(fd)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            raise
        raise CredentialError(f"caller tid {tid} is gone ({exc.strerror})") from exc
    fds[tid] = fd
    if len(fds) > _KEPT_STATUS_FILES:
        os.close(fds.popitem(last=False)[1])
    return data


# Threads whose own credentials, which /proc shows, are not those their
# requests run with: an io_uring worker (PF_IO_WORKER) runs each request under
# override_creds() with the submitter's credentials as they were at
# submission, and keeps the ones the process had when the worker was made; a
# kernel thread (PF_KTHREAD) acting for someone (nfsd, ...) does the same from
# the kernel's own. The request header shows the subjective fsuid and fsgid,
# so a worker made before its process left a group passes the ids check below
# with that group still listed.
_PF_IO_WORKER = 0x00000010
_PF_KTHREAD = 0x00200000


def _open_status(tid: int) -> int:
    """/proc/<tid>/status opened, refused (CredentialError) for a thread that
    acts under credentials other than its own. Both files are opened through
    one /proc/<tid> directory, so they are the same thread's even if tid is
    reused meanwhile; a kept status file stays that thread's (_StatusFiles),
    so the check is made once per file."""
    dir_fd = os.open(f"/proc/{tid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        stat_fd = os.open("stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            text = os.read(stat_fd, 1024)
        finally:
            os.close(stat_fd)
        try:  # "tid (comm) state ppid pgrp session tty tpgid flags ...": comm may hold ") "
            flags = int(text[text.rindex(b")") + 2:].split()[6])
        except (ValueError, IndexError):
            raise CredentialError(f"cannot parse /proc/{tid}/stat") from None
        if flags & (_PF_IO_WORKER | _PF_KTHREAD):
            raise CredentialError(f"caller tid {tid} is an io_uring worker or kernel thread: "
                                  "its requests' credentials are not in /proc")
        return os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def close_status_files() -> None:
    """Close this thread's kept status files (the daemon went idle: their
    threads may be gone, and a file kept open is a descriptor held)."""
    fds = _status_files.fds
    while fds:
        os.close(fds.popitem()[1])


def _read_from_start(fd: int) -> bytes:
    data = os.pread(fd, _STATUS_CHUNK, 0)
    if len(data) < _STATUS_CHUNK:
        return data
    # Longer than a chunk: read on from the start in one pass, which the
    # kernel serves from the one text it made for the first read.
    os.lseek(fd, 0, os.SEEK_SET)
    parts = []
    while len(part := os.read(fd, _STATUS_CHUNK)) == _STATUS_CHUNK:
        parts.append(part)
    parts.append(part)
    return b"".join(parts)


def _field(status: bytes, key: bytes) -> bytes:
    """The value of one "Key:\tvalue" line (found directly: this runs per request)."""
    start = status.find(b"\n" + key + b":")
    if start < 0:
        raise KeyError(key)
    start += len(key) + 2
    end = status.find(b"\n", start)
    if end < 0:
        raise KeyError(key)  # a status always ends with a newline: this one is cut
    return status[start:end]


def _caller_userns(tid: int) -> int | None:
    try:
        return os.stat(f"/proc/{tid}/ns/user").st_ino
    except OSError:
        return None


def _as_is() -> bool:
    return False


def from_proc(ctx: RequestContext, permitted_caps: int,
              as_daemon: Callable[[], bool] = _as_is) -> Credentials:
    """The calling thread's live credentials, or CredentialError.

    as_daemon: gives the calling thread the daemon's own identity back, if it
    was lent to a caller (inline.py); True if it was. A status file is readable
    by anyone unless /proc hides other users' processes (hidepid): only then
    does reading it need the daemon's identity, so it is tried as is first.
    ns/user needs ptrace access to the caller: always the daemon's.
    """
    tid = ctx.pid
    if tid <= 0:
        raise CredentialError("caller is not visible in the daemon's pid namespace")
    try:
        status = _read_status(tid)
    except CredentialError:
        if not as_daemon():
            raise
        status = _read_status(tid)
    fsuid, fsgid, as_is = _ids(status, tid)
    try:
        cap_eff = int(_field(status, b"CapEff"), 16)
    except (KeyError, ValueError) as exc:
        raise CredentialError(f"cannot parse /proc/{tid}/status") from exc
    # The tid may have been reused, or the caller changed identity since it
    # made the request: then these groups are not the request's groups.
    if (fsuid, fsgid) != (ctx.uid, ctx.gid):
        raise CredentialError(
            f"tid {tid} now has fsuid={fsuid} fsgid={fsgid}, request has {ctx.uid}/{ctx.gid}")
    # Capabilities count only in the daemon's own user namespace; a container's
    # "root" holds its capabilities over its own namespace, not over our files.
    if cap_eff & permitted_caps:
        as_daemon()
        if _caller_userns(tid) == _OWN_USERNS:
            return Credentials(fsuid, fsgid, as_is.groups, cap_eff & permitted_caps)
    return as_is


# The ids-and-groups text of recent status files, parsed: most requests come
# from callers seen before, and parsing costs more than reading the file. A
# text is the key, so what a caller has now is what counts; the value is the
# same immutable Credentials each time (a thread already switched to it
# recognises it by identity: creds.ThreadIdentity.become).
_parsed_ids: dict[bytes, tuple[int, int, Credentials]] = {}
_PARSED_IDS_MAX = 4096


def _ids(status: bytes, tid: int) -> tuple[int, int, Credentials]:
    """(fsuid, fsgid, Credentials without capabilities) from a status text."""
    start = status.find(b"\nUid:")
    groups_at = status.find(b"\nGroups:", start)
    end = status.find(b"\n", groups_at + 1)
    if start < 0 or groups_at < 0 or end < 0:
        raise CredentialError(f"cannot parse /proc/{tid}/status")
    text = status[start:end + 1]
    parsed = _parsed_ids.get(text)
    if parsed is None:
        try:
            fsuid = int(_field(text, b"Uid").split()[3])
            fsgid = int(_field(text, b"Gid").split()[3])
            groups = tuple(map(int, _field(text, b"Groups").split()))
        except (KeyError, IndexError, ValueError) as exc:
            raise CredentialError(f"cannot parse /proc/{tid}/status") from exc
        if len(_parsed_ids) >= _PARSED_IDS_MAX:
            _parsed_ids.clear()
        parsed = _parsed_ids[text] = (fsuid, fsgid, Credentials(fsuid, fsgid, groups, 0))
    return parsed


def current_syscall(tid: int) -> int | None:
    """The syscall the calling thread is blocked in (it waits for our reply), or
    None when that cannot be told."""
    try:
        with open(f"/proc/{tid}/syscall", "rb", buffering=0) as f:
            first = f.read(32).split(b" ", 1)[0]
        return int(first)
    except (OSError, ValueError):
        return None


def from_group_database(ctx: RequestContext) -> Credentials:
    """Fallback for callers whose /proc entry cannot be read (--missing-groups nss)."""
    try:
        name = pwd.getpwuid(ctx.uid).pw_name
        groups = tuple(sorted(set(os.getgrouplist(name, ctx.gid))))
    except KeyError:
        groups = (ctx.gid,)
    return Credentials(ctx.uid, ctx.gid, groups, 0)


def to_backing(creds: Credentials, idmap: IdMapping) -> Credentials:
    """The caller's view ids (as the request and /proc show them) -> backing ids.

    A caller whose uid or gid has no backing id cannot be given an identity on
    the backing store: refused. Supplementary groups without one are dropped
    (the caller simply is not in any backing group for them).
    """
    uid = idmap.uids.to_backing(creds.uid)
    gid = idmap.gids.to_backing(creds.gid)
    if uid is None or gid is None:
        raise CredentialError(f"caller uid {creds.uid} gid {creds.gid} is outside the "
                              f"mount's {idmap.describe()}")
    groups = tuple(g for g in map(idmap.gids.to_backing, creds.groups) if g is not None)
    return Credentials(uid, gid, groups, creds.caps)


@dataclass(frozen=True, slots=True)
class _Resolved:
    unique: int  # the request's id (continuation.py)
    tid: int
    uid: int
    gid: int
    creds: Credentials


class CallerResolver:
    """Turns a request context into the credentials its backing operation uses.

    The latest caller resolved is kept for the same request (a request may
    ask more than once), and can be carried to a request that continues the
    same syscall (resolved() and carry(); see continuation.py): the calling
    thread is blocked in that syscall meanwhile, so its credentials are the
    same.
    """

    def __init__(self, permitted_caps: int, missing_groups: str = "deny",
                 idmap: IdMapping | None = None) -> None:
        self.permitted_caps = permitted_caps
        self.missing_groups = missing_groups
        self.idmap = idmap
        self.as_daemon: Callable[[], bool] = _as_is  # set when the loop lends (inline.py)
        self._last: _Resolved | None = None
        self.read = 0  # callers read from the kernel
        self.carried = 0  # callers taken over from an earlier request of a syscall

    def resolved(self, ctx: RequestContext) -> Credentials | None:
        """What ctx's request was resolved to, if it was."""
        unique = request_id(ctx)
        last = self._last
        if unique and last is not None and last.unique == unique and \
                (last.tid, last.uid, last.gid) == (ctx.pid, ctx.uid, ctx.gid):
            return last.creds
        return None

    def carry(self, ctx: RequestContext, creds: Credentials) -> None:
        """ctx's request continues the syscall of a request resolved to creds."""
        unique = request_id(ctx)
        if unique:
            self.carried += 1
            self._last = _Resolved(unique, ctx.pid, ctx.uid, ctx.gid, creds)

    def __call__(self, ctx: RequestContext) -> Credentials:
        creds = self.resolved(ctx)
        if creds is not None:
            return creds
        unique = request_id(ctx)
        self._last = None
        self.read += 1
        try:
            creds = from_proc(ctx, self.permitted_caps, self.as_daemon)
        except CredentialError:
            if self.missing_groups != "nss":
                raise
            creds = from_group_database(ctx)
        if self.idmap is not None:
            creds = to_backing(creds, self.idmap)
        if unique:
            self._last = _Resolved(unique, ctx.pid, ctx.uid, ctx.gid, creds)
        return creds
