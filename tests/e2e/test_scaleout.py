"""Scale-out mode on real Redis and PostgreSQL: the same guarantees across instances, and fail-closed.

Two payroute apps share one PostgreSQL database and one Redis (each test gets a fresh database and a
flushed private redis-server), in front of the same sandbox channel, whose ledger counts real charges.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from aiohttp import web

from adapters.sandbox.server import RunningChannel, Script
from router.app import create_app
from router.config import Config, check
from router.idempotency_redis import make_redis
from router.runtime import KNOWN_ADAPTERS, KNOWN_POLICIES
from tests.conftest import API_KEY, channel_entry, no_sleep, payment_body
from tests.services import start_redis, stop

Start = Callable[..., Awaitable[httpx.AsyncClient]]


def scaleout_config(dsn: str, redis_url: str, channel: RunningChannel, tmp: Path, **extra: Any) -> Config:
    raw: dict[str, Any] = {
        "storage": {"mode": "scaleout", "postgres_dsn": dsn, "redis_url": redis_url},
        "channels": [channel_entry("a", channel)],
        "merchants": [{"id": "alpha", "api_keys": [{"key": API_KEY}]}],
        **extra,
    }
    cfg = msgspec.convert(raw, Config)
    assert not check(cfg, known_adapters=KNOWN_ADAPTERS, known_policies=KNOWN_POLICIES)
    return cfg


@pytest.fixture
async def instances(fresh_postgres_dsn: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Start]:
    flush = make_redis(redis_url)
    await flush.flushall()
    await flush.aclose()
    running: list[tuple[web.AppRunner, httpx.AsyncClient]] = []

    async def start(channel: RunningChannel, *, redis: str | None = None, **extra: Any) -> httpx.AsyncClient:
        cfg = scaleout_config(fresh_postgres_dsn, redis or redis_url, channel, tmp_path, **extra)
        runner = web.AppRunner(create_app(cfg, sleep=no_sleep))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{runner.addresses[0][1]}",
                                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        running.append((runner, client))
        return client

    yield start
    for runner, client in reversed(running):
        await client.aclose()
        await runner.cleanup()


async def test_100_identical_requests_over_two_instances_charge_once(sandbox, instances) -> None:
    a = await sandbox("a", Script(latency_ms=30))
    one, two = await instances(a), await instances(a)
    body = payment_body(merchant_order_id="so-1")
    results = await asyncio.gather(*(
        (one if i % 2 else two).post("/v1/payments", json=body, headers={"Idempotency-Key": "so-key"})
        for i in range(100)
    ))
    assert len(a.channel.charges) == 1
    created = [r for r in results if r.status_code == 201]
    assert created and all(r.content == created[0].content for r in created)
    assert {r.status_code for r in results} <= {201, 409}
    for client in (one, two):  # later replays, from either instance, are byte-identical
        again = await client.post("/v1/payments", json=body, headers={"Idempotency-Key": "so-key"})
        assert again.content == created[0].content and again.headers["Idempotent-Replayed"] == "true"
    pid = created[0].json()["id"]
    assert (await two.get(f"/v1/payments/{pid}")).json()["status"] == "captured"


async def test_redis_flushed_mid_run_then_1000_replays_charge_nothing_new(sandbox, instances, redis_url) -> None:
    a = await sandbox("a")
    one, two = await instances(a), await instances(a)
    bodies = [payment_body(merchant_order_id=f"fl-{i}") for i in range(200)]
    first = await asyncio.gather(*(
        (one if i % 2 else two).post("/v1/payments", json=b, headers={"Idempotency-Key": f"fl-{i}"})
        for i, b in enumerate(bodies)
    ))
    assert all(r.status_code == 201 for r in first)
    charges = len(a.channel.charges)
    assert charges == 200
    client = make_redis(redis_url)
    await client.flushall()  # every idempotency record and lock is gone
    await client.aclose()
    replays = await asyncio.gather(*(
        (two if i % 2 else one).post("/v1/payments", json=bodies[i % 200], headers={"Idempotency-Key": f"fl-{i % 200}"})
        for i in range(1000)
    ))
    assert len(a.channel.charges) == charges  # zero new charges: the durable record refuses the orders
    for r in replays:
        assert r.status_code in (201, 409), r.text
        if r.status_code == 409:
            assert r.json()["code"] in ("duplicate_merchant_order_id", "order_in_progress", "idempotency_key_in_use")


async def test_channel_slower_than_the_lock_ttl_still_charges_once(sandbox, instances) -> None:
    a = await sandbox("a", Script(latency_ms=600))
    one, two = await instances(a, duplicates={"order_lock_ttl_ms": 100}), await instances(a, duplicates={"order_lock_ttl_ms": 100})
    body = payment_body(merchant_order_id="slow-1")
    slow = asyncio.create_task(one.post("/v1/payments", json=body, headers={"Idempotency-Key": "s-1"}))
    for _ in range(500):  # until the channel holds the charge (it answers 600 ms later)
        if a.channel.charges:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.15)  # the 100 ms lock, taken before the call, has expired; the channel still works
    assert a.channel.charges and not slow.done()
    dup = await two.post("/v1/payments", json=body, headers={"Idempotency-Key": "s-2"})
    assert dup.status_code == 409 and dup.json()["code"] == "duplicate_merchant_order_id"
    assert (await slow).status_code == 201
    assert len(a.channel.charges) == 1


async def test_redis_down_fails_closed_and_recovers_without_restart(sandbox, instances) -> None:
    binary = shutil.which("redis-server")
    assert binary is not None
    proc, port = start_redis(binary)
    a = await sandbox("a")
    c = await instances(a, redis=f"redis://127.0.0.1:{port}/0")
    try:
        first = await c.post("/v1/payments", json=payment_body(merchant_order_id="rd-0"))
        assert first.status_code == 201
        stop(proc)
        # reads still work where the data is reachable (PostgreSQL is up)
        read = await c.get(f"/v1/payments/{first.json()['id']}")
        assert read.status_code == 200 and read.json()["status"] == "captured"
        r = await c.post("/v1/payments", json=payment_body(merchant_order_id="rd-1"), headers={"Idempotency-Key": "rd-1"})
        assert r.status_code == 503 and r.json()["code"] == "service_unavailable"
        assert len(a.channel.charges) == 1  # no channel was called
        ready = await c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["dependencies"] == {"coordination": "CoordinationUnavailable"}
        proc, _ = start_redis_on(binary, port)
        r = await c.post("/v1/payments", json=payment_body(merchant_order_id="rd-1"), headers={"Idempotency-Key": "rd-1"})
        assert r.status_code == 201 and len(a.channel.charges) == 2
        assert (await c.get("/readyz")).status_code == 200
    finally:
        stop(proc)


def start_redis_on(binary: str, port: int):  # type: ignore[no-untyped-def]
    import subprocess
    import time

    from tests.services import redis_answers_ping

    proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not redis_answers_ping(port):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    return proc, port


async def test_postgres_unreachable_fails_closed(sandbox, redis_url, tmp_path) -> None:
    a = await sandbox("a")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cfg = scaleout_config(f"postgresql://postgres@127.0.0.1:{closed}/none", redis_url, a, tmp_path)
    app = create_app(cfg)
    runner = web.AppRunner(app)
    with pytest.raises(Exception) as e:  # start-up itself refuses: nothing is served on a store it cannot reach
        await runner.setup()
    assert "Unavailable" in type(e.value).__name__
    await runner.cleanup()
    assert a.channel.charges == []


@pytest.mark.parametrize("shared_port", [False, True], ids=["two_ports", "reuse_port"])
async def test_two_payroute_processes_charge_once(fresh_postgres_dsn, redis_url, tmp_path, shared_port) -> None:
    """The same guarantee with two real processes sharing PostgreSQL and Redis (on two ports, or on one
    port with `serve --reuse-port`, the kernel spreading the connections)."""
    import os
    import subprocess
    import sys

    from tests.e2e.test_durability import ROOT, free_port, wait_ready

    sbx_port, p1, p2 = free_port(), free_port(), free_port()
    if shared_port:
        p2 = p1
    (tmp_path / "sbx.yaml").write_text(f"sandbox: [{{name: sbx, port: {sbx_port}, script: {{latency_ms: 50}}}}]\n")
    flush = make_redis(redis_url)
    await flush.flushall()
    await flush.aclose()
    procs = []

    def spawn(args: list[str], name: str) -> subprocess.Popen[bytes]:
        with (tmp_path / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "router.cli", *args], cwd=ROOT, stdout=log, stderr=log,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(proc)
        return proc

    try:
        sandbox = spawn(["sandbox", "--config", str(tmp_path / "sbx.yaml")], "sandbox")
        await wait_ready(f"http://127.0.0.1:{sbx_port}", sandbox, "/_sandbox/ledger")
        bases = []
        for i, port in enumerate((p1, p2)):
            cfg = tmp_path / f"p{i}.yaml"
            cfg.write_text(f"""
