"""Ledger, settlement and reconciliation tables: queries for SQLite and PostgreSQL.

The tables come from `router/store/migrations/*/0003_ledger.sql` (the payment stores migrate them);
ledger entries of payment changes are written by the payment stores in the same transaction as the
payment. This module reads them and writes what is not a payment change: settlement batches (with
their postings and reserve releases, one transaction, keyed so a re-run writes nothing) and
reconciliation exceptions. One SQL text serves both databases (`?` becomes `$n` for PostgreSQL).

Reports: balances per account, the trial balance (the sum per currency of every entry: always 0),
per-merchant statements, and a CSV an ERP can import (one row per entry, debit/credit columns).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import re
import sqlite3
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Protocol

import asyncpg
import msgspec

from router.model import Payment
from router.money.ledger import LedgerEntry
from router.money.pricing import MonthlyActivity
from router.money.settlement import Batch

Row = tuple[Any, ...]


class _Tx(Protocol):
    async def execute(self, sql: str, params: Sequence[object] = ()) -> int: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...

    async def fetch(self, sql: str, params: Sequence[object] = ()) -> list[Row]: ...


class _Db(Protocol):
    def tx(self) -> contextlib.AbstractAsyncContextManager[_Tx]: ...

    async def fetch(self, sql: str, params: Sequence[object] = ()) -> list[Row]: ...


def _ts(dt: datetime) -> str:
    if dt.tzinfo is None:
        raise ValueError(f"naive datetime {dt!r}")
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _sqlite_param(v: object) -> object:
    if isinstance(v, datetime):
        return _ts(v)
    if isinstance(v, date):
        return v.isoformat()
    return v


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        p = [_sqlite_param(v) for v in params]
        return int(await asyncio.to_thread(lambda: self.conn.execute(sql, p).rowcount))

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        rs = [[_sqlite_param(v) for v in r] for r in rows]
        await asyncio.to_thread(self.conn.executemany, sql, rs)

    async def fetch(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        p = [_sqlite_param(v) for v in params]
        return await asyncio.to_thread(lambda: [tuple(r) for r in self.conn.execute(sql, p).fetchall()])


class _SqliteDb:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[_Tx]:
        conn = await asyncio.to_thread(self._connect)
        try:
            await asyncio.to_thread(conn.execute, "BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(conn)
            except BaseException:
                await asyncio.to_thread(conn.execute, "ROLLBACK")
                raise
            await asyncio.to_thread(conn.execute, "COMMIT")
        finally:
            conn.close()

    async def fetch(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        def run() -> list[Row]:
            conn = self._connect()
            try:
                return [tuple(r) for r in conn.execute(sql, [_sqlite_param(v) for v in params]).fetchall()]
            finally:
                conn.close()

        return await asyncio.to_thread(run)


_QMARK = re.compile(r"\?")


def _pg_sql(sql: str) -> str:
    n = iter(range(1, 10_000))
    return _QMARK.sub(lambda _: f"${next(n)}", sql)


def _pg_value(v: object) -> object:
    return int(v) if isinstance(v, Decimal) else v


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        status: str = await self.conn.execute(_pg_sql(sql), *params)
        return int(status.rsplit(" ", 1)[-1])

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        if rows:
            await self.conn.executemany(_pg_sql(sql), rows)

    async def fetch(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return [tuple(_pg_value(v) for v in r) for r in await self.conn.fetch(_pg_sql(sql), *params)]


class _PgDb:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[_Tx]:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            async with conn.transaction():
                yield _PgTx(conn)
        finally:
            await conn.close()

    async def fetch(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            return await _PgTx(conn).fetch(sql, params)
        finally:
            await conn.close()


def _dt(v: object) -> datetime:
    if isinstance(v, datetime):
        return v.astimezone(UTC)
    return datetime.fromisoformat(str(v))


def _date(v: object) -> date:
    if isinstance(v, datetime):
        return v.date()
    if isinstance(v, date):
        return v
    return date.fromisoformat(str(v))


class AccountBalance(msgspec.Struct, frozen=True, kw_only=True):
    account: str
    currency: str
    balance: int  # debit positive


class TrialBalance(msgspec.Struct, frozen=True, kw_only=True):
    accounts: list[AccountBalance]
    totals: dict[str, int]  # currency -> sum of every entry: 0 in a sound ledger

    @property
    def balanced(self) -> bool:
        return all(v == 0 for v in self.totals.values())


class StatementLine(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime
    txn_id: str
    kind: str
    payment_id: str | None
    amount: int  # from the merchant's side: positive = owed to the merchant
    balance: int  # running, owed to the merchant


class Statement(msgspec.Struct, frozen=True, kw_only=True):
    merchant_id: str
    currency: str
    since: datetime
    until: datetime
    opening: int
    lines: list[StatementLine]
    closing: int


class ReconRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One expected money movement at a channel, as our record has it."""

    reference: str  # the channel's id of the charge or refund
    kind: str  # charge | refund
    amount: int
    currency: str
    status: str  # charge: captured | authorized | voided | failed; refund: succeeded | pending | failed
    payment_id: str
    fee: int | None = None  # the channel fee we booked (charges only)


