"""Hot reload: atomic swap, in-flight payments finish on their config, a bad config keeps the old one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import yaml
from aiohttp import web

from adapters.sandbox.server import Script
from router.app import create_app
from router.config import load_config_file
from router.runtime import KNOWN_ADAPTERS, KNOWN_POLICIES
from tests.conftest import API_KEY, channel_entry, payment_body

ADMIN = "adm_test_token_0123456789"


async def test_reload_swaps_atomically_and_rejects_bad_configs(sandbox, tmp_path: Path) -> None:
    a = await sandbox("a", Script(latency_ms=300))
    b = await sandbox("b")
    doc = {
        "storage": {"sqlite_path": str(tmp_path / "p.db")},
        "admin": {"tokens": [{"key": ADMIN}]},
        "channels": [channel_entry("a", a), channel_entry("b", b)],
        "routing": {"default": [{"policy": "priority", "order": ["a", "b"]}]},
        "merchants": [{"id": "alpha", "api_keys": [{"key": API_KEY}]}],
    }
    path = tmp_path / "payroute.yaml"
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config_file(path, known_adapters=KNOWN_ADAPTERS, known_policies=KNOWN_POLICIES)
    runner = web.AppRunner(create_app(cfg, config_path=str(path)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as c:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            v1 = (await c.get("/admin/v1/config", headers=admin)).json()["config_version"]
            assert (await c.post("/admin/v1/config/reload")).status_code == 401  # merchant keys are not admin tokens

            # a payment in flight on channel a (slow) while the config is swapped to prefer b
            in_flight = asyncio.create_task(c.post("/v1/payments", json=payment_body(merchant_order_id="r-1")))
            await asyncio.sleep(0.1)
            doc["routing"]["default"][0]["order"] = ["b", "a"]
            path.write_text(yaml.safe_dump(doc))
            r = await c.post("/admin/v1/config/reload", headers=admin)
            assert r.status_code == 200, r.text
            v2 = r.json()["config_version"]
            assert r.json()["previous_version"] == v1 and v2 != v1
            first = (await in_flight).json()
            assert first["channel"] == "a" and first["routing"]["config_version"] == v1  # finished on its config
            second = (await c.post("/v1/payments", json=payment_body(merchant_order_id="r-2"))).json()
            assert second["channel"] == "b" and second["routing"]["config_version"] == v2

            # a broken config is refused with its paths; the running one stays
            doc["routing"]["default"][0]["order"] = ["b", "ghost"]
            path.write_text(yaml.safe_dump(doc))
            bad = await c.post("/admin/v1/config/reload", headers=admin)
            assert bad.status_code == 422 and bad.json()["code"] == "config_rejected"
            assert bad.json()["problems"][0]["path"] == "$.routing.default[0].order[1]"
            assert (await c.get("/admin/v1/config", headers=admin)).json()["config_version"] == v2

            # storage cannot change under a running process
            doc["routing"]["default"][0]["order"] = ["b", "a"]
            doc["storage"]["sqlite_path"] = str(tmp_path / "other.db")
            path.write_text(yaml.safe_dump(doc))
            restart = await c.post("/admin/v1/config/reload", headers=admin)
            assert restart.status_code == 422 and restart.json()["code"] == "config_needs_restart"
            third = (await c.post("/v1/payments", json=payment_body(merchant_order_id="r-3"))).json()
            assert third["routing"]["config_version"] == v2
            assert [s["policy"] for s in third["routing"]["steps"]] == ["priority"]
    finally:
        await runner.cleanup()
