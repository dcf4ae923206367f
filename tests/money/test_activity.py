"""Volume-tiered channel fees follow the rolling monthly volume the ledger records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from router.app import refresh_activity
from router.money.store import MoneyStore

FEES = {"default": {"percent_bp": 200, "fixed": 0, "volume_tiers": [{"monthly_volume_from": 5000, "percent_bp": 100, "fixed": 0}]}}


async def channel_cost(tmp_path: Path, payment_id: str) -> int:
    entries = await MoneyStore.sqlite(tmp_path / "payroute.db").entries(payment_id=payment_id)
    return sum(e.amount for e in entries if e.account == "expense:channel:a")


async def test_volume_tier_applies_once_the_month_crosses_it(sandbox: Any, payroute: Any, tmp_path: Path) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a}, chan_over={"a": {"fees": FEES}})
    cfg = pr.runtime.config
    first = (await pr.pay(merchant_order_id="v-1", amount=3000)).json()
    assert await channel_cost(tmp_path, first["id"]) == 60  # 2 % below the tier
    await refresh_activity(pr.app, cfg)
    assert pr.runtime.env.state["monthly_volume"] == {"a": 3000}
    second = (await pr.pay(merchant_order_id="v-2", amount=3000)).json()
    assert await channel_cost(tmp_path, second["id"]) == 60
    await refresh_activity(pr.app, cfg)
    third = (await pr.pay(merchant_order_id="v-3", amount=1000)).json()
    assert pr.runtime.env.state["monthly_volume"] == {"a": 6000}
    assert await channel_cost(tmp_path, third["id"]) == 10  # 1 % once the month passed 5,000
