"""Success-rate ranking: follows rates, explores the configured share, adapts fast, ignores hard declines."""

from __future__ import annotations

import math
import random
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies import success_rate as sr
from policies.base import PolicyEnv, PolicyType, decode_params
from router.model import Candidate, Capabilities, Outcome, RouteContext

PTYPE = PolicyType(sr.Params, sr.build)
# explicit estimator configs, so tests do not depend on which one is the default
MIXTURE: dict[str, Any] = {"mixture_half_lives": (300.0, 1000.0, 3000.0, 10000.0), "change_detection": False,
                           "key_model": "offset"}
# the trend line alone, keys shrunk towards the channel-wide rate (the estimator before the mixture)
LINE: dict[str, Any] = {"mixture_half_lives": (), "change_detection": False, "key_model": "shrink"}
DETECT: dict[str, Any] = LINE | {"change_detection": True}  # the trend line with change detection


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
    return sr.build(decode_params(PTYPE, {"explore": 0.0, "optimism": 0.0} | params), PolicyEnv({"success_stats": stats}))


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
    # outage detection off: a 20% rate has failure runs that would rank it last at once
    with_detection = events_until_it_loses(sr.SuccessStats(sr.StatsConfig(outage_min_run=10**9, **DETECT)))
    plain = events_until_it_loses(sr.SuccessStats(sr.StatsConfig(outage_min_run=10**9, trend=False, **LINE)))
    mixture = events_until_it_loses(sr.SuccessStats(sr.StatsConfig(outage_min_run=10**9, **MIXTURE)))
    assert with_detection <= 25
    assert mixture <= 60
    # against a plain discounted window: change detection, or the mixture's short windows, make it quick
    assert with_detection < plain / 2
    assert mixture < plain / 2


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
    with_detection = events_until_it_wins_back(sr.SuccessStats(sr.StatsConfig(**DETECT)))
    assert with_detection <= 250  # restarts from the fast window (half-life 100 events), not from scratch
    mixture = events_until_it_wins_back(sr.SuccessStats(sr.StatsConfig(**MIXTURE)))
    assert mixture <= 250  # the short windows predicted the recovery better
    # against a plain discounted window (no detection, no trend): change detection is what makes it quick
    plain = events_until_it_wins_back(sr.SuccessStats(sr.StatsConfig(trend=False, **LINE)))
    assert with_detection < plain / 4
    assert mixture < plain / 4


def test_time_decay_lets_fresh_events_outweigh_old_ones() -> None:
    cfg = sr.StatsConfig(half_life_s=60.0, change_detection=False, outage_min_run=1000)
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
        # one payment id per outcome: a second outcome of the same payment is a fail-over attempt
        stats.record_outcome("a", ctx(f"ae{i}", currency="EUR"), i % 10 != 0, float(i))  # 90% on EUR
        stats.record_outcome("a", ctx(f"au{i}", currency="USD"), i % 2 == 0, float(i))  # 50% on USD
        stats.record_outcome("b", ctx(f"be{i}", currency="EUR"), i % 5 != 0, float(i))  # 80% everywhere
        stats.record_outcome("b", ctx(f"bu{i}", currency="USD"), i % 5 != 0, float(i))
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
    here, there = sr.SuccessStats(), sr.SuccessStats(sr.StatsConfig(outage_min_run=10**9))  # 50 failures: no outage
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


# --------------------------------------------------------------------------- change, outage, exploration


def test_change_detection_fires_on_a_three_point_drop_within_bounded_events() -> None:
    stats = sr.SuccessStats(sr.StatsConfig(outage_min_run=10**9, **DETECT))
    feed(stats, "a", rate_pattern(0.90, 3000))
    slow_before = sum(stats.counts("a", ""))
    for i, ch in enumerate(rate_pattern(0.87, 1500)):
        stats.record("a", "", ch == "1", 3000.0 + i)
        if sum(stats.counts("a", "")) < slow_before / 2:  # slow counts restarted from the fast window
            break
    else:
        pytest.fail("a 3-point drop was never detected")
    assert i < 1500
    # and a stable rate does not fire over as many events
    calm = sr.SuccessStats(sr.StatsConfig(outage_min_run=10**9, **DETECT))
    feed(calm, "a", rate_pattern(0.90, 4500))
    assert sum(calm.counts("a", "")) > 1000


@pytest.mark.parametrize("extra", [{}, MIXTURE], ids=["trend", "mixture"])
def test_an_outage_ranks_the_channel_last_and_does_not_lower_its_rate(extra: dict[str, Any]) -> None:
    stats = sr.SuccessStats(sr.StatsConfig(outage_hold_s=10.0, **extra))
    feed(stats, "a", rate_pattern(0.95, 500))
    feed(stats, "b", rate_pattern(0.85, 500))
    before = stats.estimate("a", "", 0.8, 20)
    feed(stats, "a", "0" * 8, t0=500)  # unavailable x8: implausible at 95%
    assert stats.is_down("a")
    assert names(ranker(stats)(ctx(), (A, B))) == ["b", "a"]
    assert stats.estimate("a", "", 0.8, 20) == pytest.approx(before)
    stats.record("b", "", True, 520.0)  # time passes: the hold expires, a is tried again
    assert not stats.is_down("a")
    assert names(ranker(stats)(ctx(), (A, B))) == ["a", "b"]


