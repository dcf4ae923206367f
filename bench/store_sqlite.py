"""How many durable writes/s SqliteStore sustains, serially and with group commit.

Each payment is written like the real path does: an insert (status processing) with one outbox event,
then one optimistic update (authorized + an attempt) with another event, so 2 writes per payment.
Concurrency 1 is the baseline (one fsync'd transaction per write); at concurrency 256 the writer
thread commits whatever queued up meanwhile in one transaction.

    .venv/bin/python bench/store_sqlite.py [--n 20000] [--concurrency 1,256] [--synchronous FULL] [--dir PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from router.model import Attempt, CardSummary, OutboxEvent, Outcome, Payment, PaymentMethod, Status
from router.store.sqlite import SqliteStore

CARD = PaymentMethod(
    type="card",
    card=CardSummary(bin="424242", last4="4242", brand="visa", exp_month=12, exp_year=2030, fingerprint="fp"),
)


def payment(n: int) -> Payment:
    return Payment(
        id=f"pay_{n:08d}", merchant_id="m_bench", merchant_order_id=f"order-{n}", status=Status.PROCESSING,
        amount=1000 + n % 5000, currency="EUR", country="DE", capture=True, payment_method=CARD,
    )  # fmt: skip


def outbox_event(p: Payment, kind: str) -> OutboxEvent:
    return OutboxEvent(
        id=f"evt_{p.id}_{kind}", merchant_id=p.merchant_id, payment_id=p.id, type=f"payment.{kind}",
        payload=msgspec.json.encode({"id": p.id, "status": p.status}),
    )  # fmt: skip


async def run(path: Path, n: int, concurrency: int, synchronous: str) -> None:
    store = SqliteStore(path, synchronous=synchronous)
    await store.start()
    numbers: Iterator[int] = iter(range(n))  # shared: each worker takes the next payment number

    async def worker() -> None:
        for i in numbers:
            p = payment(i)
            await store.insert_payment(p, [outbox_event(p, "created")])
            attempt = Attempt(seq=1, channel="sandbox", outcome=Outcome.APPROVED, code="00", latency_ms=3.0,
                              channel_key=f"{p.id}:1", channel_reference=f"ref_{i}")  # fmt: skip
            done = msgspec.structs.replace(
                p, status=Status.AUTHORIZED, version=2, attempts=[attempt], updated_at=datetime.now(UTC)
            )
            await store.update_payment(done, 1, [outbox_event(done, "authorized")])

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await store.close()

    stats = store.stats
    sizes = sorted(stats.batch_sizes.elements())
    common = ", ".join(f"{size}x{count}" for size, count in stats.batch_sizes.most_common(5))
    print(
        f"concurrency {concurrency:>4}: {stats.writes / elapsed:>9,.0f} writes/s  "
        f"({n / elapsed:,.0f} payments/s, {stats.writes} writes in {elapsed:.2f}s, {stats.transactions} commits)\n"
        f"                  batch size mean {statistics.fmean(sizes):.1f}, median {statistics.median(sizes):g}, "
        f"max {sizes[-1]}; most common (size x count): {common}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="payments per run (2 writes each)")
    parser.add_argument("--concurrency", default="1,256", help="comma-separated concurrency levels")
    parser.add_argument("--synchronous", default="FULL", help="PRAGMA synchronous for the writer")
    parser.add_argument("--dir", default=None, help="where the db goes (fsync cost is the disk's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="payroute-bench-", dir=args.dir) as tmp:
        print(f"SqliteStore, {args.n} payments per run, synchronous={args.synchronous}, db in {tmp}")
        for level in (int(c) for c in args.concurrency.split(",")):
            asyncio.run(run(Path(tmp) / f"c{level}.db", args.n, level, args.synchronous))


if __name__ == "__main__":
    main()
