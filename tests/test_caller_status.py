"""Reading who is asking (caller.py): /proc/<tid>/status files kept open.

Real processes and threads, and the kernel's own /proc: what a kept file says
must be what a fresh open says, now; a caller gone must be refused, never
answered from a file of another thread; and the daemon never holds more than
a bounded number of them.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from credfs import caller
from credfs.creds import CredentialError

BOUND = 30.0


class Ctx:
    def __init__(self, pid: int, uid: int = 0, gid: int = 0) -> None:
        self.pid, self.uid, self.gid, self.umask = pid, uid, gid, 0


def _child(groups: list[int]) -> tuple[int, int, int]:
    """A forked root child with these groups that changes them to [groups[0]+1]
    when told (a byte on its pipe) and then sleeps: (pid, tell fd, done fd)."""
    tell_r, tell_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups(groups)
            os.write(done_w, b"r")
            os.read(tell_r, 1)
            os.setgroups([groups[0] + 1])
            os.write(done_w, b"c")
            time.sleep(BOUND)
        finally:
            os._exit(0)
    os.close(tell_r)
    os.close(done_w)
    assert os.read(done_r, 1) == b"r"
    return pid, tell_w, done_r


def _kept() -> dict[int, int]:
    return dict(caller._status_files.fds)


def test_kept_status_file_says_what_the_caller_has_now() -> None:
    """The same tid asks twice, having changed its groups in between: the second
    answer has the new groups (a kept file is read afresh)."""
    pid, tell, done = _child([4101, 4102])
    try:
        assert caller.from_proc(Ctx(pid), 0).groups == (4101, 4102)
        assert pid in _kept()  # kept open for the next request
        os.write(tell, b"x")
        assert os.read(done, 1) == b"c"
        assert caller.from_proc(Ctx(pid), 0).groups == (4102,)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(tell)
        os.close(done)


def test_caller_gone_is_refused_and_its_file_closed() -> None:
    """A caller that exited after its first request: the next request with its
    tid is refused (fail closed), and the kept descriptor is closed."""
    pid, tell, done = _child([4201])
    try:
        caller.from_proc(Ctx(pid), 0)
        fd = _kept()[pid]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(tell)
        os.close(done)
    with pytest.raises(CredentialError):
        caller.from_proc(Ctx(pid), 0)
    assert pid not in _kept()
    assert _target(str(fd)) != f"/proc/{pid}/status"  # closed (or the number reused)


def test_kept_files_are_bounded() -> None:
    """Many distinct callers (threads of this process): at most
    _KEPT_STATUS_FILES descriptors stay open, the most recent ones."""
    stop = threading.Event()
    tids: list[int] = []
    lock = threading.Lock()

    def idle() -> None:
        with lock:
            tids.append(threading.get_native_id())
        stop.wait(BOUND)

    n = caller._KEPT_STATUS_FILES + 20
    threads = [threading.Thread(target=idle) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + BOUND
        while len(tids) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(tids) == n
        for tid in tids:
            caller.from_proc(Ctx(tid), 0)
        kept = _kept()
        assert len(kept) == caller._KEPT_STATUS_FILES
        assert list(kept) == tids[-caller._KEPT_STATUS_FILES:]
        status_fds = [fd for fd in os.listdir("/proc/self/fd")
                      if _target(fd).endswith("/status")]
        assert len(status_fds) == caller._KEPT_STATUS_FILES
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=BOUND)


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def test_caller_in_thousands_of_groups_read_whole_from_a_kept_file() -> None:
    """A status file longer than one read (3000 groups: a Groups: line of
    ~18 KiB) gives every group, when first opened and when read again from the
    kept file, and the groups parsed are the caller's own each time."""
    groups = list(range(50000, 53000))
    pid, tell, done = _child(groups)
    try:
        first = caller.from_proc(Ctx(pid), 0)
        assert pid in _kept()
        again = caller.from_proc(Ctx(pid), 0)
        assert first.groups == again.groups == tuple(groups)
        os.write(tell, b"x")
        assert os.read(done, 1) == b"c"
        assert caller.from_proc(Ctx(pid), 0).groups == (groups[0] + 1,)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(tell)
        os.close(done)
