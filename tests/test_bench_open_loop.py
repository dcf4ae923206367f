"""The open-loop latency bench's own HTTP client (bench/latency_open_loop.py): it must count every
request once, tell a 201 from anything else, survive the server closing a connection, and send what a
real server parses (the headers and body it was given)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import latency_open_loop as bench  # noqa: E402


@pytest.fixture
async def server(unused_tcp_port: int) -> AsyncIterator[tuple[str, list[dict[str, object]]]]:
    seen: list[dict[str, object]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        seen.append({"body": body, "key": request.headers.get("Idempotency-Key"),
                     "auth": request.headers.get("Authorization")})
        i = int(body["i"])
        if i % 5 == 4:  # every fifth request: a refusal with a body
            return web.json_response({"error": "no"}, status=422)
        response = web.json_response({"i": i, "pad": "x" * (i * 997 % 20_000)}, status=201)
        if i % 7 == 6:  # and some close their connection after answering
            response.force_close()
        return response

    app = web.Application()
    app.router.add_post("/v1/payments", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port)
    await site.start()
    yield f"http://127.0.0.1:{unused_tcp_port}/v1/payments", seen
    await runner.cleanup()


@pytest.mark.parametrize("kind", [bench.RawClient, bench.AiohttpClient])
async def test_every_request_is_counted_once_and_refusals_are_errors(
    server: tuple[str, list[dict[str, object]]], kind: type[bench.Client]
) -> None:
    url, seen = server
    client = kind(url, {"Authorization": "Bearer k"})
    try:
        latencies, errors, _lag, achieved, cpu_us = await asyncio.wait_for(
            bench.open_loop(client, lambda i: {"i": i}, 400.0, 0.25), 5)
    finally:
        await client.close()
    assert len(latencies) == 100 and all(x > 0 for x in latencies)
    assert errors == 20  # i % 5 == 4
    assert sorted(int(s["body"]["i"]) for s in seen) == list(range(100))  # type: ignore[call-overload]
    assert all(s["auth"] == "Bearer k" for s in seen)
    assert len({s["key"] for s in seen}) == 100
    assert achieved > 300 and cpu_us > 0


async def test_a_refused_connection_is_an_error_not_a_hang(unused_tcp_port: int) -> None:
    client = bench.RawClient(f"http://127.0.0.1:{unused_tcp_port}/v1/payments", {})
    latencies, errors, *_ = await asyncio.wait_for(bench.open_loop(client, lambda i: {"i": i}, 200.0, 0.05), 5)
    await client.close()
    assert len(latencies) == 10 and errors == 10
