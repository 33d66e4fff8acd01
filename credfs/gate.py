"""Who is asking, and what the policy says: the credentials a request acts with.

Without a policy, the mount's credential mode decides alone. With one, every
request is decided from the caller's identity at that moment, the operation and
the path through the mount: refused with the rule's errno, or done with the
rule's credentials (the caller's, the mounter's recorded ones, or a fixed
uid:gid) and data filters. An open file keeps the decision made at open.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import pyfuse3
from pyfuse3 import FUSEError

from .creds import CredentialError, Credentials
from .identity import CallerIdentity, IdentitySource, MounterIdentity
from .policy import CallerFacts, Decision, ObjectFacts, Policy, PolicyError, load_policy

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Act:
    creds: Credentials  # the backing operation runs as these
    source: IdentitySource  # asked who creates new objects and who kills setid bits
    filters: tuple[str, ...] = ()
    caller_uid: int = -1  # the caller's (backing) uid; owners are recorded as it
    request: Request | None = None  # with a policy: for more decisions on the same request


class FixedIdentity:
    """A rule's fixed uid:gid: no capabilities, owns what it creates."""
    name = "fixed"
    kernel_checks_permissions = False

    def __init__(self, uid: int, gid: int) -> None:
        self.creds = Credentials(uid, gid, (gid,), 0)

    def backing_creds(self, ctx: pyfuse3.RequestContext) -> Credentials:
        return self.creds

    def creator_creds(self, ctx: pyfuse3.RequestContext, creds: Credentials,
                      parent: object) -> Credentials:
        return self.creds

    def kills_privileges(self, ctx: pyfuse3.RequestContext) -> bool:
        return False  # no CAP_FSETID: the backing filesystem clears them itself

    def describe(self) -> str:
        return f"fixed: {self.creds.describe()}"


def refuse_unknown_caller(ctx: pyfuse3.RequestContext, exc: CredentialError) -> FUSEError:
    log.warning("refusing request from uid %d tid %d: %s", ctx.uid, ctx.pid, exc)
    return FUSEError(errno.EACCES)


class PolicyGate:
    def __init__(self, policy: Policy, caller: CallerIdentity,
                 mounter: MounterIdentity) -> None:
        self.policy = policy
        self.caller = caller
        self.mounter = mounter
        self._fixed: dict[tuple[int, int], FixedIdentity] = {}

    def load_new(self) -> Policy | None:
        """The policy file as it is now, or None (each problem logged) when it
        is invalid: then the policy in force stays."""
        try:
            return load_policy(self.policy.source)
        except PolicyError as exc:
            for problem in exc.problems:
                log.error("policy reload refused: %s", problem)
            log.error("policy reload refused; still enforcing the previous %s",
                      self.policy.source)
            return None

    def install(self, policy: Policy) -> None:
        """The new policy decides every request from now on; open files and
        directories keep the decisions made when they were opened."""
        self.policy = policy
        log.info("policy reloaded from %s: %d rules", policy.source, len(policy.rules))

    def source_for(self, spec: object) -> IdentitySource:
        if spec == "caller":
            return self.caller
        if spec == "mounter":
            return self.mounter
        assert isinstance(spec, tuple)
        fixed = self._fixed.get(spec)
        if fixed is None:
            fixed = self._fixed[spec] = FixedIdentity(*spec)
        return fixed

    def begin(self, ctx: pyfuse3.RequestContext) -> Request:
        """The caller's live credentials and the policy in force, for one request."""
        try:
            caller = self.caller.backing_creds(ctx)
        except CredentialError as exc:
            raise refuse_unknown_caller(ctx, exc) from None
        except OSError as exc:  # out of descriptors or memory ourselves
            raise FUSEError(exc.errno or errno.EIO) from None
        policy = self.policy  # one policy per request, even across a reload
        return Request(self, ctx, policy, caller,
                       policy.caller(caller.uid, caller.gid, caller.groups))

    def act(self, ctx: pyfuse3.RequestContext, op: str, path: str,
            obj: ObjectFacts | None = None) -> Act:
        return self.begin(ctx).act(op, path, obj)


class NeedsObject(Exception):
    """The deciding rule asks about the file (type, owner): look, then decide."""

    def __init__(self, request: Request, op: str, path: str) -> None:
        super().__init__(op, path)
        self.request, self.op, self.path = request, op, path


@dataclass(frozen=True, slots=True)
class Request:
    gate: PolicyGate
    ctx: pyfuse3.RequestContext
    policy: Policy
    caller: Credentials
    facts: CallerFacts

    def act(self, op: str, path: str, obj: ObjectFacts | None = None) -> Act:
        decision = self.policy.decide(op, path, self.facts, obj)
        if decision.needs_object:
            raise NeedsObject(self, op, path)
        if not decision.allow:
            raise FUSEError(decision.errno)
        source = self.gate.source_for(decision.creds)
        creds = self.caller if source is self.gate.caller else source.backing_creds(self.ctx)
        return Act(creds, source, decision.filters, self.caller.uid, self)

    def decision(self, op: str, path: str, obj: ObjectFacts | None = None) -> Decision:
        """The decision itself (needs_object set when obj is wanted)."""
        return self.policy.decide(op, path, self.facts, obj)