def test_a_fail_over_attempt_does_not_move_the_approval_rate() -> None:
    stats = sr.SuccessStats()
    for i in range(200):
        stats.record_outcome("b", ctx(f"p{i}"), True, float(i))
    before = stats.counts("b", "")
    stats.record_outcome("a", ctx("x"), False, 300.0)  # first attempt at a: soft decline
    stats.record_outcome("b", ctx("x"), False, 300.0)  # the fail-over at b: the card's odds, not b's
    assert stats.counts("b", "") == before


def test_exploration_shrinks_as_evidence_grows() -> None:
    def explored(n: int) -> float:
        stats = sr.SuccessStats(sr.StatsConfig(change_detection=False))
        feed(stats, "a", rate_pattern(0.92, 2000))
        feed(stats, "b", rate_pattern(0.90, n))  # b: the loser, known from n events
        r = ranker(stats, optimism=1.0)
        return sum(names(r(ctx(f"q{i}"), (A, B)))[0] == "b" for i in range(200)) / 200

    assert explored(5) == 1.0  # barely known: tried
    assert explored(2000) == 0.0  # well known loser: not tried
    scores = []
    for n in (10, 100, 1000):
        stats = sr.SuccessStats()
        feed(stats, "b", rate_pattern(0.90, n))
        scores.append(stats.score("b", "", 0.8, 20, 1.0) - stats.estimate("b", "", 0.8, 20))
    assert scores[0] > scores[1] > scores[2] > 0


# --------------------------------------------------------------------------- trend, card-caused declines, keys


def drift_error(cfg: sr.StatsConfig, seed: int) -> float:
    """|estimate - truth| after a linear drift from 95 % to 55 % over 2000 events (seeded outcomes)."""
    rng = random.Random(seed)
    stats = sr.SuccessStats(cfg)
    feed(stats, "a", rate_pattern(0.95, 2000))
    n = 2000
    for i in range(n):
        stats.record("a", "", rng.random() < 0.95 - 0.40 * i / n, 2000.0 + i)
    return abs(stats.estimate("a", "", 0.5, 0) - 0.55)


def test_trend_follows_a_linear_drift_with_less_lag_than_a_plain_window() -> None:
    trend = [drift_error(sr.StatsConfig(outage_min_run=10**9, **LINE), s) for s in range(5)]
    plain = [drift_error(sr.StatsConfig(trend=False, outage_min_run=10**9, **LINE), s) for s in range(5)]
    assert max(trend) < 0.10  # near where the rate is now (outcome noise remains)
    assert min(plain) > 0.15  # about a half-life behind: where the rate was 1000 events ago + noise
    assert sum(trend) < sum(plain) / 3


@given(st.floats(0.05, 0.95), st.integers(50, 3000))
def test_a_flat_rate_reads_as_the_plain_discounted_mean(rate: float, n: int) -> None:
    # an insignificant slope is shrunk to nothing: steady state pays no noise for trend following
    with_trend = sr.SuccessStats(sr.StatsConfig(outage_min_run=10**9, **LINE))
    plain = sr.SuccessStats(sr.StatsConfig(trend=False, outage_min_run=10**9, **LINE))
    for stats in (with_trend, plain):
        feed(stats, "a", rate_pattern(rate, n))
    assert with_trend.estimate("a", "", 0.5, 0) == pytest.approx(plain.estimate("a", "", 0.5, 0))


OUTCOMES = st.sampled_from([
    ("approved", None), ("soft_decline", "do_not_honor"), ("unavailable", None),  # the channel's
    ("hard_decline", "stolen_card"), ("soft_decline", "insufficient_funds"),  # the card's
    ("pending", None),
])


@given(st.lists(OUTCOMES, max_size=300), st.integers(0, 40))
def test_card_caused_declines_do_not_move_a_channels_score(outcomes: list[tuple[str, str | None]], extra: int) -> None:
    """Recording a stream with card-caused declines (and pending) mixed in scores the channel exactly as
    the stream without them: through `counts_for_channel`, they are never recorded."""
    mixed, clean = sr.SuccessStats(), sr.SuccessStats()
    card_caused = [("hard_decline", "do_not_honor"), ("soft_decline", "card_velocity_exceeded")] * extra
    t = 0.0
    for i, (outcome, code) in enumerate([*outcomes, *card_caused]):
        t += 1.0
        verdict = sr.counts_for_channel(outcome, code)
        if verdict is None:
            assert outcome in ("hard_decline", "pending") or code in sr.CARD_CAUSED_SOFT_CODES
            continue
        mixed.record_outcome("a", ctx(f"m{i}"), verdict, t)
        clean.record_outcome("a", ctx(f"m{i}"), verdict, t)
    assert mixed.score("a", "country:DE", 0.8, 20, 1.0) == clean.score("a", "country:DE", 0.8, 20, 1.0)
    if not outcomes or all(sr.counts_for_channel(o, c) is None for o, c in outcomes):
        assert mixed.counts("a", "") == (0.0, 0.0)  # only card-caused outcomes: nothing was learnt


