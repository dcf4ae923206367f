"""Shared fixtures: sandbox channels and a payroute app, both real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from aiohttp import web

from adapters.sandbox.server import RunningChannel, SandboxChannel, Script, start_channel
from router.app import METRICS, PIPELINE, RUNTIME, create_app
from router.config import Config
from router.runtime import KNOWN_ADAPTERS, KNOWN_POLICIES

# real services (a fresh PostgreSQL database and a private redis-server per session)
pytest_plugins = ["tests.services"]

API_KEY = "sk_test_merchant_alpha_0001"
OTHER_KEY = "sk_test_merchant_beta_00002"
GOOD_CARD = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"}


def payment_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "amount": 1099,
        "currency": "USD",
        "country": "US",
        "merchant_order_id": f"order-{id(over)}-{over.get('merchant_order_id', '')}",
        "payment_method": {"type": "card", "card": dict(GOOD_CARD)},
    }
    body.update(over)
    return body


async def no_sleep(_: float) -> None:
    await asyncio.sleep(0)


async def wait_for(predicate: Callable[[], object], what: str) -> None:
    """Until `predicate()` is truthy (awaited if it returns an awaitable), polled every 10 ms for at
    most 4 s."""
    for _ in range(400):
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Payroute:
    base_url: str
    app: web.Application
    client: httpx.AsyncClient
    other: httpx.AsyncClient
    channels: dict[str, RunningChannel] = field(default_factory=dict)

    @property
    def pipeline(self) -> Any:
        return self.app[PIPELINE]

    @property
    def runtime(self) -> Any:
        return self.app[RUNTIME].current

    @property
    def metrics(self) -> Any:
        return self.app[METRICS]

    async def pay(self, **over: Any) -> httpx.Response:
        return await self.client.post("/v1/payments", json=payment_body(**over))


def make_config(channels: list[dict[str, Any]], tmp: Path, **extra: Any) -> Config:
    raw: dict[str, Any] = {
        "storage": {"mode": "embedded", "sqlite_path": str(tmp / "payroute.db")},
        "channels": channels,
        "merchants": [
            {"id": "alpha", "api_keys": [{"key": API_KEY}]},
            {"id": "beta", "api_keys": [{"key": OTHER_KEY}]},
        ],
        "compliance": {"blocked": [{"id": "sanctions-kp", "countries": ["KP", "IR"]}]},
    }
    raw.update(extra)
    from router.config import check

    cfg = msgspec.convert(raw, Config)
    problems = check(cfg, known_adapters=KNOWN_ADAPTERS, known_policies=KNOWN_POLICIES)
    assert not problems, problems
    return cfg


def channel_entry(name: str, rc: RunningChannel, **over: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "adapter": "sandbox",
        "base_url": rc.base_url,
        "currencies": ["USD", "EUR", "JPY", "KWD"],
        "timeouts": {"connect_ms": 500, "total_ms": 2000},
        "breaker": {"fail_max": 3, "reset_timeout_s": 30},
        "retry": {"attempts": 2, "base_ms": 1, "max_ms": 2},
    }
    entry.update(over)
    return entry


StartPayroute = Callable[..., Awaitable[Payroute]]


@pytest.fixture
async def sandbox() -> AsyncIterator[Callable[..., Awaitable[RunningChannel]]]:
    running: list[RunningChannel] = []

    async def start(name: str, script: Script | None = None) -> RunningChannel:
        rc = await start_channel(SandboxChannel(name, script or Script()))
        running.append(rc)
        return rc

    yield start
    for rc in running:
        await rc.stop()


@pytest.fixture
async def payroute(tmp_path: Path) -> AsyncIterator[StartPayroute]:
    stack: list[tuple[web.AppRunner, httpx.AsyncClient, httpx.AsyncClient]] = []

    async def start(channels: dict[str, RunningChannel], chan_over: dict[str, dict[str, Any]] | None = None,
                    **extra: Any) -> Payroute:
        entries = [channel_entry(n, rc, **(chan_over or {}).get(n, {})) for n, rc in channels.items()]
        cfg = make_config(entries, tmp_path, **extra)
        app = create_app(cfg, sleep=no_sleep)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        client = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        other = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=30)
        stack.append((runner, client, other))
        return Payroute(base, app, client, other, dict(channels))

    yield start
    for runner, client, other in reversed(stack):
        await client.aclose()
        await other.aclose()
        await runner.cleanup()
