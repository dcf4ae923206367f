"""`PaymentStore` on one SQLite file: the durable record of the single-node mode.

Contract (on top of `router.store.base`):
- Writes go to one writer thread that group-commits: it takes everything queued (up to `batch_max`),
  runs it in one `BEGIN IMMEDIATE` transaction with each write in its own SAVEPOINT, commits, and only
  then resolves the callers' futures. An awaited write is therefore durably committed (WAL,
  `synchronous=FULL` by default). A write that fails on its own (`DuplicateOrder`, `VersionConflict`,
  a constraint such as a reused outbox event id) is rolled back alone; any other error (disk full, lock
  timeout, I/O) fails every write of that batch, and nothing of the batch is committed.
- `update_payment` of an unknown payment id is a `VersionConflict` too (no row at `expected_version`).
  `merchant_id` and `merchant_order_id` are immutable: updates never rewrite those columns.
- Cancelling a caller does not retract its write: once enqueued it is committed or fails with its batch.
- Webhook outbox writes (fan-out, claims, attempt results, endpoint states) group-commit the same way on
  a second writer thread and connection, so the payment writer's latency does not wait on them beyond
  SQLite's write lock. There any exception raised by one item's work (except a database-level error
  such as I/O, disk full or a lock timeout) is that item's own: rolled back to its SAVEPOINT alone.
- Reads run on a small pool of reader connections (WAL readers never wait for the writer).
- No sqlite call ever runs on the event loop thread.
- The schema comes from the numbered files in `migrations/sqlite/`, tracked by `PRAGMA user_version`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from router.errors import DuplicateOrder, VersionConflict
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
from router.store.schema import Migration, check_next_version, child_rows, settle_futures, split_statements
from router.store.schema import load_migrations as _load_migrations

T = TypeVar("T")
_Row = tuple[object, ...]

log = logging.getLogger("payroute.store")
_SYNCHRONOUS = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
_CHECKPOINT_EVERY_S = 0.5
_AUTOCHECKPOINT_BACKSTOP_PAGES = 20_000  # ~80 MB of WAL
_encode = msgspec.json.Encoder().encode
_decode_payment = msgspec.json.Decoder(Payment).decode


def load_migrations() -> list[Migration]:
    """The packaged sqlite migrations, in order."""
    return _load_migrations("router.store", "sqlite")


@dataclass
class StoreStats:
    """Counters a writer thread keeps (plain ints: readers on the loop thread may see them mid-batch)."""

    transactions: int = 0  # batches attempted, committed or not
    writes: int = 0  # writes (items) taken by the writer
    failed_writes: int = 0  # writes that ended in an exception
    batch_sizes: Counter[int] = field(default_factory=Counter)
    checkpoints: int = 0  # WAL checkpoints run by the checkpointer thread (payment writer's stats only)


@dataclass(slots=True)
class _Write:
    payment_row: _Row  # insert: full row; update: SET values + (id, expected_version)
    key: tuple[str, str, str]  # (id, merchant_id, merchant_order_id), to name the existing payment
    expected_version: int | None  # None: insert
    attempts: list[_Row]
    operations: list[_Row]
    outbox: list[_Row]
    ledger: list[_Row] = field(default_factory=list)  # ledger entries, same savepoint
    retry_failed_order: bool = False  # insert: may follow a definitively failed payment of the order


@dataclass(slots=True)
class _Job(Generic[T]):
    """One item of a group commit: `apply` runs inside its own SAVEPOINT; `future` gets its result (or
    exception) on `loop`, only after the COMMIT of its batch returned.

    `merge`, if set, applies a run of consecutive jobs with the same `merge` at once (their `args`, in
    order), with set-based statements instead of one SAVEPOINT and round of statements per job; it
    returns their results in order, exactly as the jobs one after the other would have. If it raises,
    its run is rolled back and each job is applied on its own, so one failing job still fails alone."""

    apply: Callable[[sqlite3.Connection], T]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]
    args: Any = None
    merge: Callable[[sqlite3.Connection, list[Any]], list[T]] | None = None


_STOP = object()  # queued by close(): the writer finishes what precedes it, then exits
# A small outbox batch waits this long once for more items before it commits (like PostgreSQL's
# commit_delay): under load every commit costs about as much as a batch of items (WAL pages + fsync),
# so this trades a millisecond of latency of webhook bookkeeping for fewer, larger commits.
_OUTBOX_LINGER_S = 0.001
_LINGER_BELOW = 32  # items: a batch this large commits at once


class _OneByOne(Exception):
    """Raised by a `merge` that cannot decide its run as a whole: apply its jobs one by one."""


def _payment_write_fault(exc: Exception) -> bool:
    # The payment write's own fault; anything else (I/O, lock timeout, our bug) fails its whole batch.
    return isinstance(exc, DuplicateOrder | VersionConflict | sqlite3.IntegrityError)


def _outbox_item_fault(exc: Exception) -> bool:
    # An outbox item's work is a small function of its own (a breaker decision, a claim): whatever it
    # raises is its own, except database-level errors, which may have ended the whole transaction.
    return isinstance(exc, sqlite3.IntegrityError) or not isinstance(exc, sqlite3.Error)


class _GroupWriter:
    """One thread and one connection that group-commit: take everything queued (up to `batch_max`),
    run it in one `BEGIN IMMEDIATE` transaction with each item in its own SAVEPOINT, COMMIT, and only
    then resolve the items' futures. An item whose exception `own_fault` accepts is rolled back alone;
    any other error fails every item of the batch and nothing of it is committed. With `linger_s`, a
    batch smaller than `_LINGER_BELOW` sleeps that long once to gather more before it commits."""

    def __init__(
        self, conn: sqlite3.Connection, name: str, batch_max: int, own_fault: Callable[[Exception], bool],
        stats: StoreStats, linger_s: float = 0.0,
    ) -> None:
        self.queue: queue.SimpleQueue[_Job[Any] | object] = queue.SimpleQueue()
        self.stats = stats
        self._conn = conn
        self._batch_max = batch_max
        self._own_fault = own_fault
        self._linger_s = linger_s
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: _Job[Any]) -> None:
        self.queue.put(job)  # unbounded SimpleQueue: never blocks the loop

    def stop(self) -> None:
        """Blocking: commit what is queued, then end the thread and close the connection."""
        self.queue.put(_STOP)
        self._thread.join()

    def _main(self) -> None:
        try:
            stopping = False
            while not stopping:
                batch: list[_Job[Any]] = []
                lingered = False
                item = self.queue.get()  # wait for work; then take whatever else piled up meanwhile
                while True:
                    if item is _STOP:
                        stopping = True
                        break
                    assert isinstance(item, _Job)
                    batch.append(item)
                    if len(batch) >= self._batch_max:
                        break
                    try:
                        item = self.queue.get_nowait()
                    except queue.Empty:
                        if self._linger_s <= 0 or lingered or len(batch) >= _LINGER_BELOW:
                            break
                        lingered = True
                        time.sleep(self._linger_s)
                        try:
                            item = self.queue.get_nowait()
                        except queue.Empty:
                            break
                if batch:
                    self._commit_batch(batch)
        finally:
            self._conn.close()

    def _commit_batch(self, batch: list[_Job[Any]]) -> None:
        conn = self._conn
        outcomes: list[tuple[BaseException | None, Any]] = []
        self.stats.transactions += 1
        self.stats.writes += len(batch)
        self.stats.batch_sizes[len(batch)] += 1
        try:
            conn.execute("BEGIN IMMEDIATE")
            i = 0
            while i < len(batch):
                merge, end = batch[i].merge, i + 1
                while merge is not None and end < len(batch) and batch[end].merge is merge:
                    end += 1
                if merge is not None and end - i > 1 and self._merged(batch[i:end], merge, outcomes):
                    i = end
                    continue
                for job in batch[i:end]:
                    outcomes.append(self._alone(job))
                i = end
            conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - not swallowed: every caller of the batch receives it
            # Disk full, I/O error, lock timeout, or our own bug: nothing of the batch is committed.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            outcomes = [(exc, None)] * len(batch)
        self.stats.failed_writes += sum(o[0] is not None for o in outcomes)
        assert len(outcomes) == len(batch)
        # Resolve only now, after COMMIT returned: one wake-up per event loop, not one per item.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], BaseException | None, Any]]] = {}
        for job, (failure, result) in zip(batch, outcomes, strict=True):
            by_loop.setdefault(job.loop, []).append((job.future, failure, result))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(settle_futures, settled)

    def _alone(self, job: _Job[Any]) -> tuple[BaseException | None, Any]:
        conn = self._conn
        conn.execute("SAVEPOINT item")
        try:
            result = job.apply(conn)
        except Exception as exc:
            if not self._own_fault(exc):
                raise
            # This item's own fault: undo just it; the rest of the batch still commits.
            conn.execute("ROLLBACK TO item")
            outcome: tuple[BaseException | None, Any] = (exc, None)
        else:
            outcome = (None, result)
        conn.execute("RELEASE item")
        return outcome

    def _merged(
        self, run: list[_Job[Any]], merge: Callable[[sqlite3.Connection, list[Any]], list[Any]],
        outcomes: list[tuple[BaseException | None, Any]],
    ) -> bool:
        """Apply `run` in one go; False (and nothing of it applied) if its jobs must go one by one."""
        conn = self._conn
        conn.execute("SAVEPOINT run")
        try:
            results = merge(conn, [job.args for job in run])
        except Exception as exc:
            if not (isinstance(exc, _OneByOne) or self._own_fault(exc)):
                raise
            conn.execute("ROLLBACK TO run")
            conn.execute("RELEASE run")
            return False
        conn.execute("RELEASE run")
        assert len(results) == len(run)
        outcomes.extend((None, r) for r in results)
        return True


_INSERT_PAYMENT = """INSERT INTO payments (id, merchant_id, merchant_order_id, status, amount, currency,
    version, created_at, updated_at, doc, order_attempt) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"""
_ORDER_PAYMENTS = """SELECT id, status, order_attempt FROM payments WHERE merchant_id = ? AND merchant_order_id = ?"""
_UPDATE_PAYMENT = """UPDATE payments SET status=?, amount=?, currency=?, version=?, updated_at=?, doc=?
    WHERE id=? AND version=?"""
_UPSERT_ATTEMPT = """INSERT INTO attempts (payment_id, seq, channel, outcome, code, latency_ms, channel_key,
    channel_reference, started_at) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (payment_id, seq) DO UPDATE SET
    channel=excluded.channel, outcome=excluded.outcome, code=excluded.code, latency_ms=excluded.latency_ms,
    channel_key=excluded.channel_key, channel_reference=excluded.channel_reference,
    started_at=excluded.started_at"""
_UPSERT_OPERATION = """INSERT INTO operations (id, payment_id, kind, amount, status, channel_reference, code,
    created_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET status=excluded.status,
    channel_reference=excluded.channel_reference, code=excluded.code"""
_INSERT_OUTBOX = """INSERT INTO outbox (id, merchant_id, payment_id, type, payload, created_at,
    next_attempt_at) VALUES (?,?,?,?,?,?,?)"""
_INSERT_LEDGER = """INSERT INTO ledger_entries (id, txn_id, account, amount_minor, currency, payment_id,
    merchant_id, kind, posted_at) VALUES (?,?,?,?,?,?,?,?,?)"""


# The last datetime formatted and its text: a write formats the same object several times in a row
# (an outbox row's two stamps, every ledger entry of a change, a payment's created_at on each write).
# It holds a reference, so `is` can never match another object; swapping the tuple is atomic.
_last_ts: tuple[datetime | None, str] = (None, "")


def _ts(dt: datetime) -> str:
    # Fixed width (always microseconds, always Z) so that text comparison is time comparison.
    global _last_ts
    last = _last_ts
    if last[0] is dt:
        return last[1]
    tz = dt.tzinfo
    if tz is None:
        raise ValueError(f"naive datetime {dt!r}: the store only takes aware UTC datetimes")
    u = dt if tz is UTC else dt.astimezone(UTC)
    if u.year >= 1000:  # the common case, ~3x cheaper than strftime; same text (isoformat pads 4-digit years)
        text = u.isoformat(timespec="microseconds")[:-6] + "Z"  # without its "+00:00"
    else:
        text = u.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    _last_ts = (dt, text)
    return text


def open_wal(conn: sqlite3.Connection, path: Path, prepare: Callable[[sqlite3.Connection], object]) -> sqlite3.Connection:
    """Switch a new connection's file to WAL, then `prepare` it (migrate); closes it if either fails."""
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{path}: cannot enable WAL (journal_mode is {mode})")
        prepare(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _insert_new(conn: sqlite3.Connection, write: _Write) -> bool:
    """Insert a new payment; False when its id already exists. The order's payments are read and the row
    inserted under the write lock (BEGIN IMMEDIATE): nobody can add a payment to this order in between,
    so the decision and the id named are the ones that really hold. The unique indexes of migration
    0004 are the backstop."""
    payment_id, merchant_id, order_id = write.key
    existing = conn.execute(_ORDER_PAYMENTS, (merchant_id, order_id)).fetchall()
    attempt = next_order_attempt(existing, payment_id, write.retry_failed_order)
    return bool(conn.execute(_INSERT_PAYMENT, (*write.payment_row, attempt)).rowcount)


def _insert_children(
    conn: sqlite3.Connection, attempts: list[_Row], operations: list[_Row], outbox: list[_Row], ledger: list[_Row]
) -> None:
    # skip the empty ones: each executemany costs a statement-cache lookup and a reset under the GIL
    if attempts:
        conn.executemany(_UPSERT_ATTEMPT, attempts)
    if operations:
        conn.executemany(_UPSERT_OPERATION, operations)
    if outbox:
        conn.executemany(_INSERT_OUTBOX, outbox)
    if ledger:
        conn.executemany(_INSERT_LEDGER, ledger)


def _apply_write(write: _Write, conn: sqlite3.Connection) -> None:
    if write.expected_version is None:
        if not _insert_new(conn, write):
            raise sqlite3.IntegrityError(f"payment id {write.key[0]} already exists")
    elif conn.execute(_UPDATE_PAYMENT, write.payment_row).rowcount == 0:
        raise VersionConflict(f"payment {write.key[0]} is no longer at version {write.expected_version}")
    _insert_children(conn, write.attempts, write.operations, write.outbox, write.ledger)


def _apply_writes(conn: sqlite3.Connection, writes: list[_Write]) -> list[None]:
    """`_apply_write` over a run of a batch, without a SAVEPOINT per write and with one statement per
    table for the run (updates and child rows by executemany). The same rows as one by one: the writes
    of one run are of different payments, or else of versions that follow each other, applied in order.
    A write that fails on its own (`DuplicateOrder`, an integrity error, an update that finds no row at
    its version) makes the run go one by one, so it alone fails."""
    updates: list[_Row] = []
    attempts: list[_Row] = []
    operations: list[_Row] = []
    outbox: list[_Row] = []
    ledger: list[_Row] = []
    for w in writes:
        if w.expected_version is None:
            if not _insert_new(conn, w):
                raise _OneByOne
        else:
            updates.append(w.payment_row)
        attempts += w.attempts
        operations += w.operations
        outbox += w.outbox
        ledger += w.ledger
    # rowcount sums the rows of every statement: fewer means some update found no row at its version
    if updates and conn.executemany(_UPDATE_PAYMENT, updates).rowcount != len(updates):
        raise _OneByOne
    _insert_children(conn, attempts, operations, outbox, ledger)
    return [None] * len(writes)


class SqliteStore:
    def __init__(
        self,
        path: str | Path,
        *,
        batch_max: int = 256,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
        readers: int = 2,
        migrations: Sequence[Migration] | None = None,
    ) -> None:
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {sorted(_SYNCHRONOUS)}, not {synchronous!r}")
        if batch_max < 1 or readers < 1:
            raise ValueError("batch_max and readers must be >= 1")
        self.path = Path(path)
        self.stats = StoreStats()  # the payment writer
        self.outbox_stats = StoreStats()  # the webhook outbox writer
        self._batch_max = batch_max
        self._synchronous = synchronous.upper()
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._readers = readers
        self._migrations = list(migrations) if migrations is not None else load_migrations()
        self._state = "new"  # new -> running -> closed
        self._writer: _GroupWriter | None = None
        self._reader_pool: ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_conns_lock = threading.Lock()
        # Webhook outbox writes (claims, results) group-commit on a thread and connection of their own,
        # so payment writes never queue behind a batch of them; SQLite's write lock serialises the two.
        self._outbox: _GroupWriter | None = None
        # WAL checkpoints run on a thread of their own (see _checkpointer_main), not inside a commit
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_stop = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"SqliteStore cannot start: it is {self._state}")
        conn = await asyncio.to_thread(self._open_writer_connection)
        try:
            outbox_conn = await asyncio.to_thread(self._writer_connect)
        except BaseException:
            conn.close()
            raise
        self._reader_pool = ThreadPoolExecutor(self._readers, thread_name_prefix="payroute-sqlite-read")
        self._writer = _GroupWriter(conn, "payroute-sqlite-write", self._batch_max, _payment_write_fault, self.stats)
        self._outbox = _GroupWriter(
            outbox_conn, "payroute-sqlite-outbox", self._batch_max, _outbox_item_fault, self.outbox_stats,
            _OUTBOX_LINGER_S,
        )
        self._checkpointer = threading.Thread(target=self._checkpointer_main, name="payroute-sqlite-checkpoint",
                                              daemon=True)
        self._checkpointer.start()
        self._state = "running"
        try:
            await self.ping()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Commit everything already queued, then stop the threads and close the connections."""
        if self._state != "running":
            return
        self._state = "closed"  # from here on new writes are refused, so _STOP is the last item
        await asyncio.to_thread(self._shutdown_threads)

    def _shutdown_threads(self) -> None:
        assert self._writer is not None and self._outbox is not None and self._reader_pool is not None
        self._outbox.stop()
        self._writer.stop()
        self._checkpoint_stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        self._reader_pool.shutdown(wait=True)
        with self._reader_conns_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: the module opens no implicit transactions; we issue BEGIN/COMMIT ourselves.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        # the checkpointer thread keeps the WAL short; a committing writer checkpoints only as a backstop
        conn.execute(f"PRAGMA wal_autocheckpoint = {_AUTOCHECKPOINT_BACKSTOP_PAGES}")
        return conn

    def _open_writer_connection(self) -> sqlite3.Connection:
        return open_wal(self._writer_connect(), self.path, self._migrate)

    def _writer_connect(self) -> sqlite3.Connection:
        conn = self._connect()
        # A write inside a SAVEPOINT (each item of a batch, each merged run) copies every page it changes to
        # the sub-journal first, which spills from memory to a temp file past 64 KiB: a file created,
        # written and unlinked per batch, about one pwrite() per page the batch changes. In memory it
        # costs no syscall; it holds at most the pages one batch changes, and is not part of durability
        # (the WAL is; a crash mid-batch loses the uncommitted batch either way).
        conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    def _checkpointer_main(self) -> None:
        """Copy committed WAL frames into the database file every `_CHECKPOINT_EVERY_S`, on a connection
        of its own. SQLite would otherwise checkpoint inside the commit that crosses 1,000 WAL pages: that
        commit (and every payment waiting on its group) would pay for copying and fsyncing the file.
        PASSIVE never blocks the writers or readers; the WAL restarts from its start once fully copied."""
        try:
            conn = self._connect()
        except sqlite3.Error:
            log.exception("sqlite checkpointer cannot connect; the writer's auto-checkpoint takes over")
            return
        try:
            while not self._checkpoint_stop.wait(_CHECKPOINT_EVERY_S):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.stats.checkpoints += 1
                except sqlite3.Error:
                    log.warning("sqlite checkpoint failed; retrying", exc_info=True)
        finally:
            conn.close()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # The version is read under the write lock so two processes starting at once cannot both apply.
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > len(self._migrations):
                raise RuntimeError(
                    f"{self.path} has schema version {current}, newer than this code "
                    f"({len(self._migrations)}): refusing to run against it"
                )
            for migration in self._migrations[current:]:
                for statement in split_statements(migration.sql):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {migration.version}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ writes

    async def insert_payment(
        self, payment: Payment, events: Sequence[OutboxEvent] = (), *, ledger: Sequence[LedgerEntry] = (),
        retry_failed_order: bool = False,
    ) -> None:
        row = (
            payment.id, payment.merchant_id, payment.merchant_order_id, payment.status.value,
            payment.amount, payment.currency, payment.version, _ts(payment.created_at),
            _ts(payment.updated_at), _encode(payment),
        )
        await self._submit(payment, row, None, events, ledger, retry_failed_order=retry_failed_order)

    async def update_payment(
        self, payment: Payment, expected_version: int, events: Sequence[OutboxEvent] = (),
        *, ledger: Sequence[LedgerEntry] = (),
    ) -> None:
        check_next_version(payment, expected_version)
        row = (
            payment.status.value, payment.amount, payment.currency, payment.version,
            _ts(payment.updated_at), _encode(payment), payment.id, expected_version,
        )
        await self._submit(payment, row, expected_version, events, ledger)

    async def _submit(
        self, payment: Payment, row: _Row, expected_version: int | None, events: Sequence[OutboxEvent],
        ledger: Sequence[LedgerEntry] = (), *, retry_failed_order: bool = False,
    ) -> None:
        if self._state != "running" or self._writer is None or not self._writer.alive():
            raise RuntimeError(f"SqliteStore is {self._state} (or its writer thread died)")
        # Rows are built here, on the caller, so a bad value (naive datetime) fails this write only.
        loop = asyncio.get_running_loop()
        children = child_rows(payment, events, ledger, _ts)
        write = _Write(
            payment_row=row,
            key=(payment.id, payment.merchant_id, payment.merchant_order_id),
            expected_version=expected_version,
            attempts=children.attempts,
            operations=children.operations,
            outbox=children.outbox,
            ledger=children.ledger,
            retry_failed_order=retry_failed_order,
        )
        job: _Job[None] = _Job(partial(_apply_write, write), loop, loop.create_future(), write, _apply_writes)
        self._writer.submit(job)
        await job.future

    # ------------------------------------------------------------------ reads

    async def ping(self) -> None:
        if self._writer is None or not self._writer.alive() or self._outbox is None or not self._outbox.alive():
            raise RuntimeError("SqliteStore writer thread is not running")
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def get_payment(self, payment_id: str) -> Payment | None:
        return await self._read_payment("SELECT doc FROM payments WHERE id = ?", (payment_id,))

    async def find_by_order(self, merchant_id: str, merchant_order_id: str) -> Payment | None:
        return await self._read_payment(
            "SELECT doc FROM payments WHERE merchant_id = ? AND merchant_order_id = ? "
            "ORDER BY order_attempt DESC LIMIT 1",
            (merchant_id, merchant_order_id),
        )

    async def list_by_status(
        self, statuses: Sequence[Status], updated_before: datetime, limit: int = 100
    ) -> list[Payment]:
        """Oldest first, so a janitor working through them in pages makes progress."""
        if not statuses:
            return []
        marks = ",".join("?" * len(statuses))
        sql = (
            f"SELECT doc FROM payments WHERE status IN ({marks}) AND updated_at < ? "
            "ORDER BY updated_at, id LIMIT ?"
        )
        params = (*(Status(s).value for s in statuses), _ts(updated_before), limit)
        rows = await self._read(lambda conn: conn.execute(sql, params).fetchall())
        return [_decode_payment(row[0]) for row in rows]

    async def list_pending_operations(self, created_before: datetime, limit: int = 100) -> list[Payment]:
        sql = (
            "SELECT doc FROM payments WHERE id IN (SELECT payment_id FROM operations WHERE status = 'pending' "
            "AND created_at < ? ORDER BY created_at LIMIT ?)"
        )
        params = (_ts(created_before), limit)
        rows = await self._read(lambda conn: conn.execute(sql, params).fetchall())
        return [_decode_payment(row[0]) for row in rows]

    async def outbox_events(self, payment_id: str) -> list[OutboxEvent]:
        """In commit order (rowid), which is creation order for one payment's events."""
        sql = (
            "SELECT id, merchant_id, payment_id, type, payload, created_at FROM outbox "
            "WHERE payment_id = ? ORDER BY rowid"
        )
        rows = await self._read(lambda conn: conn.execute(sql, (payment_id,)).fetchall())
        return [
            OutboxEvent(
                id=r[0], merchant_id=r[1], payment_id=r[2], type=r[3], payload=bytes(r[4]),
                created_at=datetime.fromisoformat(r[5]),
            )
            for r in rows
        ]

    async def record_callback(
        self, channel: str, event_id: str, payload: bytes, payment_id: str | None, received_at: datetime
    ) -> str | None:
        def work(conn: sqlite3.Connection) -> str | None:
            inserted = conn.execute(
                "INSERT INTO channel_callbacks (channel, event_id, received_at, payment_id, payload) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (channel, event_id, _ts(received_at), payment_id, payload),
            ).rowcount
            if inserted:
                return None
            row = conn.execute(
                "SELECT outcome FROM channel_callbacks WHERE channel = ? AND event_id = ?", (channel, event_id)
            ).fetchone()
            return str(row[0] or "")

        return await self._outbox_write(work)

    async def set_callback_outcome(self, channel: str, event_id: str, outcome: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE channel_callbacks SET outcome = ? WHERE channel = ? AND event_id = ?",
                         (outcome, channel, event_id))

        await self._outbox_write(work)

    async def _read_payment(self, sql: str, params: _Row) -> Payment | None:
        row = await self._read(lambda conn: conn.execute(sql, params).fetchone())
        return None if row is None else _decode_payment(row[0])

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        if self._state != "running" or self._reader_pool is None:
            raise RuntimeError(f"SqliteStore is {self._state}")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader_pool, self._on_reader, query)

    def _on_reader(self, query: Callable[[sqlite3.Connection], T]) -> T:
        # One connection per reader thread, opened on first use; query_only guards against a stray write.
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = ON")
            self._reader_local.conn = conn
            with self._reader_conns_lock:
                self._reader_conns.append(conn)
        return query(conn)

    # ------------------------------------------------------------------ webhook outbox (OutboxStore)

    async def _outbox_write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on the outbox writer, in its own SAVEPOINT of a group-committed transaction;
        returns its result once that transaction has committed (or raises; then nothing of it was)."""
        if self._state != "running" or self._outbox is None:
            raise RuntimeError(f"SqliteStore is {self._state}")
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(work, loop, loop.create_future())
        self._outbox.submit(job)
        return await job.future

    async def sync_webhook_endpoints(self, endpoints: Sequence[WebhookEndpointRow], now: datetime) -> None:
        rows = [(e.id, e.merchant_id, e.url, _ts(now)) for e in endpoints]

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO webhook_endpoints (id, merchant_id, url, updated_at) VALUES (?,?,?,?) "
                "ON CONFLICT (id) DO UPDATE SET merchant_id=excluded.merchant_id, url=excluded.url",
                rows,
            )

        await self._outbox_write(work)

    async def list_webhook_endpoints(self) -> list[WebhookEndpointRow]:
        rows = await self._read(lambda c: c.execute(f"SELECT {_ENDPOINT_COLS} FROM webhook_endpoints ORDER BY id").fetchall())
        return [_endpoint(r) for r in rows]

    async def set_webhook_endpoint_state(
        self, endpoint_id: str, state: EndpointStatus, now: datetime, reason: str | None = None
    ) -> WebhookEndpointRow | None:
        def work(conn: sqlite3.Connection) -> WebhookEndpointRow | None:
            row = conn.execute(f"SELECT {_ENDPOINT_COLS} FROM webhook_endpoints WHERE id = ?", (endpoint_id,)).fetchone()
            if row is None:
                return None
            ep = manual_endpoint_state(_endpoint(row), state, now, reason)
            _write_endpoint(conn, ep)
            return ep

        return await self._outbox_write(work)

    async def fan_out_events(
        self, endpoints_by_merchant: Mapping[str, Sequence[str]], now: datetime, limit: int = 500
    ) -> int:
        stamp = _ts(now)

        def work(conn: sqlite3.Connection) -> int:
            events = conn.execute(
                "SELECT rowid, id, merchant_id, payment_id, type, created_at FROM outbox "
                "WHERE fanned_out_at IS NULL ORDER BY rowid LIMIT ?",
                (limit,),
            ).fetchall()
            deliveries = [
                (eid, ep, merchant, payment, seq, etype, created, stamp)
                for seq, eid, merchant, payment, etype, created in events
                for ep in endpoints_by_merchant.get(merchant, ())
            ]
            conn.executemany(
                "INSERT INTO webhook_deliveries (event_id, endpoint_id, merchant_id, payment_id, seq, type, "
                "created_at, next_attempt_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                deliveries,
            )
            conn.executemany("UPDATE outbox SET fanned_out_at = ? WHERE rowid = ?", [(stamp, e[0]) for e in events])
            return len(events)

        return await self._outbox_write(work)

    async def claim_deliveries(
        self, endpoint_id: str, now: datetime, lease_until: datetime, owner: str, limit: int
    ) -> list[DeliveryClaim]:
        def work(conn: sqlite3.Connection) -> list[DeliveryClaim]:
            active = conn.execute(
                "SELECT 1 FROM webhook_endpoints WHERE id = ? AND state = 'active'", (endpoint_id,)
            ).fetchone()
            if active is None or limit <= 0:
                return []
            return _sqlite_claim(conn, endpoint_id, now, lease_until, owner, limit)

        return await self._outbox_write(work)

    async def claim_probe(
        self, endpoint_id: str, now: datetime, next_probe_at: datetime, lease_until: datetime, owner: str
    ) -> DeliveryClaim | None:
        def work(conn: sqlite3.Connection) -> DeliveryClaim | None:
            moved = conn.execute(
                "UPDATE webhook_endpoints SET paused_until = ?, updated_at = ? "
                "WHERE id = ? AND state = 'paused' AND (paused_until IS NULL OR paused_until <= ?)",
                (_ts(next_probe_at), _ts(now), endpoint_id, _ts(now)),
            ).rowcount
            if not moved:
                return None
            claims = _sqlite_claim(conn, endpoint_id, now, lease_until, owner, 1)
            return claims[0] if claims else None

        return await self._outbox_write(work)

    async def finish_attempt(
        self, claim: DeliveryClaim, attempt: WebhookAttemptRow, update: DeliveryUpdate,
        decide: EndpointDecision, now: datetime,
    ) -> tuple[WebhookEndpointRow, WebhookEndpointRow] | None:
        # Rows built here, on the caller: a bad value fails this call only, before anything is queued.
        if self._state != "running" or self._outbox is None:
            raise RuntimeError(f"SqliteStore is {self._state}")
        stamp = _ts(now)
        args = _Finish(
            claim=claim, decide=decide, now=now,
            delivery=(update.status, _ts(update.next_attempt_at), update.status, stamp, update.status, stamp,
                      attempt.status_code, attempt.error, claim.event_id, claim.endpoint_id, claim.lease_owner,
                      claim.attempts),
            attempt=(attempt.event_id, attempt.endpoint_id, attempt.attempt, _ts(attempt.started_at),
                     attempt.latency_ms, attempt.outcome, attempt.status_code, attempt.error,
                     attempt.response_snippet),
            outbox=(update.status, claim.event_id, stamp, claim.event_id),
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        job: _Job[_Finished] = _Job(partial(_finish_one, args), loop, loop.create_future(), args, _finish_many)
        self._outbox.submit(job)
        return await job.future

    async def next_webhook_due(self, now: datetime) -> datetime | None:
        def query(conn: sqlite3.Connection) -> tuple[object, object]:
            due = conn.execute(
                "SELECT min(max(d.next_attempt_at, coalesce(d.locked_until, ''))) FROM webhook_deliveries d "
                "JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.state = 'active' "
                "WHERE d.status = 'pending' AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p "
                "WHERE p.endpoint_id = d.endpoint_id AND p.payment_id = d.payment_id AND p.status = 'pending' "
                "AND p.seq < d.seq)"
            ).fetchone()[0]
            probe = conn.execute(
                "SELECT min(coalesce(e.paused_until, '')) FROM webhook_endpoints e WHERE e.state = 'paused' "
                "AND EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.endpoint_id = e.id AND d.status = 'pending')"
            ).fetchone()[0]
            return due, probe

        due, probe = await self._read(query)
        found = [_dt(v) or now for v in (due, probe) if v is not None]
        return min(found) if found else None

    async def list_webhook_deliveries(
        self, *, status: DeliveryStatus | None = None, endpoint_id: str | None = None,
        merchant_id: str | None = None, since: datetime | None = None, until: datetime | None = None,
        limit: int = 100,
    ) -> list[WebhookDeliveryRow]:
        where, params = _delivery_filter(status, endpoint_id, merchant_id, since, until)
        sql = f"SELECT {_DELIVERY_COLS} FROM webhook_deliveries {where} ORDER BY created_at DESC, seq DESC LIMIT ?"
        rows = await self._read(lambda c: c.execute(sql, (*params, limit)).fetchall())
        return [_delivery(r) for r in rows]

    async def get_webhook_deliveries(self, event_id: str) -> list[WebhookDeliveryRow]:
        sql = f"SELECT {_DELIVERY_COLS} FROM webhook_deliveries WHERE event_id = ? ORDER BY endpoint_id"
        rows = await self._read(lambda c: c.execute(sql, (event_id,)).fetchall())
        return [_delivery(r) for r in rows]

    async def webhook_attempts(self, event_id: str) -> list[WebhookAttemptRow]:
        sql = (
            "SELECT event_id, endpoint_id, attempt, started_at, latency_ms, outcome, status_code, error, "
            "response_snippet FROM webhook_attempts WHERE event_id = ? ORDER BY started_at, endpoint_id, attempt"
        )
        rows = await self._read(lambda c: c.execute(sql, (event_id,)).fetchall())
        return [
            WebhookAttemptRow(event_id=r[0], endpoint_id=r[1], attempt=r[2], started_at=_dt_req(r[3]),
                              latency_ms=r[4], outcome=r[5], status_code=r[6], error=r[7], response_snippet=r[8])
            for r in rows
        ]

    async def redrive_deliveries(
        self, now: datetime, *, event_id: str | None = None, endpoint_id: str | None = None,
        since: datetime | None = None, until: datetime | None = None,
    ) -> int:
        where, params = _delivery_filter("dead", endpoint_id, None, since, until)
        if event_id is not None:
            where += " AND event_id = ?"
            params.append(event_id)
        sql = (
            "UPDATE webhook_deliveries SET status = 'pending', round_attempts = 0, next_attempt_at = ?, "
            f"dead_at = NULL, locked_until = NULL, lease_owner = NULL {where}"
        )

        def work(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, (_ts(now), *params)).rowcount

        return await self._outbox_write(work)


_ENDPOINT_COLS = (
    "id, merchant_id, url, state, consecutive_failures, failing_since, paused_until, disabled_reason, updated_at"
)
_DELIVERY_COLS = (
    "event_id, endpoint_id, merchant_id, payment_id, type, status, attempts, round_attempts, created_at, "
    "next_attempt_at, delivered_at, dead_at, last_status_code, last_error, locked_until"
)


def _dt(value: object) -> datetime | None:
    return None if value is None or value == "" else datetime.fromisoformat(str(value))


def _dt_req(value: object) -> datetime:
    dt = _dt(value)
    if dt is None:
        raise ValueError("missing timestamp")
    return dt


def _endpoint(r: _Row) -> WebhookEndpointRow:
    return WebhookEndpointRow(
        id=str(r[0]), merchant_id=str(r[1]), url=str(r[2]), state=str(r[3]), consecutive_failures=int(str(r[4])),
        failing_since=_dt(r[5]), paused_until=_dt(r[6]), disabled_reason=None if r[7] is None else str(r[7]),
        updated_at=_dt(r[8]),
    )


def _write_endpoint(conn: sqlite3.Connection, ep: WebhookEndpointRow) -> None:
    conn.execute(
        "UPDATE webhook_endpoints SET state = ?, consecutive_failures = ?, failing_since = ?, paused_until = ?, "
        "disabled_reason = ?, updated_at = ? WHERE id = ?",
        (ep.state, ep.consecutive_failures, None if ep.failing_since is None else _ts(ep.failing_since),
         None if ep.paused_until is None else _ts(ep.paused_until), ep.disabled_reason,
         _ts(ep.updated_at or datetime.now(UTC)), ep.id),
    )


def _delivery(r: _Row) -> WebhookDeliveryRow:
    return WebhookDeliveryRow(
        event_id=str(r[0]), endpoint_id=str(r[1]), merchant_id=str(r[2]), payment_id=str(r[3]), type=str(r[4]),
        status=str(r[5]), attempts=int(str(r[6])), round_attempts=int(str(r[7])), created_at=_dt_req(r[8]),
        next_attempt_at=_dt_req(r[9]), delivered_at=_dt(r[10]), dead_at=_dt(r[11]),
        last_status_code=None if r[12] is None else int(str(r[12])), last_error=None if r[13] is None else str(r[13]),
        locked_until=_dt(r[14]),
    )


def _delivery_filter(
    status: str | None, endpoint_id: str | None, merchant_id: str | None, since: datetime | None,
    until: datetime | None,
) -> tuple[str, list[object]]:
    clauses, params = ["1 = 1"], list[object]()
    for column, value in (("status", status), ("endpoint_id", endpoint_id), ("merchant_id", merchant_id)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        clauses.append("created_at >= ?")
        params.append(_ts(since))
    if until is not None:
        clauses.append("created_at < ?")
        params.append(_ts(until))
    return "WHERE " + " AND ".join(clauses), params


_Finished = tuple[WebhookEndpointRow, WebhookEndpointRow] | None

# The lease check is the UPDATE's own condition: no row updated means the lease was lost.
_FINISH_DELIVERY = (
    "UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1, round_attempts = round_attempts + 1, "
    "next_attempt_at = ?, locked_until = NULL, lease_owner = NULL, "
    "delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END, "
    "dead_at = CASE WHEN ? = 'dead' THEN ? ELSE dead_at END, last_status_code = ?, last_error = ? "
    "WHERE event_id = ? AND endpoint_id = ? AND status = 'pending' AND lease_owner = ? AND attempts = ?"
)
_INSERT_ATTEMPT = (
    "INSERT INTO webhook_attempts (event_id, endpoint_id, attempt, started_at, latency_ms, outcome, "
    "status_code, error, response_snippet) VALUES (?,?,?,?,?,?,?,?,?)"
)
# The event is delivered once every one of its deliveries is.
_FINISH_OUTBOX = (
    "UPDATE outbox SET attempts = attempts + 1, delivered_at = CASE WHEN ? = 'delivered' AND NOT EXISTS "
    "(SELECT 1 FROM webhook_deliveries WHERE event_id = ? AND status <> 'delivered') THEN ? "
    "ELSE delivered_at END WHERE id = ?"
)


@dataclass(frozen=True, slots=True)
class _Finish:
    """One `finish_attempt`, its statement parameters built on the caller."""

    claim: DeliveryClaim
    decide: EndpointDecision
    now: datetime
    delivery: _Row
    attempt: _Row
    outbox: _Row


def _finish_one(f: _Finish, conn: sqlite3.Connection) -> _Finished:
    if conn.execute(_FINISH_DELIVERY, f.delivery).rowcount == 0:
        return None  # not the lease holder (any more): nothing written
    conn.execute(_INSERT_ATTEMPT, f.attempt)
    conn.execute(_FINISH_OUTBOX, f.outbox)
    row = conn.execute(f"SELECT {_ENDPOINT_COLS} FROM webhook_endpoints WHERE id = ?", (f.claim.endpoint_id,)).fetchone()
    before = _endpoint(row) if row is not None else WebhookEndpointRow(
        id=f.claim.endpoint_id, merchant_id=f.claim.merchant_id, url="")
    after = f.decide(before)
    if after != before:
        _write_endpoint(conn, msgspec.structs.replace(after, updated_at=f.now))
    return before, after


def _finish_many(conn: sqlite3.Connection, fs: list[_Finish]) -> list[_Finished]:
    """`_finish_one` over a run, with one executemany per table and one endpoint read and write per
    endpoint. Gives the same rows and results as the run one by one, or raises `_OneByOne` (a lost
    lease or a delivery twice in the run: those cases go the careful way)."""
    if conn.executemany(_FINISH_DELIVERY, [f.delivery for f in fs]).rowcount != len(fs):
        raise _OneByOne  # rowcount sums the rows of every statement: fewer means some lease was lost
    conn.executemany(_INSERT_ATTEMPT, [f.attempt for f in fs])
    conn.executemany(_FINISH_OUTBOX, [f.outbox for f in fs])
    current: dict[str, WebhookEndpointRow] = {}
    changed: set[str] = set()
    results: list[_Finished] = []
    for f in fs:  # the breaker sees the attempts in order, each after the one before, as one by one
        eid = f.claim.endpoint_id
        before = current.get(eid)
        if before is None:
            row = conn.execute(f"SELECT {_ENDPOINT_COLS} FROM webhook_endpoints WHERE id = ?", (eid,)).fetchone()
            if row is None:  # unknown endpoint: every attempt sees a blank one, nothing is stored
                before = WebhookEndpointRow(id=eid, merchant_id=f.claim.merchant_id, url="")
                results.append((before, f.decide(before)))
                continue
            before = _endpoint(row)
        after = f.decide(before)
        if after != before:
            # what a read of the row written one by one would give the next attempt
            current[eid] = msgspec.structs.replace(after, updated_at=f.now)
            changed.add(eid)
        else:
            current[eid] = before
        results.append((before, after))
    for eid in sorted(changed):
        _write_endpoint(conn, current[eid])
    return results


def _sqlite_claim(
    conn: sqlite3.Connection, endpoint_id: str, now: datetime, lease_until: datetime, owner: str, limit: int
) -> list[DeliveryClaim]:
    # One statement: pick the due, unleased rows in (next_attempt_at, seq) order (migration 0006's index
    # gives that order, so this stops at LIMIT), lease them, and return them with their payloads.
    stamp = _ts(now)
    rows = conn.execute(
        "UPDATE webhook_deliveries SET locked_until = ?, lease_owner = ? WHERE endpoint_id = ? AND event_id IN ("
        "SELECT d.event_id FROM webhook_deliveries d WHERE d.endpoint_id = ? AND d.status = 'pending' "
        "AND d.next_attempt_at <= ? AND (d.locked_until IS NULL OR d.locked_until <= ?) "
        "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p WHERE p.endpoint_id = d.endpoint_id "
        "AND p.payment_id = d.payment_id AND p.status = 'pending' AND p.seq < d.seq) "
        "ORDER BY d.next_attempt_at, d.seq LIMIT ?) "
        "RETURNING event_id, endpoint_id, merchant_id, payment_id, type, "
        "(SELECT o.payload FROM outbox o WHERE o.id = webhook_deliveries.event_id), attempts, round_attempts, "
        "next_attempt_at, seq",
        (_ts(lease_until), owner, endpoint_id, endpoint_id, stamp, stamp, limit),
    ).fetchall()
    rows.sort(key=lambda r: (r[8], r[9]))  # RETURNING comes in no particular order
    return [
        DeliveryClaim(
            event_id=r[0], endpoint_id=r[1], merchant_id=r[2], payment_id=r[3], type=r[4], payload=bytes(r[5]),
            attempts=r[6], round_attempts=r[7], lease_owner=owner,
        )
        for r in rows
    ]
