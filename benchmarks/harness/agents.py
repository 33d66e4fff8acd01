"""Agents: forked processes that drop to a benchmark uid and run fileops
functions on request, so every timed operation comes from a real non-root
process. Requests and replies are JSON lines over two pipes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import time
from typing import Any

from . import BenchError, fileops

_PR_SET_PDEATHSIG = 1


def _child(uid: int, gid: int, req: int, rep: int) -> None:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)
    os.setsid()  # a Ctrl-C at the terminal is for the harness, which kills us by pid
    os.closerange(3, min(req, rep))
    os.closerange(max(req, rep) + 1, 65536)
    os.closerange(min(req, rep) + 1, max(req, rep))
    os.chdir("/")
    os.umask(0o022)
    os.setgroups([gid])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # After the uid change, which clears it: die with the harness.
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    with os.fdopen(req, "r") as inp, os.fdopen(rep, "w") as out:
        for line in inp:
            name, args = json.loads(line)
            try:
                reply = {"ok": fileops.FUNCTIONS[name](*args)}
            except Exception as e:  # report it; the harness decides
                reply = {"error": f"{type(e).__name__}: {e}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()


class Agent:
    def __init__(self, uid: int, gid: int) -> None:
        self.uid, self.gid = uid, gid
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(req_w)
                os.close(rep_r)
                _child(uid, gid, req_r, rep_w)
            except BaseException:
                code = 70
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(rep_w)
        self.pid: int | None = pid
        self._req = req_w
        self._rep = rep_r
        self._buf = b""
        self._pending: str | None = None

    def send(self, name: str, *args: Any) -> None:
        if self.pid is None:
            raise BenchError(f"agent uid {self.uid} is closed")
        self._pending = f"{name}{args!r}"
        data = (json.dumps([name, list(args)]) + "\n").encode()
        try:
            while data:
                data = data[os.write(self._req, data):]
        except BrokenPipeError:
            self.close()
            raise BenchError(f"agent uid {self.uid} died") from None

    def receive(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._rep], [], [], left)[0]:
                what = self._pending
                self.close()  # a late reply would desynchronise the pipe
                raise BenchError(f"uid {self.uid}: {what} took more than {timeout:.0f} s "
                                 "(is a daemon hanging?)")
            chunk = os.read(self._rep, 1 << 16)
            if not chunk:
                self.close()
                raise BenchError(f"agent uid {self.uid} died during {self._pending}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        if "error" in reply:
            raise BenchError(f"uid {self.uid}: {self._pending}: {reply['error']}")
        return reply["ok"]

    def call(self, name: str, *args: Any, timeout: float) -> Any:
        self.send(name, *args)
        return self.receive(timeout)

    def close(self) -> None:
        """Kill by pid and reap, bounded (a child stuck in a FUSE request dies
        once the request ends, i.e. once its daemon is gone)."""
        pid, self.pid = self.pid, None
        for fd in (self._req, self._rep):
            with contextlib.suppress(OSError):
                os.close(fd)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            time.sleep(0.01)
