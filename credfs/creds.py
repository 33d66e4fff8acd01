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


# Held while changing ids: setgroups needs CAP_SETGID, setfsuid CAP_SETUID.
_SWITCH_CAPS = (1 << CAP_SETUID) | (1 << CAP_SETGID)
_READ_ID = 0xFFFFFFFF  # setfsuid(-1) is invalid: it only reports the current fsuid


class ThreadIdentity:
    """Switches the calling thread's filesystem identity.

    Created once per thread that acts for others: a worker unshares its
    fs_struct (so the umask is the thread's own) and holds no capability while
    idle; the event-loop thread (see inline.py) keeps its own. The daemon's
    capability sets, read here, bound what any request may be given.

    What the thread holds is tracked here, because nothing but this object
    changes it (credentials are per thread; no one in the daemon calls the
    process-wide setuid family once threads act for callers): a switch to the
    identity the thread already has costs nothing, and a switch makes only the
    syscalls whose values differ. setgroups and capset either take effect or
    fail; setfsuid/setfsgid never report failure, so their result is read
    back. After any failure the tracked state is dropped and read from the
    kernel again at the next switch.
    """

    def __init__(self, own_fs: bool = True, idle_caps: bool = False,
                 umask: int | None = None) -> None:
        """umask: what the thread's umask is known to be, when it shares the
        process's fs_struct with a thread that may change it meanwhile (it is
        then never read nor set: become() must be given that same umask)."""
        if own_fs:
            syscalls.unshare_fs()
            os.umask(0)
        if umask is None:
            umask = os.umask(0)
            os.umask(umask)
        self._umask = umask
        _eff, self.permitted, self.inheritable = syscalls.capget_thread()
        self._caps = syscalls.CapSetter(self.permitted, self.inheritable)
        if not idle_caps:
            # Idle, a worker holds no capability: each job raises what it may use.
            self._caps.set(0)
        self._known = False
        self._load()
        self.current: Credentials | None = None

    def _load(self) -> None:
        """What the thread holds, from the kernel."""
        self._fsuid = syscalls.getfsuid()
        self._fsgid = syscalls.getfsgid()
        self._groups = tuple(sorted(set(syscalls.getgroups_thread())))
        self._eff = syscalls.capget_thread()[0]
        self._known = True

    def held(self) -> Credentials:
        """The identity the thread holds now."""
        return Credentials(self._fsuid, self._fsgid, self._groups, self._eff)

    def become(self, creds: Credentials, umask: int = 0) -> None:
        """Take on creds for the next backing operation, verified, or raise."""
        if creds is not self.current and creds != self.current:
            self._switch(creds)
        if umask != self._umask:
            os.umask(umask)
            self._umask = umask

    def _switch(self, creds: Credentials) -> None:
        self.current = None
        try:
            if not self._known:
                self._load()
            self._known = False  # until the whole switch is done and checked
            groups = syscalls.group_list(creds.groups)
            uid, gid = creds.uid, creds.gid
            new_ids = groups.groups != self._groups or gid != self._fsgid or uid != self._fsuid
            eff = creds.caps & self.permitted
            exact = False  # does the thread hold eff already?
            if new_ids:
                # Switching needs setuid/setgid, which the previous identity
                # may not have held: regain the daemon's set first.
                if self._eff & _SWITCH_CAPS != self.permitted & _SWITCH_CAPS:
                    self._caps.set(self.permitted)
                    # setfsuid then only raises fs caps (from the permitted
                    # set) unless it leaves fsuid 0: a return to the daemon's
                    # full set needs no second capset.
                    exact = eff == self.permitted and not (self._fsuid == 0 and uid != 0)
                # Only what differs: an unprivileged daemon may keep its own
                # identity but could not even re-set its own groups.
                if groups.groups != self._groups:
                    groups.apply()
                    self._groups = groups.groups
                if gid != self._fsgid:
                    syscalls.setfsgid_fast(gid)
                if uid != self._fsuid:
                    syscalls.setfsuid_fast(uid)
                self._fsuid = syscalls.setfsuid_fast(_READ_ID)
                self._fsgid = syscalls.setfsgid_fast(_READ_ID)
                if (self._fsuid, self._fsgid) != (uid, gid):
                    raise CredentialError(
                        f"switch to {creds.describe()} did not take: fsuid={self._fsuid} "
                        f"fsgid={self._fsgid}")
            # A change of fsuid makes the kernel drop or raise the fs caps by
            # itself; set the whole effective set explicitly anyway, because
            # CAP_MKNOD, CAP_SYS_ADMIN (trusted.* xattrs) and others are outside
            # that mask and must not leak to an unprivileged caller.
            if not exact and (new_ids or eff != self._eff):
                self._caps.set(eff)
            self._eff = eff
            self._known = True
        except OSError as exc:
            raise CredentialError(f"cannot switch to {creds.describe()}: {exc}") from exc
        self.current = creds
