"""The `PaymentStore` contract, run against every store: SQLite (embedded) and PostgreSQL (scale-out).

Each contract test takes `backend` (parametrized: "sqlite", "postgres"), which holds a started store
on an empty database plus a way to open more stores on the same database and to read raw rows with
SQL both dialects accept. Behaviour only one store has lives apart: SQLite's group commit, writer
thread and kill -9 in test_store_sqlite.py; PostgreSQL's migration table, advisory lock and
fail-closed `StoreUnavailable` at the end of this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from router.errors import DuplicateOrder, VersionConflict
from router.model import (
    Attempt,
    CardSummary,
    Decline,
    DeclineCategory,
    Operation,
    OutboxEvent,
    Outcome,
    Payment,
    PaymentMethod,
    RoutingDecision,
    Status,
)
from router.store.base import PaymentStore
from router.store.postgres import Migration, PostgresStore, StoreUnavailable, load_migrations
from router.store.sqlite import SqliteStore
from router.store.sqlite import load_migrations as load_sqlite_migrations

# The real-service fixtures (postgres_dsn, fresh_postgres_dsn, pg_store, redis_url), registered as a
# plugin rather than imported by name, so that test parameters do not shadow imported names.

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
# What a write that breaks a constraint of its own (a reused outbox event id) raises, per driver.
CONSTRAINT_ERRORS = (sqlite3.IntegrityError, asyncpg.UniqueViolationError)


def make_payment(n: int, *, order: str | None = None, **changes: Any) -> Payment:
    p = Payment(
        id=f"pay_{n:05d}",
        merchant_id="m_1",
        merchant_order_id=order or f"order-{n}",
        status=Status.PROCESSING,
        amount=1999,
        currency="EUR",
        country="DE",
        capture=True,
        payment_method=PaymentMethod(
            type="card",
            card=CardSummary(
                bin="424242", last4="4242", brand="visa", exp_month=12, exp_year=2030, fingerprint="fp"
            ),
        ),
        created_at=T0,
        updated_at=T0,
    )
    return msgspec.structs.replace(p, **changes)


def event(payment: Payment, suffix: str) -> OutboxEvent:
    return OutboxEvent(
        id=f"evt_{payment.id}_{suffix}",
        merchant_id=payment.merchant_id,
        payment_id=payment.id,
        type=f"payment.{suffix}",
        payload=b'{"k":"' + suffix.encode() + b'"}',
        created_at=T0,
    )


def advanced(p: Payment, status: Status, **changes: Any) -> Payment:
    return msgspec.structs.replace(
        p, status=status, version=p.version + 1, updated_at=p.updated_at + timedelta(seconds=1), **changes
    )


# --------------------------------------------------------------------------- backends


Rows = list[tuple[Any, ...]]


@dataclass
class Backend:
    name: str
    store: PaymentStore  # started, on an empty database; closed by its fixture
    new_store: Callable[[], PaymentStore]  # another (unstarted) store on the same database
    query: Callable[[str], Awaitable[Rows]]  # SQL without parameters, valid in both dialects
    migrations_applied: Callable[[], Awaitable[int]]
    migration_count: int

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[PaymentStore]:
        store = self.new_store()
        await store.start()
        try:
            yield store
        finally:
            await store.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "payroute.db")
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def sqlite_backend(store: SqliteStore) -> Backend:
    path = store.path

    async def query(sql: str) -> Rows:
        def run() -> Rows:
            conn = sqlite3.connect(path)
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()

        return await asyncio.to_thread(run)

    async def migrations_applied() -> int:
        value: int = (await query("PRAGMA user_version"))[0][0]
        return value

    return Backend(
        "sqlite", store, lambda: SqliteStore(path), query, migrations_applied, len(load_sqlite_migrations())
    )


def postgres_backend(store: PostgresStore) -> Backend:
    dsn = store.dsn

    async def query(sql: str) -> Rows:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    async def migrations_applied() -> int:
        value: int = (await query("SELECT count(*) FROM schema_migrations"))[0][0]
        return value

    return Backend(
        "postgres", store, lambda: PostgresStore(dsn), query, migrations_applied, len(load_migrations())
    )


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> Backend:
    # A plain fixture, so that it may ask for the async store fixtures by name (and only for the one
    # its parameter needs: the sqlite half runs without a PostgreSQL server).
    if request.param == "sqlite":
        return sqlite_backend(request.getfixturevalue("sqlite_store"))
    return postgres_backend(request.getfixturevalue("pg_store"))


@pytest.fixture
def store(backend: Backend) -> PaymentStore:
    return backend.store


# --------------------------------------------------------------------------- the contract


async def test_every_field_round_trips(backend: Backend, store: PaymentStore) -> None:
    p = make_payment(
        1,
        status=Status.AUTHORIZED,
        captured_amount=1999,
        refunded_amount=500,
        channel="adyen_eu",
        channel_reference="psp_9",
        decline=Decline(code="05", message="do not honor", category=DeclineCategory.SOFT, channel="stripe_eu"),
        attempts=[
            Attempt(seq=1, channel="stripe_eu", outcome=Outcome.SOFT_DECLINE, code="05", latency_ms=12.5,
                    channel_key="k1", started_at=T0),
            Attempt(seq=2, channel="adyen_eu", outcome=Outcome.APPROVED, code=None, latency_ms=40.0,
                    channel_key="k2", channel_reference="psp_9", retries=1, started_at=T0 + timedelta(seconds=1)),
        ],
        operations=[Operation(id="op_1", kind="capture", amount=1999, status="succeeded", reason="shipped",
                              created_at=T0)],
        routing=RoutingDecision(chain="default", config_version="v3", candidates=["stripe_eu", "adyen_eu"],
                                plan=["stripe_eu", "adyen_eu"], removed={"alipay": "currency"}),
        next_action={"type": "redirect", "url": "https://example.test/3ds", "nested": {"n": [1, 2.5, None]}},
        description="Zoë's order — 注文",
        customer_id="cus_1",
        # A NUL inside a string: JSONB refuses it; the record must keep it.
        metadata={"cart": "42", "note": "a\x00b"},
        idempotency_key="idem_1",
        version=1,
        created_at=datetime(2024, 5, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
        updated_at=T0 + timedelta(microseconds=1),
    )  # fmt: skip
    await store.insert_payment(p, [event(p, "authorized")])

    got = await store.get_payment(p.id)
    assert got == p
    assert got is not None and got.attempts[1].started_at == T0 + timedelta(seconds=1)
    assert got.created_at == T0 and got.updated_at == T0 + timedelta(microseconds=1)
    assert got.metadata["note"] == "a\x00b"
    assert await store.find_by_order("m_1", "order-1") == p
    assert await store.get_payment("pay_missing") is None
    assert await store.find_by_order("m_2", "order-1") is None
    # The doc is kept byte for byte; the projections hold what it holds, money as integers.
    assert await backend.query("SELECT doc FROM payments") == [(msgspec.json.encode(p),)]
    assert await backend.query("SELECT amount, currency, status, version FROM payments") == [
        (1999, "EUR", "authorized", 1)
    ]
    assert await backend.query(
        "SELECT seq, channel, outcome, code, latency_ms FROM attempts ORDER BY seq"
    ) == [
        (1, "stripe_eu", "soft_decline", "05", 12.5),
        (2, "adyen_eu", "approved", None, 40.0),
    ]
    assert await backend.query("SELECT id, payment_id, kind, amount FROM operations") == [
        ("op_1", p.id, "capture", 1999)
    ]


async def test_naive_datetimes_are_refused_before_anything_is_written(store: PaymentStore) -> None:
    naive = make_payment(1, updated_at=datetime(2024, 5, 1, 12, 0))
    with pytest.raises(ValueError, match="naive"):
        await store.insert_payment(naive)
    with pytest.raises(ValueError, match="naive"):
        await store.list_by_status([Status.PENDING], datetime(2024, 5, 1))
    assert await store.get_payment(naive.id) is None


async def test_duplicate_order_names_the_existing_payment_and_persists_nothing(store: PaymentStore) -> None:
    first = make_payment(1, order="o-dup")
    second = make_payment(2, order="o-dup", attempts=[
        Attempt(seq=1, channel="x", outcome=Outcome.APPROVED, code=None, latency_ms=1, channel_key="k")
    ], operations=[Operation(id="op_2", kind="capture", amount=1, status="succeeded", created_at=T0)])  # fmt: skip
    await store.insert_payment(first, [event(first, "created")])

    with pytest.raises(DuplicateOrder) as raised:
        await store.insert_payment(second, [event(second, "created")])

    assert raised.value.existing_payment_id == first.id
    assert await store.get_payment(second.id) is None
    assert await store.find_by_order("m_1", "o-dup") == first
    assert await store.outbox_events(second.id) == []
    assert await store.outbox_events(first.id) == [event(first, "created")]


async def test_the_same_insert_twice_is_a_duplicate_of_itself(backend: Backend, store: PaymentStore) -> None:
    p = make_payment(1)
    await store.insert_payment(p, [event(p, "created")])
    with pytest.raises(DuplicateOrder) as raised:
        await store.insert_payment(p, [event(p, "created")])
    assert raised.value.existing_payment_id == p.id
    assert await backend.query("SELECT count(*) FROM outbox") == [(1,)]


async def test_optimistic_update_and_stale_version(backend: Backend, store: PaymentStore) -> None:
    p1 = make_payment(1)
    await store.insert_payment(p1)
    p2 = advanced(p1, Status.AUTHORIZED, attempts=[
        Attempt(seq=1, channel="c", outcome=Outcome.APPROVED, code="00", latency_ms=3, channel_key="k1", started_at=T0)
    ], operations=[Operation(id="op_1", kind="capture", amount=1999, status="pending", created_at=T0)])  # fmt: skip
    await store.update_payment(p2, expected_version=1)
    p3 = advanced(p2, Status.CAPTURED, operations=[
        Operation(id="op_1", kind="capture", amount=1999, status="succeeded", created_at=T0)
    ])  # fmt: skip
    await store.update_payment(p3, expected_version=2)

    with pytest.raises(VersionConflict):
        await store.update_payment(advanced(p1, Status.DECLINED), expected_version=1)
    with pytest.raises(VersionConflict):  # unknown payment: there is no version 1 to move from
        await store.update_payment(advanced(make_payment(9), Status.FAILED), expected_version=1)
    with pytest.raises(ValueError):  # a version that does not advance by one is our bug, not a race
        await store.update_payment(p3, expected_version=3)
    assert await store.get_payment(p1.id) == p3
    assert await store.get_payment(make_payment(9).id) is None
    assert await backend.query("SELECT status, version FROM payments") == [("captured", 3)]
    assert await backend.query("SELECT id, status FROM operations") == [("op_1", "succeeded")]
    assert await backend.query("SELECT seq, code FROM attempts") == [(1, "00")]


async def test_two_updates_from_one_version_exactly_one_wins(store: PaymentStore) -> None:
    p1 = make_payment(1)
    await store.insert_payment(p1, [event(p1, "created")])
    a = advanced(p1, Status.AUTHORIZED)
    b = advanced(p1, Status.DECLINED)

    results = await asyncio.gather(
        store.update_payment(a, 1, [event(a, "authorized")]),
        store.update_payment(b, 1, [event(b, "declined")]),
        return_exceptions=True,
    )

    assert sorted(type(r).__name__ for r in results) == ["NoneType", "VersionConflict"]
    winner, suffix = (a, "authorized") if results[0] is None else (b, "declined")
    assert await store.get_payment(p1.id) == winner
    # The loser's event went down with its write: the outbox only describes what happened.
    assert await store.outbox_events(p1.id) == [event(p1, "created"), event(winner, suffix)]


async def test_many_concurrent_inserts_with_one_duplicate(store: PaymentStore) -> None:
    payments = [make_payment(i) for i in range(100)]
    payments[60] = make_payment(60, order="order-10")  # same merchant order as payment 10

    results = await asyncio.gather(
        *(store.insert_payment(p, [event(p, "created")]) for p in payments), return_exceptions=True
    )

    failed = {i: r for i, r in enumerate(results) if r is not None}
    assert len(failed) == 1, failed
    # Either of the pair may commit first; the other is the duplicate and names the winner.
    [(loser, error)] = failed.items()
    winner = {10: 60, 60: 10}[loser]
    assert isinstance(error, DuplicateOrder) and error.existing_payment_id == payments[winner].id
    for i, p in enumerate(payments):
        assert (await store.get_payment(p.id) == p) == (i != loser)
        assert await store.outbox_events(p.id) == ([] if i == loser else [event(p, "created")])


async def test_a_write_breaking_its_own_constraint_fails_alone(store: PaymentStore) -> None:
    p1, p2, p3 = make_payment(1), make_payment(2), make_payment(3)
    await store.insert_payment(p1, [event(p1, "created")])

    results = await asyncio.gather(
        store.insert_payment(p2, [event(p2, "created"), event(p1, "created")]),  # reuses p1's event id
        store.insert_payment(p3, [event(p3, "created")]),
        return_exceptions=True,
    )

    assert isinstance(results[0], CONSTRAINT_ERRORS) and results[1] is None
    assert await store.get_payment(p2.id) is None  # the payment went down with its event
    assert await store.outbox_events(p2.id) == []
    assert await store.get_payment(p3.id) == p3
    assert await store.outbox_events(p1.id) == [event(p1, "created")]


async def test_outbox_follows_the_payment_write_in_order(backend: Backend, store: PaymentStore) -> None:
    p1 = make_payment(1)
    await store.insert_payment(p1, [event(p1, "created")])
    with pytest.raises(VersionConflict):
        await store.update_payment(
            advanced(advanced(p1, Status.PENDING), Status.FAILED), 2, [event(p1, "lost")]
        )
    p2 = advanced(p1, Status.AUTHORIZED)
    await store.update_payment(p2, 1, [event(p2, "authorized"), event(p2, "captured")])
    p3 = advanced(p2, Status.CAPTURED)
    await store.update_payment(p3, 2, [event(p3, "a_late_event_sorting_first")])

    events = await store.outbox_events(p1.id)
    assert [e.type for e in events] == [
        "payment.created", "payment.authorized", "payment.captured", "payment.a_late_event_sorting_first",
    ]  # fmt: skip
    assert events[1] == event(p2, "authorized")
    assert await store.outbox_events("pay_missing") == []
    assert await backend.query("SELECT DISTINCT delivered_at, attempts FROM outbox") == [(None, 0)]


async def test_list_pending_operations_finds_payments_with_an_unsettled_operation(store: PaymentStore) -> None:
    def op(n: int, status: str, minutes: int) -> Operation:
        return Operation(id=f"op_{n}", kind="refund", amount=100, status=status, created_at=T0 + timedelta(minutes=minutes))

    rows = [
        make_payment(1, status=Status.CAPTURED, operations=[op(1, "pending", 3)]),
        make_payment(2, status=Status.CAPTURED, operations=[op(2, "succeeded", 1), op(3, "pending", 1)]),
        make_payment(3, status=Status.CAPTURED, operations=[op(4, "succeeded", 0), op(5, "failed", 0)]),
        make_payment(4, status=Status.CAPTURED, operations=[op(6, "pending", 10)]),  # not before the cutoff
        make_payment(5, status=Status.CAPTURED),
    ]
    await asyncio.gather(*(store.insert_payment(p) for p in rows))
    cutoff = T0 + timedelta(minutes=5)
    found = await store.list_pending_operations(cutoff)
    assert sorted(p.id for p in found) == ["pay_00001", "pay_00002"]
    assert {p.id: p for p in found}["pay_00002"] == rows[1]
    assert [p.id for p in await store.list_pending_operations(cutoff, limit=1)] == ["pay_00002"]  # oldest first
    settled = advanced(rows[0], Status.REFUNDED, operations=[msgspec.structs.replace(rows[0].operations[0],
                                                                                       status="succeeded")])
    await store.update_payment(settled, rows[0].version)
    assert [p.id for p in await store.list_pending_operations(cutoff)] == ["pay_00002"]


async def test_list_by_status_filters_and_orders_oldest_first(store: PaymentStore) -> None:
    rows = [
        make_payment(1, status=Status.PENDING, updated_at=T0 + timedelta(minutes=3)),
        make_payment(2, status=Status.PENDING, updated_at=T0 + timedelta(minutes=1)),
        make_payment(3, status=Status.PROCESSING, updated_at=T0 + timedelta(minutes=2)),
        make_payment(4, status=Status.CAPTURED, updated_at=T0),
        make_payment(5, status=Status.PENDING, updated_at=T0 + timedelta(minutes=10)),
        make_payment(6, status=Status.PENDING, updated_at=T0 + timedelta(minutes=5)),  # not before cutoff
    ]
    await asyncio.gather(*(store.insert_payment(p) for p in rows))
    cutoff = T0 + timedelta(minutes=5)

    found = await store.list_by_status([Status.PENDING, Status.PROCESSING], cutoff)
    assert [p.id for p in found] == ["pay_00002", "pay_00003", "pay_00001"]
    assert found[0] == rows[1]
    assert [p.id for p in await store.list_by_status([Status.PENDING], cutoff, limit=1)] == ["pay_00002"]
    assert [p.id for p in await store.list_by_status([Status.CAPTURED], cutoff)] == ["pay_00004"]
    # The same instant in another offset is the same cutoff.
    other_offset = cutoff.astimezone(timezone(timedelta(hours=-7)))
    assert [p.id for p in await store.list_by_status([Status.PENDING], other_offset)] == [
        "pay_00002",
        "pay_00001",
    ]
    assert await store.list_by_status([], cutoff) == []


async def test_data_survives_a_new_store_on_the_same_database(backend: Backend, store: PaymentStore) -> None:
    p = make_payment(1)
    await store.insert_payment(p, [event(p, "created")])
    await store.close()

    async with backend.open() as second:
        assert await second.get_payment(p.id) == p
        assert await second.outbox_events(p.id) == [event(p, "created")]
        await second.ping()
        p2 = advanced(p, Status.AUTHORIZED)
        await second.update_payment(p2, 1, [event(p2, "authorized")])
    async with backend.open() as third:
        assert await third.get_payment(p.id) == p2
        assert [e.type for e in await third.outbox_events(p.id)] == ["payment.created", "payment.authorized"]


async def test_migrations_run_once_and_a_restart_reapplies_none(
    backend: Backend, store: PaymentStore
) -> None:
    assert backend.migration_count >= 1
    assert await backend.migrations_applied() == backend.migration_count
    await store.insert_payment(make_payment(1))

    # Re-running 0001 would fail on CREATE TABLE: a clean restart proves nothing was re-applied.
    for _ in range(2):
        async with backend.open() as again:
            assert await again.get_payment("pay_00001") == make_payment(1)
    assert await backend.migrations_applied() == backend.migration_count


async def test_a_closed_store_refuses_work(backend: Backend, store: PaymentStore) -> None:
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(RuntimeError):
        await store.insert_payment(make_payment(1))
    with pytest.raises(RuntimeError):
        await store.ping()
    with pytest.raises(RuntimeError):
        await store.start()
    async with backend.open() as other:
        assert await other.get_payment("pay_00001") is None


# --------------------------------------------------------------------------- PostgreSQL only


async def test_postgres_columns_are_typed(pg_store: PostgresStore) -> None:
    p = make_payment(1, amount=2**40)  # beyond 32 bits: BIGINT minor units
    await pg_store.insert_payment(p, [event(p, "created")])
    conn = await asyncpg.connect(pg_store.dsn, timeout=5)
    try:
        row = await conn.fetchrow("SELECT amount, created_at, updated_at FROM payments")
        types = await conn.fetch(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND column_name IN ('amount', 'doc', 'created_at', 'payload') "
            "AND table_name IN ('payments', 'operations', 'outbox')"
        )
    finally:
        await conn.close()
    assert tuple(row) == (2**40, T0, T0)
    assert {(r["table_name"], r["column_name"]): r["data_type"] for r in types} == {
        ("payments", "amount"): "bigint",
        ("payments", "doc"): "bytea",
        ("payments", "created_at"): "timestamp with time zone",
        ("operations", "amount"): "bigint",
        ("operations", "created_at"): "timestamp with time zone",
        ("outbox", "payload"): "bytea",
        ("outbox", "created_at"): "timestamp with time zone",
    }


async def test_postgres_migrations_are_recorded_and_race_free(fresh_postgres_dsn: str) -> None:
    migrations = load_migrations()
    assert migrations[0].name == "0001_init.sql"
    stores = [PostgresStore(fresh_postgres_dsn, min_size=1, max_size=2) for _ in range(4)]
    # Four instances starting together on an empty database: the advisory lock lets one migrate.
    results = await asyncio.gather(*(s.start() for s in stores), return_exceptions=True)
    try:
        assert results == [None] * 4
        await stores[0].insert_payment(make_payment(1))
        assert await stores[3].get_payment("pay_00001") == make_payment(1)
    finally:
        await asyncio.gather(*(s.close() for s in stores))

    rows = await _fetch(fresh_postgres_dsn, "SELECT version, name FROM schema_migrations ORDER BY version")
    assert rows == [(m.version, m.name) for m in migrations]

    # A release that adds one migration: only it runs.
    extra = Migration(len(migrations) + 1, "9999_probe.sql", "-- probe\nCREATE TABLE probe (x INTEGER);\n")
    upgraded = PostgresStore(fresh_postgres_dsn, migrations=[*migrations, extra])
    await upgraded.start()
    try:
        assert await upgraded.get_payment("pay_00001") == make_payment(1)
    finally:
        await upgraded.close()
    assert await _fetch(fresh_postgres_dsn, "SELECT count(*) FROM probe") == [(0,)]
    assert (
        len(await _fetch(fresh_postgres_dsn, "SELECT version FROM schema_migrations")) == len(migrations) + 1
    )

    # Code older than the database refuses to run against it rather than guess.
    older = PostgresStore(fresh_postgres_dsn)
    with pytest.raises(RuntimeError, match="does not have"):
        await older.start()
    with pytest.raises(RuntimeError):  # and a store that failed to start does not serve
        await older.ping()


async def test_postgres_failing_migration_leaves_the_database_untouched(fresh_postgres_dsn: str) -> None:
    broken = [
        *load_migrations(),
        Migration(2, "0002_broken.sql", "CREATE TABLE t (x int);\nCREATE TABLE t (x int);"),
    ]
    with pytest.raises(asyncpg.DuplicateTableError):
        await PostgresStore(fresh_postgres_dsn, migrations=broken).start()
    tables = await _fetch(
        fresh_postgres_dsn, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    )
    assert tables == []


async def test_postgres_constructor_rejects_unbounded_or_bad_settings() -> None:
    with pytest.raises(ValueError):
        PostgresStore("postgresql://x/y", command_timeout_s=0)
    with pytest.raises(ValueError):
        PostgresStore("postgresql://x/y", min_size=5, max_size=2)
    with pytest.raises(ValueError):
        PostgresStore("postgresql://x/y", batch_max=0)


async def test_unreachable_postgres_fails_start_with_store_unavailable() -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres"
    store = PostgresStore(dsn, connect_timeout_s=1, command_timeout_s=1)
    with pytest.raises(StoreUnavailable):
        await store.start()


async def test_a_lost_database_turns_every_call_into_store_unavailable(pg_store: PostgresStore) -> None:
    target = _host_port(pg_store.dsn)
    async with TcpProxy(*target) as proxy:
        store = PostgresStore(proxy.dsn(pg_store.dsn), min_size=1, max_size=2, connect_timeout_s=1,
                              command_timeout_s=1)  # fmt: skip
        await store.start()
        try:
            p = make_payment(1)
            await store.insert_payment(p)
            proxy.cut()  # the connections drop and new ones are refused

            with pytest.raises(StoreUnavailable):
                await store.ping()
            with pytest.raises(StoreUnavailable):
                await store.insert_payment(make_payment(2))
            with pytest.raises(StoreUnavailable):
                await store.update_payment(advanced(p, Status.AUTHORIZED), 1)
            with pytest.raises(StoreUnavailable):
                await store.get_payment(p.id)
        finally:
            await store.close()
    assert await pg_store.get_payment(p.id) == p
    assert await pg_store.get_payment("pay_00002") is None


async def test_a_silent_database_turns_into_store_unavailable(pg_store: PostgresStore) -> None:
    async with TcpProxy(*_host_port(pg_store.dsn)) as proxy:
        store = PostgresStore(proxy.dsn(pg_store.dsn), min_size=1, max_size=1, connect_timeout_s=0.5,
                              command_timeout_s=0.5)  # fmt: skip
        await store.start()
        try:
            proxy.stall()  # connections stay open but nothing comes back: a network black hole
            with pytest.raises(StoreUnavailable):
                await store.ping()
            with pytest.raises(StoreUnavailable):
                await store.insert_payment(make_payment(1))
        finally:
            await store.close()
    assert await pg_store.get_payment("pay_00001") is None


# --------------------------------------------------------------------------- services


async def test_redis_url_is_a_private_server(redis_url: str) -> None:
    host_port = redis_url.removeprefix("redis://").split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        await writer.drain()
        assert await reader.readline() == b"+OK\r\n"
        assert await reader.readline() == b"$1\r\n"
        assert await reader.readline() == b"v\r\n"
    finally:
        writer.close()
        await writer.wait_closed()


# --------------------------------------------------------------------------- helpers


async def _fetch(dsn: str, sql: str) -> Rows:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


def _host_port(dsn: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens on it now: connecting is refused


class TcpProxy:
    """A loopback TCP relay to PostgreSQL that a test can cut (refuse) or stall (black hole)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.mode = "open"  # open | stalled | cut
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()

    def dsn(self, dsn: str) -> str:
        from urllib.parse import urlsplit, urlunsplit

        assert self._server is not None
        listen_port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(dsn)
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{listen_port}"))

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        self._closing.set()  # handlers end on their own (cancelling them makes asyncio log noise)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def cut(self) -> None:
        self.mode = "cut"
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()

    def stall(self) -> None:
        self.mode = "stalled"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        try:
            if self.mode != "open":
                await self._closing.wait()  # accepted, never answered
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
            self._writers.append(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except OSError:
            pass  # the server refused or dropped us: so does the proxy
        finally:
            writer.transport.abort()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.mode == "stalled":
                    continue  # swallowed
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()


# --------------------------------------------------------------------------- webhook outbox (OutboxStore)


async def _outbox_ready(backend: Backend) -> None:
    if backend.name == "postgres":  # the shared pg_store fixture empties only the payment tables
        await backend.query("TRUNCATE webhook_endpoints, webhook_deliveries, webhook_attempts")


def _ep(eid: str, merchant: str = "m_1") -> Any:
    from router.store.base import WebhookEndpointRow

    return WebhookEndpointRow(id=eid, merchant_id=merchant, url=f"https://{eid}.example/hook")


async def test_outbox_fan_out_claims_in_payment_order_under_a_lease(backend: Backend, store: PaymentStore) -> None:
    from router.store.base import DeliveryUpdate, OutboxStore, WebhookAttemptRow

    await _outbox_ready(backend)
    assert isinstance(store, SqliteStore | PostgresStore)
    ob: OutboxStore = store
    p1, p2 = make_payment(1), make_payment(2)
    await store.insert_payment(p1, [event(p1, "created")])
    await store.insert_payment(p2, [event(p2, "created")])
    p1b = advanced(p1, Status.AUTHORIZED)
    await store.update_payment(p1b, 1, [event(p1b, "authorized")])
    now = T0 + timedelta(hours=1)
    await ob.sync_webhook_endpoints([_ep("we_a"), _ep("we_b")], now)
    assert await ob.fan_out_events({"m_1": ["we_a", "we_b"]}, now) == 3
    assert await ob.fan_out_events({"m_1": ["we_a", "we_b"]}, now) == 0  # exactly once

    lease = now + timedelta(seconds=30)
    claims = await ob.claim_deliveries("we_a", now, lease, "one", 10)
    # p1's second event waits behind its first; p2 flows
    assert sorted(c.event_id for c in claims) == [f"evt_{p1.id}_created", f"evt_{p2.id}_created"]
    assert claims[0].payload.startswith(b'{"k"')
    assert await ob.claim_deliveries("we_a", now, lease, "two", 10) == []  # leased
    assert await ob.next_webhook_due(now) == now  # we_b is due now

    first = next(c for c in claims if c.payment_id == p1.id)
    attempt = WebhookAttemptRow(event_id=first.event_id, endpoint_id="we_a", attempt=1, started_at=now,
                                latency_ms=3.5, outcome="delivered", status_code=200, response_snippet="ok")
    stale = msgspec.structs.replace(first, lease_owner="intruder")
    assert await ob.finish_attempt(stale, attempt, DeliveryUpdate(status="delivered", next_attempt_at=now),
                                   lambda e: e, now) is None  # not the lease holder: nothing written
    result = await ob.finish_attempt(first, attempt, DeliveryUpdate(status="delivered", next_attempt_at=now),
                                     lambda e: msgspec.structs.replace(e, consecutive_failures=0), now)
    assert result is not None and result[0].id == "we_a"
    [nxt] = await ob.claim_deliveries("we_a", now, lease, "one", 10)
    assert nxt.event_id == f"evt_{p1.id}_authorized"
    assert await ob.webhook_attempts(first.event_id) == [attempt]
    # after the lease lapses, another owner may take what the first never finished
    later = lease + timedelta(seconds=1)
    retaken = await ob.claim_deliveries("we_a", later, later + timedelta(seconds=30), "two", 10)
    assert sorted(c.event_id for c in retaken) == sorted([nxt.event_id, f"evt_{p2.id}_created"])


async def test_outbox_dead_letters_are_listed_and_redriven(backend: Backend, store: PaymentStore) -> None:
    from router.store.base import DeliveryUpdate, OutboxStore, WebhookAttemptRow

    await _outbox_ready(backend)
    assert isinstance(store, SqliteStore | PostgresStore)
    ob: OutboxStore = store
    p = make_payment(1)
    await store.insert_payment(p, [event(p, "created")])
    now = T0 + timedelta(hours=1)
    await ob.sync_webhook_endpoints([_ep("we_a")], now)
    await ob.fan_out_events({"m_1": ["we_a"]}, now)
    [claim] = await ob.claim_deliveries("we_a", now, now + timedelta(seconds=30), "one", 1)
    attempt = WebhookAttemptRow(event_id=claim.event_id, endpoint_id="we_a", attempt=1, started_at=now,
                                latency_ms=1.0, outcome="failed", status_code=500, response_snippet="x")
    await ob.finish_attempt(claim, attempt, DeliveryUpdate(status="dead", next_attempt_at=now), lambda e: e, now)
    [dead] = await ob.list_webhook_deliveries(status="dead")
    assert (dead.event_id, dead.attempts, dead.last_status_code) == (claim.event_id, 1, 500)
    assert await ob.list_webhook_deliveries(status="dead", since=T0 + timedelta(days=1)) == []
    assert await ob.claim_deliveries("we_a", now, now, "one", 1) == []
    assert await ob.redrive_deliveries(now, event_id=claim.event_id) == 1
    assert await ob.redrive_deliveries(now, event_id=claim.event_id) == 0  # only dead letters
    [again] = await ob.claim_deliveries("we_a", now, now + timedelta(seconds=30), "one", 1)
    assert (again.event_id, again.attempts, again.round_attempts) == (claim.event_id, 1, 0)


async def test_outbox_endpoint_states_gate_claims_and_probes(backend: Backend, store: PaymentStore) -> None:
    from router.store.base import OutboxStore

    await _outbox_ready(backend)
    assert isinstance(store, SqliteStore | PostgresStore)
    ob: OutboxStore = store
    p = make_payment(1)
    await store.insert_payment(p, [event(p, "created")])
    now = T0 + timedelta(hours=1)
    await ob.sync_webhook_endpoints([_ep("we_a")], now)
    await ob.fan_out_events({"m_1": ["we_a"]}, now)
    await ob.set_webhook_endpoint_state("we_a", "disabled", now, "test")
    assert await ob.claim_deliveries("we_a", now, now + timedelta(seconds=30), "one", 5) == []
    assert await ob.next_webhook_due(now) is None  # nothing a dispatcher could do
    paused = await ob.set_webhook_endpoint_state("we_a", "paused", now)
    assert paused is not None and paused.state == "paused"
    assert await ob.claim_deliveries("we_a", now, now + timedelta(seconds=30), "one", 5) == []
    probe = await ob.claim_probe("we_a", now, now + timedelta(minutes=1), now + timedelta(seconds=30), "one")
    assert probe is not None
    # one probe per interval, whichever instance asks
    assert await ob.claim_probe("we_a", now, now + timedelta(minutes=1), now + timedelta(seconds=30), "two") is None
    assert (await ob.set_webhook_endpoint_state("we_missing", "active", now)) is None
    [row] = await ob.list_webhook_endpoints()
    assert (row.state, row.paused_until) == ("paused", now + timedelta(minutes=1))


async def _fanned_out(store: PaymentStore, n: int, now: datetime, endpoints: tuple[str, ...] = ("we_a",)) -> list[Payment]:
    from router.store.base import OutboxStore

    assert isinstance(store, SqliteStore | PostgresStore)
    ob: OutboxStore = store
    payments = [make_payment(i) for i in range(1, n + 1)]
    for p in payments:
        await store.insert_payment(p, [event(p, "created")])
    await ob.sync_webhook_endpoints([_ep(e) for e in endpoints], now)
    await ob.fan_out_events({"m_1": list(endpoints)}, now)
    return payments


def _attempt_for(claim: Any, now: datetime, outcome: str = "delivered", code: int = 200) -> Any:
    from router.store.base import WebhookAttemptRow

    return WebhookAttemptRow(event_id=claim.event_id, endpoint_id=claim.endpoint_id, attempt=claim.attempts + 1,
                             started_at=now, latency_ms=1.0, outcome=outcome, status_code=code, response_snippet="x")


async def test_outbox_claim_takes_only_due_unleased_rows_oldest_due_first_then_commit_order(
    backend: Backend, store: PaymentStore
) -> None:
    from router.store.base import DeliveryUpdate

    await _outbox_ready(backend)
    assert isinstance(store, SqliteStore | PostgresStore)
    now = T0 + timedelta(hours=1)
    p = await _fanned_out(store, 4, now)
    ids = [f"evt_{x.id}_created" for x in p]
    lease = now + timedelta(seconds=30)
    [first] = await store.claim_deliveries("we_a", now, lease, "one", 1)
    assert first.event_id == ids[0]  # same due time: commit order
    retry_at = now + timedelta(seconds=1)
    await store.finish_attempt(first, _attempt_for(first, now, "failed", 500),
                               DeliveryUpdate(status="pending", next_attempt_at=retry_at), lambda e: e, now)
    [second] = await store.claim_deliveries("we_a", now, lease, "two", 1)
    assert second.event_id == ids[1]  # the retry is not due yet; the leased row is skipped too
    later = now + timedelta(seconds=5)
    rest = await store.claim_deliveries("we_a", later, later + timedelta(seconds=30), "three", 10)
    # ids[1] is still leased by "two"; due earlier (now) comes before due later (retry_at)
    assert [c.event_id for c in rest] == [ids[2], ids[3], ids[0]]
    assert [c.attempts for c in rest] == [0, 0, 1]
    assert await store.claim_deliveries("we_a", later, later, "four", 10) == []


async def test_outbox_results_finished_together_each_count_once_and_a_failing_one_fails_alone(
    backend: Backend, store: PaymentStore
) -> None:
    from router.store.base import DeliveryUpdate

    await _outbox_ready(backend)
    assert isinstance(store, SqliteStore | PostgresStore)
    now = T0 + timedelta(hours=1)
    await _fanned_out(store, 30, now, ("we_a", "we_b"))
    claims = [c for ep in ("we_a", "we_b")
              for c in await store.claim_deliveries(ep, now, now + timedelta(seconds=30), "one", 100)]
    assert len(claims) == 60
    delivered = DeliveryUpdate(status="delivered", next_attempt_at=now)
    bad, stale = claims[7], msgspec.structs.replace(claims[40], lease_owner="intruder")

    def boom(_: Any) -> Any:
        raise ValueError("a broken breaker decision")

    results = await asyncio.gather(
        *(store.finish_attempt(stale if c is claims[40] else c, _attempt_for(c, now), delivered,
                               boom if c is bad else (lambda e: e), now) for c in claims),
        return_exceptions=True,
    )  # fmt: skip
    assert isinstance(results[7], ValueError)
    assert results[40] is None  # not the lease holder: nothing written
    assert all(isinstance(r, tuple) for i, r in enumerate(results) if i not in (7, 40))
    rows = await backend.query(
        "SELECT event_id, endpoint_id, status, attempts FROM webhook_deliveries ORDER BY event_id, endpoint_id"
    )
    undone = {(bad.event_id, bad.endpoint_id), (claims[40].event_id, claims[40].endpoint_id)}
    for eid, ep, status, attempts in rows:
        assert (status, attempts) == (("pending", 0) if (eid, ep) in undone else ("delivered", 1)), (eid, ep)
    assert (await backend.query("SELECT count(*) FROM webhook_attempts"))[0][0] == 58
    # an event counts as delivered once every endpoint has it; attempts count over endpoints
    outbox = dict((r[0], (r[1] is not None, r[2])) for r in await backend.query(
        "SELECT id, delivered_at, attempts FROM outbox"))
    assert outbox[bad.event_id] == (False, 1) and outbox[claims[40].event_id] == (False, 1)
    assert sum(1 for done, n in outbox.values() if done and n == 2) == 28
    if isinstance(store, SqliteStore):
        assert store.outbox_stats.transactions < store.outbox_stats.writes  # they did go together


async def test_outbox_breaker_sees_attempts_finished_together_one_after_another(
    backend: Backend, store: PaymentStore
) -> None:
    from router.store.base import DeliveryUpdate, WebhookEndpointRow

    await _outbox_ready(backend)
    assert isinstance(store, SqliteStore | PostgresStore)
    now = T0 + timedelta(hours=1)
    await _fanned_out(store, 12, now)
    claims = await store.claim_deliveries("we_a", now, now + timedelta(seconds=30), "one", 11)
    # the twelfth delivery was never claimed by this owner: its result must change nothing
    claims.append(msgspec.structs.replace(claims[0], event_id="evt_pay_00012_created", payment_id="pay_00012",
                                          lease_owner="intruder"))

    def failed_once_more(e: WebhookEndpointRow) -> WebhookEndpointRow:
        return msgspec.structs.replace(e, consecutive_failures=e.consecutive_failures + 1,
                                       failing_since=e.failing_since or now)

    retry = DeliveryUpdate(status="pending", next_attempt_at=now + timedelta(minutes=1))
    results = await asyncio.gather(*(store.finish_attempt(c, _attempt_for(c, now, "failed", 500), retry,
                                                          failed_once_more, now) for c in claims))
    assert results[-1] is None
    befores = sorted(r[0].consecutive_failures for r in results if r is not None)
    assert befores == list(range(11))  # each decision saw the one before it, none was lost
    [row] = await store.list_webhook_endpoints()
    assert (row.consecutive_failures, row.failing_since) == (11, now)
    rows = await backend.query("SELECT event_id, attempts FROM webhook_deliveries WHERE attempts > 0")
    assert len(rows) == 11 and "evt_pay_00012_created" not in {r[0] for r in rows}


# --------------------------------------------------------------------------- ledger rows (router.money)
# Ledger entries travel with the payment write: same transaction (PostgreSQL) / savepoint (SQLite).


def _ledger_pair(p: Payment, after: Payment) -> list[Any]:
    from router.money.ledger import postings_for
    from router.money.pricing import NoPricing

    return postings_for(p, after, NoPricing())


async def _ledger_rows(backend: Backend, payment_id: str) -> Rows:
    return await backend.query(
        f"SELECT id, account, amount_minor FROM ledger_entries WHERE payment_id = '{payment_id}' ORDER BY id"
    )


async def test_ledger_rows_are_written_with_the_payment(backend: Backend, store: PaymentStore) -> None:
    p = make_payment(70001)
    captured = advanced(p, Status.CAPTURED, captured_amount=p.amount, channel="a", channel_reference="ch_1")
    entries = _ledger_pair(p, captured)
    assert entries
    await store.insert_payment(p, [event(p, "created")])
    await store.update_payment(captured, p.version, [event(captured, "captured")], ledger=entries)
    rows = await _ledger_rows(backend, p.id)
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted((e.id, e.account, e.amount) for e in entries)
    assert sum(r[2] for r in rows) == 0


async def test_ledger_rows_are_atomic_with_the_payment(backend: Backend, store: PaymentStore) -> None:
    p = make_payment(70002)
    captured = advanced(p, Status.CAPTURED, captured_amount=p.amount, channel="a")
    entries = _ledger_pair(p, captured)
    await store.insert_payment(p, [event(p, "created")])
    await store.update_payment(captured, p.version, [event(captured, "captured")], ledger=entries)
    refunded = advanced(captured, Status.REFUNDED, refunded_amount=p.amount)
    clash = [*_ledger_pair(captured, refunded), entries[0]]  # reuses an entry id: this write must fail whole
    with pytest.raises(CONSTRAINT_ERRORS):
        await store.update_payment(refunded, captured.version, [event(refunded, "refunded")], ledger=clash)
    got = await store.get_payment(p.id)
    assert got is not None and got.version == captured.version and got.status is Status.CAPTURED
    assert [e.type for e in await store.outbox_events(p.id)] == ["payment.created", "payment.captured"]
    assert len(await _ledger_rows(backend, p.id)) == len(entries)
    # a stale version posts nothing either
    rival = advanced(p, Status.CAPTURED, captured_amount=p.amount, channel="b")
    with pytest.raises(VersionConflict):
        await store.update_payment(rival, p.version, ledger=_ledger_pair(p, rival))
    assert len(await _ledger_rows(backend, p.id)) == len(entries)
    # and an insert whose ledger clashes leaves no payment behind
    q = make_payment(70003, status=Status.CAPTURED, captured_amount=1999, channel="a")
    with pytest.raises(CONSTRAINT_ERRORS):
        await store.insert_payment(q, [event(q, "captured")], ledger=[*_ledger_pair(None, q), entries[0]])  # type: ignore[arg-type]
    assert await store.get_payment(q.id) is None and await store.outbox_events(q.id) == []


# --------------------------------------------------------------------------- a new attempt after a definitive failure
# `insert_payment(..., retry_failed_order=True)`: an order whose payments all ended declined / failed
# takes a new payment (order_attempt = max + 1); never two payments outside declined / failed.


async def _failed_order(store: PaymentStore, n: int, order: str, status: Status = Status.FAILED) -> Payment:
    p = make_payment(n, order=order)
    await store.insert_payment(p, [event(p, "created")])
    ended = advanced(p, status)
    await store.update_payment(ended, p.version)
    return ended


async def _order_attempts(backend: Backend, order: str) -> Rows:
    return await backend.query(
        f"SELECT id, status, order_attempt FROM payments WHERE merchant_order_id = '{order}' ORDER BY order_attempt"
    )


async def test_by_default_a_failed_order_still_refuses_a_second_payment(backend: Backend, store: PaymentStore) -> None:
    first = await _failed_order(store, 1, "o-fail")
    second = make_payment(2, order="o-fail")
    with pytest.raises(DuplicateOrder) as raised:
        await store.insert_payment(second, [event(second, "created")])
    assert raised.value.existing_payment_id == first.id
    with pytest.raises(DuplicateOrder) as raised:
        await store.insert_payment(second, retry_failed_order=False)
    assert raised.value.existing_payment_id == first.id
    assert await store.get_payment(second.id) is None and await store.outbox_events(second.id) == []
    assert await store.find_by_order("m_1", "o-fail") == first
    assert await _order_attempts(backend, "o-fail") == [(first.id, "failed", 1)]


@pytest.mark.parametrize("ended", [Status.DECLINED, Status.FAILED])
async def test_retry_takes_a_new_payment_after_a_definitive_failure(
    backend: Backend, store: PaymentStore, ended: Status
) -> None:
    first = await _failed_order(store, 1, "o-retry", ended)
    second = make_payment(2, order="o-retry")
    await store.insert_payment(second, [event(second, "created")], retry_failed_order=True)

    assert await store.get_payment(second.id) == second
    assert await store.get_payment(first.id) == first  # the failed attempt stays on record
    assert await store.find_by_order("m_1", "o-retry") == second  # the newest attempt
    assert await store.outbox_events(second.id) == [event(second, "created")]
    assert await _order_attempts(backend, "o-retry") == [(first.id, ended.value, 1), (second.id, "processing", 2)]
    # the order is live again: a further retry names the live payment, not the failed one
    third = make_payment(3, order="o-retry")
    with pytest.raises(DuplicateOrder) as raised:
        await store.insert_payment(third, retry_failed_order=True)
    assert raised.value.existing_payment_id == second.id
    # the same insert again is still a duplicate of itself
    with pytest.raises(DuplicateOrder) as raised:
        await store.insert_payment(second, retry_failed_order=True)
    assert raised.value.existing_payment_id == second.id
    assert await store.get_payment(third.id) is None


@pytest.mark.parametrize(
    "status",
    [Status.PROCESSING, Status.PENDING, Status.REQUIRES_ACTION, Status.MANUAL_REVIEW, Status.AUTHORIZED,
     Status.CAPTURED, Status.PARTIALLY_REFUNDED, Status.REFUNDED, Status.VOIDED],
)
async def test_retry_refuses_an_order_that_is_not_definitively_failed(
    backend: Backend, store: PaymentStore, status: Status
) -> None:
    first = make_payment(1, order="o-live")
    await store.insert_payment(first)
    if status is not Status.PROCESSING:
        first = advanced(first, status)
        await store.update_payment(first, 1)
    second = make_payment(2, order="o-live")
    with pytest.raises(DuplicateOrder) as raised:
        await store.insert_payment(second, [event(second, "created")], retry_failed_order=True)
    assert raised.value.existing_payment_id == first.id
    assert await store.get_payment(second.id) is None and await store.outbox_events(second.id) == []
    assert await _order_attempts(backend, "o-live") == [(first.id, status.value, 1)]


async def test_attempts_count_up_through_failures_and_find_by_order_returns_the_newest(
    backend: Backend, store: PaymentStore
) -> None:
    p1 = await _failed_order(store, 1, "o-many", Status.DECLINED)
    p2 = make_payment(2, order="o-many", status=Status.FAILED)  # recorded already failed (e.g. blocked)
    await store.insert_payment(p2, [event(p2, "failed")], retry_failed_order=True)
    assert await store.find_by_order("m_1", "o-many") == p2
    with pytest.raises(DuplicateOrder) as raised:  # default mode names the latest failed attempt
        await store.insert_payment(make_payment(9, order="o-many"))
    assert raised.value.existing_payment_id == p2.id
    p3 = make_payment(3, order="o-many")
    await store.insert_payment(p3, retry_failed_order=True)
    assert await store.find_by_order("m_1", "o-many") == p3
    assert await _order_attempts(backend, "o-many") == [
        (p1.id, "declined", 1), (p2.id, "failed", 2), (p3.id, "processing", 3)
    ]
    # another merchant's order with the same id is untouched by any of it
    other = make_payment(4, order="o-many", merchant_id="m_2")
    await store.insert_payment(other)
    assert await store.find_by_order("m_2", "o-many") == other
    assert await store.find_by_order("m_1", "o-many") == p3


async def test_a_reused_payment_id_on_retry_is_still_a_constraint_error(store: PaymentStore) -> None:
    await _failed_order(store, 1, "o-a")
    taken = make_payment(2, order="o-b")
    await store.insert_payment(taken)
    clash = make_payment(2, order="o-a")  # pay_00002 again, for the failed order
    with pytest.raises(CONSTRAINT_ERRORS):
        await store.insert_payment(clash, [event(clash, "other")], retry_failed_order=True)
    assert await store.get_payment(taken.id) == taken
    assert await store.outbox_events(taken.id) == []


async def test_concurrent_retries_after_a_failure_exactly_one_wins(backend: Backend, store: PaymentStore) -> None:
    first = await _failed_order(store, 1, "o-race")
    retries = [make_payment(100 + i, order="o-race") for i in range(20)]

    results = await asyncio.gather(
        *(store.insert_payment(p, [event(p, "created")], retry_failed_order=True) for p in retries),
        return_exceptions=True,
    )

    winners = [p for p, r in zip(retries, results, strict=True) if r is None]
    assert len(winners) == 1, results
    [winner] = winners
    for p, r in zip(retries, results, strict=True):
        if p is not winner:
            assert isinstance(r, DuplicateOrder) and r.existing_payment_id == winner.id, r
            assert await store.get_payment(p.id) is None and await store.outbox_events(p.id) == []
    assert await store.find_by_order("m_1", "o-race") == winner
    assert await _order_attempts(backend, "o-race") == [(first.id, "failed", 1), (winner.id, "processing", 2)]


async def test_the_database_itself_refuses_a_second_live_payment(backend: Backend, store: PaymentStore) -> None:
    # The partial unique index is the guarantee, not the store's read-then-insert.
    await store.insert_payment(make_payment(1, order="o-idx"))
    sql = (
        "INSERT INTO payments (id, merchant_id, merchant_order_id, status, amount, currency, version, "
        "created_at, updated_at, doc, order_attempt) VALUES ('pay_x', 'm_1', 'o-idx', 'pending', 1, 'EUR', 1, "
        "'2024-05-01T12:00:00.000000Z', '2024-05-01T12:00:00.000000Z', 'x', 2)"
    )
    if backend.name == "postgres":
        sql = sql.replace("'2024-05-01T12:00:00.000000Z'", "'2024-05-01T12:00:00Z'").replace(", 'x',", ", '\\x00',")
    with pytest.raises(CONSTRAINT_ERRORS, match="payments_live_order|UNIQUE"):
        await backend.query(sql)
    assert await _order_attempts(backend, "o-idx") == [("pay_00001", "processing", 1)]


async def _insert_pre_0004(dialect: str, target: str, p: Payment) -> None:
    """A payment row as the release before 0004 wrote it (no order_attempt column)."""
    cols = "id, merchant_id, merchant_order_id, status, amount, currency, version, created_at, updated_at, doc"
    doc = msgspec.json.encode(p)
    if dialect == "sqlite":
        def run() -> None:
            ts = lambda dt: dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # noqa: E731
            with contextlib.closing(sqlite3.connect(target)) as conn, conn:
                conn.execute(
                    f"INSERT INTO payments ({cols}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (p.id, p.merchant_id, p.merchant_order_id, p.status.value, p.amount, p.currency, p.version,
                     ts(p.created_at), ts(p.updated_at), doc),
                )

        await asyncio.to_thread(run)
        return
    conn = await asyncpg.connect(target, timeout=5)
    try:
        await conn.execute(
            f"INSERT INTO payments ({cols}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
            p.id, p.merchant_id, p.merchant_order_id, p.status.value, p.amount, p.currency, p.version,
            p.created_at, p.updated_at, doc,
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
async def test_an_existing_database_migrates_and_its_payments_still_block_duplicates(
    request: pytest.FixtureRequest, tmp_path: Path, dialect: str
) -> None:
    new: Callable[[Any], PaymentStore]
    if dialect == "sqlite":
        migrations = load_sqlite_migrations()
        target = str(tmp_path / "old.db")
        new = lambda m: SqliteStore(target, migrations=m)  # noqa: E731
    else:
        migrations = load_migrations()
        target = request.getfixturevalue("fresh_postgres_dsn")
        new = lambda m: PostgresStore(target, migrations=m)  # noqa: E731
    before = [m for m in migrations if m.version < 4]
    assert [m.name for m in migrations if m.version == 4] == ["0004_order_attempts.sql"]

    old = new(before)  # the schema as the previous release left it
    await old.start()
    await old.close()
    live = make_payment(1, order="o-old")
    failed = make_payment(2, order="o-old-failed", status=Status.FAILED, updated_at=T0 + timedelta(seconds=1))
    for p in (live, failed):
        await _insert_pre_0004(dialect, target, p)

    upgraded = new(migrations)
    await upgraded.start()
    try:
        assert await upgraded.get_payment(live.id) == live
        for retry in (False, True):
            with pytest.raises(DuplicateOrder) as raised:
                await upgraded.insert_payment(make_payment(3, order="o-old"), retry_failed_order=retry)
            assert raised.value.existing_payment_id == live.id
        with pytest.raises(DuplicateOrder) as raised:
            await upgraded.insert_payment(make_payment(4, order="o-old-failed"))
        assert raised.value.existing_payment_id == failed.id
        retried = make_payment(4, order="o-old-failed")
        await upgraded.insert_payment(retried, retry_failed_order=True)
        assert await upgraded.find_by_order("m_1", "o-old-failed") == retried
        assert await upgraded.get_payment(failed.id) == failed
        assert await upgraded.list_by_status([Status.FAILED], T0 + timedelta(days=1)) == [failed]
        updated = advanced(live, Status.CAPTURED)  # the migrated rows still take optimistic updates
        await upgraded.update_payment(updated, 1)
        assert await upgraded.find_by_order("m_1", "o-old") == updated
    finally:
        await upgraded.close()
    if dialect == "sqlite":  # the rebuilt table kept its index and gained the two unique ones
        with contextlib.closing(sqlite3.connect(target)) as conn:
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'payments'")}
        assert {"payments_status_updated_at", "payments_order_attempt", "payments_live_order"} <= names
        assert "payments_0004" not in names


async def test_callbacks_are_recorded_once_per_channel_event(store: PaymentStore) -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    assert await store.record_callback("ch", "evt-1", b'{"a":1}', "pay_1", at) is None
    assert await store.record_callback("ch", "evt-1", b'{"a":1}', "pay_1", at) == ""  # stored, still open
    await store.set_callback_outcome("ch", "evt-1", "applied")
    assert await store.record_callback("ch", "evt-1", b"other", None, at) == "applied"
    assert await store.record_callback("other-ch", "evt-1", b"x", None, at) is None  # per channel