def test_change_detection_reacts_to_a_step_in_either_direction() -> None:
    for before, after in ((0.92, 0.60), (0.60, 0.92)):
        stats = sr.SuccessStats(sr.StatsConfig(outage_min_run=10**9, **DETECT))
        feed(stats, "a", rate_pattern(before, 3000))
        n_before = sum(stats.counts("a", ""))
        for i, ch in enumerate(rate_pattern(after, 500)):
            stats.record("a", "", ch == "1", 3000.0 + i)
            if sum(stats.counts("a", "")) < n_before / 2:
                break
        assert i < 100  # a 32-point step restarts the estimate within a hundred events
        feed(stats, "a", rate_pattern(after, 200), t0=4000.0)
        assert abs(stats.estimate("a", "", 0.5, 0) - after) < abs(before - after) / 4  # a plain window: ~85 % of the step away


def test_key_samples_pull_a_segment_towards_the_channel() -> None:
    stats = sr.SuccessStats(sr.StatsConfig(change_detection=False, key_model="shrink"))
    for i in range(600):
        stats.record_outcome("a", ctx(f"d{i}", country="DE"), i % 10 != 0, float(i))  # 90 % in DE
    for i in range(60):
        stats.record_outcome("a", ctx(f"f{i}", country="FR"), i % 5 != 0, 600.0 + i)  # 80 % in FR, little data
    wide = stats.estimate("a", "", 0.5, 0)
    own = stats.estimate("a", "country:FR", 0.5, 0, key_samples=0.0)
    pooled = stats.estimate("a", "country:FR", 0.5, 0, key_samples=200.0)
    assert own == pytest.approx(0.8, abs=0.01)
    assert own < pooled < wide
    assert stats.estimate("a", "country:FR", 0.5, 0, key_samples=1e12) == pytest.approx(wide)
    # the ranker's param reaches the stats
    r = ranker(stats, dimension="country", key_samples=1e12, min_samples=0.0)
    assert r.scores(ctx(country="FR"), (A,))["a"] == pytest.approx(wide)


def test_expected_outcomes_count_as_evidence_on_their_way() -> None:
    """Delayed feedback: outcomes already sent for shrink a channel's optimism bonus until they arrive,
    so a little-known channel is not sent a whole delay's worth of payments before its first outcome."""
    stats = sr.SuccessStats()
    feed(stats, "a", rate_pattern(0.90, 2000))
    r = ranker(stats, optimism=1.0)
    assert names(r(ctx("x"), (A, B)))[0] == "b"  # b is unknown: tried
    sent = 0
    while names(r(ctx(f"w{sent}"), (A, B)))[0] == "b":
        stats.expect("b", ctx(f"w{sent}"))
        sent += 1
    assert 0 < sent < 300  # without the pending count b would get every payment until outcomes arrive
    before = stats.score("b", "", 0.8, 20, 1.0)
    for i in range(sent):  # the outcomes arrive: the pending count goes, the evidence stays
        stats.record_outcome("b", ctx(f"w{i}"), True, 3000.0 + i)
    assert stats._pending == {} and stats._expected == {}
    assert stats.counts("b", "")[0] == pytest.approx(sent, rel=0.01)
    assert stats.score("b", "", 0.8, 20, 1.0) != before
    stats.expect("a", ctx("hard"))
    stats.settle(ctx("hard"))  # e.g. a hard decline: never recorded, no longer pending
    assert stats._pending == {}


def declining(start: float, end: float, n: int) -> str:
    """A deterministic sequence whose success share moves linearly from `start` to `end`."""
    out, cum = [], 0.0
    for i in range(n):
        nxt = cum + start + (end - start) * i / n
        out.append("1" if int(nxt) > int(cum) else "0")
        cum = nxt
    return "".join(out)


