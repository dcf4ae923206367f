"""Success-rate statistics shared across instances through Redis."""

from __future__ import annotations

import asyncio

from policies.success_rate import SuccessStats
from router.stats_sync import StatsSync


async def test_two_instances_see_each_others_counts_without_double_counting(redis_client) -> None:
    a_stats, b_stats = SuccessStats(), SuccessStats()
    a = StatsSync(redis_client, a_stats, instance="a")
    b = StatsSync(redis_client, b_stats, instance="b")
    for i in range(60):
        a_stats.record("ch1", "", i % 3 == 0, float(i))  # instance a sees ch1 approve a third of the time
    assert b_stats.counts("ch1", "") == (0.0, 0.0)
    await a.sync_once()
    assert await b.sync_once() == 1
    s, f = b_stats.counts("ch1", "")
    assert (s, f) == a_stats.counts("ch1", "") and f > s > 5  # b now knows what a knows
    await a.sync_once()
    await b.sync_once()  # merging again replaces a's snapshot: no double counting
    assert b_stats.counts("ch1", "") == (s, f)
    assert await a.sync_once() == 1 and a_stats.counts("ch1", "") == (s, f)  # a's own counts are not re-merged


async def test_a_departed_instances_counts_are_forgotten_when_its_snapshot_expires(redis_client) -> None:
    """b publishes, then dies: once its key's TTL (5 sync intervals) has run out, a stops reading b's
    last counts, which nothing would ever decay again."""
    a_stats, b_stats = SuccessStats(), SuccessStats()
    a = StatsSync(redis_client, a_stats, instance="a-gone-test", interval_s=0.04)
    b = StatsSync(redis_client, b_stats, instance="b-gone-test", interval_s=0.04)
    for i in range(50):
        a_stats.record("ch1", "", True, float(i))
        b_stats.record("ch1", "", i % 3 == 0, float(i))  # not a run of failures: an outage is not counted
    await b.sync_once()
    await a.sync_once()
    assert a_stats.counts("ch1", "")[1] > 10  # b's failures are read
    await asyncio.sleep(0.3)  # b publishes no more: its key expires (TTL 200 ms)
    assert await a.sync_once() == 0
    assert a_stats.counts("ch1", "") == (a_stats.snapshot().cells["ch1"][""].ss, 0.0)


async def test_levels_and_offsets_travel_through_redis(redis_client) -> None:
    """Instance a learns DE at 92 % and FR at 80 %; b, which saw nothing, reads both keys from a's
    published levels and offsets after one round."""
    from router.model import RouteContext

    a_stats, b_stats = SuccessStats(), SuccessStats()
    a = StatsSync(redis_client, a_stats, instance="a-levels-test")
    b = StatsSync(redis_client, b_stats, instance="b-levels-test")
    for i in range(3000):
        country = "FR" if i % 3 == 0 else "DE"
        ok = (i * 7919) % 100 < (80 if country == "FR" else 92)
        ctx = RouteContext(payment_id=f"p{i}", merchant_id="m", amount=1000, currency="EUR", country=country,
                           method="card")
        a_stats.record_outcome("ch1", ctx, ok, float(i), dimensions=["country"])
    await a.sync_once()
    await b.sync_once()
    assert b_stats._remote_levels[("ch1", "country")][1] > 0  # a's level arrived as a level, not only counts
    for key, rate in (("country:DE", 0.92), ("country:FR", 0.80)):
        assert abs(b_stats.estimate("ch1", key, 0.5, 0, key_samples=0.0) - rate) < 0.02, key
