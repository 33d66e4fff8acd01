"""Real processes acting as real uids and gids.

A UserAgent forks once; the child drops to the given identity and then runs
functions of ``fsops`` on request, so every filesystem operation in a test comes
from a process that the kernel (and credfs) sees as that user. Requests and
replies are pickled frames over two pipes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import select
import signal
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from . import fsops

DEFAULT_TIMEOUT = 30.0
_HEADER = struct.Struct("!I")
_PR_SET_PDEATHSIG = 1

Outcome = tuple[str, Any]  # ("ok", value) or ("err", errno)


@dataclass(frozen=True)
class Identity:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


# Numeric ids only: nothing is added to /etc/passwd or /etc/group.
USERS: dict[str, Identity] = {
    "alice": Identity("alice", 2001, 2001, (2001, 3001, 3003)),
    "bob": Identity("bob", 2002, 2002, (2002, 3001)),
    "carol": Identity("carol", 2003, 2003, (2003, 3002)),
    "root": Identity("root", 0, 0, (0,)),
}


class AgentError(RuntimeError):
    """The agent died, timed out, or raised something other than OSError."""


def _write_frame(fd: int, obj: object) -> None:
    data = pickle.dumps(obj)
    buf = memoryview(_HEADER.pack(len(data)) + data)
    while buf:
        buf = buf[os.write(fd, buf):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks: list[bytes] = []
    while n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, deadline: float | None = None) -> Any:
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return pickle.loads(_read_exact(fd, size, deadline))


def _close_fds_except(keep: set[int]) -> None:
    # Other agents' pipe ends and files the parent has open (maybe on a FUSE
    # mount) must not be kept alive by this child.
    start = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, 65536)


def _child(uid: int, gid: int, groups: tuple[int, ...], umask: int, req_fd: int,
           rep_fd: int) -> None:
    # Never raise out of here: the caller os._exit()s so pytest's state (atexit,
    # fixtures, captured output) is never run or flushed twice.
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for pytest, close() is for us
    _close_fds_except({req_fd, rep_fd})
    os.chdir("/")  # the parent's cwd may not be searchable by this uid
    os.umask(umask)
    # Order matters: groups and gid need privilege, so they go before the uid.
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # Set after the credential change, which clears the parent-death signal.
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    while True:
        try:
            name, args = _read_frame(req_fd)
        except EOFError:
            return
        try:
            reply: Outcome = ("ok", getattr(fsops, name)(*args))
        except OSError as e:
            reply = ("err", e.errno)
        except BaseException as e:
            reply = ("exc", f"{type(e).__name__}: {e}")
        _write_frame(rep_fd, reply)


class UserAgent:
    """A forked child running as (uid, gid, groups) that runs fsops functions.

    ``do(name, *args)`` returns the outcome tuple, for comparisons;
    ``call(name, *args)`` returns the value or raises the OSError.
    """

    def __init__(self, uid: int, gid: int, groups: Sequence[int],
                 umask: int = 0o022, *, name: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.uid, self.gid, self.groups, self.umask = uid, gid, tuple(groups), umask
        self.name = name or f"uid{uid}"
        self.timeout = timeout
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                os.close(req_w)
                os.close(rep_r)
                _child(uid, gid, self.groups, umask, req_r, rep_w)
            except BaseException:
                code = 70
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(rep_w)
        self.pid: int | None = pid
        self._req_fd = req_w
        self._rep_fd = rep_r

    @classmethod
    def for_identity(cls, ident: Identity, umask: int = 0o022, **kw: Any) -> UserAgent:
        return cls(ident.uid, ident.gid, ident.groups, umask, name=ident.name, **kw)

    def do(self, fn: str, *args: Any, timeout: float | None = None) -> Outcome:
        """Run fsops.<fn>(*args) in the agent: ("ok", value) or ("err", errno)."""
        if self.pid is None:
            raise AgentError(f"agent {self.name} is closed")
        if not hasattr(fsops, fn):
            raise AttributeError(f"fsops has no function {fn!r}")
        limit = self.timeout if timeout is None else timeout
        try:
            _write_frame(self._req_fd, (fn, args))
            reply = _read_frame(self._rep_fd, time.monotonic() + limit)
        except TimeoutError:
            # The reply may still come later and would desynchronise the pipe:
            # this agent is no longer usable.
            self.close()
            raise AgentError(f"agent {self.name}: {fn}{args!r} took more than {limit} s") from None
        except (EOFError, BrokenPipeError) as e:
            self.close()
            raise AgentError(f"agent {self.name} died during {fn}{args!r}") from e
        if reply[0] == "exc":
            raise AgentError(f"agent {self.name}: {fn}{args!r} raised {reply[1]}")
        return reply

    def call(self, fn: str, *args: Any, timeout: float | None = None) -> Any:
        """Like do(), but return the value or raise OSError(errno)."""
        status, value = self.do(fn, *args, timeout=timeout)
        if status == "err":
            raise OSError(value, os.strerror(value))
        return value

    def close(self) -> None:
        """Kill the child by pid and reap it. Idempotent."""
        pid, self.pid = self.pid, None
        for fd in (self._req_fd, self._rep_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        # SIGKILL cannot be ignored, but a child stuck in an uninterruptible
        # FUSE request only dies when that request ends: don't wait forever.
        deadline = time.monotonic() + 10
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done or time.monotonic() > deadline:
                return
            time.sleep(0.01)

    def __enter__(self) -> UserAgent:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"UserAgent({self.name}: uid={self.uid} gid={self.gid} groups={self.groups}"
                f" umask={self.umask:#o} pid={self.pid})")
