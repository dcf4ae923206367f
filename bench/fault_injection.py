"""Seeded fault-injection run: many payments through the real pipeline against sandbox channels that
time out, fail after accepting, refuse before accepting and decline; with crashes (a request's task is
killed mid-flight, as if its process died) and duplicates (the same order sent twice at once, and
retried later under a new key). Afterwards the janitor settles what was left in flight, and the
sandbox ledgers are audited against the durable record.

Prints the number of double charges (target 0) and of charges the record does not account for.
Run: .venv/bin/python bench/fault_injection.py [-n 100000] [-c 256] [--seed 7]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import tempfile
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from adapters.sandbox.server import SandboxChannel, Script, start_channel
from router.config import Config, JanitorSettings
from router.errors import ProblemError
from router.janitor import Janitor
from router.metrics import Metrics
from router.model import Status
from router.pipeline import Pipeline
from router.runtime import Runtime
from router.store.sqlite import SqliteStore
from router.validation import Limits, validate_payment

CARD = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2040, "cvc": "123"}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=100_000, help="payments (orders)")
    ap.add_argument("-c", type=int, default=256, help="concurrency")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # thousands of expected "outcome unknown" warnings: the audit below is the output
    rng = random.Random(args.seed)
    faults = {"error_after": 0.02, "hang": 0.01, "error_before": 0.02}
    channels = []
    for i, name in enumerate(("a", "b", "c")):
        script = Script(seed=args.seed + i, approval_rate=0.9, fault_rates=faults, hang_s=0.4,
                        decline_codes={"issuer_unavailable": 2, "do_not_honor": 1})
        channels.append((name, await start_channel(SandboxChannel(name, script))))
    tmp = Path(tempfile.mkdtemp(prefix="payroute-faults-"))
    cfg = msgspec.convert({
        "storage": {"sqlite_path": str(tmp / "f.db")},
        "server": {"payment_deadline_ms": 1500},
        "channels": [{"name": n, "adapter": "sandbox", "base_url": rc.base_url, "max_connections": 512,
                      "timeouts": {"connect_ms": 500, "total_ms": 150}, "retry": {"attempts": 2, "base_ms": 1, "max_ms": 5},
                      "breaker": {"fail_max": 1000, "reset_timeout_s": 1}} for n, rc in channels],
        "merchants": [{"id": "m", "api_keys": [{"key": "sk_test_faults_000000000001"}]}],
        "duplicates": {"fingerprint_mode": "off"},
    }, Config)
    store = SqliteStore(tmp / "f.db", synchronous="NORMAL")
    await store.start()
    rt = Runtime(cfg)
    await rt.start()
    pipeline = Pipeline(lambda: rt, store, Metrics())
    today = datetime.now(UTC).date()
    outcomes: Counter[str] = Counter()
    crashed = dup_sent = retried = 0
    sem = asyncio.Semaphore(args.c)

    async def pay(i: int) -> None:
        nonlocal crashed, dup_sent, retried
        body = {"amount": 100 + i % 5000, "currency": "USD", "country": "US", "merchant_order_id": f"o-{i}",
                "payment_method": {"type": "card", "card": CARD}}
        req, card = validate_payment(body, merchant_id="m", fingerprint_key=b"k", limits=Limits(), today=today)
        roll = rng.random()
        async with sem:
            if roll < 0.02:  # a crash: the request dies somewhere in flight
                crashed += 1
                task = asyncio.create_task(pipeline.create_payment(req, card, None))
                await asyncio.sleep(rng.random() * 0.05)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return
            copies = 2 if roll < 0.07 else 1  # two devices submit the same order at once
            dup_sent += copies - 1
            results = await asyncio.gather(*(pipeline.create_payment(req, card, None) for _ in range(copies)),
                                           return_exceptions=True)
            for r in results:
                outcomes[r.status.value if not isinstance(r, BaseException) else
                         getattr(r, "code", type(r).__name__)] += 1
            if roll > 0.97:  # the merchant retries later with the same order
                retried += 1
                try:
                    await pipeline.create_payment(req, card, None)
                except ProblemError as e:
                    outcomes[f"retry:{e.code}"] += 1

    t0 = time.perf_counter()
    done = 0
    batch = 2000
    for start in range(0, args.n, batch):
        await asyncio.gather(*(pay(i) for i in range(start, min(args.n, start + batch))))
        done = min(args.n, start + batch)
        print(f"\r{done}/{args.n} payments", end="", flush=True)
    elapsed = time.perf_counter() - t0
    print()
    for _, rc in channels:
        rc.channel.release_holds()
    # the janitor settles whatever crashes and timeouts left in flight (as if past min_age)
    janitor = Janitor(pipeline, pipeline.metrics, JanitorSettings(min_age_s=5, interval_s=0.01, page=1000),
                      now=lambda: datetime.now(UTC) + timedelta(seconds=3600))
    for _ in range(100):
        if not await janitor.run_once():
            left = await store.list_by_status([Status.PROCESSING, Status.PENDING], datetime.now(UTC) + timedelta(hours=2), 10)
            if not left:
                break
    # audit: every approved charge in the ledgers against the durable record
    approved_by_payment: defaultdict[str, int] = defaultdict(int)
    for _, rc in channels:
        for ch in rc.channel.charges:
            if ch["status"] in ("authorized", "captured"):
                approved_by_payment[ch["reference"].rpartition("-a")[0]] += 1
    double = sum(1 for n in approved_by_payment.values() if n > 1)
    unaccounted = 0
    statuses: Counter[str] = Counter()
    orders_charged: Counter[str] = Counter()
    for pid in approved_by_payment:
        p = await store.get_payment(pid)
        if p is None or p.status not in (Status.CAPTURED, Status.AUTHORIZED):
            unaccounted += 1
        if p is not None:
            orders_charged[p.merchant_order_id] += 1
    double += sum(1 for n in orders_charged.values() if n > 1)
    for i in range(0, args.n):
        p = await store.find_by_order("m", f"o-{i}")
        statuses[p.status.value if p else "never recorded"] += 1
    await rt.close()
    await store.close()
    for _, rc in channels:
        await rc.stop()
    print(f"seed {args.seed}: {args.n} orders in {elapsed:.0f} s ({args.n / elapsed:.0f}/s), concurrency {args.c}")
    print(f"injected per channel call: {faults}; crashes {crashed}, concurrent duplicates {dup_sent}, later retries {retried}")
    print(f"final statuses: {dict(statuses)}")
    print(f"responses: {dict(outcomes)}")
    print(f"approved channel charges: {sum(approved_by_payment.values())}")
    print(f"DOUBLE CHARGES: {double}")
    print(f"charges the record does not account for (charged but not captured/authorized): {unaccounted}")


if __name__ == "__main__":
    asyncio.run(main())
