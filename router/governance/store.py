"""`GovernanceStore`: admins, grants, change requests, governed objects and the audit chain.

Contract:
- Every state change is one `Commit`, applied in one transaction: the request row (a compare-and-set
  on its `version`), a review's TOTP step (accepted once per admin), admin/grant/object rows (objects
  by compare-and-set on their version) and the audit entries describing the change, chained in that
  same transaction. Nothing of a commit that fails is kept.
- `RequestConflict` / `ObjectConflict`: someone else moved the request / object first.
  `OpenRequestExists`: the object already has an open request. `CodeReplayed`: that TOTP step of
  that admin was used before.
- Writes are serialised (SQLite: one connection under `BEGIN IMMEDIATE`; PostgreSQL: an advisory
  transaction lock), so the audit chain has exactly one successor per entry.
- Its own tables and migrations (`router/governance/migrations/{sqlite,postgres}`), tracked in
  `governance_schema_version`, apart from the payment store's.
- No sqlite call runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import msgspec

from router.errors import StoreUnavailable, VersionConflict
from router.governance import audit
from router.governance.model import (
    Admin,
    AuditDraft,
    AuditEntry,
    ChangeRequest,
    Grant,
    RequestStatus,
    SignedHead,
)
from router.store.schema import Migration, split_statements
from router.store.schema import load_migrations as _load_migrations

T = TypeVar("T")
Row = tuple[Any, ...]

# "payroute-gov" as a number: serialises governance writes (and so audit appends) across instances
GOVERNANCE_LOCK_KEY = 0x7072_676F_7665_726E
OPEN = (RequestStatus.PENDING.value, RequestStatus.APPLYING.value)


class RequestConflict(VersionConflict):
    """The change request is no longer at the expected version."""


class ObjectConflict(VersionConflict):
    """The governed object is no longer at the expected version (stale)."""


class OpenRequestExists(Exception):
    """The object already has an open (pending or applying) request."""


class CodeReplayed(Exception):
    """This admin's TOTP step was accepted before."""


class ObjectWrite(NamedTuple):
    kind: str
    object_id: str
    expected_version: int  # 0: the object must not exist yet
    doc: bytes


class StoredObject(NamedTuple):
    version: int
    doc: bytes


@dataclass
class Commit:
    request: ChangeRequest | None = None
    expected_request_version: int | None = None  # None: insert the request
    totp_use: tuple[str, int] | None = None  # (admin id, time step)
    admins: list[Admin] = field(default_factory=list)
    grants: list[Grant] = field(default_factory=list)
    objects: list[ObjectWrite] = field(default_factory=list)
    audit: list[AuditDraft] = field(default_factory=list)


