"""Idempotency records of the embedded mode, on disk: memory stays flat however many keys a day brings.

The semantics are those of `router.idempotency` (Stripe's). What lives where:
- in-flight claims stay in process (a dict bounded by the requests running now); an unfinished claim
  lapses after `in_flight_ttl_s`, like the other stores;
- finished responses go to a SQLite file of their own (`<payments db stem>-idempotency.db`), written by
  one thread in batches (one transaction for everything queued meanwhile) and read through one reader
  thread, so the event loop never touches the disk. The loop hands the writer what finished within
  `_HANDOVER_S` as one item (one thread wake-up per batch, not per response). Until its batch has
  committed a response is also kept in process, so a replay never misses it;
- expired records are deleted in the background (at most once a minute, in bounded chunks);
- a Bloom filter of the keys on disk (about 1.2 MB per million keys, filled from the file at start)
  spares the disk lookup for a key never seen, which is nearly every request; a false positive (about
  1 %) costs one lookup, and there are no false negatives.

The file uses WAL with `synchronous=NORMAL`, and a record is committed by its batch just after its
response went out (handed over every `_HANDOVER_S`, 20 ms): a crash (`kill -9`, a power cut) can lose
the last few tens of milliseconds of records. That is
safe for money: the payment itself is in the durable record (`synchronous=FULL`, committed before the
response), and a retry whose record was lost meets the unique `(merchant, merchant_order_id)` there and
gets `409 duplicate_merchant_order_id` naming the payment, never a second charge (the same as Redis
losing its keys in scale-out mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from router.idempotency import Claim, StoredResponse, key_in_use, key_reused
from router.store.sqlite import open_wal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_records (
    merchant_id  TEXT NOT NULL,
    key          TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    status       INTEGER NOT NULL,
    body         BLOB NOT NULL,
    content_type TEXT NOT NULL,
    expires_at   REAL NOT NULL,
    PRIMARY KEY (merchant_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_records_expiry ON idempotency_records (expires_at);
"""
# a second complete never replaces the first; an expired row is replaced by the new record
_UPSERT = (
    "INSERT INTO idempotency_records VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (merchant_id, key) DO UPDATE SET fingerprint = excluded.fingerprint, status = excluded.status, "
    "body = excluded.body, content_type = excluded.content_type, expires_at = excluded.expires_at "
    "WHERE idempotency_records.expires_at <= excluded.expires_at - ?"
)
_LOOKUP = (
    "SELECT fingerprint, status, body, content_type, expires_at FROM idempotency_records "
    "WHERE merchant_id = ? AND key = ? AND expires_at > ?"
)
_REAP = (
    "DELETE FROM idempotency_records WHERE (merchant_id, key) IN "
    "(SELECT merchant_id, key FROM idempotency_records WHERE expires_at <= ? LIMIT ?)"
)
_LIVE_KEYS = "SELECT merchant_id, key FROM idempotency_records WHERE expires_at > ?"
_REAP_CHUNK = 10_000
# Finished records wait this long on the loop, then go to the writer together: every wake-up of the
# writer thread (which then competes for the GIL) and every commit cost the loop CPU, so fewer and
# larger batches are cheaper (measured: 2 ms -> 20 ms, about -2 to -6 % CPU per payment). A crash loses
# at most the records of this window and of the commit running.
_HANDOVER_S = 0.02
log = logging.getLogger("payroute.idempotency")
_STOP = object()


class _Reap:
    """A request to the writer: delete what expired by `now` (a type of its own, never mistaken for a row)."""

    __slots__ = ("now",)

    def __init__(self, now: float) -> None:
        self.now = now

_Row = tuple[str, str, str, int, bytes, str, float, float]


