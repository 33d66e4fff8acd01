"""The policy engine's fast decision path agrees with the explained one.

decide() (what the daemon uses) and trace() (what `credfs explain` prints)
are separate code paths; for any request they must name the same rule.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from policy_bench import generate

from credfs.policy import OPS, ObjectFacts, parse_policy

POLICY = parse_policy("generated.toml", generate(60))
SEGMENTS = ["area0", "area1", "area2", "area3", "area4", "area7", "private", "shared", "2001",
            "2002", "x.tmp", "y.bak", "secret3", "secret8", "f"]


@settings(max_examples=400, deadline=None)
@given(op=st.sampled_from(OPS),
       segments=st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=5),
       uid=st.sampled_from([0, 2001, 2002, 3500]),
       groups=st.sampled_from([(), (3001,), (3001, 3002)]),
       obj=st.sampled_from([None, ObjectFacts(True, None), ObjectFacts(False, 2001),
                            ObjectFacts(False, None, new=True)]))
def test_decide_agrees_with_trace(op: str, segments: list[str], uid: int,
                                  groups: tuple[int, ...], obj: ObjectFacts | None) -> None:
    path = "/".join(segments)
    caller = POLICY.caller(uid, uid, (uid, *groups))
    traced = next((d for d, _why in POLICY.trace(op, path, caller, obj) if d),
                  POLICY.default_decision())
    decided = POLICY.decide(op, path, caller, obj)
    assert (decided.rule, decided.allow, decided.needs_object) == \
        (traced.rule, traced.allow, traced.needs_object)