@pytest.mark.parametrize("ahead", [True, False])
def test_a_drifting_channel_is_read_ahead_over_its_outcomes_on_their_way(ahead: bool) -> None:
    """Delayed feedback: 800 outcomes of a channel falling from 95 % to 80 % are still on their way. Read
    ahead along its trend (the default), its rate is nearer where the channel is now than the rate its
    arrived outcomes show; with `trend_ahead: false`, or nothing pending, it reads as before."""
    total, late = 4000, 800
    stats = sr.SuccessStats(sr.StatsConfig(outage_min_run=10**9, trend_ahead=ahead, **MIXTURE))
    feed(stats, "a", declining(0.95, 0.80, total)[: total - late])
    arrived = stats.score("a", "", 0.8, 20, 0.0)
    for i in range(late):
        stats.expect("a", ctx(f"late{i}"))
    read = stats.score("a", "", 0.8, 20, 0.0)
    now = 0.80  # the true rate at the last payment sent
    if ahead:
        assert read < arrived
        assert abs(read - now) < abs(arrived - now)
    else:
        assert read == arrived
    for i in range(late):
        stats.settle(ctx(f"late{i}"))
    assert stats.score("a", "", 0.8, 20, 0.0) == arrived


@pytest.mark.parametrize("seed", range(5))
def test_a_steady_channel_is_not_moved_by_its_outcomes_on_their_way(seed: int) -> None:
    """Random outcomes at a steady 90 %: their noise slope is shrunk away, nothing is read ahead."""
    rng = random.Random(seed)
    stats = sr.SuccessStats(sr.StatsConfig(outage_min_run=10**9, **MIXTURE))
    feed(stats, "a", "".join("1" if rng.random() < 0.90 else "0" for _ in range(3000)))
    before = stats.score("a", "", 0.8, 20, 0.0)
    for i in range(800):
        stats.expect("a", ctx(f"late{i}"))
    assert stats.score("a", "", 0.8, 20, 0.0) == pytest.approx(before, abs=1e-3)


def step_in_two_countries(scope: str) -> tuple[dict[str, float], dict[str, float], float]:
    """92 % for 3000 payments (DE twice as many as FR), then 75 % for 60: (evidence before, after, FR rate)."""
    stats = sr.SuccessStats(sr.StatsConfig(outage_min_run=10**9, change_scope=scope, **DETECT))  # type: ignore[arg-type]
    for i, ch in enumerate(rate_pattern(0.92, 3000)):
        stats.record_outcome("a", ctx(f"p{i}", country="DE" if i % 3 else "FR"), ch == "1", float(i))
    before = {k: sum(stats.counts("a", k)) for k in ("", "country:DE", "country:FR")}
    for i, ch in enumerate(rate_pattern(0.75, 60)):
        stats.record_outcome("a", ctx(f"q{i}", country="DE" if i % 3 else "FR"), ch == "1", 3000.0 + i)
    after = {k: sum(stats.counts("a", k)) for k in before}
    return before, after, stats.estimate("a", "country:FR", 0.5, 0)


def test_a_channel_wide_change_restarts_every_key_of_the_channel() -> None:
    before, after, fr = step_in_two_countries("channel")  # the default
    assert all(after[k] < before[k] / 2 for k in before), (before, after)  # the sparse FR key restarted too
    _, after_by_key, fr_by_key = step_in_two_countries("key")
    assert after_by_key["country:FR"] > before["country:FR"] / 2  # 20 FR events: too few for its own alarm
    assert fr < fr_by_key - 0.01  # FR reads its recent window, not 1000 events of the old rate


EVENTS = st.lists(
    st.tuples(st.sampled_from("ab"), st.sampled_from(["DE", "FR", None]), st.booleans(), st.floats(0, 30)),
    max_size=200,
)


@given(EVENTS, st.floats(0, 2), st.sampled_from([None, 0.0, 50.0]), st.floats(0, 50), st.sampled_from([(), (30.0, 300.0)]),
       st.sampled_from(["offset", "shrink"]))
def test_the_inlined_score_agrees_with_estimate_and_is_down(
    events: list[tuple[str, str | None, bool, float]], optimism: float, key_samples: float | None, min_samples: float,
    mixture: tuple[float, ...], key_model: str,
) -> None:
    stats = sr.SuccessStats(sr.StatsConfig(stale_half_life_events=50.0, outage_hold_s=5.0, mixture_half_lives=mixture,
                                           key_model=key_model))  # type: ignore[arg-type]
    t = 0.0
    for i, (channel, country, ok, dt) in enumerate(events):
        t += dt
        if country is None:
            stats.expect(channel, ctx(f"p{i}"))  # an outcome on its way
        else:
            stats.record_outcome(channel, ctx(f"p{i}", country=country), ok, t)
    for channel in "abc":
        for key in ("", "country:DE", "country:FR", "country:IT"):
            est, n = stats._estimate(channel, key, 0.8, min_samples, key_samples)
            assert est == pytest.approx(stats.estimate(channel, key, 0.8, min_samples, key_samples))
            n += stats._pending.get((channel, key), 0) if optimism > 0 else 0
            ref = est + (optimism * math.sqrt(est * (1 - est) / (n + 1)) if optimism > 0 else 0.0)
            ref -= 1.0 if stats.is_down(channel) else 0.0
            assert stats.score(channel, key, 0.8, min_samples, optimism, key_samples) == pytest.approx(ref)