class GovernanceStore(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def commit(self, c: Commit) -> list[AuditEntry]:
        """Apply everything in `c` atomically; returns the audit entries as chained."""

    async def get_admin(self, admin_id: str) -> Admin | None: ...

    async def admin_by_token(self, token_sha256: str) -> Admin | None: ...

    async def list_admins(self) -> list[Admin]: ...

    async def grants(self, admin_id: str | None = None) -> list[Grant]: ...

    async def get_request(self, request_id: str) -> ChangeRequest | None: ...

    async def list_requests(self, status: str | None = None, limit: int = 100) -> list[ChangeRequest]: ...

    async def get_object(self, kind: str, object_id: str) -> StoredObject | None: ...

    async def list_objects(self, kind: str) -> list[tuple[str, StoredObject]]: ...

    async def audit_rows(self, after_seq: int = 0, limit: int | None = None) -> list[audit.StoredEntry]: ...

    async def record_head(self, key: bytes | None, at_: Any) -> SignedHead | None:
        """Sign and keep the current head (None when the log is empty)."""

    async def heads(self) -> list[SignedHead]: ...


_enc = msgspec.json.Encoder().encode
_dec_admin = msgspec.json.Decoder(Admin).decode
_dec_grant = msgspec.json.Decoder(Grant).decode
_dec_request = msgspec.json.Decoder(ChangeRequest).decode
_dec_head = msgspec.json.Decoder(SignedHead).decode


def load_migrations(dialect: str) -> list[Migration]:
    return _load_migrations("router.governance", dialect)


class _Tx(Protocol):
    async def execute(self, sql: str, *params: Any) -> int: ...

    async def fetchone(self, sql: str, *params: Any) -> Row | None: ...

    async def fetchall(self, sql: str, *params: Any) -> list[Row]: ...


class _SqlStore:
    """The queries, written once (`?` placeholders); subclasses supply connections and transactions."""

    def _transaction(self) -> contextlib.AbstractAsyncContextManager[_Tx]:
        raise NotImplementedError

    def _reader(self) -> contextlib.AbstractAsyncContextManager[_Tx]:
        raise NotImplementedError

    # ------------------------------------------------------------------ writes

    async def commit(self, c: Commit) -> list[AuditEntry]:
        async with self._transaction() as tx:
            if c.totp_use is not None:
                n = await tx.execute(
                    "INSERT INTO governance_totp_used (admin_id, step) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    *c.totp_use,
                )
                if n == 0:
                    raise CodeReplayed(f"admin {c.totp_use[0]}: this TOTP code was already used")
            if c.request is not None:
                await self._write_request(tx, c.request, c.expected_request_version)
            for a in c.admins:
                await tx.execute(
                    "INSERT INTO governance_admins (id, token_sha256, doc) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE "
                    "SET token_sha256 = excluded.token_sha256, doc = excluded.doc",
                    a.id, a.token_sha256, _enc(a),
                )  # fmt: skip
            for g in c.grants:
                await tx.execute(
                    "INSERT INTO governance_grants (id, admin_id, role, doc) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
                    "SET doc = excluded.doc",
                    g.id, g.admin_id, g.role.value, _enc(g),
                )  # fmt: skip
            for o in c.objects:
                if o.expected_version == 0:
                    n = await tx.execute(
                        "INSERT INTO governance_objects (kind, object_id, version, doc) VALUES (?, ?, 1, ?) ON CONFLICT DO NOTHING",
                        o.kind, o.object_id, o.doc,
                    )  # fmt: skip
                else:
                    n = await tx.execute(
                        "UPDATE governance_objects SET version = ?, doc = ? WHERE kind = ? AND object_id = ? AND version = ?",
                        o.expected_version + 1, o.doc, o.kind, o.object_id, o.expected_version,
                    )  # fmt: skip
                if n == 0:
                    raise ObjectConflict(
                        f"{o.kind}:{o.object_id} is no longer at version {o.expected_version}"
                    )
            return await self._append_audit(tx, c.audit)

    async def _write_request(self, tx: _Tx, r: ChangeRequest, expected: int | None) -> None:
        if expected is None:
            n = await tx.execute(
                "INSERT INTO governance_requests (id, kind, object_id, status, version, doc) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                r.id, r.kind.value, r.object_id, r.status.value, r.version, _enc(r),
            )  # fmt: skip
            if n == 0:
                raise OpenRequestExists(f"{r.kind}:{r.object_id} already has an open change request")
            return
        if r.version != expected + 1:
            raise ValueError(f"request {r.id}: version {r.version} must be {expected + 1}")
        n = await tx.execute(
            "UPDATE governance_requests SET status = ?, version = ?, doc = ? WHERE id = ? AND version = ?",
            r.status.value, r.version, _enc(r), r.id, expected,
        )  # fmt: skip
        if n == 0:
            raise RequestConflict(f"request {r.id} is no longer at version {expected}")

    async def _append_audit(self, tx: _Tx, drafts: Sequence[AuditDraft]) -> list[AuditEntry]:
        if not drafts:
            return []
        last = await tx.fetchone("SELECT seq, hash FROM governance_audit ORDER BY seq DESC LIMIT 1")
        seq, prev = (int(last[0]), str(last[1])) if last else (0, audit.GENESIS)
        out = []
        for d in drafts:
            entry = audit.chain(seq, prev, d)
            await tx.execute(
                "INSERT INTO governance_audit (seq, hash, doc) VALUES (?, ?, ?)",
                entry.seq,
                entry.hash,
                audit.encode_entry(entry),
            )
            out.append(entry)
            seq, prev = entry.seq, entry.hash
        return out

    async def record_head(self, key: bytes | None, at_: Any) -> SignedHead | None:
        async with self._transaction() as tx:
            last = await tx.fetchone("SELECT seq, hash FROM governance_audit ORDER BY seq DESC LIMIT 1")
            if last is None:
                return None
            head = audit.make_head(key, int(last[0]), str(last[1]), at_)
            await tx.execute(
                "INSERT INTO governance_audit_heads (seq, doc) VALUES (?, ?)", head.seq, _enc(head)
            )
            return head

    # ------------------------------------------------------------------ reads

    async def get_admin(self, admin_id: str) -> Admin | None:
        async with self._reader() as tx:
            row = await tx.fetchone("SELECT doc FROM governance_admins WHERE id = ?", admin_id)
        return None if row is None else _dec_admin(bytes(row[0]))

    async def admin_by_token(self, token_sha256: str) -> Admin | None:
        async with self._reader() as tx:
            row = await tx.fetchone("SELECT doc FROM governance_admins WHERE token_sha256 = ?", token_sha256)
        return None if row is None else _dec_admin(bytes(row[0]))

    async def list_admins(self) -> list[Admin]:
        async with self._reader() as tx:
            rows = await tx.fetchall("SELECT doc FROM governance_admins ORDER BY id")
        return [_dec_admin(bytes(r[0])) for r in rows]

    async def grants(self, admin_id: str | None = None) -> list[Grant]:
        async with self._reader() as tx:
            if admin_id is None:
                rows = await tx.fetchall("SELECT doc FROM governance_grants ORDER BY id")
            else:
                rows = await tx.fetchall(
                    "SELECT doc FROM governance_grants WHERE admin_id = ? ORDER BY id", admin_id
                )
        return [_dec_grant(bytes(r[0])) for r in rows]

    async def get_request(self, request_id: str) -> ChangeRequest | None:
        async with self._reader() as tx:
            row = await tx.fetchone("SELECT doc FROM governance_requests WHERE id = ?", request_id)
        return None if row is None else _dec_request(bytes(row[0]))

    async def list_requests(self, status: str | None = None, limit: int = 100) -> list[ChangeRequest]:
        async with self._reader() as tx:
            if status is None:
                rows = await tx.fetchall(
                    "SELECT doc FROM governance_requests ORDER BY id DESC LIMIT ?", limit
                )
            else:
                rows = await tx.fetchall(
                    "SELECT doc FROM governance_requests WHERE status = ? ORDER BY id DESC LIMIT ?",
                    status,
                    limit,
                )
        return [_dec_request(bytes(r[0])) for r in rows]

    async def get_object(self, kind: str, object_id: str) -> StoredObject | None:
        async with self._reader() as tx:
            row = await tx.fetchone(
                "SELECT version, doc FROM governance_objects WHERE kind = ? AND object_id = ?",
                kind,
                object_id,
            )
        return None if row is None else StoredObject(int(row[0]), bytes(row[1]))

    async def list_objects(self, kind: str) -> list[tuple[str, StoredObject]]:
        async with self._reader() as tx:
            rows = await tx.fetchall(
                "SELECT object_id, version, doc FROM governance_objects WHERE kind = ? ORDER BY object_id",
                kind,
            )
        return [(str(r[0]), StoredObject(int(r[1]), bytes(r[2]))) for r in rows]

    async def audit_rows(self, after_seq: int = 0, limit: int | None = None) -> list[audit.StoredEntry]:
        """In storage order (rowid / physical order is not trusted: ordered by the seq column)."""
        async with self._reader() as tx:
            if limit is None:
                rows = await tx.fetchall(
                    "SELECT seq, doc, hash FROM governance_audit WHERE seq > ? ORDER BY seq", after_seq
                )
            else:
                rows = await tx.fetchall(
                    "SELECT seq, doc, hash FROM governance_audit WHERE seq > ? ORDER BY seq LIMIT ?",
                    after_seq,
                    limit,
                )
        return [audit.StoredEntry(int(r[0]), bytes(r[1]), str(r[2])) for r in rows]

    async def heads(self) -> list[SignedHead]:
        async with self._reader() as tx:
            rows = await tx.fetchall("SELECT doc FROM governance_audit_heads ORDER BY seq")
        return [_dec_head(bytes(r[0])) for r in rows]


# ------------------------------------------------------------------ SQLite


class _SqliteTx:
    def __init__(self, store: SqliteGovernanceStore, conn: sqlite3.Connection) -> None:
        self._run = store._run
        self._conn = conn

    async def execute(self, sql: str, *params: Any) -> int:
        return await self._run(lambda: self._conn.execute(sql, params).rowcount)

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        row: Row | None = await self._run(lambda: self._conn.execute(sql, params).fetchone())
        return row

    async def fetchall(self, sql: str, *params: Any) -> list[Row]:
        rows: list[Row] = await self._run(lambda: self._conn.execute(sql, params).fetchall())
        return rows


class SqliteGovernanceStore(_SqlStore):
    """One connection on one thread (governance traffic is a few writes a minute); an asyncio lock
    keeps one transaction at a time on it, and `BEGIN IMMEDIATE` keeps other processes out."""

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._migrations = load_migrations("sqlite")
        self._pool: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._pool is None:
            raise RuntimeError("SqliteGovernanceStore is not running")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def start(self) -> None:
        if self._pool is not None:
            raise RuntimeError("SqliteGovernanceStore already started")
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="payroute-governance-sqlite")
        try:
            self._conn = await self._run(self._open)
        except BaseException:
            self._pool.shutdown(wait=False)
            self._pool = None
            raise

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS governance_schema_version (version INTEGER NOT NULL)"
                )
                row = conn.execute("SELECT max(version) FROM governance_schema_version").fetchone()
                current = int(row[0] or 0)
                if current > len(self._migrations):
                    raise RuntimeError(f"{self.path}: governance schema {current} is newer than this code")
                for m in self._migrations[current:]:
                    for statement in split_statements(m.sql):
                        conn.execute(statement)
                    conn.execute("INSERT INTO governance_schema_version (version) VALUES (?)", (m.version,))
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        conn, self._conn = self._conn, None
        async with self._lock:
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(pool, conn.close)
        await asyncio.to_thread(pool.shutdown, True)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Tx]:
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise RuntimeError("SqliteGovernanceStore is not running")
            await self._run(lambda: conn.execute("BEGIN IMMEDIATE"))
            try:
                yield _SqliteTx(self, conn)
            except BaseException:
                await asyncio.shield(self._run(lambda: conn.execute("ROLLBACK")))
                raise
            await asyncio.shield(self._run(lambda: conn.execute("COMMIT")))

    @contextlib.asynccontextmanager
    async def _reader(self) -> AsyncIterator[_Tx]:
        async with self._lock:
            if self._conn is None:
                raise RuntimeError("SqliteGovernanceStore is not running")
            yield _SqliteTx(self, self._conn)


