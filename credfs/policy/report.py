"""`credfs check` and `credfs explain`: a policy's problems and decisions, in words."""

from __future__ import annotations

import argparse
import os
import pwd
from typing import TextIO

from .engine import Decision, Policy, describe_creds
from .loader import PolicyError, load_policy

_ERRNO_NAMES = {1: "EPERM", 2: "ENOENT", 13: "EACCES"}


def check(path: str, out: TextIO) -> int:
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        for problem in exc.problems:
            out.write(f"{problem}\n")
        n = len(exc.problems)
        out.write(f"{path}: invalid ({n} problem{'s' if n != 1 else ''})\n")
        return 1
    out.write(f"{path}: valid: {len(policy.rules)} rules, {len(policy.identities)} "
              f"identities, {len(policy.apps.apps)} apps; default: "
              f"{_outcome(policy.default_decision())}\n")
    return 0


def _outcome(d: Decision) -> str:
    if not d.allow:
        name = _ERRNO_NAMES.get(d.errno, str(d.errno))
        return f"deny {name}" + (" (hidden: lookup gives ENOENT, listings leave it out)"
                                 if d.hides else "")
    filters = f", filters {', '.join(d.filters)}" if d.filters else ""
    return f"allow as {describe_creds(d.creds)}{filters}"


def _caller_ids(args: argparse.Namespace) -> tuple[int, tuple[int, ...], str]:
    try:
        pw = pwd.getpwuid(args.uid)
    except KeyError:
        pw = None
    gid = args.gid if args.gid is not None else (pw.pw_gid if pw else args.uid)
    if args.groups is not None:
        groups = args.groups
    elif pw is not None:
        groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, gid))))
    else:
        groups = (gid,)
    return gid, groups, pw.pw_name if pw else "no passwd entry"


def _acting(policy: Policy, d: Decision, uid: int, gid: int, groups: tuple[int, ...],
            mounter: str | None) -> str:
    if d.creds == "caller":
        return f"the caller: uid={uid} gid={gid} groups={','.join(map(str, groups))}"
    if d.creds == "mounter":
        if mounter:
            from ..identity import parse_mounter
            m_uid, m_gid, m_groups = parse_mounter(mounter)
            return (f"the mounter: uid={m_uid} gid={m_gid} "
                    f"groups={','.join(map(str, m_groups))} (--mounter {mounter})")
        return ("the mounter: the credentials recorded when the mount is made (the user "
                f"running credfs mount, here uid={os.geteuid()}, or its --mounter)")
    assert isinstance(d.creds, tuple)
    return f"the fixed identity uid={d.creds[0]} gid={d.creds[1]} groups={d.creds[1]}, " \
           "no capabilities"


def explain(args: argparse.Namespace, out: TextIO) -> int:
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        for problem in exc.problems:
            out.write(f"{problem}\n")
        out.write(f"{args.policy}: invalid; nothing to explain\n")
        return 1
    path = args.path.strip("/")
    path = "" if path == "." else path
    if any(seg in ("", ".", "..") for seg in path.split("/")) and path:
        out.write(f"path {args.path!r}: expected a path relative to the mount root, without "
                  "'.', '..' or empty segments\n")
        return 2
    gid, groups, user = _caller_ids(args)
    facts = policy.caller(args.uid, gid, groups)
    app = ", ".join(f"{p}" for p in sorted(facts.packages)) or "none"
    perms = ", ".join(sorted(facts.permissions)) or "none"
    out.write(f"policy:   {policy.source} ({len(policy.rules)} rules; first match in file "
              "order wins)\n")
    out.write(f"request:  {args.op} {path or '.'!r} by uid={args.uid} ({user}) gid={gid} "
              f"groups={','.join(map(str, groups))}; app: {app}; permissions: {perms}\n")
    decision = policy.default_decision()
    for d, (rule, why) in policy.trace(args.op, path, facts):
        out.write(f"  {rule.label}: {why}\n")
        if d is not None:
            decision = d
    skipped = len(policy.rules) - len(policy.candidates(path))
    if skipped:
        out.write(f"  ({skipped} rule{'s' if skipped != 1 else ''} for other top-level "
                  "names not considered)\n")
    who = decision.rule.label if decision.rule else "the [defaults] (no rule matched)"
    out.write(f"decision: {_outcome(decision)}\n")
    out.write(f"by:       {who}\n")
    if decision.allow:
        out.write(f"acting:   {_acting(policy, decision, args.uid, gid, groups, args.mounter)}"
                  "\n")
        out.write(f"filters:  {', '.join(decision.filters) or 'none'}\n")
    return 0
