"""`PaymentStore` on PostgreSQL (asyncpg): the durable record of the scale-out mode.

Contract (on top of `router.store.base`, with the same semantics as `SqliteStore`):
- Every write is one transaction on a pooled connection: the payment row, its attempts and
  operations, and its outbox events. An awaited write has committed. A write that fails on its own
  (`DuplicateOrder`, `VersionConflict`, a constraint such as a reused outbox event id, which surfaces
  as `asyncpg.UniqueViolationError`) rolls back entirely and affects no other write.
- No client-side batching: each write is its own short transaction touching one payment, so writes
  of different payments never wait on each other or deadlock, and PostgreSQL already shares WAL
  flushes between concurrent commits. `batch_max` is accepted for configuration parity only.
- `update_payment` of an unknown payment id is a `VersionConflict` (no row at `expected_version`).
  `merchant_id` and `merchant_order_id` are immutable: updates never rewrite those columns.
- Fail closed, fast: connecting, acquiring a pooled connection and every statement are bounded by a
  timeout. Anything that means "the database cannot be reached" (refused or lost connection,
  timeout, shutdown, too many connections) is raised as `StoreUnavailable`, from every method. A
  write that raises it may or may not have committed (the connection can drop during COMMIT): read
  the payment back before deciding; re-inserting is safe, it answers `DuplicateOrder`.
- Webhook attempt results (`finish_attempt`) that arrive while others are being written are written
  together in one transaction, set-based, lease checks included (the payment writes above stay one
  transaction each). A group that fails for any reason but an unreachable database is rolled back and
  its results written one transaction each, so one bad result fails alone.
- The schema comes from the numbered files in `migrations/postgres/`, applied in order inside one
  transaction under `pg_advisory_xact_lock`, so instances starting together apply each one once;
  they are recorded in `schema_migrations (version, name, applied_at)`. A database that records a
  migration this code does not know is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from router.errors import DuplicateOrder, StoreUnavailable, VersionConflict
from router.store.schema import ChildRows, Migration, check_next_version, child_rows, settle_futures
from router.store.schema import load_migrations as _load_migrations

__all__ = ["PostgresStore", "StoreUnavailable", "load_migrations"]
from router.model import OutboxEvent, Payment, Status
from router.money.ledger import LedgerEntry
from router.store.base import (
    DeliveryClaim,
    DeliveryStatus,
    DeliveryUpdate,
    EndpointDecision,
    EndpointStatus,
    WebhookAttemptRow,
    WebhookDeliveryRow,
    WebhookEndpointRow,
    manual_endpoint_state,
    next_order_attempt,
)

_encode = msgspec.json.Encoder().encode
_decode_payment = msgspec.json.Decoder(Payment).decode

# "payroute" in ASCII: the advisory lock that serialises schema migrations across instances.
MIGRATION_LOCK_KEY = 0x7061_7972_6F75_7465


# Errors that say nothing about the write itself, only that the database is not serving us.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)


def load_migrations() -> list[Migration]:
    """The packaged postgres migrations, in order."""
    return _load_migrations("router.store", "postgres")


_CREATE_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""
# No conflict target: a racing insert of the same order (same `order_attempt`, or a second live payment)
# waits for the other transaction, then does nothing; the caller reads the order again and decides.
_INSERT_PAYMENT = """INSERT INTO payments (id, merchant_id, merchant_order_id, status, amount, currency,
    version, created_at, updated_at, doc, order_attempt) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)
    ON CONFLICT DO NOTHING RETURNING 1"""
# The same without ON CONFLICT: run only to raise the real error of a reused payment id.
_INSERT_PAYMENT_STRICT = _INSERT_PAYMENT.replace("ON CONFLICT DO NOTHING RETURNING 1", "")
_ORDER_PAYMENTS = """SELECT id, status, order_attempt FROM payments
    WHERE merchant_id = $1 AND merchant_order_id = $2"""
# Rounds of read-decide-insert before giving up: a lost race ends in DuplicateOrder after one round
# unless the winner itself was inserted already failed.
_INSERT_ROUNDS = 5
_UPDATE_PAYMENT = """UPDATE payments SET status=$1, amount=$2, currency=$3, version=$4, updated_at=$5, doc=$6
    WHERE id=$7 AND version=$8"""
_UPSERT_ATTEMPT = """INSERT INTO attempts (payment_id, seq, channel, outcome, code, latency_ms, channel_key,
    channel_reference, started_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9) ON CONFLICT (payment_id, seq) DO UPDATE
    SET channel=excluded.channel, outcome=excluded.outcome, code=excluded.code,
    latency_ms=excluded.latency_ms, channel_key=excluded.channel_key,
    channel_reference=excluded.channel_reference, started_at=excluded.started_at"""
_UPSERT_OPERATION = """INSERT INTO operations (id, payment_id, kind, amount, status, channel_reference, code,
    created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT (id) DO UPDATE SET status=excluded.status,
    channel_reference=excluded.channel_reference, code=excluded.code"""
_INSERT_OUTBOX = """INSERT INTO outbox (id, merchant_id, payment_id, type, payload, created_at,
    next_attempt_at) VALUES ($1,$2,$3,$4,$5,$6,$7)"""
_INSERT_LEDGER = """INSERT INTO ledger_entries (id, txn_id, account, amount_minor, currency, payment_id,
    merchant_id, kind, posted_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"""


def _ts(dt: datetime) -> datetime:
    # asyncpg would read a naive datetime as UTC; refuse it, as SqliteStore does, rather than guess.
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"naive datetime {dt!r}: the store only takes aware UTC datetimes")
    return dt


def _rowcount(status: str) -> int:
    # asyncpg returns the command tag, e.g. "UPDATE 1".
    return int(status.rsplit(" ", 1)[-1])


class PostgresStore:
    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        command_timeout_s: float = 5.0,
        batch_max: int = 256,
        connect_timeout_s: float = 5.0,
        migrate_timeout_s: float = 300.0,
        migrations: Sequence[Migration] | None = None,
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError("need 0 <= min_size <= max_size and max_size >= 1")
        if min(command_timeout_s, connect_timeout_s, migrate_timeout_s) <= 0:
            raise ValueError("timeouts must be > 0: an unbounded wait would not fail closed")
        if batch_max < 1:
            raise ValueError("batch_max must be >= 1")
        self.dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._command_timeout_s = command_timeout_s
        self._connect_timeout_s = connect_timeout_s
        # Waiting for another instance's migrations, or building an index, may outlast a query.
        self._migrate_timeout_s = migrate_timeout_s
        # Waiting for a pooled connection covers a reconnect (connect timeout) plus queueing behind
        # other writes (a few statements each); bounded all the same.
        self._acquire_timeout_s = connect_timeout_s + command_timeout_s
        self._migrations = list(migrations) if migrations is not None else load_migrations()
        self._state = "new"  # new -> running -> closed
        self._pool: Any = None  # asyncpg.Pool (asyncpg ships no type information)
        self._finishing: list[tuple[_PgFinish, asyncio.Future[_Finished]]] = []
        self._finisher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"PostgresStore cannot start: it is {self._state}")
        self._state = "running"
        try:
            async with _unavailable_as("cannot start"):
                self._pool = await asyncio.wait_for(
                    asyncpg.create_pool(
                        self.dsn,
                        min_size=self._min_size,
                        max_size=self._max_size,
                        command_timeout=self._command_timeout_s,
                        timeout=self._connect_timeout_s,
                        server_settings={"application_name": "payroute"},
                    ),
                    # create_pool opens min_size connections one after another.
                    timeout=self._connect_timeout_s * max(1, self._min_size) + self._command_timeout_s,
                )
            async with self._connection() as conn:
                await self._migrate(conn)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Let writes in flight finish (bounded), then close every connection."""
        if self._state == "closed":
            return
        self._state = "closed"
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self._acquire_timeout_s)
        except _UNREACHABLE:
            pool.terminate()

    async def _migrate(self, conn: Any) -> None:
        async with conn.transaction():
            # Held until this transaction ends: a second instance starting now waits, then sees our work.
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY, timeout=self._migrate_timeout_s
            )
            await conn.execute(_CREATE_MIGRATIONS_TABLE)
            applied = {
                r["version"]: r["name"]
                for r in await conn.fetch("SELECT version, name FROM schema_migrations")
            }
            known = {m.version: m.name for m in self._migrations}
            unknown = sorted(v for v in applied if known.get(v) != applied[v])
            if unknown:
                raise RuntimeError(
                    f"the database records migrations this code does not have "
                    f"{[(v, applied[v]) for v in unknown]}: it is newer (or diverged); refusing to run"
                )
            for migration in self._migrations:
                if migration.version in applied:
                    continue
                # No arguments: the simple query protocol, which runs a file of several statements.
                await conn.execute(migration.sql, timeout=self._migrate_timeout_s)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        if self._state != "running" or self._pool is None:
            raise RuntimeError(f"PostgresStore is {self._state}")
        async with _unavailable_as("unreachable"):
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                yield conn

    # ------------------------------------------------------------------ writes

    async def insert_payment(
        self, payment: Payment, events: Sequence[OutboxEvent] = (), *, ledger: Sequence[LedgerEntry] = (),
        retry_failed_order: bool = False,
    ) -> None:
        row = (
            payment.id, payment.merchant_id, payment.merchant_order_id, payment.status.value,
            payment.amount, payment.currency, payment.version, _ts(payment.created_at),
            _ts(payment.updated_at), _encode(payment),
        )  # fmt: skip
        children = _children(payment, events, ledger)  # built first: a bad value fails before any I/O
        order = (payment.merchant_id, payment.merchant_order_id)
        async with self._connection() as conn, conn.transaction():
            for _ in range(_INSERT_ROUNDS):
                # READ COMMITTED: each statement sees what committed before it, so after a conflict
                # (the insert waited for the racing transaction to commit) the next read sees the
                # winner, and the id named is the one that really won.
                existing = [tuple(r) for r in await conn.fetch(_ORDER_PAYMENTS, *order)]
                attempt = next_order_attempt(existing, payment.id, retry_failed_order)
                if await conn.fetchval(_INSERT_PAYMENT, *row, attempt) is not None:
                    break
                owner = await conn.fetchrow(
                    "SELECT merchant_id, merchant_order_id FROM payments WHERE id = $1", payment.id
                )
                if owner is not None and tuple(owner) != order:
                    # The payment id is taken by another order's payment: raise the database's own
                    # UniqueViolationError, as before 0004. (Taken by this order: the next read names it.)
                    await conn.execute(_INSERT_PAYMENT_STRICT, *row, attempt)
            else:
                if not existing:  # cannot happen without deletes; never report a wrong id
                    raise RuntimeError(f"payment {payment.id}: order conflict without a conflicting row")
                raise DuplicateOrder(str(max(existing, key=lambda r: r[2])[0]))
            await _write_children(conn, children)

    async def update_payment(
        self, payment: Payment, expected_version: int, events: Sequence[OutboxEvent] = (),
        *, ledger: Sequence[LedgerEntry] = (),
    ) -> None:
        check_next_version(payment, expected_version)
        row = (
            payment.status.value, payment.amount, payment.currency, payment.version,
            _ts(payment.updated_at), _encode(payment), payment.id, expected_version,
        )  # fmt: skip
        children = _children(payment, events, ledger)
        async with self._connection() as conn, conn.transaction():
            # A concurrent update of the same row makes this wait for it, then re-check the version
            # on the committed row: the loser updates 0 rows.
            if _rowcount(await conn.execute(_UPDATE_PAYMENT, *row)) == 0:
                raise VersionConflict(f"payment {payment.id} is no longer at version {expected_version}")
            await _write_children(conn, children)

    # ------------------------------------------------------------------ reads

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1")

    async def get_payment(self, payment_id: str) -> Payment | None:
        return await self._read_payment("SELECT doc FROM payments WHERE id = $1", payment_id)

    async def find_by_order(self, merchant_id: str, merchant_order_id: str) -> Payment | None:
        return await self._read_payment(
            "SELECT doc FROM payments WHERE merchant_id = $1 AND merchant_order_id = $2 "
            "ORDER BY order_attempt DESC LIMIT 1",
            merchant_id,
            merchant_order_id,
        )

    async def list_by_status(
        self, statuses: Sequence[Status], updated_before: datetime, limit: int = 100
    ) -> list[Payment]:
        """Oldest first, so a janitor working through them in pages makes progress."""
        if not statuses:
            return []
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT doc FROM payments WHERE status = ANY($1::text[]) AND updated_at < $2 "
                "ORDER BY updated_at, id LIMIT $3",
                [Status(s).value for s in statuses],
                _ts(updated_before),
                limit,
            )
        return [_decode_payment(r["doc"]) for r in rows]

    async def list_pending_operations(self, created_before: datetime, limit: int = 100) -> list[Payment]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT doc FROM payments WHERE id IN (SELECT payment_id FROM operations WHERE status = 'pending' "
                "AND created_at < $1 ORDER BY created_at LIMIT $2)",
                _ts(created_before),
                limit,
            )
        return [_decode_payment(r["doc"]) for r in rows]

    async def outbox_events(self, payment_id: str) -> list[OutboxEvent]:
        """In creation order (`seq`), which is commit order for one payment's events."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, merchant_id, payment_id, type, payload, created_at FROM outbox "
                "WHERE payment_id = $1 ORDER BY seq",
                payment_id,
            )
        return [
            OutboxEvent(
                id=r["id"], merchant_id=r["merchant_id"], payment_id=r["payment_id"], type=r["type"],
                payload=bytes(r["payload"]), created_at=r["created_at"],
            )
            for r in rows
        ]  # fmt: skip

    async def _read_payment(self, sql: str, *params: object) -> Payment | None:
        async with self._connection() as conn:
            doc = await conn.fetchval(sql, *params)
        return None if doc is None else _decode_payment(doc)

    # ------------------------------------------------------------------ webhook outbox (OutboxStore)

    async def sync_webhook_endpoints(self, endpoints: Sequence[WebhookEndpointRow], now: datetime) -> None:
        # in id order, like the endpoint locks of a group of attempt results: no lock-order deadlock
        rows = sorted((e.id, e.merchant_id, e.url, _ts(now)) for e in endpoints)
        if not rows:
            return
        async with self._connection() as conn:
            await conn.executemany(
                "INSERT INTO webhook_endpoints (id, merchant_id, url, updated_at) VALUES ($1,$2,$3,$4) "
                "ON CONFLICT (id) DO UPDATE SET merchant_id = excluded.merchant_id, url = excluded.url",
                rows,
            )

    async def list_webhook_endpoints(self) -> list[WebhookEndpointRow]:
        async with self._connection() as conn:
            rows = await conn.fetch(f"SELECT {_ENDPOINT_COLS} FROM webhook_endpoints ORDER BY id")
        return [_endpoint(r) for r in rows]

    async def set_webhook_endpoint_state(
        self, endpoint_id: str, state: EndpointStatus, now: datetime, reason: str | None = None
    ) -> WebhookEndpointRow | None:
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {_ENDPOINT_COLS} FROM webhook_endpoints WHERE id = $1 FOR UPDATE", endpoint_id
            )
            if row is None:
                return None
            ep = manual_endpoint_state(_endpoint(row), state, now, reason)
            await _write_endpoint(conn, ep)
            return ep

    async def fan_out_events(
        self, endpoints_by_merchant: Mapping[str, Sequence[str]], now: datetime, limit: int = 500
    ) -> int:
        async with self._connection() as conn, conn.transaction():
            # One fan-out at a time across instances: with SKIP LOCKED instead, a later event of a
            # payment could be fanned out (and sent) while an earlier one sat in another's batch.
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", FAN_OUT_LOCK_KEY):
                return 0
            events = await conn.fetch(
                "SELECT seq, id, merchant_id, payment_id, type, created_at FROM outbox "
                "WHERE fanned_out_at IS NULL ORDER BY seq LIMIT $1",
                limit,
            )
            deliveries = [
                (e["id"], ep, e["merchant_id"], e["payment_id"], e["seq"], e["type"], e["created_at"], _ts(now))
                for e in events
                for ep in endpoints_by_merchant.get(e["merchant_id"], ())
            ]
            if deliveries:
                await conn.executemany(
                    "INSERT INTO webhook_deliveries (event_id, endpoint_id, merchant_id, payment_id, seq, type, "
                    "created_at, next_attempt_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT DO NOTHING",
                    deliveries,
                )
            if events:
                await conn.execute(
                    "UPDATE outbox SET fanned_out_at = $1 WHERE seq = ANY($2::bigint[])",
                    _ts(now), [e["seq"] for e in events],
                )
            return len(events)

    async def record_callback(
        self, channel: str, event_id: str, payload: bytes, payment_id: str | None, received_at: datetime
    ) -> str | None:
        async with self._connection() as conn, conn.transaction():
            inserted = await conn.fetchval(
                "INSERT INTO channel_callbacks (channel, event_id, received_at, payment_id, payload) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING 1",
                channel, event_id, received_at, payment_id, payload,
            )
            if inserted:
                return None
            outcome = await conn.fetchval(
                "SELECT outcome FROM channel_callbacks WHERE channel = $1 AND event_id = $2", channel, event_id
            )
            return str(outcome or "")

    async def set_callback_outcome(self, channel: str, event_id: str, outcome: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE channel_callbacks SET outcome = $1 WHERE channel = $2 AND event_id = $3",
                outcome, channel, event_id,
            )

    async def claim_deliveries(
        self, endpoint_id: str, now: datetime, lease_until: datetime, owner: str, limit: int
    ) -> list[DeliveryClaim]:
        if limit <= 0:
            return []
        async with self._connection() as conn, conn.transaction():
            active = await conn.fetchval(
                "SELECT 1 FROM webhook_endpoints WHERE id = $1 AND state = 'active'", endpoint_id
            )
            if active is None:
                return []
            return await _pg_claim(conn, endpoint_id, now, lease_until, owner, limit)

    async def claim_probe(
        self, endpoint_id: str, now: datetime, next_probe_at: datetime, lease_until: datetime, owner: str
    ) -> DeliveryClaim | None:
        async with self._connection() as conn, conn.transaction():
            moved = await conn.execute(
                "UPDATE webhook_endpoints SET paused_until = $1, updated_at = $2 "
                "WHERE id = $3 AND state = 'paused' AND (paused_until IS NULL OR paused_until <= $2)",
                _ts(next_probe_at), _ts(now), endpoint_id,
            )
            if _rowcount(moved) == 0:
                return None
            claims = await _pg_claim(conn, endpoint_id, now, lease_until, owner, 1)
            return claims[0] if claims else None

    async def finish_attempt(
        self, claim: DeliveryClaim, attempt: WebhookAttemptRow, update: DeliveryUpdate,
        decide: EndpointDecision, now: datetime,
    ) -> tuple[WebhookEndpointRow, WebhookEndpointRow] | None:
        if self._state != "running":
            raise RuntimeError(f"PostgresStore is {self._state}")
        f = _PgFinish(claim, attempt, update, decide, _ts(now), _ts(update.next_attempt_at), _ts(attempt.started_at))
        future: asyncio.Future[_Finished] = asyncio.get_running_loop().create_future()
        self._finishing.append((f, future))
        if self._finisher is None or self._finisher.done():
            self._finisher = asyncio.create_task(self._finish_queued())
        return await future

    async def _finish_queued(self) -> None:
        # One writer of results: whatever queued up while a group was being written goes next, together.
        while self._finishing:
            group, self._finishing = self._finishing[:_FINISH_GROUP_MAX], self._finishing[_FINISH_GROUP_MAX:]
            outcomes: list[tuple[BaseException | None, _Finished]]
            try:
                keys = {(f.claim.event_id, f.claim.endpoint_id) for f, _ in group}
                if len(group) == 1 or len(keys) < len(group):
                    raise _OneByOne
                outcomes = [(None, r) for r in await self._finish_many([f for f, _ in group])]
            except StoreUnavailable as exc:
                outcomes = [(exc, None)] * len(group)
            except Exception:  # noqa: BLE001 - the group is rolled back; each result is written alone below
                outcomes = []
                for f, _ in group:
                    try:
                        outcomes.append((None, await self._finish_one(f)))
                    except Exception as exc:  # noqa: BLE001 - handed to that result's caller
                        outcomes.append((exc, None))
            settle_futures([(future, failure, result)
                            for (_, future), (failure, result) in zip(group, outcomes, strict=True)])

    async def _finish_one(self, f: _PgFinish) -> _Finished:
        claim, attempt, update = f.claim, f.attempt, f.update
        async with self._connection() as conn, conn.transaction():
            held = await conn.fetchval(
                "SELECT 1 FROM webhook_deliveries WHERE event_id = $1 AND endpoint_id = $2 AND status = 'pending' "
                "AND lease_owner = $3 AND attempts = $4 FOR UPDATE",
                claim.event_id, claim.endpoint_id, claim.lease_owner, claim.attempts,
            )
            if held is None:
                return None
            await conn.execute(
                "INSERT INTO webhook_attempts (event_id, endpoint_id, attempt, started_at, latency_ms, outcome, "
                "status_code, error, response_snippet) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
                attempt.event_id, attempt.endpoint_id, attempt.attempt, f.started_at, attempt.latency_ms,
                attempt.outcome, attempt.status_code, attempt.error, attempt.response_snippet,
            )
            await conn.execute(
                "UPDATE webhook_deliveries SET status = $1, attempts = attempts + 1, round_attempts = round_attempts + 1, "
                "next_attempt_at = $2, locked_until = NULL, lease_owner = NULL, "
                "delivered_at = CASE WHEN $1 = 'delivered' THEN $3 ELSE delivered_at END, "
                "dead_at = CASE WHEN $1 = 'dead' THEN $3 ELSE dead_at END, last_status_code = $4, last_error = $5 "
                "WHERE event_id = $6 AND endpoint_id = $7",
                update.status, f.next_at, f.now, attempt.status_code, attempt.error,
                claim.event_id, claim.endpoint_id,
            )
            await conn.execute("UPDATE outbox SET attempts = attempts + 1 WHERE id = $1", claim.event_id)
            if update.status == "delivered":
                await conn.execute(
                    "UPDATE outbox SET delivered_at = $1 WHERE id = $2 AND NOT EXISTS (SELECT 1 FROM "
                    "webhook_deliveries WHERE event_id = $2 AND status <> 'delivered')",
                    f.now, claim.event_id,
                )
            row = await conn.fetchrow(
                f"SELECT {_ENDPOINT_COLS} FROM webhook_endpoints WHERE id = $1 FOR UPDATE", claim.endpoint_id
            )
            before = _endpoint(row) if row is not None else WebhookEndpointRow(
                id=claim.endpoint_id, merchant_id=claim.merchant_id, url="")
            after = f.decide(before)
            if after != before:
                await _write_endpoint(conn, msgspec.structs.replace(after, updated_at=f.now))
            return before, after

    async def _finish_many(self, fs: list[_PgFinish]) -> list[_Finished]:
        """`_finish_one` over a group in one transaction and a handful of statements; same rows and
        results as one by one (the breaker sees the attempts in order)."""
        fs = sorted(fs, key=lambda f: (f.claim.endpoint_id, f.claim.event_id))  # lock order
        async with self._connection() as conn, conn.transaction():
            held = {
                (r["event_id"], r["endpoint_id"]) for r in await conn.fetch(
                    "UPDATE webhook_deliveries d SET status = u.status, attempts = d.attempts + 1, "
                    "round_attempts = d.round_attempts + 1, next_attempt_at = u.next_at, locked_until = NULL, "
                    "lease_owner = NULL, "
                    "delivered_at = CASE WHEN u.status = 'delivered' THEN u.stamp ELSE d.delivered_at END, "
                    "dead_at = CASE WHEN u.status = 'dead' THEN u.stamp ELSE d.dead_at END, "
                    "last_status_code = u.code, last_error = u.error "
                    "FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::text[], $6::timestamptz[], "
                    "$7::timestamptz[], $8::int[], $9::text[]) "
                    "AS u(event_id, endpoint_id, owner, attempts, status, next_at, stamp, code, error) "
                    "WHERE d.event_id = u.event_id AND d.endpoint_id = u.endpoint_id AND d.status = 'pending' "
                    "AND d.lease_owner = u.owner AND d.attempts = u.attempts "
                    "RETURNING d.event_id, d.endpoint_id",
                    [f.claim.event_id for f in fs], [f.claim.endpoint_id for f in fs],
                    [f.claim.lease_owner for f in fs], [f.claim.attempts for f in fs],
                    [f.update.status for f in fs], [f.next_at for f in fs], [f.now for f in fs],
                    [f.attempt.status_code for f in fs], [f.attempt.error for f in fs],
                )
            }
            done = [f for f in fs if (f.claim.event_id, f.claim.endpoint_id) in held]
            if done:
                a = [f.attempt for f in done]
                await conn.execute(
                    "INSERT INTO webhook_attempts (event_id, endpoint_id, attempt, started_at, latency_ms, outcome, "
                    "status_code, error, response_snippet) SELECT * FROM unnest($1::text[], $2::text[], $3::int[], "
                    "$4::timestamptz[], $5::float8[], $6::text[], $7::int[], $8::text[], $9::text[])",
                    [x.event_id for x in a], [x.endpoint_id for x in a], [x.attempt for x in a],
                    [f.started_at for f in done], [x.latency_ms for x in a], [x.outcome for x in a],
                    [x.status_code for x in a], [x.error for x in a], [x.response_snippet for x in a],
                )
                # per event: how many attempts, and the instant of its last delivery in this group
                per_event: dict[str, tuple[int, datetime | None]] = {}
                for f in done:
                    n, stamp = per_event.get(f.claim.event_id, (0, None))
                    per_event[f.claim.event_id] = (n + 1, f.now if f.update.status == "delivered" else stamp)
                events = sorted(per_event)
                await conn.execute(
                    "UPDATE outbox o SET attempts = o.attempts + u.n, delivered_at = CASE WHEN u.stamp IS NOT NULL "
                    "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries w WHERE w.event_id = o.id "
                    "AND w.status <> 'delivered') THEN u.stamp ELSE o.delivered_at END "
                    "FROM unnest($1::text[], $2::int[], $3::timestamptz[]) AS u(id, n, stamp) WHERE o.id = u.id",
                    events, [per_event[e][0] for e in events], [per_event[e][1] for e in events],
                )
            rows = {
                r["id"]: _endpoint(r) for r in await conn.fetch(
                    f"SELECT {_ENDPOINT_COLS} FROM webhook_endpoints WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
                    sorted({f.claim.endpoint_id for f in done}),
                )
            }
            outcome: dict[int, _Finished] = {}
            changed: set[str] = set()
            for f in sorted(done, key=lambda f: f.seq):  # the breaker sees them in the order they came
                eid = f.claim.endpoint_id
                before = rows.get(eid) or WebhookEndpointRow(id=eid, merchant_id=f.claim.merchant_id, url="")
                after = f.decide(before)
                if after != before and eid in rows:
                    rows[eid] = msgspec.structs.replace(after, updated_at=f.now)
                    changed.add(eid)
                outcome[f.seq] = (before, after)
            for eid in sorted(changed):
                await _write_endpoint(conn, rows[eid])
        return [outcome.get(f.seq) for f in sorted(fs, key=lambda f: f.seq)]

    async def next_webhook_due(self, now: datetime) -> datetime | None:
        async with self._connection() as conn:
            due = await conn.fetchval(
                "SELECT min(greatest(d.next_attempt_at, d.locked_until)) FROM webhook_deliveries d "
                "JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.state = 'active' "
                "WHERE d.status = 'pending' AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p "
                "WHERE p.endpoint_id = d.endpoint_id AND p.payment_id = d.payment_id AND p.status = 'pending' "
                "AND p.seq < d.seq)"
            )
            probe = await conn.fetchval(
                "SELECT min(coalesce(e.paused_until, $1)) FROM webhook_endpoints e WHERE e.state = 'paused' "
                "AND EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.endpoint_id = e.id AND d.status = 'pending')",
                _ts(now),
            )
        found: list[datetime] = [v for v in (due, probe) if v is not None]
        return min(found) if found else None

    async def list_webhook_deliveries(
        self, *, status: DeliveryStatus | None = None, endpoint_id: str | None = None,
        merchant_id: str | None = None, since: datetime | None = None, until: datetime | None = None,
        limit: int = 100,
    ) -> list[WebhookDeliveryRow]:
        where, params = _delivery_filter(status, endpoint_id, merchant_id, since, until)
        sql = (
            f"SELECT {_DELIVERY_COLS} FROM webhook_deliveries {where} ORDER BY created_at DESC, seq DESC "
            f"LIMIT ${len(params) + 1}"
        )
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *params, limit)
        return [_delivery(r) for r in rows]

    async def get_webhook_deliveries(self, event_id: str) -> list[WebhookDeliveryRow]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_DELIVERY_COLS} FROM webhook_deliveries WHERE event_id = $1 ORDER BY endpoint_id", event_id
            )
        return [_delivery(r) for r in rows]

    async def webhook_attempts(self, event_id: str) -> list[WebhookAttemptRow]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT event_id, endpoint_id, attempt, started_at, latency_ms, outcome, status_code, error, "
                "response_snippet FROM webhook_attempts WHERE event_id = $1 ORDER BY started_at, endpoint_id, attempt",
                event_id,
            )
        return [WebhookAttemptRow(**dict(r)) for r in rows]

    async def redrive_deliveries(
        self, now: datetime, *, event_id: str | None = None, endpoint_id: str | None = None,
        since: datetime | None = None, until: datetime | None = None,
    ) -> int:
        where, params = _delivery_filter("dead", endpoint_id, None, since, until)
        if event_id is not None:
            params.append(event_id)
            where += f" AND event_id = ${len(params)}"
        params.append(_ts(now))
        sql = (
            f"UPDATE webhook_deliveries SET status = 'pending', round_attempts = 0, next_attempt_at = ${len(params)}, "
            f"dead_at = NULL, locked_until = NULL, lease_owner = NULL {where}"
        )
        async with self._connection() as conn:
            return _rowcount(await conn.execute(sql, *params))


FAN_OUT_LOCK_KEY = MIGRATION_LOCK_KEY + 1
_FINISH_GROUP_MAX = 256
_Finished = tuple[WebhookEndpointRow, WebhookEndpointRow] | None
_finish_seq = itertools.count()


class _OneByOne(Exception):
    """A group of results that must be written one by one (a delivery twice in it)."""


class _PgFinish:
    """One queued `finish_attempt`, times checked on the caller; `seq` keeps the order they came in."""

    __slots__ = ("attempt", "claim", "decide", "next_at", "now", "seq", "started_at", "update")

    def __init__(
        self, claim: DeliveryClaim, attempt: WebhookAttemptRow, update: DeliveryUpdate, decide: EndpointDecision,
        now: datetime, next_at: datetime, started_at: datetime,
    ) -> None:
        self.claim, self.attempt, self.update, self.decide = claim, attempt, update, decide
        self.now, self.next_at, self.started_at = now, next_at, started_at
        self.seq = next(_finish_seq)
_ENDPOINT_COLS = (
    "id, merchant_id, url, state, consecutive_failures, failing_since, paused_until, disabled_reason, updated_at"
)
_DELIVERY_COLS = (
    "event_id, endpoint_id, merchant_id, payment_id, type, status, attempts, round_attempts, created_at, "
    "next_attempt_at, delivered_at, dead_at, last_status_code, last_error, locked_until"
)


def _endpoint(r: Any) -> WebhookEndpointRow:
    return WebhookEndpointRow(**dict(r))


def _delivery(r: Any) -> WebhookDeliveryRow:
    return WebhookDeliveryRow(**dict(r))


async def _write_endpoint(conn: Any, ep: WebhookEndpointRow) -> None:
    await conn.execute(
        "UPDATE webhook_endpoints SET state = $1, consecutive_failures = $2, failing_since = $3, paused_until = $4, "
        "disabled_reason = $5, updated_at = coalesce($6, now()) WHERE id = $7",
        ep.state, ep.consecutive_failures, ep.failing_since, ep.paused_until, ep.disabled_reason, ep.updated_at,
        ep.id,
    )


def _delivery_filter(
    status: str | None, endpoint_id: str | None, merchant_id: str | None, since: datetime | None,
    until: datetime | None,
) -> tuple[str, list[object]]:
    clauses, params = ["TRUE"], list[object]()
    for column, op, value in (
        ("status", "=", status), ("endpoint_id", "=", endpoint_id), ("merchant_id", "=", merchant_id),
        ("created_at", ">=", since), ("created_at", "<", until),
    ):
        if value is not None:
            params.append(_ts(value) if isinstance(value, datetime) else value)
            clauses.append(f"{column} {op} ${len(params)}")
    return "WHERE " + " AND ".join(clauses), params


async def _pg_claim(
    conn: Any, endpoint_id: str, now: datetime, lease_until: datetime, owner: str, limit: int
) -> list[DeliveryClaim]:
    # SKIP LOCKED: another instance claiming the same endpoint right now takes other rows, never these;
    # a row it leased and committed is re-checked on its new version (locked_until in the future).
    rows = await conn.fetch(
        "WITH picked AS (SELECT d.event_id FROM webhook_deliveries d WHERE d.endpoint_id = $1 "
        "AND d.status = 'pending' AND d.next_attempt_at <= $2 AND (d.locked_until IS NULL OR d.locked_until <= $2) "
        "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p WHERE p.endpoint_id = d.endpoint_id "
        "AND p.payment_id = d.payment_id AND p.status = 'pending' AND p.seq < d.seq) "
        "ORDER BY d.next_attempt_at, d.seq LIMIT $3 FOR UPDATE OF d SKIP LOCKED) "
        "UPDATE webhook_deliveries w SET locked_until = $4, lease_owner = $5 FROM picked, outbox o "
        "WHERE w.endpoint_id = $1 AND w.event_id = picked.event_id AND o.id = w.event_id "
        "RETURNING w.event_id, w.endpoint_id, w.merchant_id, w.payment_id, w.type, o.payload, w.attempts, "
        "w.round_attempts, w.seq, w.next_attempt_at",
        endpoint_id, _ts(now), limit, _ts(lease_until), owner,
    )
    rows = sorted(rows, key=lambda r: (r["next_attempt_at"], r["seq"]))
    return [
        DeliveryClaim(
            event_id=r["event_id"], endpoint_id=r["endpoint_id"], merchant_id=r["merchant_id"],
            payment_id=r["payment_id"], type=r["type"], payload=bytes(r["payload"]), attempts=r["attempts"],
            round_attempts=r["round_attempts"], lease_owner=owner,
        )
        for r in rows
    ]



def _children(payment: Payment, events: Sequence[OutboxEvent], ledger: Sequence[LedgerEntry] = ()) -> ChildRows:
    return child_rows(payment, events, ledger, _ts)


async def _write_children(conn: Any, children: ChildRows) -> None:
    for sql, rows in (
        (_UPSERT_ATTEMPT, children.attempts),
        (_UPSERT_OPERATION, children.operations),
        (_INSERT_OUTBOX, children.outbox),
        (_INSERT_LEDGER, children.ledger),
    ):
        if rows:
            await conn.executemany(sql, rows)


@contextlib.asynccontextmanager
async def _unavailable_as(what: str) -> AsyncIterator[None]:
    """The one place driver errors meaning "no database" become `StoreUnavailable`."""
    try:
        yield
    except _UNREACHABLE as exc:
        raise StoreUnavailable(f"PostgreSQL {what}: {type(exc).__name__}: {exc}") from exc
