"""How many durable writes/s PostgresStore sustains, serially and with concurrent writers.

The same workload as bench/store_sqlite.py: per payment an insert (status processing, one outbox
event) and one optimistic update (authorized + an attempt, another event), so 2 writes per payment,
each its own committed transaction. Each run uses a fresh database that is dropped afterwards.

    .venv/bin/python bench/store_postgres.py [--n 5000] [--concurrency 1,10,64] [--max-size 10]
        [--server postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec

from router.model import Attempt, CardSummary, OutboxEvent, Outcome, Payment, PaymentMethod, Status
from router.store.postgres import PostgresStore

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


async def admin(server: str, sql: str) -> None:
    conn = await asyncpg.connect(server, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def run(server: str, n: int, concurrency: int, max_size: int) -> None:
    name = f"payroute_bench_{secrets.token_hex(4)}"
    await admin(server, f'CREATE DATABASE "{name}"')
    store = PostgresStore(urlunsplit(urlsplit(server)._replace(path="/" + name)), max_size=max_size)
    try:
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
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await store.close()
        await admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(
        f"concurrency {concurrency:>4}: {2 * n / elapsed:>9,.0f} writes/s  "
        f"({n / elapsed:,.0f} payments/s, {2 * n} writes in {elapsed:.2f}s, pool max_size {max_size})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5_000, help="payments per run (2 writes each)")
    parser.add_argument("--concurrency", default="1,10,64", help="comma-separated concurrency levels")
    parser.add_argument("--max-size", type=int, default=10, help="connection pool size")
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    print(f"PostgresStore, {args.n} payments per run, server {args.server}")
    for level in (int(c) for c in args.concurrency.split(",")):
        asyncio.run(run(args.server, args.n, level, args.max_size))


if __name__ == "__main__":
    main()