def step_error(cfg: sr.StatsConfig, after: int) -> float:
    """|estimate - truth| `after` events into a step from 95 % down to 85 % (after 5000 events at 95 %)."""
    stats = sr.SuccessStats(cfg)
    feed(stats, "a", rate_pattern(0.95, 5000) + rate_pattern(0.85, after))
    return abs(stats.estimate("a", "", 0.5, 0) - 0.85)


def test_the_mixture_follows_a_step_sooner_than_the_slow_window() -> None:
    # the short windows predicted the new outcomes better, so they take the weight
    quiet = LINE | {"outage_min_run": 10**9}
    slow = step_error(sr.StatsConfig(**quiet), 600)
    mixed = step_error(sr.StatsConfig(**(quiet | MIXTURE)), 600)
    assert slow > 0.03  # the 1000-event line is still a third of the way back to the old rate
    assert mixed < 0.8 * slow


def steady_error(cfg: sr.StatsConfig, seed: int) -> float:
    rng = random.Random(seed)
    stats = sr.SuccessStats(cfg)
    for i in range(20000):
        stats.record("a", "", rng.random() < 0.9, float(i))
    return abs(stats.estimate("a", "", 0.5, 0) - 0.9)


def test_in_steady_state_the_mixture_reads_the_long_windows() -> None:
    # nothing changes: the long windows predict as well and average more outcomes, so the estimate is
    # more precise than the 1000-event line's
    quiet = LINE | {"outage_min_run": 10**9}
    line = [steady_error(sr.StatsConfig(**quiet), s) for s in range(12)]
    mixed = [steady_error(sr.StatsConfig(**(quiet | MIXTURE)), s) for s in range(12)]
    assert sum(mixed) < 0.9 * sum(line)


def test_the_mixture_evidence_is_its_windows_counts_by_weight() -> None:
    stats = sr.SuccessStats(sr.StatsConfig(**(MIXTURE | {"outage_min_run": 10**9})))
    feed(stats, "a", rate_pattern(0.9, 50))
    _, n, _ = stats.rate("a", "")
    assert 45 < n < 50  # every window holds about the 50 events (the longest ones barely decayed)
    feed(stats, "a", rate_pattern(0.9, 30000), t0=50)
    _, n, _ = stats.rate("a", "")
    assert n > 1443  # more than the 1000-event window holds: the long windows carry weight


def test_reconfiguring_the_mixture_on_and_off_keeps_what_was_learnt() -> None:
    stats = sr.SuccessStats(sr.StatsConfig(outage_min_run=10**9, **LINE))
    feed(stats, "a", rate_pattern(0.9, 2000))
    line = stats.estimate("a", "", 0.5, 0)
    stats.reconfigure(sr.StatsConfig(outage_min_run=10**9, **MIXTURE))
    feed(stats, "a", rate_pattern(0.9, 200), t0=2000)
    assert stats.estimate("a", "", 0.5, 0) == pytest.approx(0.9, abs=0.01)
    stats.reconfigure(sr.StatsConfig(outage_min_run=10**9, **LINE))
    stats.record("a", "", True, 2300.0)
    assert stats.estimate("a", "", 0.5, 0) == pytest.approx(line, abs=0.01)


def test_outcomes_are_learnt_only_under_the_dimensions_chains_read() -> None:
    stats = sr.SuccessStats()
    by_country = ranker(stats, dimension="country")
    stats.dimensions = sr.dimensions_read([by_country, object()])
    assert stats.dimensions == ("none", "country")
    stats.record_outcome("a", ctx("p1", country="FR"), True, 1.0)
    assert sum(stats.counts("a", "")) == 1 and sum(stats.counts("a", "country:FR")) == 1
    assert stats.counts("a", "currency:EUR") == (0.0, 0.0)  # no chain reads it: not kept
    stats.record_outcome("a", ctx("p2"), True, 2.0, dimensions=["currency"])  # asked for explicitly
    assert sum(stats.counts("a", "currency:EUR")) == 1
    assert sr.dimensions_read([]) == ("none",)


# --- keys as the channel's level plus the key's offset (`key_model: offset`, the default) ---

OFFSET: dict[str, Any] = MIXTURE | {"outage_min_run": 10**9}


def two_countries(stats: sr.SuccessStats, de: float, fr: float, n: int, t0: float = 0.0, prefix: str = "p") -> None:
    """n payments, DE twice as many as FR, each country at its own deterministic rate."""
    de_outcomes, fr_outcomes = iter(rate_pattern(de, n)), iter(rate_pattern(fr, n))
    for i in range(n):
        country = "DE" if i % 3 else "FR"
        ok = next(de_outcomes if country == "DE" else fr_outcomes) == "1"
        stats.record_outcome("a", ctx(f"{prefix}{i}", country=country), ok, t0 + i)


