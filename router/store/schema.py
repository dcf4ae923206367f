"""What every store shares about the schema: versioned migrations (and SQLite's statement splitting),
the version rule of an update, the child rows of a payment write, and handing a group's results to
their callers (`settle_futures`).

`load_migrations(package, dialect)` reads `<package>/migrations/<dialect>/NNNN_name.sql` in order and
refuses gaps, so a release can never skip or reorder a step. `child_rows` builds the attempt,
operation, outbox and ledger rows written with a payment, in the column order both dialects use;
only the timestamp representation differs, so the dialect passes its converter.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple

from router.model import OutboxEvent, Payment

if TYPE_CHECKING:
    from router.money.ledger import LedgerEntry

Row = tuple[object, ...]


def split_statements(script: str) -> list[str]:
    """A SQLite migration's statements one by one: executescript() would COMMIT first, and every
    migration must run inside the caller's transaction."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending)
            pending = ""
    if pending.strip():
        statements.append(pending)  # a trailing comment runs as a no-op; a truncated statement fails loudly
    return statements


def check_next_version(payment: Payment, expected_version: int) -> None:
    """An update must move a payment exactly one version on from the one it read."""
    if payment.version != expected_version + 1:
        raise ValueError(
            f"payment {payment.id}: version {payment.version} must be expected_version + 1 ({expected_version + 1})"
        )


class ChildRows(NamedTuple):
    attempts: list[Row]
    operations: list[Row]
    outbox: list[Row]
    ledger: list[Row]


def child_rows(
    payment: Payment, events: Sequence[OutboxEvent], ledger: Sequence[LedgerEntry], ts: Callable[[datetime], object]
) -> ChildRows:
    """Built on the caller, before any I/O: a bad value (a naive datetime) fails this write only."""
    return ChildRows(
        attempts=[
            (payment.id, a.seq, a.channel, a.outcome.value, a.code, a.latency_ms, a.channel_key,
             a.channel_reference, ts(a.started_at))
            for a in payment.attempts
        ],
        operations=[
            (o.id, payment.id, o.kind, o.amount, o.status, o.channel_reference, o.code, ts(o.created_at))
            for o in payment.operations
        ],
        outbox=[(e.id, e.merchant_id, e.payment_id, e.type, e.payload, (at := ts(e.created_at)), at)
                for e in events],
        ledger=[
            (e.id, e.txn_id, e.account, e.amount, e.currency, e.payment_id, e.merchant_id, e.kind, ts(e.created_at))
            for e in ledger
        ],
    )  # fmt: skip


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


def load_migrations(package: str, dialect: str) -> list[Migration]:
    """The packaged migrations, in order. Numbers must run 1..N without gaps."""
    folder = resources.files(package) / "migrations" / dialect
    found = sorted(
        (int(f.name.split("_", 1)[0]), f.name, f.read_text(encoding="utf-8"))
        for f in folder.iterdir()
        if f.name.endswith(".sql")
    )
    migrations = [Migration(*m) for m in found]
    if [m.version for m in migrations] != list(range(1, len(migrations) + 1)):
        raise RuntimeError(f"{package} {dialect} migrations are not numbered 1..N: {[m.name for m in migrations]}")
    return migrations


def settle_futures(settled: Sequence[tuple[asyncio.Future[Any], BaseException | None, Any]]) -> None:
    """Give each waiting caller of a group write its result or exception; a cancelled caller's write
    happened (or failed) regardless, so it is skipped. Runs on the futures' loop."""
    for future, exc, result in settled:
        if future.done():
            continue
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
