"""Latency payroute adds at a fixed open-loop rate (default 1,000 requests/s), without coordinated omission.

Same set-up as bench/pipeline_throughput.py: a zero-latency sandbox channel in its own process, a bare
aiohttp pass-through hop and payroute's full pipeline both forwarding to it. The load generator (this
process) schedules request i at its intended send time `start + i / rate` whatever happened to earlier
requests, and measures each latency from that intended time, so a stall is charged to every request
it delays (no coordinated omission). The bare hop and payroute are measured one after the other, each
after a warm-up. Prints p50/p99/p99.9 of both, the difference (what payroute adds) against the target
(added <= 1 ms p50, <= 5 ms p99; printed, never asserted), and the achieved rate: if the generator
itself falls behind, the figures are flagged as not trustworthy.
Run: .venv/bin/python bench/latency_open_loop.py [-r 1000] [-d 20] [--mode embedded|scaleout] [--instances N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time

import aiohttp
import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline_throughput import KEY, pct, start_services, stop_services  # noqa: E402

TARGET_P50_MS = 1.0
TARGET_P99_MS = 5.0


async def open_loop(url: str, body_for, rate: float, seconds: float,  # type: ignore[no-untyped-def]
                    headers: dict[str, str]) -> tuple[list[float], int, float, float]:
    """Returns (latencies from intended send time, errors, worst send lag, achieved rate)."""
    n = int(rate * seconds)
    latencies: list[float] = []
    errors = 0
    worst_lag = 0.0
    tasks: set[asyncio.Task[None]] = set()
    conn = aiohttp.TCPConnector(limit=1024)
    async with aiohttp.ClientSession(connector=conn, headers={"Content-Type": "application/json"}) as s:

        async def one(i: int, intended: float) -> None:
            nonlocal errors, worst_lag
            worst_lag = max(worst_lag, time.perf_counter() - intended)
            try:
                async with s.post(url, data=orjson.dumps(body_for(i)),
                                  headers={**headers, "Idempotency-Key": f"ol-{i}-{intended}"}) as r:
                    await r.read()
                    if r.status != 201:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - intended)

        start = time.perf_counter() + 0.05
        for i in range(n):
            intended = start + i / rate
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(one(i, intended))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        sent_in = time.perf_counter() - start
        while tasks:
            await asyncio.gather(*tasks)
    return latencies, errors, worst_lag, n / max(sent_in, 1e-9)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-r", "--rate", type=float, default=1000.0, help="requests per second")
    ap.add_argument("-d", "--duration", type=float, default=20.0, help="seconds measured, per target")
    ap.add_argument("-w", "--warmup", type=float, default=3.0)
    ap.add_argument("--mode", choices=["embedded", "scaleout"], default="embedded",
                    help="scaleout: Redis + PostgreSQL (see bench/pipeline_throughput.py)")
    ap.add_argument("--instances", type=int, default=1, help="payroute (and bare-hop) processes sharing the port")
    args = ap.parse_args()
    if args.instances > 1 and args.mode != "scaleout":
        ap.error("--instances > 1 needs --mode scaleout (embedded mode is one process)")
    svc = await start_services(mode=args.mode, instances=args.instances)
    card = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"}

    def hop_body(i: int) -> dict[str, object]:
        return {"amount": 1099, "currency": "USD", "capture": True, "reference": f"r-{i}", "card": card}

    def pr_body(i: int) -> dict[str, object]:
        return {"amount": 1099, "currency": "USD", "country": "US", "merchant_order_id": f"ol-{i}-{time.time_ns()}",
                "payment_method": {"type": "card", "card": card}}

    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        await open_loop(svc.hop_url, hop_body, args.rate, args.warmup, {})
        hop = await open_loop(svc.hop_url, hop_body, args.rate, args.duration, {})
        await open_loop(svc.pr_url, pr_body, args.rate, args.warmup, auth)
        pr = await open_loop(svc.pr_url, pr_body, args.rate, args.duration, auth)
    finally:
        stop_services(svc)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}; open loop "
          f"{args.rate:.0f} req/s for {args.duration:.0f} s each, latency from the intended send time "
          f"(no coordinated omission), load generator in-process (Python), {args.mode} mode "
          f"({'SQLite, synchronous=FULL' if args.mode == 'embedded' else 'Redis + PostgreSQL'}), "
          f"{args.instances} process(es) each")
    print(f"{'':28} {'sent/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max lag ms':>10} {'errors':>7}")
    for name, (lat, err, lag, achieved) in (("bare aiohttp hop (baseline)", hop), ("payroute full pipeline", pr)):
        print(f"{name:28} {achieved:8.0f} {pct(lat, 0.5):8.2f} {pct(lat, 0.99):8.2f} {pct(lat, 0.999):9.2f} "
              f"{lag * 1000:10.2f} {err:7d}")
    add50 = pct(pr[0], 0.5) - pct(hop[0], 0.5)
    add99 = pct(pr[0], 0.99) - pct(hop[0], 0.99)
    ok = lambda v, t: "meets" if v <= t else f"misses by {v - t:.2f} ms"  # noqa: E731
    print(f"added by payroute: p50 {add50:+.2f} ms (target <= {TARGET_P50_MS:.0f} ms: {ok(add50, TARGET_P50_MS)}), "
          f"p99 {add99:+.2f} ms (target <= {TARGET_P99_MS:.0f} ms: {ok(add99, TARGET_P99_MS)})")
    for name, (_, _, _, achieved) in (("bare hop", hop), ("payroute", pr)):
        if achieved < args.rate * 0.98:
            print(f"WARNING: the generator sent only {achieved:.0f}/s to {name}: it fell behind, figures understate")


if __name__ == "__main__":
    asyncio.run(main())
