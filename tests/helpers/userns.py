"""Agents inside real user namespaces, as a container's processes are.

`NsAgent` forks like `UserAgent`; the child unshares a new user namespace
(unshare(2), CLONE_NEWUSER), the parent writes its uid_map/gid_map through the
kernel's own interface (/proc/PID/uid_map, which init-namespace root may write
with any ranges), and then the child switches to an identity *inside* the
namespace and serves fsops requests. So the kernel (and credfs) see it exactly
as they see a container's process: its ids are the namespace's, translated to
host ids by the map, and its capabilities count only inside its namespace.

`HostUser` makes a real unprivileged host user with subordinate id ranges for
the scenario where the namespace is made the rootless way, by that user with
util-linux `unshare` and shadow's newuidmap/newgidmap; it is removed again with
userdel, and /etc/subuid and /etc/subgid are restored byte for byte.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import subprocess
from collections.abc import Sequence
from pathlib import Path

from . import agents
from .agents import UserAgent

CLONE_NEWUSER = 0x10000000
_libc = ctypes.CDLL(None, use_errno=True)

# One "INNER OUTER COUNT" line per range, as /proc/PID/uid_map takes them.
NsMap = Sequence[tuple[int, int, int]]


def _unshare_user() -> None:
    if _libc.unshare(CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NsAgent(UserAgent):
    """A UserAgent whose process lives in a fresh user namespace.

    uid_map/gid_map: (inside, outside, count) ranges; uid, gid, groups: the
    identity *inside* the namespace the agent takes before serving requests.
    """

    def __init__(self, uid_map: NsMap, gid_map: NsMap, uid: int, gid: int,
                 groups: Sequence[int], umask: int = 0o022, *, name: str | None = None,
                 timeout: float = agents.DEFAULT_TIMEOUT) -> None:
        self.uid, self.gid, self.groups, self.umask = uid, gid, tuple(groups), umask
        self.name = name or f"ns-uid{uid}"
        self.timeout = timeout
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        go_r, go_w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                for fd in (req_w, rep_r, go_w, ready_r):
                    os.close(fd)
                _unshare_user()
                os.write(ready_w, b"u")
                os.close(ready_w)
                if os.read(go_r, 1) != b"g":  # the parent could not write the maps
                    os._exit(71)
                os.close(go_r)
                agents._child(uid, gid, self.groups, umask, req_r, rep_w)
            except BaseException:
                code = 70
            finally:
                os._exit(code)
        for fd in (req_r, rep_w, go_r, ready_w):
            os.close(fd)
        self.pid = pid
        self._req_fd = req_w
        self._rep_fd = rep_r
        try:
            if os.read(ready_r, 1) != b"u":
                raise agents.AgentError(f"{self.name}: could not unshare a user namespace")
            write_maps(pid, uid_map, gid_map)
            os.write(go_w, b"g")
        except BaseException:
            self.close()
            raise
        finally:
            os.close(ready_r)
            os.close(go_w)


def _map_text(ranges: NsMap) -> str:
    return "".join(f"{inner} {outer} {count}\n" for inner, outer, count in ranges)


def write_maps(pid: int, uid_map: NsMap, gid_map: NsMap) -> None:
    """Set a child namespace's maps as init-namespace root may (setgroups stays
    allowed, so the agent can take supplementary groups inside)."""
    Path(f"/proc/{pid}/uid_map").write_text(_map_text(uid_map))
    Path(f"/proc/{pid}/gid_map").write_text(_map_text(gid_map))


class HostUser:
    """A temporary real host user with a subordinate id range, for rootless runs.

    newuidmap insists on a passwd entry for the user who runs it and on
    /etc/subuid and /etc/subgid entries for the ranges it maps.
    """

    def __init__(self, uid: int, name: str, subid_start: int, subid_count: int) -> None:
        self.uid, self.name = uid, name
        self.gid = 100  # "users": no group of its own is created
        self.subid_start, self.subid_count = subid_start, subid_count
        self._saved: dict[str, bytes | None] = {}
        self._created = False

    def __enter__(self) -> HostUser:
        try:
            existing = pwd.getpwuid(self.uid)
        except KeyError:
            existing = None
        if existing is not None:
            raise RuntimeError(f"uid {self.uid} already belongs to {existing.pw_name}")
        for path in ("/etc/subuid", "/etc/subgid"):
            p = Path(path)
            self._saved[path] = p.read_bytes() if p.exists() else None
        try:
            last = self.subid_start + self.subid_count - 1
            _run(["useradd", "--no-create-home", "--no-user-group", "--gid", str(self.gid),
                  "--uid", str(self.uid), "--shell", "/usr/sbin/nologin", self.name])
            self._created = True
            _run(["usermod", "--add-subuids", f"{self.subid_start}-{last}",
                  "--add-subgids", f"{self.subid_start}-{last}", self.name])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._created:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _run(["userdel", self.name])
            self._created = False
        for path, data in self._saved.items():
            p = Path(path)
            if data is None:
                p.unlink(missing_ok=True)
            elif p.read_bytes() != data:
                p.write_bytes(data)


def _run(argv: list[str], timeout: float = 30) -> None:
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
