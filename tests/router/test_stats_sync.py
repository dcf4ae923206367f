"""Success-rate statistics shared across instances through Redis."""

from __future__ import annotations

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
