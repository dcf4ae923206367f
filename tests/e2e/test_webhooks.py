"""Webhooks end to end: a payment through the API reaches the merchant's endpoint signed (verified with
`standardwebhooks`) and without card data; `payroute webhooks list|show|redrive` drive the admin API.

The app is wired here the way router/app.py is to wire it (dispatcher in app state, `dispatcher_ctx`
after the store, `register_webhook_routes` with the admin authenticator).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from adapters.sandbox.server import SandboxChannel, Script, start_channel
from router.app import create_app
from router.webhooks import (
    new_secret,
)
from router.webhooks_cli import add_webhooks_parser
from tests.conftest import API_KEY, GOOD_CARD, channel_entry, make_config, payment_body, wait_for
from tests.router.test_webhooks import Receiver, StartReceiver, receiver  # noqa: F401 - the fixture

ADMIN = "admin-token-for-webhooks-0001"


@contextlib.asynccontextmanager
async def payroute_with_webhooks(tmp: Path, url: str, secret: str) -> AsyncIterator[tuple[str, web.Application]]:
    ch = await start_channel(SandboxChannel("sbx", Script()))
    # the app wires the dispatcher, its cleanup context and the admin routes itself (router/app.py)
    cfg = make_config(
        [channel_entry("sbx", ch)], tmp,
        merchants=[{"id": "alpha", "api_keys": [{"key": API_KEY}], "webhooks": [{"url": url, "secret": secret}]}],
        admin={"tokens": [{"key": ADMIN}]},
        webhooks={"allow_networks": ["127.0.0.0/8"], "poll_interval_s": 0.05, "schedule_s": [0]},
    )
    app = create_app(cfg)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app
    finally:
        await runner.cleanup()
        await ch.stop()


def cli(base: str, *argv: str) -> tuple[int, Any]:
    parser = argparse.ArgumentParser(prog="payroute")
    add_webhooks_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["webhooks", *argv, "--url", base, "--token", ADMIN])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = int(args.func(args))
    return code, orjson.loads(out.getvalue())


async def test_payment_webhook_is_signed_card_free_and_redrivable(tmp_path: Path, receiver: StartReceiver) -> None:  # noqa: F811
    rec: Receiver = await receiver()
    old, new = new_secret(), new_secret()
    rec.script = lambda hit: (500, {}, b"not yet")  # first: fail, so the one-step schedule dead-letters it
    async with payroute_with_webhooks(tmp_path, rec.url, f"{new} {old}") as (base, _app):
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            r = await c.post("/v1/payments", json=payment_body(merchant_order_id="wh-1"))
            assert r.status_code == 201, r.text
            pid = r.json()["id"]
        await wait_for(lambda: rec.hits, "the first delivery")
        hit = rec.hits[0]
        for secret in (old, new):  # rotation: each secret alone verifies
            doc = Webhook(secret).verify(hit.body, hit.headers)
        assert doc["data"]["id"] == pid and doc["id"] == hit.event_id
        assert GOOD_CARD["number"].encode() not in hit.body and b'"cvc"' not in hit.body

        code, listed = await asyncio.to_thread(cli, base, "list", "--status", "dead")
        for _ in range(100):
            if listed["data"]:
                break
            await asyncio.sleep(0.02)
            code, listed = await asyncio.to_thread(cli, base, "list", "--status", "dead")
        assert code == 0 and [d["event_id"] for d in listed["data"]] == [hit.event_id]
        code, shown = await asyncio.to_thread(cli, base, "show", hit.event_id)
        assert shown["deliveries"][0]["attempt_history"][0]["response_snippet"] == "not yet"

        rec.script = lambda hit: (200, {}, b"thanks")
        code, redriven = await asyncio.to_thread(cli, base, "redrive", hit.event_id)
        assert code == 0 and redriven == {"redriven": 1}
        await wait_for(lambda: len(rec.hits) == 2, "the re-driven delivery")
        assert rec.hits[1].event_id == hit.event_id  # the same webhook-id: merchants de-duplicate on it
        Webhook(new).verify(rec.hits[1].body, rec.hits[1].headers)
        code, missing = await asyncio.to_thread(cli, base, "show", "evt_nope")
        assert code == 1 and missing["status"] == 404
