"""Success-rate ranking: follows rates, explores the configured share, adapts fast, ignores hard declines."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies import success_rate as sr
from policies.base import PolicyEnv, PolicyType, decode_params
from router.model import Candidate, Capabilities, Outcome, RouteContext

PTYPE = PolicyType(sr.Params, sr.build)


def cand(name: str, priority: int = 100) -> Candidate:
    return Candidate(name=name, adapter="sandbox", capabilities=Capabilities(), priority=priority)


A, B, C = cand("a"), cand("b"), cand("c")


def ctx(payment_id: str = "p", **kw: Any) -> RouteContext:
    base: dict[str, Any] = dict(
        payment_id=payment_id, merchant_id="m", amount=1000, currency="EUR", country="DE", method="card",
        card_bin="42424242", card_brand="Visa",
    )
    return RouteContext(**(base | kw))


def ranker(stats: sr.SuccessStats, **params: Any) -> sr.SuccessRateRanker:
    return sr.build(decode_params(PTYPE, {"explore": 0.0} | params), PolicyEnv({"success_stats": stats}))


def feed(stats: sr.SuccessStats, channel: str, pattern: str, key: str = "", t0: float = 0.0) -> None:
    """Record a pattern of outcomes: '1' success, '0' failure."""
    for i, ch in enumerate(pattern):
        stats.record(channel, key, ch == "1", t0 + i)


def rate_pattern(rate: float, n: int) -> str:
    """A deterministic sequence with the given success share, failures spread evenly."""
    return "".join("1" if int((i + 1) * rate) > int(i * rate) else "0" for i in range(n))


def names(cands: tuple[Candidate, ...]) -> list[str]:
    return [c.name for c in cands]


def test_ranking_follows_the_success_rates() -> None:
    stats = sr.SuccessStats()
    feed(stats, "a", rate_pattern(0.70, 300))
    feed(stats, "b", rate_pattern(0.95, 300))
    feed(stats, "c", rate_pattern(0.85, 300))
    assert names(ranker(stats)(ctx(), (A, B, C))) == ["b", "c", "a"]


def test_without_data_the_order_is_by_priority_then_name() -> None:
    stats = sr.SuccessStats()
    assert names(ranker(stats)(ctx(), (cand("z", 1), cand("y", 2), cand("x", 2)))) == ["z", "x", "y"]
    # and without any stats in the env at all
    r = sr.build(decode_params(PTYPE, {"explore": 0}), PolicyEnv())
    assert names(r(ctx(), (cand("z", 1), cand("y", 2), cand("x", 2)))) == ["z", "x", "y"]


@given(st.text(max_size=10), st.lists(st.sampled_from("abcdefgh"), unique=True, max_size=8), st.floats(0, 0.5))
def test_a_permutation_sticky_per_payment(pid: str, chans: list[str], explore: float) -> None:
    stats = sr.SuccessStats()
    for i, ch in enumerate(chans):
        feed(stats, ch, rate_pattern(0.5 + i / 20, 40))
    cands = tuple(cand(c) for c in chans)
    out = ranker(stats, explore=explore)(ctx(pid), cands)
    assert sorted(names(out)) == sorted(chans)
    assert out == ranker(stats, explore=explore)(ctx(pid), cands)


def test_exploration_share_is_as_configured_and_spread_over_the_others() -> None:
    stats = sr.SuccessStats()
    feed(stats, "a", rate_pattern(0.95, 200))
    feed(stats, "b", rate_pattern(0.90, 200))
    feed(stats, "c", rate_pattern(0.80, 200))
    r = ranker(stats, explore=0.05)
    n = 20_000
    firsts = {"a": 0, "b": 0, "c": 0}
    for i in range(n):
        out = names(r(ctx(f"pay_{i}"), (A, B, C)))
        firsts[out[0]] += 1
        if out[0] == "a":
            assert out == ["a", "b", "c"]
        else:
            assert out[1:] == [x for x in ["a", "b", "c"] if x != out[0]]  # the rest keep their ranking
    explored = firsts["b"] + firsts["c"]
    assert abs(explored - 0.05 * n) < 4 * (0.05 * 0.95 * n) ** 0.5
    assert abs(firsts["b"] - firsts["c"]) < 4 * (explored * 0.25) ** 0.5


def events_until_it_loses(stats: sr.SuccessStats) -> int:
    """A (95%, long history) degrades to 20%; B stays at 85%. Events on A until B ranks first."""
    feed(stats, "a", rate_pattern(0.95, 2000))
    feed(stats, "b", rate_pattern(0.85, 2000))
    r = ranker(stats)
    assert names(r(ctx(), (A, B)))[0] == "a"
    bad = rate_pattern(0.20, 2000)
    for i, ch in enumerate(bad, start=1):
        stats.record("a", "", ch == "1", 2000.0 + i)
        if names(r(ctx(), (A, B)))[0] == "b":
            return i
    return len(bad)


def test_a_degraded_channel_loses_within_a_bounded_number_of_events() -> None:
    with_detection = events_until_it_loses(sr.SuccessStats())
    without = events_until_it_loses(sr.SuccessStats(sr.StatsConfig(change_threshold=1.0)))
    assert with_detection <= 25
    assert with_detection < without  # change detection is what makes it quick


def events_until_it_wins_back(stats: sr.SuccessStats) -> int:
    feed(stats, "a", rate_pattern(0.30, 1000))
    feed(stats, "b", rate_pattern(0.85, 1000))
    r = ranker(stats)
    for i in range(1, 2000):
        stats.record("a", "", True, 1000.0 + i)
        if names(r(ctx(), (A, B)))[0] == "a":
            return i
    return 2000


def test_a_recovered_channel_wins_back_within_a_bounded_number_of_events() -> None:
    with_detection = events_until_it_wins_back(sr.SuccessStats())
    assert with_detection <= 100
    assert with_detection < events_until_it_wins_back(sr.SuccessStats(sr.StatsConfig(change_threshold=1.0))) / 4


def test_time_decay_lets_fresh_events_outweigh_old_ones() -> None:
    cfg = sr.StatsConfig(half_life_s=60.0, change_threshold=1.0)
    stale, fresh = sr.SuccessStats(cfg), sr.SuccessStats(cfg)
    for stats, gap in ((stale, 3600.0), (fresh, 1.0)):
        feed(stats, "a", "1" * 200)
        feed(stats, "a", "0" * 10, t0=200 + gap)
    assert stale.estimate("a", "", 0.5, 0) < 0.5 < fresh.estimate("a", "", 0.5, 0)


@pytest.mark.parametrize(
    ("outcome", "code", "counts"),
    [
        (Outcome.APPROVED, None, True),
        (Outcome.SOFT_DECLINE, "issuer_unavailable", False),
        (Outcome.SOFT_DECLINE, "insufficient_funds", None),
        (Outcome.UNAVAILABLE, None, False),
        (Outcome.UNKNOWN, None, False),
        (Outcome.HARD_DECLINE, "stolen_card", None),
        (Outcome.PENDING, None, None),
        (Outcome.REQUIRES_ACTION, None, None),
        (Outcome.SKIPPED, None, None),
        (Outcome.NOT_CHARGED, None, None),
    ],
)
def test_counts_for_channel(outcome: Outcome, code: str | None, counts: bool | None) -> None:
    assert sr.counts_for_channel(outcome.value, code) is counts


def test_counts_for_channel_rejects_an_unknown_outcome() -> None:
    with pytest.raises(ValueError):
        sr.counts_for_channel("maybe", None)


def test_hard_declines_do_not_lower_a_channel() -> None:
    stats = sr.SuccessStats()
    feed(stats, "a", rate_pattern(0.9, 100))
    before = stats.estimate("a", "", 0.8, 20)
    for i in range(500):
        verdict = sr.counts_for_channel("hard_decline", "do_not_honor")
        if verdict is not None:
            stats.record("a", "", verdict, 100.0 + i)
    assert stats.estimate("a", "", 0.8, 20) == before


def test_per_dimension_keys_are_independent() -> None:
    stats = sr.SuccessStats()
    for i in range(300):
        stats.record_outcome("a", ctx(currency="EUR"), i % 10 != 0, float(i))  # 90% on EUR
        stats.record_outcome("a", ctx(currency="USD"), i % 2 == 0, float(i))  # 50% on USD
        stats.record_outcome("b", ctx(currency="EUR"), i % 5 != 0, float(i))  # 80% everywhere
        stats.record_outcome("b", ctx(currency="USD"), i % 5 != 0, float(i))
    r = ranker(stats, dimension="currency")
    assert names(r(ctx(currency="EUR"), (A, B))) == ["a", "b"]
    assert names(r(ctx(currency="USD"), (A, B))) == ["b", "a"]
    assert stats.counts("a", "currency:JPY") == (0.0, 0.0)
    assert stats.counts("a", "bin6:424242") != (0.0, 0.0)
    assert sr.dimension_key("bin6", ctx(card_bin=None)) == ""  # no value: the channel-wide key
    assert sr.dimension_key("card_brand", ctx()) == "card_brand:visa"


def test_a_sparse_key_starts_from_the_channel_wide_rate() -> None:
    stats = sr.SuccessStats()
    feed(stats, "a", rate_pattern(0.95, 500))
    feed(stats, "a", "0", key="bin6:999999", t0=500)
    est = stats.estimate("a", "bin6:999999", prior=0.5, min_samples=20)
    assert 0.85 < est < 0.95  # one failure barely moves it from the channel's ~95%
    assert stats.estimate("a", "bin6:123456", prior=0.5, min_samples=20) == stats.estimate("a", "", 0.5, 20)


def test_snapshot_and_merge_share_counts_without_double_counting() -> None:
    here, there = sr.SuccessStats(), sr.SuccessStats()
    feed(here, "a", "1" * 50)
    feed(there, "a", "0" * 50)
    wire = msgspec.msgpack.encode(there.snapshot())  # what would go through Redis
    peer = msgspec.msgpack.decode(wire, type=sr.Snapshot)
    here.merge("node-2", peer)
    merged = here.counts("a", "")
    here.merge("node-2", peer)  # the same peer again replaces, never adds
    assert here.counts("a", "") == merged
    assert merged[0] == pytest.approx(here.snapshot().cells["a"][""].ss)
    assert merged[1] == pytest.approx(there.snapshot().cells["a"][""].sf)
    assert here.snapshot().cells["a"][""].sf == 0.0  # a snapshot holds only local counts, not the peers'
    assert here.estimate("a", "", 0.5, 0) == pytest.approx(0.5, abs=0.01)
