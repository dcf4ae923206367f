"""RSS of the payroute process after N payments (default 1,000,000), sampled along the way.

Same set-up as bench/pipeline_throughput.py (embedded mode, zero-latency sandbox channel in its own
process). A closed loop of C clients sends payments, each with its own Idempotency-Key and order id,
and the payroute process's resident set (VmRSS from /proc) is sampled every `--every` payments
(default 100,000, or N/10 when N is smaller), to show whether it stays flat after warm-up. Prints
the samples and the final RSS against the target (<= 200 MB after 1,000,000 payments, flat; printed,
never asserted). Linux only (reads /proc).
Run: .venv/bin/python bench/memory.py [-n 1000000] [--every 100000] [-c 32]
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
from pipeline_throughput import KEY, start_services, stop_services  # noqa: E402

TARGET_MB = 200.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", "--payments", type=int, default=1_000_000)
    ap.add_argument("--every", type=int, default=0, help="sample interval (default 100,000 or N/10)")
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    args = ap.parse_args()
    every = args.every or min(100_000, max(1, args.payments // 10))
    svc = await start_services()
    pid = svc.payroute_pid
    card = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    samples: list[tuple[int, float, float]] = [(0, rss_mb(pid), 0.0)]
    sent = 0
    errors = 0
    t0 = time.perf_counter()
    next_sample = every

    async def worker(s: aiohttp.ClientSession, w: int) -> None:
        nonlocal sent, errors, next_sample
        while sent < args.payments:
            sent += 1
            n = sent
            body = {"amount": 1099, "currency": "USD", "country": "US", "merchant_order_id": f"m-{w}-{n}-{time.time_ns()}",
                    "payment_method": {"type": "card", "card": card}}
            async with s.post(svc.pr_url, data=orjson.dumps(body), headers={"Idempotency-Key": f"m-{n}"}) as r:
                await r.read()
                if r.status != 201:
                    errors += 1
            if n >= next_sample:
                next_sample += every
                samples.append((n, rss_mb(pid), time.perf_counter() - t0))
                print(f"  {n:>9,} payments  RSS {samples[-1][1]:7.1f} MB  ({samples[-1][2]:.0f} s)", flush=True)

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency), headers=headers) as s:
            await asyncio.gather(*(worker(s, w) for w in range(args.concurrency)))
        samples.append((args.payments, rss_mb(pid), time.perf_counter() - t0))
    finally:
        stop_services(svc)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}; embedded mode "
          f"(SQLite); {args.payments:,} payments, {args.concurrency} clients, {errors} errors")
    final = samples[-1][1]
    warm = samples[min(2, len(samples) - 1)]  # after the first two intervals
    growth = (final - warm[1]) / max(1, args.payments - warm[0]) * 1_000_000
    print(f"RSS at start {samples[0][1]:.1f} MB, after {warm[0]:,} {warm[1]:.1f} MB, after {args.payments:,} "
          f"{final:.1f} MB; growth after warm-up {growth:.1f} MB per 1M payments")
    projected = final + growth * max(0, 1_000_000 - args.payments) / 1_000_000
    verdict = "meets" if projected <= TARGET_MB and growth < 10 else "misses"
    note = "" if args.payments >= 1_000_000 else f" (projected to 1M from the growth rate: {projected:.0f} MB)"
    print(f"target: <= {TARGET_MB:.0f} MB after 1,000,000 payments and flat after warm-up: {verdict}{note}")


if __name__ == "__main__":
    asyncio.run(main())