class StoredException(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    run_id: str
    channel: str
    type: str
    kind: str
    reference: str
    payment_id: str | None
    detail: str
    ours: dict[str, Any] | None
    theirs: dict[str, Any] | None
    created_at: datetime
    resolved_at: datetime | None = None
    resolution_reason: str | None = None
    resolved_by: str | None = None


_ENTRY_COLUMNS = "id, txn_id, account, amount_minor, currency, payment_id, merchant_id, kind, posted_at"
_INSERT_ENTRY = f"INSERT INTO ledger_entries ({_ENTRY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)"
_BATCH_COLUMNS = (
    "batch_key, merchant_id, currency, payout_date, period_start, period_end, gross, fees, refunds, "
    "chargebacks, reserve_held, reserve_released, net, release_date, released_by"
)


def _entry_row(e: LedgerEntry) -> tuple[object, ...]:
    return (e.id, e.txn_id, e.account, e.amount, e.currency, e.payment_id, e.merchant_id, e.kind, e.created_at)


def _entry(r: Row) -> LedgerEntry:
    return LedgerEntry(id=r[0], txn_id=r[1], account=r[2], amount=int(r[3]), currency=r[4], payment_id=r[5],
                       merchant_id=r[6], kind=r[7], created_at=_dt(r[8]))


def _batch(r: Row) -> Batch:
    return Batch(
        batch_key=r[0], merchant_id=r[1], currency=r[2], payout_date=_date(r[3]), period_start=_date(r[4]),
        period_end=_date(r[5]), gross=int(r[6]), fees=int(r[7]), refunds=int(r[8]), chargebacks=int(r[9]),
        reserve_held=int(r[10]), reserve_released=int(r[11]), net=int(r[12]),
        release_date=_date(r[13]) if r[13] is not None else None, released_by=r[14],
    )


_decode_payment = msgspec.json.Decoder(Payment).decode
_json = msgspec.json.encode


class MoneyStore:
    def __init__(self, db: _Db) -> None:
        self.db = db

    @classmethod
    def sqlite(cls, path: str | Path) -> MoneyStore:
        return cls(_SqliteDb(path))

    @classmethod
    def postgres(cls, dsn: str) -> MoneyStore:
        return cls(_PgDb(dsn))

    # ------------------------------------------------------------------ ledger

    async def insert_entries(self, entries: Sequence[LedgerEntry]) -> None:
        """Postings that are not a payment change (e.g. a chargeback placeholder), one transaction."""
        async with self.db.tx() as tx:
            await tx.executemany(_INSERT_ENTRY, [_entry_row(e) for e in entries])

    async def entries(self, *, payment_id: str | None = None, merchant_id: str | None = None,
                      since: datetime | None = None, until: datetime | None = None) -> list[LedgerEntry]:
        where, params = self._where(payment_id=payment_id, merchant_id=merchant_id, since=since, until=until)
        rows = await self.db.fetch(f"SELECT {_ENTRY_COLUMNS} FROM ledger_entries{where} ORDER BY posted_at, id",
                                   params)
        return [_entry(r) for r in rows]

    @staticmethod
    def _where(**filters: object) -> tuple[str, list[object]]:
        clauses, params = [], []
        for name, value in filters.items():
            if value is None:
                continue
            if name == "since":
                clauses.append("posted_at >= ?")
            elif name == "until":
                clauses.append("posted_at < ?")
            else:
                clauses.append(f"{name} = ?")
            params.append(value)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    async def balances(self, account_prefix: str | None = None) -> list[AccountBalance]:
        sql = "SELECT account, currency, SUM(amount_minor) FROM ledger_entries"
        params: list[object] = []
        if account_prefix:
            # not LIKE: "_" in merchant ids would be a wildcard
            sql += " WHERE substr(account, 1, length(?)) = ?"
            params += [account_prefix, account_prefix]
        rows = await self.db.fetch(sql + " GROUP BY account, currency ORDER BY account, currency", params)
        return [AccountBalance(account=r[0], currency=r[1], balance=int(r[2])) for r in rows]

    async def trial_balance(self) -> TrialBalance:
        accounts = await self.balances()
        totals: dict[str, int] = {}
        for a in accounts:
            totals[a.currency] = totals.get(a.currency, 0) + a.balance
        return TrialBalance(accounts=accounts, totals=totals)

    async def statement(self, merchant_id: str, currency: str, since: datetime, until: datetime) -> Statement:
        account = f"merchant:{merchant_id}:payable"
        opening_rows = await self.db.fetch(
            "SELECT COALESCE(SUM(amount_minor), 0) FROM ledger_entries WHERE account = ? AND currency = ? AND posted_at < ?",
            [account, currency, since],
        )
        opening = -int(opening_rows[0][0])
        rows = await self.db.fetch(
            "SELECT posted_at, txn_id, kind, payment_id, amount_minor FROM ledger_entries WHERE account = ? AND "
            "currency = ? AND posted_at >= ? AND posted_at < ? ORDER BY posted_at, id",
            [account, currency, since, until],
        )
        running, lines = opening, []
        for r in rows:
            running -= int(r[4])
            lines.append(StatementLine(at=_dt(r[0]), txn_id=r[1], kind=r[2], payment_id=r[3], amount=-int(r[4]),
                                       balance=running))
        return Statement(merchant_id=merchant_id, currency=currency, since=since, until=until, opening=opening,
                         lines=lines, closing=running)

    async def monthly_activity(self, since: datetime) -> dict[tuple[str, str], MonthlyActivity]:
        """Rolling figures for tiered pricing: captured volume and count per (merchant, currency) and
        per (`channel:<name>`, currency) since `since` (callers pass now - 30 days)."""
        rows = await self.db.fetch(
            "SELECT account, currency, SUM(amount_minor), COUNT(DISTINCT payment_id) FROM ledger_entries "
            "WHERE kind = 'capture' AND posted_at >= ? GROUP BY account, currency",
            [since],
        )
        out: dict[tuple[str, str], MonthlyActivity] = {}
        for account, currency, total, count in rows:
            parts = str(account).split(":")
            if parts[0] == "merchant" and parts[-1] == "payable":
                out[(":".join(parts[1:-1]), currency)] = MonthlyActivity(volume=-int(total), count=int(count))
            elif parts[0] == "channel" and parts[-1] == "clearing":
                out[(f"channel:{':'.join(parts[1:-1])}", currency)] = MonthlyActivity(volume=int(total),
                                                                                     count=int(count))
        return out

    # ------------------------------------------------------------------ settlement

    async def merchant_ids(self) -> list[str]:
        return [r[0] for r in await self.db.fetch("SELECT DISTINCT merchant_id FROM ledger_entries ORDER BY 1")]

    async def merchant_currencies(self, merchant_id: str) -> list[str]:
        rows = await self.db.fetch(
            "SELECT DISTINCT currency FROM ledger_entries WHERE merchant_id = ? ORDER BY 1", [merchant_id]
        )
        return [r[0] for r in rows]

    async def payable_sums(self, merchant_id: str, currency: str, since: datetime, until: datetime) -> dict[str, int]:
        rows = await self.db.fetch(
            "SELECT kind, SUM(amount_minor) FROM ledger_entries WHERE account = ? AND currency = ? AND posted_at >= ? "
            "AND posted_at < ? AND payment_id IS NOT NULL GROUP BY kind",
            [f"merchant:{merchant_id}:payable", currency, since, until],
        )
        return {r[0]: int(r[1]) for r in rows}

    async def releasable_reserves(self, merchant_id: str, currency: str, on: date) -> list[tuple[str, int]]:
        rows = await self.db.fetch(
            "SELECT batch_key, reserve_held FROM settlement_batches WHERE merchant_id = ? AND currency = ? AND "
            "release_date IS NOT NULL AND release_date <= ? AND released_by IS NULL ORDER BY batch_key",
            [merchant_id, currency, on],
        )
        return [(r[0], int(r[1])) for r in rows]

    async def get_batch(self, key: str) -> Batch | None:
        rows = await self.db.fetch(f"SELECT {_BATCH_COLUMNS} FROM settlement_batches WHERE batch_key = ?", [key])
        return _batch(rows[0]) if rows else None

    async def batches(self, *, payout_date: date | None = None, merchant_id: str | None = None) -> list[Batch]:
        clauses: list[str] = []
        params: list[object] = []
        if payout_date is not None:
            clauses.append("payout_date = ?")
            params.append(payout_date)
        if merchant_id is not None:
            clauses.append("merchant_id = ?")
            params.append(merchant_id)
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        rows = await self.db.fetch(f"SELECT {_BATCH_COLUMNS} FROM settlement_batches{where} ORDER BY batch_key",
                                   params)
        return [_batch(r) for r in rows]

    async def save_batch(self, batch: Batch, postings: Sequence[LedgerEntry], releases: Sequence[str]) -> bool:
        """Insert the batch, mark the reserves it releases, post its entries: all or nothing.
        False (and nothing written) when the batch key exists already."""
        async with self.db.tx() as tx:
            inserted = await tx.execute(
                f"INSERT INTO settlement_batches ({_BATCH_COLUMNS}, recorded_at) VALUES "
                "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (batch_key) DO NOTHING",
                [batch.batch_key, batch.merchant_id, batch.currency, batch.payout_date, batch.period_start,
                 batch.period_end, batch.gross, batch.fees, batch.refunds, batch.chargebacks, batch.reserve_held,
                 batch.reserve_released, batch.net, batch.release_date, None, datetime.now(UTC)],
            )
            if inserted == 0:
                return False
            for key in releases:
                if await tx.execute(
                    "UPDATE settlement_batches SET released_by = ? WHERE batch_key = ? AND released_by IS NULL",
                    [batch.batch_key, key],
                ) != 1:
                    raise RuntimeError(f"reserve of {key} was released concurrently; re-run the settlement")
            await tx.executemany(_INSERT_ENTRY, [_entry_row(e) for e in postings])
        return True

    # ------------------------------------------------------------------ reconciliation

    async def channel_records(
        self, channel: str, *, since: datetime | None = None, until: datetime | None = None,
    ) -> list[ReconRecord]:
        """What our record expects the channel to report: every charge with a channel reference, and
        every refund operation, with the channel fee booked in the ledger. `since`/`until` keep the
        payments created in [since, until) (a report covers a period: match it to the same one)."""
        rows = await self.db.fetch("SELECT doc FROM payments")
        fee_rows = await self.db.fetch(
            "SELECT payment_id, SUM(amount_minor) FROM ledger_entries WHERE account = ? GROUP BY payment_id",
            [f"expense:channel:{channel}"],
        )
        fees = {r[0]: int(r[1]) for r in fee_rows}
        out: list[ReconRecord] = []
        for (doc,) in rows:
            p = _decode_payment(bytes(doc))
            if (since is not None and p.created_at < since) or (until is not None and p.created_at >= until):
                continue
            if p.channel == channel:
                out.extend(records_of(p, fees.get(p.id)))
        return out

    async def save_exceptions(self, exceptions: Sequence[StoredException]) -> None:
        async with self.db.tx() as tx:
            await tx.executemany(
                "INSERT INTO recon_exceptions (id, run_id, channel, type, kind, reference, payment_id, detail, "
                "ours, theirs, found_at) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO NOTHING",
                [(e.id, e.run_id, e.channel, e.type, e.kind, e.reference, e.payment_id, e.detail,
                  _json(e.ours).decode() if e.ours is not None else None,
                  _json(e.theirs).decode() if e.theirs is not None else None, e.created_at)
                 for e in exceptions],
            )

    async def exceptions(self, *, channel: str | None = None, open_only: bool = False) -> list[StoredException]:
        sql = ("SELECT id, run_id, channel, type, kind, reference, payment_id, detail, ours, theirs, found_at, "
               "resolved_at, resolution_reason, resolved_by FROM recon_exceptions")
        clauses: list[str] = []
        params: list[object] = []
        if channel is not None:
            clauses.append("channel = ?")
            params.append(channel)
        if open_only:
            clauses.append("resolved_at IS NULL")
        rows = await self.db.fetch(sql + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY id",
                                   params)
        return [
            StoredException(
                id=r[0], run_id=r[1], channel=r[2], type=r[3], kind=r[4], reference=r[5], payment_id=r[6],
                detail=r[7], ours=msgspec.json.decode(r[8]) if r[8] else None,
                theirs=msgspec.json.decode(r[9]) if r[9] else None, created_at=_dt(r[10]),
                resolved_at=_dt(r[11]) if r[11] is not None else None, resolution_reason=r[12], resolved_by=r[13],
            )
            for r in rows
        ]

    async def resolve_exception(self, exception_id: str, reason: str, by: str, now: datetime) -> bool:
        """An operator closes an exception with a reason. False if unknown or already resolved."""
        if not reason.strip():
            raise ValueError("a resolution needs a reason")
        async with self.db.tx() as tx:
            n = await tx.execute(
                "UPDATE recon_exceptions SET resolved_at = ?, resolution_reason = ?, resolved_by = ? "
                "WHERE id = ? AND resolved_at IS NULL",
                [now, reason, by, exception_id],
            )
        return n == 1


JOURNAL_COLUMNS = ("date", "journal_id", "line_id", "account", "debit", "credit", "currency", "merchant_id",
                   "payment_id", "kind")


def write_journal_csv(entries: Sequence[LedgerEntry], out: IO[str]) -> int:
    """ERP journal lines: one row per entry, unsigned minor units in debit/credit columns."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(JOURNAL_COLUMNS)
    for e in entries:
        w.writerow([_ts(e.created_at), e.txn_id, e.id, e.account, max(e.amount, 0), max(-e.amount, 0),
                    e.currency, e.merchant_id, e.payment_id or "", e.kind])
    return len(entries)


_CHARGE_STATUS = {
    "captured": "captured", "partially_refunded": "captured", "refunded": "captured",
    "authorized": "authorized", "voided": "voided", "declined": "failed", "failed": "failed",
}


def records_of(p: Payment, booked_channel_fee: int | None = None) -> list[ReconRecord]:
    """A payment as reconciliation expects it at its channel (none without a channel reference)."""
    out: list[ReconRecord] = []
    status = _CHARGE_STATUS.get(p.status.value)
    if p.channel_reference and status is not None:
        out.append(ReconRecord(
            reference=p.channel_reference, kind="charge",
            amount=p.captured_amount if status == "captured" else p.amount, currency=p.currency, status=status,
            payment_id=p.id, fee=booked_channel_fee,
        ))
    for op in p.operations:
        if op.kind == "refund" and op.channel_reference:
            out.append(ReconRecord(reference=op.channel_reference, kind="refund", amount=op.amount,
                                   currency=p.currency, status=op.status, payment_id=p.id))
    return out
