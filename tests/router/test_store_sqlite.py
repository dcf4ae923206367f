"""SqliteStore against real database files: durability, group commit, optimistic writes, migrations."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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
from router.store.sqlite import Migration, SqliteStore, load_migrations

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


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
            card=CardSummary(bin="424242", last4="4242", brand="visa", exp_month=12, exp_year=2030, fingerprint="fp"),
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


async def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    def run() -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(path)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    return await asyncio.to_thread(run)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "payroute.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(db)
    await s.start()
    yield s
    await s.close()


async def test_round_trip_keeps_every_field(store: SqliteStore, db: Path) -> None:
    p = make_payment(
        1,
        status=Status.AUTHORIZED,
        channel="adyen_eu",
        channel_reference="psp_9",
        decline=Decline(code="05", message="do not honor", category=DeclineCategory.SOFT, channel="stripe_eu"),
        attempts=[
            Attempt(seq=1, channel="stripe_eu", outcome=Outcome.SOFT_DECLINE, code="05", latency_ms=12.5,
                    channel_key="k1", started_at=T0),
            Attempt(seq=2, channel="adyen_eu", outcome=Outcome.APPROVED, code=None, latency_ms=40.0,
                    channel_key="k2", channel_reference="psp_9", retries=1, started_at=T0 + timedelta(seconds=1)),
        ],
        operations=[Operation(id="op_1", kind="capture", amount=1999, status="succeeded", created_at=T0)],
        routing=RoutingDecision(chain="default", config_version="v3", candidates=["stripe_eu", "adyen_eu"],
                                plan=["stripe_eu", "adyen_eu"], removed={"alipay": "currency"}),
        metadata={"cart": "42"},
    )  # fmt: skip
    await store.insert_payment(p, [event(p, "authorized")])

    got = await store.get_payment(p.id)
    assert got == p
    assert got is not None and got.attempts[1].started_at == T0 + timedelta(seconds=1)
    assert got.created_at.utcoffset() == timedelta(0)
    assert await store.find_by_order("m_1", "order-1") == p
    assert await store.get_payment("pay_missing") is None
    assert await store.find_by_order("m_2", "order-1") is None
    # The projections hold what the doc holds, money as integers and times as UTC text.
    assert await query(db, "SELECT amount, status, version, created_at FROM payments") == [
        (1999, "authorized", 1, "2024-05-01T12:00:00.123456Z")
    ]
    assert await query(db, "SELECT seq, channel, outcome, code FROM attempts ORDER BY seq") == [
        (1, "stripe_eu", "soft_decline", "05"),
        (2, "adyen_eu", "approved", None),
    ]
    assert await query(db, "SELECT id, payment_id, amount FROM operations") == [("op_1", p.id, 1999)]


async def test_duplicate_order_names_the_existing_payment_and_persists_nothing(store: SqliteStore) -> None:
    first = make_payment(1, order="o-dup")
    second = make_payment(2, order="o-dup", attempts=[
        Attempt(seq=1, channel="x", outcome=Outcome.APPROVED, code=None, latency_ms=1, channel_key="k")
    ])  # fmt: skip
    await store.insert_payment(first, [event(first, "created")])

    with pytest.raises(DuplicateOrder) as raised:
        await store.insert_payment(second, [event(second, "created")])

    assert raised.value.existing_payment_id == first.id
    assert await store.get_payment(second.id) is None
    assert await store.outbox_events(second.id) == []
    assert await store.outbox_events(first.id) == [event(first, "created")]


async def test_optimistic_update_and_stale_version(store: SqliteStore) -> None:
    p1 = make_payment(1)
    await store.insert_payment(p1)
    p2 = advanced(p1, Status.AUTHORIZED)
    await store.update_payment(p2, expected_version=1)

    with pytest.raises(VersionConflict):
        await store.update_payment(advanced(p1, Status.DECLINED), expected_version=1)
    with pytest.raises(VersionConflict):  # unknown payment: there is no version 1 to move from
        await store.update_payment(advanced(make_payment(9), Status.FAILED), expected_version=1)
    with pytest.raises(ValueError):  # a version that does not advance by one is our bug, not a race
        await store.update_payment(p2, expected_version=2)
    assert await store.get_payment(p1.id) == p2


async def test_two_updates_from_one_version_exactly_one_wins(store: SqliteStore) -> None:
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


async def test_outbox_follows_the_payment_write_in_commit_order(store: SqliteStore, db: Path) -> None:
    p1 = make_payment(1)
    await store.insert_payment(p1, [event(p1, "created")])
    with pytest.raises(VersionConflict):
        await store.update_payment(advanced(advanced(p1, Status.PENDING), Status.FAILED), 2, [event(p1, "lost")])
    p2 = advanced(p1, Status.AUTHORIZED)
    await store.update_payment(p2, 1, [event(p2, "authorized"), event(p2, "captured")])

    assert [e.type for e in await store.outbox_events(p1.id)] == [
        "payment.created", "payment.authorized", "payment.captured",
    ]  # fmt: skip
    assert await query(db, "SELECT DISTINCT delivered_at, attempts FROM outbox") == [(None, 0)]


async def test_failed_write_in_a_batch_leaves_the_others_committed(store: SqliteStore) -> None:
    payments = [make_payment(i) for i in range(100)]
    payments[60] = make_payment(60, order="order-10")  # same merchant order as payment 10
    payments[70] = make_payment(70)  # reuses payment 30's event id below: a constraint on this write only

    results = await asyncio.gather(
        *(store.insert_payment(p, [event(payments[30] if i == 70 else p, "created")])
          for i, p in enumerate(payments)),
        return_exceptions=True,
    )  # fmt: skip

    failed = {i: r for i, r in enumerate(results) if r is not None}
    assert set(failed) == {60, 70}
    assert isinstance(failed[60], DuplicateOrder) and failed[60].existing_payment_id == "pay_00010"
    assert isinstance(failed[70], sqlite3.IntegrityError)
    for i, p in enumerate(payments):
        assert (await store.get_payment(p.id) is not None) == (i not in failed)
    assert store.stats.failed_writes == 2
    assert store.stats.transactions < store.stats.writes == 100


async def test_updates_of_one_batch_write_their_rows_and_a_stale_one_fails_alone(store: SqliteStore, db: Path) -> None:
    # a run of writes in a batch goes through one statement per table (no SAVEPOINT each); a stale version
    # among them must still fail alone and leave nothing of itself, the others committed with their rows
    payments = [make_payment(i) for i in range(60)]
    await asyncio.gather(*(store.insert_payment(p) for p in payments))
    done = [
        advanced(p, Status.CAPTURED, channel="sbx", attempts=[Attempt(
            seq=1, channel="sbx", outcome=Outcome.APPROVED, code="ok", latency_ms=1.0, channel_key=f"{p.id}-a1",
            started_at=T0)])
        for p in payments
    ]  # fmt: skip
    transactions = store.stats.transactions
    await asyncio.gather(*(store.update_payment(d, 1, [event(d, "captured")]) for d in done[:30]))
    assert store.stats.transactions - transactions < 30  # batched
    stale = msgspec.structs.replace(done[45], version=8)  # not the version the row is at
    results = await asyncio.gather(
        *(store.update_payment(d, 1, [event(d, "captured")]) if i != 45 else
          store.update_payment(stale, 7, [event(d, "captured")])
          for i, d in enumerate(done) if i >= 30),
        return_exceptions=True,
    )  # fmt: skip
    assert [i + 30 for i, r in enumerate(results) if r is not None] == [45]
    assert isinstance(results[15], VersionConflict)
    for i, (p, d) in enumerate(zip(payments, done, strict=True)):
        assert await store.get_payment(p.id) == (p if i == 45 else d)
    written = [p.id for i, p in enumerate(payments) if i != 45]
    assert [r[0] for r in await query(db, "SELECT payment_id FROM attempts ORDER BY payment_id")] == written
    assert [r[0] for r in await query(db, "SELECT payment_id FROM outbox ORDER BY payment_id")] == written


async def test_group_commit_puts_many_writes_in_one_transaction(store: SqliteStore) -> None:
    await asyncio.gather(*(store.insert_payment(make_payment(i)) for i in range(200)))

    assert store.stats.writes == 200
    assert store.stats.transactions < store.stats.writes
    assert sum(size * count for size, count in store.stats.batch_sizes.items()) == 200
    assert max(store.stats.batch_sizes) <= 256


async def test_batch_max_caps_a_transaction(db: Path) -> None:
    store = SqliteStore(db, batch_max=8)
    await store.start()
    try:
        await asyncio.gather(*(store.insert_payment(make_payment(i)) for i in range(100)))
    finally:
        await store.close()
    assert max(store.stats.batch_sizes) <= 8
    assert store.stats.transactions >= 13


async def test_an_error_outside_any_one_write_fails_the_whole_batch(db: Path) -> None:
    store = SqliteStore(db, busy_timeout_ms=50)
    await store.start()
    blocker = await asyncio.to_thread(sqlite3.connect, db, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(blocker.execute, "BEGIN IMMEDIATE")  # another process holds the write lock
        results = await asyncio.gather(
            *(store.insert_payment(make_payment(i)) for i in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
        await asyncio.to_thread(blocker.execute, "ROLLBACK")

        assert await store.get_payment("pay_00000") is None
        await store.insert_payment(make_payment(0))  # the writer thread survived and serves again
        assert await store.get_payment("pay_00000") == make_payment(0)
    finally:
        await asyncio.to_thread(blocker.close)
        await store.close()


async def test_close_commits_writes_already_queued(db: Path) -> None:
    store = SqliteStore(db)
    await store.start()
    tasks = [asyncio.create_task(store.insert_payment(make_payment(i))) for i in range(50)]
    await asyncio.sleep(0)  # every task has enqueued its write and is waiting for the commit
    await store.close()

    assert await asyncio.gather(*tasks) == [None] * 50
    with pytest.raises(RuntimeError):
        await store.insert_payment(make_payment(99))
    with pytest.raises(RuntimeError):
        await store.ping()
    assert (await query(db, "SELECT count(*) FROM payments"))[0][0] == 50


async def test_data_survives_a_new_store_on_the_same_file(db: Path) -> None:
    first = SqliteStore(db)
    await first.start()
    p = make_payment(1)
    await first.insert_payment(p, [event(p, "created")])
    await first.close()

    second = SqliteStore(db)
    await second.start()
    try:
        assert await second.get_payment(p.id) == p
        assert await second.outbox_events(p.id) == [event(p, "created")]
        await second.ping()
    finally:
        await second.close()


async def test_an_awaited_write_survives_kill_9(db: Path) -> None:
    doc = msgspec.json.encode(make_payment(1)).decode()
    script = textwrap.dedent(f"""
        import asyncio, os, signal, msgspec
        from router.model import Payment
        from router.store.sqlite import SqliteStore

        async def main():
            store = SqliteStore({str(db)!r})
            await store.start()
            await store.insert_payment(msgspec.json.decode({doc!r}, type=Payment))
            os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit, no flush

        asyncio.run(main())
    """)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=REPO)
    assert await proc.wait() == -9

    store = SqliteStore(db)
    await store.start()
    try:
        assert await store.get_payment("pay_00001") == make_payment(1)
    finally:
        await store.close()


async def test_webhook_results_finished_together_survive_kill_9(db: Path) -> None:
    # Marks recorded in one group commit are durable once finish_attempt returns, like payment writes.
    script = textwrap.dedent(f"""
        import asyncio, os, signal
        from datetime import datetime, timedelta, UTC
        from router.model import OutboxEvent
        from router.store.base import DeliveryUpdate, WebhookAttemptRow, WebhookEndpointRow
        from router.store.sqlite import SqliteStore
        from tests.router.test_store_sqlite import make_payment

        async def main():
            store = SqliteStore({str(db)!r})
            await store.start()
            now = datetime(2024, 5, 1, 13, tzinfo=UTC)
            for i in range(50):
                p = make_payment(i)
                await store.insert_payment(p, [OutboxEvent(id=f"evt_{{i}}", merchant_id="m_1", payment_id=p.id,
                                                           type="payment.created", payload=b"{{}}", created_at=now)])
            await store.sync_webhook_endpoints([WebhookEndpointRow(id="we_a", merchant_id="m_1", url="http://x")], now)
            await store.fan_out_events({{"m_1": ["we_a"]}}, now)
            claims = await store.claim_deliveries("we_a", now, now + timedelta(seconds=60), "one", 100)
            await asyncio.gather(*(store.finish_attempt(
                c, WebhookAttemptRow(event_id=c.event_id, endpoint_id="we_a", attempt=1, started_at=now,
                                     latency_ms=1.0, outcome="delivered", status_code=200),
                DeliveryUpdate(status="delivered", next_attempt_at=now), lambda e: e, now) for c in claims))
            print(store.outbox_stats.transactions, len(claims), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit, no flush

        asyncio.run(main())
    """)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=REPO, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == -9
    assert out.split()[1] == b"50"

    assert await query(db, "SELECT status, count(*) FROM webhook_deliveries GROUP BY status") == [("delivered", 50)]
    assert (await query(db, "SELECT count(*) FROM webhook_attempts"))[0][0] == 50
    assert (await query(db, "SELECT count(*) FROM outbox WHERE delivered_at IS NOT NULL"))[0][0] == 50


async def test_fresh_db_gets_every_migration_and_a_restart_reapplies_none(db: Path) -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "0001_init.sql"

    store = SqliteStore(db)
    await store.start()
    await store.insert_payment(make_payment(1))
    await store.close()
    assert (await query(db, "PRAGMA user_version"))[0][0] == len(migrations)

    # A release that adds one migration: only it runs (re-running 0001 would fail on CREATE TABLE).
    extra = Migration(len(migrations) + 1, "9999_probe.sql", "-- probe\nCREATE TABLE probe (x INTEGER);\n-- end\n")
    upgraded = SqliteStore(db, migrations=[*migrations, extra])
    await upgraded.start()
    try:
        assert await upgraded.get_payment("pay_00001") == make_payment(1)
    finally:
        await upgraded.close()
    assert (await query(db, "PRAGMA user_version"))[0][0] == len(migrations) + 1
    assert await query(db, "SELECT count(*) FROM probe") == [(0,)]

    # Code older than the file refuses to run against it rather than guess.
    with pytest.raises(RuntimeError, match="newer than this code"):
        await SqliteStore(db).start()


async def test_a_failing_migration_leaves_the_file_untouched(db: Path) -> None:
    broken = [*load_migrations(), Migration(2, "0002_broken.sql", "CREATE TABLE t (x);\nCREATE TABLE t (x);\n")]
    with pytest.raises(sqlite3.OperationalError):
        await SqliteStore(db, migrations=broken).start()
    assert await query(db, "PRAGMA user_version") == [(0,)]
    assert await query(db, "SELECT name FROM sqlite_master WHERE type = 'table'") == []


async def test_list_by_status_filters_and_orders_oldest_first(store: SqliteStore) -> None:
    rows = [
        make_payment(1, status=Status.PENDING, updated_at=T0 + timedelta(minutes=3)),
        make_payment(2, status=Status.PENDING, updated_at=T0 + timedelta(minutes=1)),
        make_payment(3, status=Status.PROCESSING, updated_at=T0 + timedelta(minutes=2)),
        make_payment(4, status=Status.CAPTURED, updated_at=T0),
        make_payment(5, status=Status.PENDING, updated_at=T0 + timedelta(minutes=10)),
    ]
    await asyncio.gather(*(store.insert_payment(p) for p in rows))
    cutoff = T0 + timedelta(minutes=5)

    found = await store.list_by_status([Status.PENDING, Status.PROCESSING], cutoff)
    assert [p.id for p in found] == ["pay_00002", "pay_00003", "pay_00001"]
    assert [p.id for p in await store.list_by_status([Status.PENDING], cutoff, limit=1)] == ["pay_00002"]
    assert await store.list_by_status([], cutoff) == []


async def test_constructor_rejects_bad_settings(db: Path) -> None:
    with pytest.raises(ValueError):
        SqliteStore(db, synchronous="FULL; DROP TABLE payments")
    with pytest.raises(ValueError):
        SqliteStore(db, batch_max=0)


async def test_the_checkpointer_copies_the_wal_into_the_file_outside_commits(store: SqliteStore, db: Path,
                                                                          tmp_path: Path) -> None:
    import shutil

    await asyncio.gather(*(store.insert_payment(make_payment(n)) for n in range(300)))
    for _ in range(60):  # it runs every 0.5 s
        if store.stats.checkpoints >= 2:
            break
        await asyncio.sleep(0.1)
    assert store.stats.checkpoints >= 2
    # the main file alone (no -wal beside it) already holds every committed payment: the frames were
    # copied by the checkpointer, not left for a committing writer (its backstop is 20,000 pages away)
    alone = tmp_path / "alone.db"
    shutil.copyfile(db, alone)
    with sqlite3.connect(alone) as conn:
        assert conn.execute("SELECT count(*) FROM payments").fetchone()[0] == 300
