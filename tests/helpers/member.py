"""Run a step as a group member in a forked root child: fsuid/fsgid 2001 in
group 3001 (what a FUSE request then carries; the filesystem capabilities
drop with fsuid 0 -> 2001, CAP_SETGID stays, so the step may leave the group)."""

from __future__ import annotations

import ctypes
import os
import select
import time
from collections.abc import Callable

GROUP = 3001  # a directory's group: its members may create in it
UID = GID = 2001
SYS_SETGROUPS = 116  # x86_64: this thread only, unlike glibc's setgroups
TIMEOUT = 15.0

_libc = ctypes.CDLL(None, use_errno=True)


def as_member(fn: Callable[[], int]) -> int:
    """fn() in the child: its result (0 or an errno), asserted below 250
    (250 and up: the child broke)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 255
        try:
            os.close(r)
            os.setgroups([GROUP])
            _libc.setfsgid(GID)
            _libc.setfsuid(UID)
            code = fn()
        except BaseException:
            code = 254
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], TIMEOUT)
        assert ready, "child did not answer"
        got = os.read(r, 1)
    finally:
        os.close(r)
        if not _exited(pid):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    assert got and got[0] < 250, f"child failed: {got!r}"
    return got[0]


def leave_group() -> None:
    """Leave every supplementary group (this thread only)."""
    if _libc.syscall(SYS_SETGROUPS, 0, None) != 0:
        raise OSError(ctypes.get_errno(), "setgroups")


def _exited(pid: int) -> bool:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
        time.sleep(0.02)
    return False
