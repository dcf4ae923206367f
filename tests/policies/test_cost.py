"""Cost: one rounding rule, tiers by amount and volume, expected value decides, a permutation."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies import cost
from policies.base import PolicyEnv, PolicyType, decode_params
from policies.success_rate import SuccessStats
from router.model import Candidate, Capabilities, RouteContext

PTYPE = PolicyType(cost.Params, cost.build)


def cand(name: str, fees: Any, priority: int = 100) -> Candidate:
    return Candidate(name=name, adapter="sandbox", capabilities=Capabilities(), fees=fees, priority=priority)


def ctx(amount: int = 10_000, currency: str = "EUR", payment_id: str = "p") -> RouteContext:
    return RouteContext(payment_id=payment_id, merchant_id="m", amount=amount, currency=currency, country="DE", method="card")


def ranker(state: dict[str, Any] | None = None, **params: Any) -> cost.CostRanker:
    return cost.build(decode_params(PTYPE, params), PolicyEnv(state or {}))


def schedule(**kw: Any) -> cost.Schedule:
    return msgspec.convert(kw, cost.Schedule)


def names(cands: tuple[Candidate, ...]) -> list[str]:
    return [c.name for c in cands]


# --------------------------------------------------------------------------- the fee


@given(st.integers(-10**12, 10**12), st.integers(1, 10**6))
def test_round_half_even_matches_exact_rational_rounding(n: int, d: int) -> None:
    assert cost.round_half_even(n, d) == round(Fraction(n, d))  # Fraction rounds half to even


@pytest.mark.parametrize(("amount", "expected"), [(50, 0), (150, 2), (250, 2), (350, 4), (149, 1), (151, 2)])
def test_half_even_at_the_half_boundaries(amount: int, expected: int) -> None:
    # 1% of these amounts is x.5 exactly at 50, 150, 250, 350
    assert cost.fee(schedule(percent_bp=100), amount, "EUR", 0) == expected


def test_fixed_part_and_min_fee() -> None:
    s = schedule(percent_bp=290, fixed=30, min_fee=50)
    assert cost.fee(s, 10_000, "EUR", 0) == 30 + 290
    assert cost.fee(s, 100, "EUR", 0) == 50  # 30 + 3 below the minimum


def test_amount_tiers_are_selected_by_amount() -> None:
    s = schedule(
        percent_bp=500,
        tiers=[{"up_to_amount": 1000, "percent_bp": 300}, {"up_to_amount": 10_000, "percent_bp": 200, "fixed": 10},
               {"up_to_amount": None, "percent_bp": 100}],
    )
    assert cost.fee(s, 1000, "EUR", 0) == 30  # inclusive upper bound
    assert cost.fee(s, 1001, "EUR", 0) == 10 + 20
    assert cost.fee(s, 10_000, "EUR", 0) == 10 + 200
    assert cost.fee(s, 20_000, "EUR", 0) == 200
    capped = schedule(percent_bp=500, tiers=[{"up_to_amount": 1000, "percent_bp": 300}])
    assert cost.fee(capped, 2000, "EUR", 0) == 100  # above every tier: the schedule's own rate


def test_volume_tiers_are_selected_by_monthly_volume() -> None:
    s = schedule(
        percent_bp=300,
        volume_tiers=[{"monthly_volume_from": 1_000_000, "percent_bp": 250},
                      {"monthly_volume_from": 10_000_000, "percent_bp": 200}],
    )
    assert cost.fee(s, 10_000, "EUR", 0) == 300
    assert cost.fee(s, 10_000, "EUR", 999_999) == 300
    assert cost.fee(s, 10_000, "EUR", 1_000_000) == 250
    assert cost.fee(s, 10_000, "EUR", 50_000_000) == 200
    both = schedule(tiers=[{"up_to_amount": 500, "fixed": 7}], volume_tiers=[{"monthly_volume_from": 0, "fixed": 9}])
    assert cost.fee(both, 500, "EUR", 10) == 7  # an amount tier wins over a volume tier
    assert cost.fee(both, 501, "EUR", 10) == 9


def test_currency_schedule_then_default() -> None:
    fees = cost.decode_fees({"eur": {"fixed": 1}, "default": {"fixed": 2}})
    assert cost.fee(fees, 100, "EUR", 0) == 1
    assert cost.fee(fees, 100, "USD", 0) == 2
    with pytest.raises(KeyError):
        cost.fee(cost.decode_fees({"EUR": {"fixed": 1}}), 100, "USD", 0)


@given(
    st.integers(0, 10_000), st.integers(0, 1000), st.integers(0, 500),
    st.integers(0, 10**9), st.integers(0, 10**9),
)
def test_fee_is_an_integer_monotonic_in_amount_within_a_tier(bp: int, fixed: int, min_fee: int, a1: int, a2: int) -> None:
    s = schedule(percent_bp=bp, fixed=fixed, min_fee=min_fee)
    lo, hi = sorted((a1, a2))
    f_lo, f_hi = cost.fee(s, lo, "EUR", 0), cost.fee(s, hi, "EUR", 0)
    assert type(f_lo) is int and f_lo >= min_fee
    assert f_lo <= f_hi


@pytest.mark.parametrize(
    "raw",
    [
        {"EUR": {"percent": 2}},
        {"EUR": {"percent_bp": -1}},
        {"EUR": {"tiers": [{"up_to_amount": 100}, {"up_to_amount": 50}]}},
        {"EUR": {"tiers": [{"up_to_amount": None}, {"up_to_amount": 50}]}},
        {"EUR": {"volume_tiers": [{"monthly_volume_from": 5}, {"monthly_volume_from": 5}]}},
        {"EUR": "2.9%"},
    ],
)
def test_invalid_fee_schedules_are_rejected(raw: Any) -> None:
    with pytest.raises(msgspec.ValidationError):
        cost.decode_fees(raw)


# --------------------------------------------------------------------------- the ranking

fee_configs = st.none() | st.fixed_dictionaries(
    {"EUR": st.fixed_dictionaries({"percent_bp": st.integers(0, 500), "fixed": st.integers(0, 50)})}
)


@given(
    st.lists(st.tuples(st.sampled_from("abcdefgh"), fee_configs, st.integers(0, 3)), unique_by=lambda t: t[0], max_size=8),
    st.integers(0, 10**7),
    st.sampled_from(["EUR", "USD"]),
)
def test_a_permutation_with_priced_channels_by_value(raw: list[tuple[str, Any, int]], amount: int, currency: str) -> None:
    cands = tuple(cand(n, f, p) for n, f, p in raw)
    r = ranker()
    out = r(ctx(amount, currency), cands)
    assert sorted(names(out)) == sorted(names(cands))
    keys = []
    for c in out:
        ev = r.expected(ctx(amount, currency), c)
        keys.append((0, -ev[0], ev[1], c.name) if ev else (1, c.priority, 0, c.name))
    assert keys == sorted(keys)


def test_ties_go_to_the_lower_fee_then_the_name() -> None:
    # at p = 0 every channel is worth 0: the fee decides, then the name
    cands = (cand("b", {"EUR": {"fixed": 5}}), cand("a", {"EUR": {"fixed": 5}}), cand("c", {"EUR": {"fixed": 1}}))
    assert names(ranker(default_success=0.0)(ctx(), cands)) == ["c", "a", "b"]


def test_unpriced_channels_go_last() -> None:
    cands = (cand("free", None, priority=1), cand("usd-only", {"USD": {"fixed": 1}}), cand("priced", {"EUR": {"fixed": 999}}))
    assert names(ranker()(ctx(), cands)) == ["priced", "free", "usd-only"]


def test_a_cheap_channel_with_a_falling_approval_rate_loses_to_a_pricier_reliable_one() -> None:
    stats = SuccessStats()
    cheap, pricey = cand("cheap", {"default": {"percent_bp": 100}}), cand("pricey", {"default": {"percent_bp": 300}})
    r = ranker({"success_stats": stats})
    for i in range(300):
        stats.record("cheap", "", True, float(i))
        stats.record("pricey", "", i % 20 != 0, float(i))  # 95%
    assert names(r(ctx(), (pricey, cheap))) == ["cheap", "pricey"]
    for i in range(300, 340):
        stats.record("cheap", "", i % 2 == 0, float(i))  # falls to 50%
        stats.record("pricey", "", i % 20 != 0, float(i))
    assert names(r(ctx(), (cheap, pricey))) == ["pricey", "cheap"]


def test_monthly_volume_comes_from_the_env_and_is_read_live() -> None:
    fees = {"EUR": {"percent_bp": 300, "volume_tiers": [{"monthly_volume_from": 1_000_000, "percent_bp": 100}]}}
    a, b = cand("a", fees), cand("b", {"EUR": {"percent_bp": 200}})
    volume: dict[str, int] = {}
    r = ranker({"monthly_volume": volume})
    assert names(r(ctx(), (a, b))) == ["b", "a"]
    volume["a"] = 2_000_000
    assert names(r(ctx(), (a, b))) == ["a", "b"]



def test_cost_explores_a_little_known_channel_and_stops_once_it_is_known() -> None:
    stats = SuccessStats()
    fees = {"default": {"percent_bp": 250}}
    a, b = cand("a", fees), cand("b", fees)
    for i in range(2000):
        stats.record("a", "", i % 100 < 92, float(i))  # 92%, well known
    for i in range(5):
        stats.record("b", "", True, float(i))  # b: 5 events only
    greedy = ranker({"success_stats": stats})
    optimistic = cost.build(msgspec.convert({"optimism": 1.0}, cost.Params), PolicyEnv({"success_stats": stats}))
    assert names(greedy(ctx(), (a, b)))[0] == "a" or names(optimistic(ctx(), (a, b)))[0] == "b"
    assert names(optimistic(ctx(), (a, b)))[0] == "b"  # optimism tries the little-known channel
    for i in range(5, 2000):
        stats.record("b", "", i % 100 < 90, float(i))  # now b is a known 90%
    assert names(optimistic(ctx(), (a, b)))[0] == "a"
    flat = cost.build(msgspec.convert({"explore": 0.1}, cost.Params), PolicyEnv({"success_stats": stats}))
    share = sum(names(flat(ctx(payment_id=f"p{i}"), (a, b)))[0] == "b" for i in range(4000)) / 4000
    assert 0.07 < share < 0.13  # the flat share, sticky per payment
