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
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
from pyfuse3 import FUSEError

from .creds import CredentialError, Credentials
from .identity import CallerIdentity, IdentitySource, MounterIdentity
from .policy import Decision, Policy, PolicyError, load_policy

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Act:
    creds: Credentials  # the backing operation runs as these
    source: IdentitySource  # asked who creates new objects and who kills setid bits
    filters: tuple[str, ...] = ()


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

    def decide(self, ctx: pyfuse3.RequestContext, op: str, path: str
               ) -> tuple[Decision, Credentials]:
        """The decision for this request and the caller's live credentials."""
        try:
            caller = self.caller.backing_creds(ctx)
        except CredentialError as exc:
            raise refuse_unknown_caller(ctx, exc) from None
        policy = self.policy  # one policy per request, even across a reload
        facts = policy.caller(caller.uid, caller.gid, caller.groups)
        return policy.decide(op, path, facts), caller

    def act(self, ctx: pyfuse3.RequestContext, op: str, path: str) -> Act:
        decision, caller = self.decide(ctx, op, path)
        return self._act(ctx, decision, caller)

    def _act(self, ctx: pyfuse3.RequestContext, decision: Decision, caller: Credentials
             ) -> Act:
        if not decision.allow:
            raise FUSEError(decision.errno)
        source = self.source_for(decision.creds)
        creds = caller if source is self.caller else source.backing_creds(ctx)
        return Act(creds, source, decision.filters)

    def act_listing(self, ctx: pyfuse3.RequestContext, path: str
                    ) -> tuple[Act, Callable[[bytes], bool]]:
        """opendir: who lists the directory, and which of its names are hidden
        from this caller (decided now, with the policy in force now: the open
        directory keeps this decision, as an open file does)."""
        decision, caller = self.decide(ctx, "list", path)
        act = self._act(ctx, decision, caller)
        policy = self.policy
        facts = policy.caller(caller.uid, caller.gid, caller.groups)
        prefix = f"{path}/" if path else ""

        def hidden(name: bytes) -> bool:
            child = prefix + name.decode("utf-8", "surrogateescape")
            return policy.decide("lookup", child, facts).hides

        return act, hidden
