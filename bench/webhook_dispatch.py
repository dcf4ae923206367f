"""Webhook dispatch throughput: deliveries/s to a loopback aiohttp receiver and the time to drain a
backlog of outbox events, against a baseline measured in the same run.

- The receiver is an aiohttp server in a child process (its own core) answering 200 at once.
- Baselines: the same number of raw POSTs (same body size, same concurrency, no store) with aiohttp and
  with httpx (skip it with --skip-httpx: it is slow), so the gap shows what the store and the dispatcher
  add over the dispatcher's own HTTP client (aiohttp), and why it is not httpx.
- Backlog: `--events` outbox events (2 per payment: authorized, captured; spread over `--merchants`
  merchants with one endpoint each) are committed through `SqliteStore.insert_payment` like the
  pipeline writes them; then the real `WebhookDispatcher` runs (`run_forever`, wall clock) until the
  receiver has seen every event and the store says every delivery is `delivered`.

Targets (issue 6) are printed, never asserted: >= 3,000 deliveries/s; 100,000-event backlog <= 60 s.

    .venv/bin/python bench/webhook_dispatch.py [--events 100000] [--merchants 4] [--concurrency 64]
        [--synchronous FULL] [--dir PATH] [--skip-httpx]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import httpx
import msgspec
import orjson
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router.model import CardSummary, OutboxEvent, Payment, PaymentMethod, Status  # noqa: E402
from router.store.sqlite import SqliteStore  # noqa: E402
from router.webhooks import Endpoint, WebhookDispatcher, WebhooksSettings, endpoint_id, new_secret  # noqa: E402

TARGET_RATE = 3000.0
TARGET_DRAIN_S = 60.0
T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
CARD = PaymentMethod(
    type="card",
    card=CardSummary(bin="424242", last4="4242", brand="visa", exp_month=12, exp_year=2030, fingerprint="fp"),
)


# --------------------------------------------------------------------------- receiver (child process)


def _serve(port_out: multiprocessing.connection.Connection) -> None:
    async def main() -> None:
        count = 0

        async def hook(request: web.Request) -> web.Response:
            nonlocal count
            await request.read()
            count += 1
            return web.Response(text="ok")

        async def counter(_: web.Request) -> web.Response:
            return web.Response(text=str(count))

        app = web.Application()
        app.router.add_post("/hooks/{n}", hook)
        app.router.add_get("/count", counter)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port_out.send(runner.addresses[0][1])
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())


async def received(base: str, session: aiohttp.ClientSession | None = None) -> int:
    if session is None:
        async with aiohttp.ClientSession() as s:
            return await received(base, s)
    async with session.get(f"{base}/count") as r:
        return int(await r.text())


# --------------------------------------------------------------------------- baselines


BODY = orjson.dumps({"id": "evt_x" * 4, "type": "payment.captured",
                     "data": {"id": "pay_00000000", "status": "captured", "amount": 1099, "currency": "EUR"}})


async def baseline_aiohttp(urls: list[str], n: int, concurrency: int) -> float:
    left = n
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def worker(i: int) -> None:
            nonlocal left
            url = urls[i % len(urls)]
            while left > 0:
                left -= 1
                async with s.post(url, data=BODY, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    assert r.status == 200

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return time.perf_counter() - t0


async def baseline_httpx(urls: list[str], n: int, concurrency: int) -> float:
    left = n
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as c:

        async def worker(i: int) -> None:
            nonlocal left
            url = urls[i % len(urls)]
            while left > 0:
                left -= 1
                r = await c.post(url, content=BODY, headers={"content-type": "application/json"})
                assert r.status_code == 200

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return time.perf_counter() - t0


# --------------------------------------------------------------------------- backlog


def payment(n: int, merchant: str) -> Payment:
    return Payment(
        id=f"pay_{n:08d}", merchant_id=merchant, merchant_order_id=f"order-{n}", status=Status.PROCESSING,
        amount=1000 + n % 5000, currency="EUR", country="DE", capture=True, payment_method=CARD,
        created_at=T0, updated_at=T0,
    )  # fmt: skip


async def fill(store: SqliteStore, events: int, merchants: list[str]) -> float:
    payments = (events + 1) // 2
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(256)

    async def one(n: int) -> None:
        merchant = merchants[n % len(merchants)]
        pid = f"pay_{n:08d}"
        evs = []
        for k, kind in enumerate(("authorized", "captured")[: min(2, events - 2 * n)]):
            eid = f"evt_{n:08d}_{kind}"
            body = orjson.dumps({"id": eid, "type": f"payment.{kind}",
                                 "data": {"id": pid, "status": kind, "amount": 1099, "currency": "EUR"}})
            evs.append(OutboxEvent(id=eid, merchant_id=merchant, payment_id=pid, type=f"payment.{kind}",
                                   payload=body, created_at=T0 + timedelta(microseconds=2 * n + k)))
        async with sem:
            await store.insert_payment(payment(n, merchant), evs)

    await asyncio.gather(*(one(n) for n in range(payments)))
    return time.perf_counter() - t0


async def drain(store: SqliteStore, endpoints: list[Endpoint], settings: WebhooksSettings, base: str,
                events: int, profile_s: float) -> tuple[float, int]:
    d = WebhookDispatcher(store, lambda: endpoints, settings, owner="bench")
    before = await received(base)
    # one keep-alive session for the progress polls: a new connection every 50 ms would be load of ours
    poll = aiohttp.ClientSession()
    t0 = time.perf_counter()
    await d.start(run=True)
    try:
        last_print = t0
        while True:
            got = await received(base, poll) - before
            if got >= events:
                break
            now = time.perf_counter()
            if now - last_print >= 5:
                print(f"  ... {got:,} delivered after {now - t0:.1f} s ({got / (now - t0):,.0f}/s)", flush=True)
                last_print = now
            await asyncio.sleep(0.05)
        # the receiver saw them all; the store must also have recorded them all
        while True:
            delivered = await asyncio.to_thread(_count_delivered, store.path)
            if delivered >= events:
                break
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t0
    finally:
        await d.aclose()
        await poll.close()
    return elapsed, await received(base) - before


def _count_delivered(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'").fetchone()[0])
    finally:
        db.close()


def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


async def main(args: argparse.Namespace) -> None:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child,), daemon=True)
    proc.start()
    port = parent.recv()
    base = f"http://127.0.0.1:{port}"
    merchants = [f"m_bench_{i}" for i in range(args.merchants)]
    urls = [f"{base}/hooks/{i}" for i in range(args.merchants)]
    secret = new_secret()
    endpoints = [Endpoint(id=endpoint_id(m, u), merchant_id=m, url=u, secrets=(secret,)) for m, u in zip(merchants, urls, strict=True)]
    per_endpoint = max(1, args.concurrency // args.merchants)
    settings = msgspec.convert({
        "allow_networks": ["127.0.0.0/8"], "concurrency_per_endpoint": per_endpoint,
        "max_in_flight": per_endpoint * args.merchants, "poll_interval_s": 0.05,
    }, WebhooksSettings)
    conc = per_endpoint * args.merchants
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {args.events:,} events over "
          f"{args.merchants} endpoints, {conc} in flight ({per_endpoint}/endpoint), sqlite synchronous={args.synchronous}")
    try:
        n_base = min(args.events, args.baseline_n)
        t = await baseline_aiohttp(urls, n_base, conc)
        print(f"baseline aiohttp raw POSTs : {n_base / t:9,.0f} req/s  ({n_base:,} in {t:.2f} s, no store, no signing)")
        if not args.skip_httpx:
            t = await baseline_httpx(urls, n_base, conc)
            print(f"baseline httpx raw POSTs   : {n_base / t:9,.0f} req/s  ({n_base:,} in {t:.2f} s, no store, no signing)")

        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            store = SqliteStore(Path(tmp) / "bench.db", synchronous=args.synchronous)
            await store.start()
            try:
                t_fill = await fill(store, args.events, merchants)
                print(f"backlog committed          : {args.events:,} events in {t_fill:.1f} s (not part of the drain)")
                elapsed, hits = await drain(store, endpoints, settings, base, args.events, args.profile_s)
            finally:
                await store.close()
        rate = args.events / elapsed
        print(f"dispatcher                 : {rate:9,.0f} deliveries/s  ({hits:,} receiver hits, "
              f"{args.events:,} delivered)")
        print(f"  target >= {TARGET_RATE:,.0f} deliveries/s : {verdict(rate >= TARGET_RATE)}")
        scaled = elapsed * 100_000 / args.events
        print(f"backlog drain              : {elapsed:.1f} s for {args.events:,} events"
              + ("" if args.events == 100_000 else f" (~{scaled:.1f} s per 100,000 at this rate)"))
        print(f"  target <= {TARGET_DRAIN_S:.0f} s per 100,000    : {verdict(scaled <= TARGET_DRAIN_S)}")
    finally:
        proc.terminate()
        proc.join(5)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--merchants", type=int, default=4, help="endpoints (one per merchant)")
    p.add_argument("--concurrency", type=int, default=64, help="sends in flight in total")
    p.add_argument("--baseline-n", type=int, default=20_000)
    p.add_argument("--synchronous", default="FULL")
    p.add_argument("--skip-httpx", action="store_true", help="skip the httpx baseline (slow: ~400 req/s)")
    p.add_argument("--dir", default=None)
    p.add_argument("--profile-s", type=float, default=0.0, help=argparse.SUPPRESS)
    asyncio.run(main(p.parse_args()))