def test_a_sparse_key_follows_a_drift_of_its_channel_with_all_the_channels_traffic() -> None:
    """The whole channel falls from 92 % to 82 %: FR (a third of the traffic) reads the drop sooner as
    level + offset than from its own events alone."""
    errors = {}
    for model in ("offset", "shrink"):
        stats = sr.SuccessStats(sr.StatsConfig(**(OFFSET | {"key_model": model})))
        two_countries(stats, 0.92, 0.92, 3000)
        for step in range(10):  # 1 point down every 100 payments
            two_countries(stats, 0.91 - step / 100, 0.91 - step / 100, 100, 3000.0 + 100 * step, f"s{step}-")
        two_countries(stats, 0.82, 0.82, 300, 4000.0, "e")
        errors[model] = stats.estimate("a", "country:FR", 0.5, 0, key_samples=50.0) - 0.82
    assert errors["offset"] < errors["shrink"] - 0.01, errors
    assert abs(errors["offset"]) < 0.03, errors


def test_a_keys_own_difference_stays_when_the_channels_traffic_mix_changes() -> None:
    """DE 92 %, FR 80 %: each key reads its own rate; then only DE traffic comes for a while (the router
    sent FR elsewhere): the level does not move with the mix, so FR still reads 80 %, not DE's rate."""
    stats = sr.SuccessStats(sr.StatsConfig(**OFFSET))
    two_countries(stats, 0.92, 0.80, 6000)
    assert stats.estimate("a", "country:DE", 0.5, 0, key_samples=0.0) == pytest.approx(0.92, abs=0.015)
    assert stats.estimate("a", "country:FR", 0.5, 0, key_samples=0.0) == pytest.approx(0.80, abs=0.015)
    fr_before = stats.estimate("a", "country:FR", 0.5, 0, key_samples=0.0)
    for i, ch in enumerate(rate_pattern(0.92, 3000)):
        stats.record_outcome("a", ctx(f"d{i}", country="DE"), ch == "1", 6000.0 + i)
    assert stats.estimate("a", "", 0.5, 0) > 0.90  # the channel-wide rate moved with the mix
    assert stats.estimate("a", "country:FR", 0.5, 0, key_samples=0.0) == pytest.approx(fr_before, abs=0.01)
    # key_samples pulls a key's offset towards 0: it reads as the channel's level
    level = stats.estimate("a", "country:FR", 0.5, 0, key_samples=1e12)
    assert level == pytest.approx(stats.estimate("a", "country:DE", 0.5, 0, key_samples=1e12))
    assert fr_before < level < 0.92


def test_an_outages_failures_never_reach_the_level() -> None:
    stats = sr.SuccessStats(sr.StatsConfig(**(MIXTURE | {"outage_min_run": 4})))
    two_countries(stats, 0.90, 0.90, 2000)
    before = stats.estimate("a", "country:DE", 0.5, 0)
    for i in range(40):  # implausible at 90 %: an outage
        stats.record_outcome("a", ctx(f"x{i}", country="DE" if i % 3 else "FR"), False, 2000.0 + i)
    assert stats.is_down("a")
    stats.record_outcome("a", ctx("back", country="DE"), True, 2050.0)
    assert stats.estimate("a", "country:DE", 0.5, 0) == pytest.approx(before, abs=0.002)
    # a short run of declines does reach it, once the run ends
    for i in range(3):
        stats.record_outcome("a", ctx(f"d{i}", country="DE"), False, 2060.0 + i)
    held = stats.estimate("a", "country:DE", 0.5, 0)
    stats.record_outcome("a", ctx("ok", country="DE"), True, 2070.0)
    assert stats.estimate("a", "country:DE", 0.5, 0) < held


def test_levels_and_offsets_restart_from_a_saved_snapshot() -> None:
    stats = sr.SuccessStats(sr.StatsConfig(**OFFSET))
    two_countries(stats, 0.92, 0.80, 3000)
    saved = msgspec.msgpack.decode(msgspec.msgpack.encode(stats.snapshot()), type=sr.Snapshot)
    # a snapshot from before levels were saved: they are rebuilt from the counts, close
    older = sr.SuccessStats(sr.StatsConfig(**OFFSET))
    assert older.restore(sr.Snapshot(cells=saved.cells)) == sum(len(k) for k in saved.cells.values())
    for key in ("", "country:DE", "country:FR"):
        assert older.estimate("a", key, 0.5, 0, key_samples=0.0) == pytest.approx(
            stats.estimate("a", key, 0.5, 0, key_samples=0.0), abs=0.01), key
    # with the saved levels and offsets every key reads as it did
    again = sr.SuccessStats(sr.StatsConfig(**OFFSET))
    assert again.restore(saved) == sum(len(k) for k in saved.cells.values())
    for key in ("country:DE", "country:FR"):
        for key_samples in (0.0, 50.0):
            assert again.estimate("a", key, 0.5, 0, key_samples=key_samples) == pytest.approx(
                stats.estimate("a", key, 0.5, 0, key_samples=key_samples), abs=1e-9), key
    # one outcome later the keys still read their rates (no level rebuilt from a single event)
    again.record_outcome("a", ctx("next", country="FR"), True, 3001.0)
    assert again.estimate("a", "country:FR", 0.5, 0, key_samples=0.0) == pytest.approx(0.80, abs=0.015)