# ------------------------------------------------------------------ PostgreSQL

_PLACEHOLDER = re.compile(r"\?")


def _pg(sql: str) -> str:
    counter = iter(range(1, 1000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *params: Any) -> int:
        tag: str = await self._conn.execute(_pg(sql), *params)
        return int(tag.rsplit(" ", 1)[-1])

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        row = await self._conn.fetchrow(_pg(sql), *params)
        return None if row is None else tuple(row)

    async def fetchall(self, sql: str, *params: Any) -> list[Row]:
        return [tuple(r) for r in await self._conn.fetch(_pg(sql), *params)]


class PostgresGovernanceStore(_SqlStore):
    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 5,
        command_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self._min_size, self._max_size = min_size, max_size
        self._command_timeout_s = command_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._migrations = load_migrations("postgres")
        self._pool: Any = None

    async def start(self) -> None:
        import asyncpg

        try:
            self._pool = await asyncio.wait_for(
                asyncpg.create_pool(self.dsn, min_size=self._min_size, max_size=self._max_size,
                                    command_timeout=self._command_timeout_s, timeout=self._connect_timeout_s,
                                    server_settings={"application_name": "payroute-governance"}),
                timeout=self._connect_timeout_s * max(1, self._min_size) + self._command_timeout_s,
            )  # fmt: skip
        except (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as e:
            raise StoreUnavailable(f"governance PostgreSQL cannot start: {type(e).__name__}: {e}") from e
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", GOVERNANCE_LOCK_KEY)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS governance_schema_version (version INTEGER PRIMARY KEY, "
                    "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                current = int(
                    await conn.fetchval("SELECT coalesce(max(version), 0) FROM governance_schema_version")
                )
                if current > len(self._migrations):
                    raise RuntimeError(f"governance schema {current} is newer than this code")
                for m in self._migrations[current:]:
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO governance_schema_version (version, name) VALUES ($1, $2)",
                        m.version,
                        m.name,
                    )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Tx]:
        if self._pool is None:
            raise RuntimeError("PostgresGovernanceStore is not running")
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", GOVERNANCE_LOCK_KEY)
            yield _PgTx(conn)

    @contextlib.asynccontextmanager
    async def _reader(self) -> AsyncIterator[_Tx]:
        if self._pool is None:
            raise RuntimeError("PostgresGovernanceStore is not running")
        async with self._pool.acquire() as conn:
            yield _PgTx(conn)
