"""Keep only the capabilities the chosen mode needs (python-prctl).

Done in the main thread before any other thread exists: capabilities are per
thread and new threads inherit the creating thread's sets. What each worker
then holds *effectively* while serving a request is set per request
(creds.ThreadIdentity); what is dropped here can never come back.
"""

from __future__ import annotations

import logging
import os

import prctl

from .creds import cap_names

log = logging.getLogger(__name__)

# Needed to act on the backing store with a caller's rights when the caller is
# root (or holds them): the kernel's CAP_FS_MASK, plus mknod for device nodes,
# sys_admin for trusted.* xattrs, setfcap for security.capability.
_FS_RIGHTS = ("chown", "dac_override", "dac_read_search", "fowner", "fsetid",
              "linux_immutable", "mac_override", "mknod", "setfcap")
# Needed by the daemon itself: setuid/setgid to take on fsuid, fsgid and
# groups; sys_admin to unmount at the end (and trusted.* xattrs); sys_ptrace to
# read another user's /proc/<tid>/ns/user when deciding whether a caller's
# capabilities count.
_DAEMON = ("setuid", "setgid", "sys_admin")

KEEP = {
    "caller": _FS_RIGHTS + _DAEMON + ("sys_ptrace",),
    # sys_ptrace: whether a caller holds CAP_FSETID (suid/sgid kill) is decided
    # by its capabilities, which count only in our own user namespace.
    "mounter": _FS_RIGHTS + _DAEMON + ("sys_ptrace",),
    "mounter-unprivileged": _DAEMON,
}


def _cap(name: str) -> int:
    return getattr(prctl, "CAP_" + name.upper())


def restrict(mode: str) -> list[str]:
    """Reduce the process to the capabilities of mode; returns what is kept."""
    if os.geteuid() != 0:
        return []
    keep = [n for n in KEEP[mode] if hasattr(prctl, "CAP_" + n.upper())]
    caps = [_cap(n) for n in keep]
    # Order matters: the bounding set needs setpcap still effective, and the
    # effective set must shrink before the permitted set may.
    if _cap("setpcap") in _current_effective():
        prctl.capbset.limit(*caps)
    else:
        # A container started with a minimal capability set has no CAP_SETPCAP,
        # and dropping from the bounding set needs it. The bounding set only
        # limits what an execve could gain, and no_new_privs below already
        # keeps an execve from gaining anything.
        log.info("no CAP_SETPCAP: capability bounding set left as it is")
    prctl.cap_effective.limit(*caps)
    prctl.cap_inheritable.limit()
    prctl.cap_permitted.limit(*caps)
    prctl.set_no_new_privs(True)
    # No core dumps, no ptrace or /proc/PID/mem by anyone but root: the daemon
    # holds other users' data and descriptors to the whole backing tree.
    prctl.set_dumpable(False)
    kept = [n for n in keep if _cap(n) in _current_effective()]
    log.info("capabilities kept for %s mode: %s", mode, ", ".join(kept) or "none")
    return kept


def become(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    """Stop being root: the whole process takes on uid, gid and groups for good,
    keeping only CAP_SYS_ADMIN (to unmount at the end).

    For the service-mounter mode, after mounting and before any other thread
    exists: every backing operation runs as the service identity anyway, so
    the daemon needs neither root's uid nor setuid/setgid from here on."""
    prctl.set_keepcaps(True)  # keep the permitted set across setresuid
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    prctl.set_keepcaps(False)
    admin = _cap("sys_admin")
    prctl.cap_permitted.limit(admin)
    prctl.cap_effective.sys_admin = True  # the uid change cleared the effective set
    prctl.set_dumpable(False)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or \
            _current_effective() != {admin}:
        raise PermissionError(f"could not drop root to uid {uid} gid {gid}")
    log.info("dropped root: running as uid %d gid %d, capabilities kept: sys_admin", uid, gid)


def _current_effective() -> set[int]:
    with open("/proc/thread-self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                mask = int(line.split()[1], 16)
                return {i for i in range(64) if mask & (1 << i)}
    return set()


def describe_effective() -> str:
    with open("/proc/thread-self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return ", ".join(cap_names(int(line.split()[1], 16))) or "none"
    return "unknown"