def test_reconfigured_windows_start_the_levels_again_and_shrink_reads_the_keys_own_rate() -> None:
    stats = sr.SuccessStats(sr.StatsConfig(**OFFSET))
    two_countries(stats, 0.92, 0.80, 3000)
    assert stats._levels and any(w.off is not None for w in stats._watch.values())
    stats.reconfigure(sr.StatsConfig(**(OFFSET | {"mixture_half_lives": (500.0, 5000.0)})))
    assert not stats._levels and all(w.off is None for w in stats._watch.values())
    two_countries(stats, 0.92, 0.80, 300, 3000.0, "q")
    assert stats.estimate("a", "country:FR", 0.5, 0, key_samples=0.0) < 0.86
    stats.reconfigure(sr.StatsConfig(**(OFFSET | {"key_model": "shrink"})))
    shrink = stats.estimate("a", "country:FR", 0.5, 0, key_samples=0.0)
    p, _, _ = stats.rate("a", "country:FR")
    assert shrink == pytest.approx(p)


# --- the same in scale-out: peers' levels and offsets pooled in (`merge`) ---


def exchange(nodes: list[sr.SuccessStats], scale: bool = True) -> None:
    """Every node publishes its snapshot (over the wire format) and merges every other node's; then ends
    the round (`after_merge`: event scales), unless `scale` is False (counts merged, windows unscaled)."""
    wires = [msgspec.msgpack.encode(node.snapshot()) for node in nodes]
    for i, node in enumerate(nodes):
        for j, wire in enumerate(wires):
            if i != j:
                node.merge(f"node-{j}", msgspec.msgpack.decode(wire, type=sr.Snapshot))
        if scale:
            node.after_merge(f"node-{j}" for j in range(len(nodes)) if j != i)


