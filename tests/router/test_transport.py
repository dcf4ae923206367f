"""The one boundary where client errors are mapped: nothing-sent vs maybe-processed."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from router.config import ChannelConfig, Timeouts
from router.errors import ChannelUnavailable, OutcomeUnknown
from router.model import WireRequest
from router.transport import ChannelTransport, RetryBudget, with_retries


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve(handler) -> tuple[web.AppRunner, str]:  # type: ignore[no-untyped-def]
    app = web.Application()
    app.router.add_route("*", "/{p:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def transport(url: str, total_ms: int = 300) -> ChannelTransport:
    return ChannelTransport(ChannelConfig(name="t", adapter="sandbox", base_url=url,
                                          timeouts=Timeouts(connect_ms=200, total_ms=total_ms)))


async def test_connection_refused_is_unavailable() -> None:
    t = transport(f"http://127.0.0.1:{closed_port()}")
    await t.start()
    try:
        with pytest.raises(ChannelUnavailable):
            await t.send(WireRequest(method="POST", path="/x", body=b"{}"))
    finally:
        await t.close()


async def test_read_timeout_is_outcome_unknown() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    runner, url = await serve(slow)
    t = transport(url, total_ms=200)
    await t.start()
    try:
        with pytest.raises(OutcomeUnknown):
            await t.send(WireRequest(method="POST", path="/x", body=b"{}"))
    finally:
        await t.close()
        await runner.cleanup()


async def test_disconnect_after_request_is_outcome_unknown() -> None:
    async def drop(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        request.transport.abort()
        await asyncio.sleep(1)
        return web.Response()

    runner, url = await serve(drop)
    t = transport(url, total_ms=2000)
    await t.start()
    try:
        with pytest.raises(OutcomeUnknown):
            await t.send(WireRequest(method="POST", path="/x", body=b"{}"))
    finally:
        await t.close()
        await runner.cleanup()


async def test_deadline_already_past_sends_nothing() -> None:
    hits = 0

    async def count(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response()

    runner, url = await serve(count)
    t = transport(url)
    await t.start()
    try:
        with pytest.raises(ChannelUnavailable):
            await t.send(WireRequest(method="GET", path="/"), timeout_s=0)
        assert hits == 0
        resp = await t.send(WireRequest(method="GET", path="/"))
        assert resp.status == 200 and hits == 1
    finally:
        await t.close()
        await runner.cleanup()


def test_tls_verification_off_only_for_loopback() -> None:
    cfg = ChannelConfig(name="t", adapter="sandbox", base_url="https://psp.example.com")
    with pytest.raises(ValueError):
        ChannelTransport(cfg, verify_tls=False)
    ChannelTransport(ChannelConfig(name="t", adapter="sandbox", base_url="https://127.0.0.1:9"), verify_tls=False)


async def test_retries_only_unavailable_within_tries() -> None:
    calls = 0
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    async def unavailable() -> str:
        nonlocal calls
        calls += 1
        raise ChannelUnavailable("down")

    with pytest.raises(ChannelUnavailable):
        await with_retries(unavailable, attempts=3, base_s=0.01, max_s=0.05, deadline=float("inf"),
                           budget=RetryBudget(), sleep=sleep)
    assert calls == 3 and len(sleeps) == 2 and all(0 <= s <= 0.05 for s in sleeps)

    calls = 0

    async def unknown() -> str:
        nonlocal calls
        calls += 1
        raise OutcomeUnknown("maybe")

    with pytest.raises(OutcomeUnknown):
        await with_retries(unknown, attempts=3, base_s=0.01, max_s=0.05, deadline=float("inf"),
                           budget=RetryBudget(), sleep=sleep)
    assert calls == 1  # never retried: it may have been processed


async def test_retry_budget_caps_retries() -> None:
    budget = RetryBudget(ratio=0.0, floor=2)
    calls = 0

    async def unavailable() -> str:
        nonlocal calls
        calls += 1
        raise ChannelUnavailable("down")

    async def sleep(s: float) -> None:
        return None

    for _ in range(3):
        with pytest.raises(ChannelUnavailable):
            await with_retries(unavailable, attempts=5, base_s=0, max_s=0, deadline=float("inf"), budget=budget, sleep=sleep)
    assert calls == 3 + 2  # three first tries, and only the two retries the budget held
