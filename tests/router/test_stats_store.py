"""Routing statistics saved beside the database and restored at start (router/stats_store.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import msgspec
import pytest
from aiohttp import web

from adapters.sandbox.server import Script
from policies.success_rate import SuccessStats
from router.app import RUNTIME, create_app
from router.stats_store import StatsFile, stats_path
from tests.conftest import API_KEY, channel_entry, make_config, no_sleep, payment_body


def learned(n: int = 300) -> SuccessStats:
    stats = SuccessStats()
    for i in range(n):
        stats.record("good", "", i % 10 != 0, 1000.0 + i)  # 90 %
        stats.record("good", "country:DE", i % 5 != 0, 1000.0 + i)
        stats.record("poor", "", i % 2 == 0, 1000.0 + i)  # 50 %
    return stats


def test_restore_takes_the_saved_counts_and_reads_them_as_a_steady_rate() -> None:
    before = learned()
    after = SuccessStats()
    assert after.restore(before.snapshot()) == 3
    for key in (("good", ""), ("good", "country:DE"), ("poor", "")):
        assert after.counts(*key) == before.counts(*key)
        s, f = before.counts(*key)
        assert after.rate(*key)[0] == pytest.approx(s / (s + f))  # no trend carried over: the plain mean
    # the ranking the restored instance makes is the one the saved instance made
    assert after.score("good", "", 0.8, 20, 1.0) > after.score("poor", "", 0.8, 20, 1.0)
    assert after.now == before.now  # reads take "now" from the latest saved event


def test_restore_never_overwrites_what_this_instance_already_learned() -> None:
    saved = learned().snapshot()
    fresh = SuccessStats()
    fresh.record("poor", "", True, 5000.0)
    assert fresh.restore(saved) == 2  # good and good/DE; poor is this instance's own
    assert fresh.counts("poor", "") == (1.0, 0.0)


def test_a_saved_file_round_trips_and_a_bad_one_is_a_cold_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = stats_path(tmp_path / "payroute.db")
    assert path.name == "payroute-routing-stats.msgpack"
    stats = learned()
    StatsFile(path, stats).save_blob(msgspec.msgpack.encode(stats.snapshot()))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file was renamed away
    other = SuccessStats()
    assert StatsFile(path, other).load() == 3
    assert other.counts("good", "") == stats.counts("good", "")

    assert StatsFile(tmp_path / "missing.msgpack", SuccessStats()).load() == 0
    path.write_bytes(b"\x00not msgpack")
    with caplog.at_level(logging.WARNING, logger="payroute.stats"):
        assert StatsFile(path, SuccessStats()).load() == 0
    assert "unreadable" in caplog.text


async def test_a_restarted_payroute_routes_with_what_it_learnt_before(tmp_path: Path, sandbox) -> None:  # type: ignore[no-untyped-def]
    good = await sandbox("good", Script(approval_rate=0.95, seed=1))
    poor = await sandbox("poor", Script(approval_rate=0.40, seed=2))
    chain = [{"policy": "currency"}, {"policy": "success_rate", "optimism": 1.0}]
    cfg = make_config([channel_entry("good", good), channel_entry("poor", poor)], tmp_path, routing={"default": chain})

    keys = (("good", ""), ("poor", ""))

    async def run(payments: int) -> tuple[dict[tuple[str, str], tuple[float, float]], SuccessStats]:
        """Serve `payments` payments and shut down; (the counts it started with, its stats at the end)."""
        app = create_app(cfg, sleep=no_sleep)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        stats = app[RUNTIME].current.env.state["success_stats"]
        assert isinstance(stats, SuccessStats)
        at_start = {k: stats.counts(*k) for k in keys}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runner.addresses[0][1]}",
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            for i in range(payments):
                r = await client.post("/v1/payments", json=payment_body(merchant_order_id=f"r{len(str(payments))}-{i}"))
                assert r.status_code == 201
        await runner.cleanup()  # shutdown saves the statistics
        return at_start, stats

    cold, first = await run(80)
    assert cold == {k: (0.0, 0.0) for k in keys}
    assert stats_path(tmp_path / "payroute.db").exists()
    assert sum(first.counts("good", "")) > 0 and sum(first.counts("poor", "")) > 0
    warm, second = await run(0)
    # the second app started with the first one's counts, before any payment of its own
    assert warm == {k: first.counts(*k) for k in keys}
    assert second.score("good", "", 0.8, 20, 0.0) > second.score("poor", "", 0.8, 20, 0.0)


async def test_stats_save_s_zero_never_writes_the_file(tmp_path: Path, sandbox) -> None:  # type: ignore[no-untyped-def]
    good = await sandbox("good")
    cfg = make_config([channel_entry("good", good)], tmp_path, routing={"stats_save_s": 0})
    app = create_app(cfg, sleep=no_sleep)
    runner = web.AppRunner(app)
    await runner.setup()
    await runner.cleanup()
    assert not stats_path(tmp_path / "payroute.db").exists()