def shared_traffic(
    nodes: list[sr.SuccessStats], de: float, fr: float, n: int, t0: float, prefix: str, scale: bool = True
) -> None:
    """`two_countries` traffic spread over the nodes, snapshots exchanged every 100 payments."""
    de_outcomes, fr_outcomes = iter(rate_pattern(de, n)), iter(rate_pattern(fr, n))
    for i in range(n):
        country = "DE" if i % 3 else "FR"
        ok = next(de_outcomes if country == "DE" else fr_outcomes) == "1"
        # each node in turn takes three payments (two DE, one FR): every node sees both countries
        nodes[(i // 3) % len(nodes)].record_outcome("a", ctx(f"{prefix}{i}", country=country), ok, t0 + i)
        if i % 100 == 99:
            exchange(nodes, scale)


def shared_drift_error(nodes: list[sr.SuccessStats], scale: bool = True) -> float:
    """`two_countries` traffic (DE 92 %, FR 80 %) shared by the nodes, then the whole channel drops 10
    points over 1,000 payments; FR's worst error over the nodes 300 payments after the drop ends."""
    shared_traffic(nodes, 0.92, 0.80, 6000, 0.0, "p", scale)
    for node in nodes:  # before the drift every node reads each country's own rate
        assert node.estimate("a", "country:DE", 0.5, 0, key_samples=0.0) == pytest.approx(0.92, abs=0.015)
        assert node.estimate("a", "country:FR", 0.5, 0, key_samples=0.0) == pytest.approx(0.80, abs=0.015)
    for step in range(10):  # 1 point down every 100 payments
        shared_traffic(nodes, 0.91 - step / 100, 0.79 - step / 100, 100, 6000.0 + 100 * step, f"s{step}-", scale)
    shared_traffic(nodes, 0.82, 0.70, 300, 7000.0, "e", scale)
    return max(abs(node.estimate("a", "country:FR", 0.5, 0, key_samples=50.0) - 0.70) for node in nodes)


def test_scale_out_keys_follow_a_channel_drift_with_every_instances_traffic() -> None:
    """Three instances share the traffic: each reads a key as the pooled level plus the pooled offset,
    so FR follows the whole channel's drop sooner than under shrink, and keeps its own difference."""
    errors = {
        model: shared_drift_error([sr.SuccessStats(sr.StatsConfig(**(OFFSET | {"key_model": model}))) for _ in range(3)])
        for model in ("offset", "shrink")
    }
    assert errors["offset"] < errors["shrink"] - 0.01, errors


def test_scale_out_windows_span_the_clusters_payments_not_the_instances_events() -> None:
    """With three instances each key's event scale becomes 3 (each of its events stands for three of the
    cluster's), so its windows span the payments one instance's would: FR follows the drop about as
    soon as on one instance, where unscaled windows (3x the payments) lag."""
    nodes = [sr.SuccessStats(sr.StatsConfig(**OFFSET)) for _ in range(3)]
    scaled = shared_drift_error(nodes)
    assert {w.dec.scale for node in nodes for w in node._watch.values()} == {3.0}
    unscaled = shared_drift_error([sr.SuccessStats(sr.StatsConfig(**OFFSET)) for _ in range(3)], scale=False)
    alone = shared_drift_error([sr.SuccessStats(sr.StatsConfig(**OFFSET))])
    assert scaled < unscaled - 0.01, (scaled, unscaled, alone)
    assert scaled < alone + 0.025, (scaled, unscaled, alone)
    # the trend line alone (no mixture, keys shrunk): its slow counts scale the same way
    line = [sr.SuccessStats(sr.StatsConfig(**(LINE | {"outage_min_run": 10**9}))) for _ in range(3)]
    unscaled_line = [sr.SuccessStats(sr.StatsConfig(**(LINE | {"outage_min_run": 10**9}))) for _ in range(3)]
    assert shared_drift_error(line) < shared_drift_error(unscaled_line, scale=False) - 0.005
    # a peer that is gone: forgotten, and the key's scale falls back as only this instance's events come
    here = nodes[0]
    assert here.after_merge([]) == 2 and not here._remote
    for i, ch in enumerate(rate_pattern(0.82, 600)):
        here.record_outcome("a", ctx(f"alone{i}", country="DE"), ch == "1", 8000.0 + i)
        if i % 100 == 99:
            here.after_merge([])
    assert here._watch[("a", "")].dec.scale == 1.0


def test_scale_out_instances_with_different_traffic_read_each_key_as_the_one_that_sees_it() -> None:
    """One instance gets all of DE (92 %), the other all of FR (80 %): after merging, both read DE as
    92 % and FR as 80 %, not the average level; an instance reads a key it never saw from its peer."""
    de_only, fr_only = (sr.SuccessStats(sr.StatsConfig(**OFFSET)) for _ in range(2))
    for i, (d, f) in enumerate(zip(rate_pattern(0.92, 4000), rate_pattern(0.80, 2000) * 2, strict=True)):
        de_only.record_outcome("a", ctx(f"d{i}", country="DE"), d == "1", float(i))
        fr_only.record_outcome("a", ctx(f"f{i}", country="FR"), f == "1", float(i))
    exchange([de_only, fr_only])
    for node in (de_only, fr_only):
        assert node.estimate("a", "country:DE", 0.5, 0, key_samples=50.0) == pytest.approx(0.92, abs=0.01)
        assert node.estimate("a", "country:FR", 0.5, 0, key_samples=50.0) == pytest.approx(0.80, abs=0.01)
        # the ranker's hot path reads the same with peers merged
        assert node.score("a", "country:FR", 0.5, 0, 0.0, key_samples=50.0) == pytest.approx(
            node.estimate("a", "country:FR", 0.5, 0, key_samples=50.0))


def test_scale_out_a_peer_without_levels_stands_in_with_its_counts() -> None:
    """A peer on `key_model: shrink` (or a build before levels: a snapshot without the fields) publishes
    counts only; they stand in as its level and offsets, so keys still read their own rates."""
    here = sr.SuccessStats(sr.StatsConfig(**OFFSET))
    there = sr.SuccessStats(sr.StatsConfig(**(OFFSET | {"key_model": "shrink"})))
    shared_traffic([here, there], 0.92, 0.80, 6000, 0.0, "p")
    published = there.snapshot()
    assert published.levels == {} and published.offsets == {}
    assert here.snapshot().levels["a"]["country"][1] > 0  # ours carries them
    old_wire = msgspec.msgpack.encode({"cells": published.cells})  # the snapshot format before levels
    here.merge("node-1", msgspec.msgpack.decode(old_wire, type=sr.Snapshot))
    assert here.estimate("a", "country:DE", 0.5, 0, key_samples=0.0) == pytest.approx(0.92, abs=0.015)
    assert here.estimate("a", "country:FR", 0.5, 0, key_samples=0.0) == pytest.approx(0.80, abs=0.015)
    # a key known only to the peer reads as the peer's counts say, not as the channel
    for i, ch in enumerate(rate_pattern(0.60, 600)):
        there.record_outcome("a", ctx(f"it{i}", country="IT"), ch == "1", 6000.0 + i)
    here.merge("node-1", there.snapshot())
    assert here.estimate("a", "country:IT", 0.5, 0, key_samples=50.0) == pytest.approx(0.60, abs=0.03)