class _Generation:
    __slots__ = ("bits", "count", "opened", "last")

    def __init__(self, size_bits: int, now: float) -> None:
        self.bits = bytearray(size_bits // 8 + 1)
        self.count = 0
        self.opened = now
        self.last = now


class KeyFilter:
    """Which (merchant, key) pairs may have a record: never a false negative; ~1 % false positives.

    Keys go into the newest generation (a Bloom filter of `capacity` keys, 10 bits and 7 hashes per
    key); a full generation, or one older than a quarter of the TTL, is followed by a new one, and a
    generation is dropped once the last key added to it has expired. Hashes are Python's (per process),
    so the filter is rebuilt from the file at every start."""

    _HASHES = 7

    def __init__(self, ttl_s: float, capacity: int = 100_000) -> None:
        self._ttl = ttl_s
        self._capacity = capacity
        self._size = capacity * 10
        self._gens: list[_Generation] = []

    def _positions(self, merchant_id: str, key: str) -> list[int]:
        h = hash((merchant_id, key)) & 0xFFFFFFFFFFFFFFFF
        h2 = (h >> 32) | 1
        m = self._size
        return [(h + i * h2) % m for i in range(self._HASHES)]

    def add(self, merchant_id: str, key: str, now: float) -> None:
        gens = self._gens
        if not gens or gens[-1].count >= self._capacity or now - gens[-1].opened > self._ttl / 4:
            gens.append(_Generation(self._size, now))
        gen = gens[-1]
        bits = gen.bits
        for p in self._positions(merchant_id, key):
            bits[p >> 3] |= 1 << (p & 7)
        gen.count += 1
        gen.last = max(gen.last, now)

    def may_contain(self, merchant_id: str, key: str) -> bool:
        if not self._gens:
            return False
        positions = self._positions(merchant_id, key)
        return any(all(g.bits[p >> 3] & (1 << (p & 7)) for p in positions) for g in self._gens)

    def expire(self, now: float) -> None:
        """Drop the generations whose every key has expired (`now` on the clock the keys were added by)."""
        self._gens = [g for g in self._gens if g.last + self._ttl > now]

    @property
    def generations(self) -> int:
        return len(self._gens)


def sidecar_path(payments_db: Path) -> Path:
    """Where the embedded idempotency records live, next to the payments database."""
    return payments_db.with_name(f"{payments_db.stem}-idempotency{payments_db.suffix or '.db'}")


class _InFlight:
    __slots__ = ("fingerprint", "expires_at")

    def __init__(self, fingerprint: str, expires_at: float) -> None:
        self.fingerprint = fingerprint
        self.expires_at = expires_at


class SqliteIdempotencyStore:
    """Finished responses in a SQLite file; in-flight claims in process. Call `start()` before use."""

    def __init__(
        self, path: Path, ttl_s: float = 24 * 3600, clock: Callable[[], float] = time.time,
        in_flight_ttl_s: float = 120, reap_every_s: float = 60,
    ) -> None:
        self.path = path
        self._ttl = ttl_s
        self._in_flight_ttl = in_flight_ttl_s
        self._clock = clock
        self._reap_every = reap_every_s
        self._next_reap = 0.0
        self._in_flight: dict[tuple[str, str], _InFlight] = {}
        self._filter = KeyFilter(ttl_s)
        # finished but not yet committed: (fingerprint, response, expires_at)
        self._unflushed: dict[tuple[str, str], tuple[str, StoredResponse, float]] = {}
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._handover: list[_Row] = []  # finished on the loop, not yet given to the writer
        self._handover_timer: asyncio.TimerHandle | None = None
        self._writer: threading.Thread | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._reader_conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Future[None] | None = None
        self.write_errors = 0
        self._next_error_log = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the file (created with its table if new) and start the threads; `claim` calls it if needed."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        conn = await asyncio.to_thread(self._open)
        await asyncio.to_thread(self._load_filter, conn, self._clock())
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="payroute-idempotency-read")
        writer = threading.Thread(target=self._writer_main, args=(conn,), name="payroute-idempotency-write", daemon=True)
        writer.start()
        self._writer = writer

    async def close(self) -> None:
        """Commit what is queued, then stop the threads."""
        if self._writer is None:
            return
        self._hand_over()
        self._queue.put(_STOP)
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        self._starting = None
        await asyncio.to_thread(writer.join)
        if reader is not None:
            await asyncio.to_thread(reader.shutdown, True)
        if self._reader_conn is not None:
            self._reader_conn.close()
            self._reader_conn = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _open(self) -> sqlite3.Connection:
        return open_wal(self._connect(), self.path, lambda conn: conn.executescript(_SCHEMA))

    def _load_filter(self, conn: sqlite3.Connection, now: float) -> None:
        for merchant_id, key in conn.execute(_LIVE_KEYS, (now,)):
            self._filter.add(merchant_id, key, now)

    # ------------------------------------------------------------------ the store

    async def claim(self, merchant_id: str, key: str, fingerprint: str) -> Claim:
        now = self._clock()
        self._maybe_reap(now)
        k = (merchant_id, key)
        self._check_in_flight(k, fingerprint, now)
        done = self._unflushed.get(k)
        if done is None and self._writer is not None and not self._filter.may_contain(merchant_id, key):
            pass  # never finished here within the TTL: no need to ask the disk
        elif done is None:
            if self._writer is None:
                await self.start()
                self._check_in_flight(k, fingerprint, now)
            assert self._reader is not None
            loop = asyncio.get_running_loop()
            row = await loop.run_in_executor(self._reader, self._lookup, merchant_id, key, now)
            # the loop ran meanwhile: another request may have claimed or finished this key
            self._check_in_flight(k, fingerprint, now)
            done = self._unflushed.get(k) or row
        if done is not None and done[2] > now:
            if done[0] != fingerprint:
                raise key_reused()
            return Claim(replay=done[1])
        self._in_flight[k] = _InFlight(fingerprint, now + self._in_flight_ttl)
        return Claim()

    def _check_in_flight(self, k: tuple[str, str], fingerprint: str, now: float) -> None:
        rec = self._in_flight.get(k)
        if rec is None:
            return
        if rec.expires_at <= now:  # its request died without complete or release
            del self._in_flight[k]
            return
        if rec.fingerprint != fingerprint:
            raise key_reused()
        raise key_in_use()

    async def complete(self, merchant_id: str, key: str, response: StoredResponse) -> None:
        k = (merchant_id, key)
        rec = self._in_flight.pop(k, None)
        if rec is None:  # no claim (or it lapsed and was given to another request): keep nothing
            return
        now = self._clock()
        expires_at = now + self._ttl
        self._filter.add(merchant_id, key, now)
        self._unflushed[k] = (rec.fingerprint, response, expires_at)
        self._handover.append((merchant_id, key, rec.fingerprint, response.status, response.body,
                               response.content_type, expires_at, self._ttl))
        if self._handover_timer is None:
            self._handover_timer = asyncio.get_running_loop().call_later(_HANDOVER_S, self._hand_over)

    def _hand_over(self) -> None:
        """Give the writer what finished since the last hand-over, as one queue item."""
        if self._handover_timer is not None:
            self._handover_timer.cancel()
            self._handover_timer = None
        if self._handover:
            rows, self._handover = self._handover, []
            self._queue.put(rows)

    async def release(self, merchant_id: str, key: str) -> None:
        self._in_flight.pop((merchant_id, key), None)

    def __len__(self) -> int:
        """Records in process (in flight and not yet committed): what memory holds, not what disk holds."""
        return len(self._in_flight) + len(self._unflushed)

    # ------------------------------------------------------------------ threads

    def _lookup(self, merchant_id: str, key: str, now: float) -> tuple[str, StoredResponse, float] | None:
        if self._reader_conn is None:
            self._reader_conn = self._connect()
            self._reader_conn.execute("PRAGMA query_only = ON")
        row = self._reader_conn.execute(_LOOKUP, (merchant_id, key, now)).fetchone()
        if row is None:
            return None
        return row[0], StoredResponse(int(row[1]), bytes(row[2]), row[3]), float(row[4])

    def _maybe_reap(self, now: float) -> None:
        if now < self._next_reap:
            return
        self._next_reap = now + self._reap_every
        self._in_flight = {k: r for k, r in self._in_flight.items() if r.expires_at > now}
        self._filter.expire(now)
        self._queue.put(_Reap(now))

    def _writer_main(self, conn: sqlite3.Connection) -> None:
        try:
            stopping = False
            while not stopping:
                rows: list[_Row] = []
                reaps: list[float] = []
                item = self._queue.get()
                while True:
                    if item is _STOP:
                        stopping = True
                        break
                    if isinstance(item, _Reap):
                        reaps.append(item.now)
                    else:
                        assert isinstance(item, list)
                        rows.extend(item)
                    if len(rows) >= 1024:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                self._write(conn, rows, reaps)
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, rows: list[_Row], reaps: list[float]) -> None:
        try:
            if rows:
                with conn:
                    conn.execute("BEGIN")
                    conn.executemany(_UPSERT, rows)
            for now in reaps[-1:]:
                while True:
                    with conn:
                        conn.execute("BEGIN")
                        deleted = conn.execute(_REAP, (now, _REAP_CHUNK)).rowcount
                    if deleted < _REAP_CHUNK:
                        break
        except sqlite3.Error:
            # not fatal: the records stay in process until a later batch commits them
            self.write_errors += 1
            if time.monotonic() >= self._next_error_log:
                self._next_error_log = time.monotonic() + 10
                log.warning("idempotency records not written yet (kept in memory, retried)", exc_info=True,
                            extra={"path": str(self.path), "pending": len(rows), "errors": self.write_errors})
            if rows:
                self._queue.put(rows)
                time.sleep(0.1)
            return
        if rows and self._loop is not None:
            keys = [(r[0], r[1]) for r in rows]
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody needs the cache any more
                self._loop.call_soon_threadsafe(self._flushed, keys)

    def _flushed(self, keys: list[tuple[str, str]]) -> None:
        for k in keys:
            self._unflushed.pop(k, None)
