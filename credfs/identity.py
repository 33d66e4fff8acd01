"""Credential modes: whose identity a request's backing operation runs with.

caller   every backing operation runs as the caller (fsuid, fsgid, groups,
         capabilities), so the backing filesystem decides exactly as natively.
mounter  the overlayfs model (override_creds): the kernel checks the caller
         against the inode as it appears through the mount (default_permissions
         with POSIX ACLs), then the backing operation runs with the credentials
         recorded when the mount was made, and the backing filesystem checks
         those.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
from typing import Protocol

import pyfuse3

from .caller import CallerResolver
from .creds import CAP_FSETID, CAP_SETGID, CAP_SETUID, CredentialError, Credentials, cap_bit
from .idmap import OVERFLOW_ID

log = logging.getLogger(__name__)


class IdentitySource(Protocol):
    name: str
    # True when the kernel makes the caller's permission check (default_permissions).
    kernel_checks_permissions: bool

    def backing_creds(self, ctx: pyfuse3.RequestContext) -> Credentials:
        """Credentials for a backing operation on behalf of ctx's caller."""

    def creator_creds(self, ctx: pyfuse3.RequestContext, creds: Credentials,
                      parent: object) -> Credentials:
        """Credentials that create a new object, which then belongs to their fsuid."""

    def kills_privileges(self, ctx: pyfuse3.RequestContext) -> bool:
        """Must the daemon clear setuid/setgid bits on this caller's write or
        truncate? (The backing filesystem does it only when the acting
        credentials lack CAP_FSETID, and the acting credentials may not be the
        caller's.)"""

    def describe(self) -> str: ...


class CallerIdentity:
    name = "caller"
    kernel_checks_permissions = False

    def __init__(self, resolver: CallerResolver, honour_caps: bool = False) -> None:
        self.resolver = resolver
        # --caller-caps: a caller's own capabilities (CAP_DAC_OVERRIDE,
        # CAP_DAC_READ_SEARCH, CAP_FOWNER, ...) count through the mount as they
        # do natively. Off: every caller acts with its ids and groups alone.
        self.honour_caps = honour_caps

    def backing_creds(self, ctx: pyfuse3.RequestContext) -> Credentials:
        creds = self.resolver(ctx)
        if creds.caps and not self.honour_caps:
            return Credentials(creds.uid, creds.gid, creds.groups, 0)
        return creds

    def creator_creds(self, ctx: pyfuse3.RequestContext, creds: Credentials,
                      parent: object) -> Credentials:
        return creds

    def kills_privileges(self, ctx: pyfuse3.RequestContext) -> bool:
        return False  # the backing filesystem does it, as the caller

    def describe(self) -> str:
        caps = "with" if self.honour_caps else "without"
        return f"caller: each backing operation runs as the calling thread, {caps} its " \
               "capabilities"


class MounterIdentity:
    name = "mounter"
    kernel_checks_permissions = True

    def __init__(self, recorded: Credentials, resolver: CallerResolver) -> None:
        self.recorded = recorded
        self.resolver = resolver
        # Like overlayfs, a mounter that may take any identity creates new
        # objects as the caller's fsuid/fsgid; one that may not owns them itself.
        need = cap_bit(CAP_SETUID) | cap_bit(CAP_SETGID)
        self.creates_as_caller = recorded.caps & need == need
        # With an id map, 65534 in the view stands for "unmapped": the kernel,
        # checking the caller against the view, would take a caller that *is*
        # 65534 (nobody) for the owner of every unmapped file. Such callers are
        # refused, unless the map gives 65534 a backing id of its own.
        idmap = resolver.idmap
        self.refuse_overflow = idmap is not None and (
            idmap.uids.to_backing(OVERFLOW_ID) is None
            or idmap.gids.to_backing(OVERFLOW_ID) is None)

    def backing_creds(self, ctx: pyfuse3.RequestContext) -> Credentials:
        if self.refuse_overflow and OVERFLOW_ID in (ctx.uid, ctx.gid):
            raise CredentialError(f"caller uid {ctx.uid} gid {ctx.gid}: the overflow id "
                                  "stands for unmapped owners on this mount")
        return self.recorded

    def creator_creds(self, ctx: pyfuse3.RequestContext, creds: Credentials,
                      parent: object) -> Credentials:
        if not self.creates_as_caller:
            return self.recorded
        r = self.recorded
        uid, gid = ctx.uid, ctx.gid
        idmap = self.resolver.idmap
        if idmap is not None:
            uid, gid = idmap.uids.to_backing(uid), idmap.gids.to_backing(gid)
            if uid is None or gid is None:
                # As the kernel refuses a create on an idmapped mount by a
                # caller whose fsuid/fsgid it cannot map.
                log.warning("refusing create by uid %d gid %d: outside the %s",
                            ctx.uid, ctx.gid, idmap.describe())
                raise pyfuse3.FUSEError(errno.EOVERFLOW)
        # The caller's fsgid; a setgid parent overrides it in the backing
        # filesystem exactly as it does in overlayfs' inode_init_owner().
        return Credentials(uid, gid, r.groups, r.caps)

    def kills_privileges(self, ctx: pyfuse3.RequestContext) -> bool:
        # As overlayfs decides it: by the caller's CAP_FSETID, not the mounter's.
        # When the caller cannot be identified, clear them: the safe direction.
        try:
            caps = self.resolver(ctx).caps
        except (CredentialError, OSError):
            return True
        return not caps & cap_bit(CAP_FSETID)

    def describe(self) -> str:
        owner = "the caller" if self.creates_as_caller else "the mounter"
        return f"mounter: {self.recorded.describe()}; new objects belong to {owner}"


def parse_mounter(spec: str) -> tuple[int, int, tuple[int, ...]]:
    """USER[:GROUP] (names or numbers) -> uid, gid, supplementary groups."""
    user, _, group = spec.partition(":")
    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        uid, gid, name = pw.pw_uid, pw.pw_gid, pw.pw_name
    except KeyError:
        if not user.isdigit():
            raise ValueError(f"--mounter: no such user {user!r}") from None
        uid, gid, name = int(user), int(user), None
    if group:
        import grp
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"--mounter: no such group {group!r}") from None
    groups = tuple(sorted(set(os.getgrouplist(name, gid)))) if name else (gid,)
    return uid, gid, groups
