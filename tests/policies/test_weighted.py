"""Weighted split: sticky per payment, a permutation, zero weights last, frequencies follow the weights."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies import weighted
from policies.base import PolicyEnv, PolicyType, decode_params, validate_params
from router.model import Candidate, Capabilities, RouteContext

PTYPE = PolicyType(weighted.Params, weighted.build, weighted.channel_refs)


def cand(name: str, weight: int = 1) -> Candidate:
    return Candidate(name=name, adapter="sandbox", capabilities=Capabilities(), weight=weight)


def ctx(payment_id: str) -> RouteContext:
    return RouteContext(payment_id=payment_id, merchant_id="m", amount=1000, currency="EUR", country="DE", method="card")


def ranker(raw: dict[str, object] | None = None) -> weighted.WeightedRanker:
    return weighted.build(decode_params(PTYPE, raw or {}), PolicyEnv())


weighted_candidates = st.lists(
    st.builds(cand, st.integers(0, 50).map(lambda i: f"c{i}"), st.integers(0, 10)),
    max_size=8,
    unique_by=lambda c: c.name,
).map(tuple)


@given(st.text(max_size=20), weighted_candidates)
def test_a_permutation_that_is_the_same_for_the_same_payment(pid: str, cands: tuple[Candidate, ...]) -> None:
    out = ranker()(ctx(pid), cands)
    assert sorted(c.name for c in out) == sorted(c.name for c in cands)
    assert ranker()(ctx(pid), cands) == out  # a fresh instance: no hidden state, only the payment id


@given(st.text(max_size=20), weighted_candidates)
def test_fallbacks_keep_their_order_and_zero_weights_go_last(pid: str, cands: tuple[Candidate, ...]) -> None:
    out = ranker()(ctx(pid), cands)
    if not any(c.weight for c in cands):
        assert out == cands
        return
    first, rest = out[0], out[1:]
    assert first.weight > 0
    positive = [c for c in cands if c.weight > 0 and c is not first]
    zero = [c for c in cands if c.weight == 0]
    assert list(rest) == positive + zero


def test_params_weights_override_candidate_weights() -> None:
    cands = (cand("a", 1), cand("b", 1))
    r = ranker({"weights": {"a": 0}})
    assert {r(ctx(f"p{i}"), cands)[0].name for i in range(200)} == {"b"}


def test_empirical_frequencies_converge_to_the_weights() -> None:
    cands = (cand("a", 1), cand("b", 2), cand("c", 7), cand("z", 0))
    r = ranker()
    n = 20_000
    counts = {"a": 0, "b": 0, "c": 0, "z": 0}
    for i in range(n):
        counts[r(ctx(f"pay_{i:08d}"), cands)[0].name] += 1
    assert counts["z"] == 0
    expected = {"a": n * 0.1, "b": n * 0.2, "c": n * 0.7}
    chi2 = sum((counts[k] - e) ** 2 / e for k, e in expected.items())
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


def test_sticky_uniform_is_in_the_unit_interval_and_salted() -> None:
    xs = [weighted.sticky_uniform(f"p{i}", "x") for i in range(1000)]
    assert all(0.0 <= x < 1.0 for x in xs)
    assert xs != [weighted.sticky_uniform(f"p{i}", "y") for i in range(1000)]


def test_params_are_validated_and_channels_checked() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_params(PTYPE, {"weights": {"a": -1}})
    with pytest.raises(msgspec.ValidationError):
        decode_params(PTYPE, {"weight": {"a": 1}})
    assert validate_params(PTYPE, {"weights": {"a": 1, "ghost": 2}}, frozenset({"a"})) == [
        (".weights.ghost", "unknown channel 'ghost'")
    ]
