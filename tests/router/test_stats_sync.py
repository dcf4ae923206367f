"""Success-rate statistics shared across instances through Redis."""

from __future__ import annotations

from policies.success_rate import SuccessStats
from router.stats_sync import StatsSync


async def test_two_instances_see_each_others_counts_without_double_counting(redis_client) -> None:
    a_stats, b_stats = SuccessStats(), SuccessStats()
    a = StatsSync(redis_client, a_stats, instance="a")
    b = StatsSync(redis_client, b_stats, instance="b")
    for i in range(50):
        a_stats.record("ch1", "", False, float(i))  # instance a sees ch1 failing
    assert b_stats.counts("ch1", "") == (0.0, 0.0)
    await a.sync_once()
    assert await b.sync_once() == 1
    s, f = b_stats.counts("ch1", "")
    assert s == 0.0 and f > 10  # b now knows ch1 fails
    await a.sync_once()
    await b.sync_once()  # merging again replaces a's snapshot: no double counting
    assert b_stats.counts("ch1", "") == (s, f)
    assert await a.sync_once() == 1 and a_stats.counts("ch1", "")[1] == f  # a's own counts are not re-merged
