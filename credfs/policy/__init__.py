"""Policies: per-request access and credential rules, as data (TOML)."""

from .engine import OPS, CallerFacts, Decision, ObjectFacts, Policy, Rule, describe_creds
from .loader import PolicyError, Problem, load_policy, parse_policy

__all__ = ["OPS", "CallerFacts", "Decision", "ObjectFacts", "Policy", "PolicyError", "Problem",
           "Rule", "describe_creds", "load_policy", "parse_policy"]
