"""Credentials and switching the calling thread to them.

A worker thread acts on the backing store with exactly one identity at a
time: fsuid, fsgid, supplementary groups and effective capabilities, all of
them per-thread kernel state set here with raw syscalls and read back to
verify. A switch that cannot be verified raises CredentialError, and the
request that wanted it fails closed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import syscalls

# Capability numbers credfs refers to by name (linux/capability.h).
CAP_DAC_READ_SEARCH = 2
CAP_FSETID = 4
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SYS_ADMIN = 21
CAP_SETFCAP = 31

CAP_NAMES = {
    0: "chown", 1: "dac_override", 2: "dac_read_search", 3: "fowner", 4: "fsetid",
    5: "kill", 6: "setgid", 7: "setuid", 8: "setpcap", 9: "linux_immutable",
    10: "net_bind_service", 11: "net_broadcast", 12: "net_admin", 13: "net_raw",
    14: "ipc_lock", 15: "ipc_owner", 16: "sys_module", 17: "sys_rawio", 18: "sys_chroot",
    19: "sys_ptrace", 20: "sys_pacct", 21: "sys_admin", 22: "sys_boot", 23: "sys_nice",
    24: "sys_resource", 25: "sys_time", 26: "sys_tty_config", 27: "mknod", 28: "lease",
    29: "audit_write", 30: "audit_control", 31: "setfcap", 32: "mac_override",
    33: "mac_admin", 34: "syslog", 35: "wake_alarm", 36: "block_suspend", 37: "audit_read",
    38: "perfmon", 39: "bpf", 40: "checkpoint_restore",
}


def cap_bit(cap: int) -> int:
    return 1 << cap


def cap_names(mask: int) -> list[str]:
    return [CAP_NAMES.get(i, str(i)) for i in range(64) if mask & (1 << i)]


class CredentialError(Exception):
    """Credentials could not be established or verified: refuse the request."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """One identity as the backing filesystem sees it."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    caps: int = 0  # effective capabilities to hold while acting

    def describe(self) -> str:
        caps = ",".join(cap_names(self.caps)) or "none"
        groups = ",".join(map(str, self.groups)) or "none"
        return f"uid={self.uid} gid={self.gid} groups={groups} caps={caps}"


class ThreadIdentity:
    """Switches the calling thread's filesystem identity.

    Created once per worker thread: it unshares the thread's fs_struct (so the
    umask is the thread's own) and remembers the daemon's own capability sets,
    which bound what any request may be given.
    """

    def __init__(self) -> None:
        syscalls.unshare_fs()
        os.umask(0)
        _eff, self.permitted, self.inheritable = syscalls.capget_thread()
        # Idle, a worker holds no capability: each job raises what it may use.
        syscalls.capset_thread(0, self.permitted, self.inheritable)
        self.current: Credentials | None = None

    def become(self, creds: Credentials, umask: int = 0) -> None:
        """Take on creds for the next backing operation, verified, or raise."""
        try:
            if self.current != creds:
                # Switching needs setuid/setgid, which the previous identity
                # may not have held: regain the daemon's set first.
                syscalls.capset_thread(self.permitted, self.permitted, self.inheritable)
                # Only what differs: an unprivileged daemon may keep its own
                # identity but could not even re-set its own groups.
                if sorted(syscalls.getgroups_thread()) != sorted(creds.groups):
                    syscalls.setgroups_thread(creds.groups)
                syscalls.setfsgid(creds.gid)
                syscalls.setfsuid(creds.uid)
                # After setfsuid the kernel has already dropped the fs caps for a
                # non-zero fsuid; set the whole effective set explicitly anyway,
                # because CAP_MKNOD, CAP_SYS_ADMIN (trusted.* xattrs) and others are
                # outside that mask and must not leak to an unprivileged caller.
                syscalls.capset_thread(creds.caps & self.permitted, self.permitted,
                                       self.inheritable)
            self._verify(creds)
        except OSError as exc:
            self.current = None
            raise CredentialError(f"cannot switch to {creds.describe()}: {exc}") from exc
        self.current = creds
        os.umask(umask)

    def _verify(self, creds: Credentials) -> None:
        fsuid, fsgid = syscalls.getfsuid(), syscalls.getfsgid()
        groups = syscalls.getgroups_thread()
        eff = syscalls.capget_thread()[0]
        if (fsuid, fsgid) != (creds.uid, creds.gid) or sorted(groups) != sorted(creds.groups) \
                or eff != creds.caps & self.permitted:
            self.current = None
            raise CredentialError(
                f"switch to {creds.describe()} did not take: fsuid={fsuid} fsgid={fsgid} "
                f"groups={groups} caps={eff:#x}")