server: {{host: 127.0.0.1, port: {port}}}
storage: {{mode: scaleout, postgres_dsn: "{fresh_postgres_dsn}", redis_url: "{redis_url}"}}
channels: [{{name: sbx, adapter: sandbox, base_url: "http://127.0.0.1:{sbx_port}"}}]
merchants: [{{id: alpha, api_keys: [{{key: {API_KEY}}}]}}]
""")
            proc = spawn(["serve", "--config", str(cfg), *(["--reuse-port"] if shared_port else [])], f"payroute-{i}")
            await wait_ready(f"http://127.0.0.1:{port}", proc)
            bases.append(f"http://127.0.0.1:{port}")
        headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": "two-procs"}
        body = payment_body(merchant_order_id="two-procs")
        # a fresh connection per request, so with a shared port the kernel spreads them over both processes
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(headers=headers, timeout=30, limits=limits) as c:
            results = await asyncio.gather(*(c.post(f"{bases[i % 2]}/v1/payments", json=body) for i in range(100)))
            ledger = (await c.get(f"http://127.0.0.1:{sbx_port}/_sandbox/ledger")).json()
        assert ledger["totals"]["count"] == 1
        created = [r for r in results if r.status_code == 201]
        assert created and all(r.content == created[0].content for r in created)
        assert {r.status_code for r in results} <= {201, 409}
        if shared_port:
            for i, proc in enumerate(procs[1:]):  # both processes still serve the one port
                assert proc.poll() is None, (tmp_path / f"payroute-{i}.log").read_text()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def test_concurrent_refunds_and_captures_across_instances_never_exceed(sandbox, instances) -> None:
    a = await sandbox("a", Script(latency_ms=20))
    one, two = await instances(a), await instances(a)
    paid = (await one.post("/v1/payments", json=payment_body(merchant_order_id="cr-1", amount=1000))).json()
    results = await asyncio.gather(*(
        (one if i % 2 else two).post(f"/v1/payments/{paid['id']}/refunds", json={"amount": 600}) for i in range(10)
    ))
    ok = [r for r in results if r.status_code == 200]
    assert len(ok) == 1 and {r.status_code for r in results} <= {200, 400, 409}
    stored = (await two.get(f"/v1/payments/{paid['id']}")).json()
    assert stored["refunded_amount"] == 600
    charge = next(c for c in a.channel.charges if c["id"] == paid["channel_reference"])
    assert charge["refunded_amount"] == 600  # the channel was not refunded twice either

    auth = (await one.post("/v1/payments", json=payment_body(merchant_order_id="cc-1", amount=1000, capture=False))).json()
    results = await asyncio.gather(*(
        (one if i % 2 else two).post(f"/v1/payments/{auth['id']}/capture", json={"amount": 700 + i}) for i in range(10)
    ))
    # one capture is claimed in the record before any channel call; the others are refused without one
    # (409: concurrent_update, operation_pending or illegal_transition). 202: its outcome was lost
    assert sum(r.status_code in (200, 202) for r in results) == 1, [r.text for r in results]
    assert {r.status_code for r in results} <= {200, 202, 409}, [r.text for r in results]
    captured = (await one.get(f"/v1/payments/{auth['id']}")).json()
    assert len(captured["operations"]) == 1
    charge = next(c for c in a.channel.charges if c["id"] == auth["channel_reference"])
    if captured["status"] == "captured":
        assert captured["captured_amount"] == charge["captured_amount"] <= 1000
    else:  # the answer was lost: pending in the record, at most the one amount at the channel
        assert captured["operations"][0]["status"] == "pending"
        assert charge["captured_amount"] in (0, captured["operations"][0]["amount"])
