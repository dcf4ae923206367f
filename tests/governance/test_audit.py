"""The audit chain: it verifies, and the verifier names the first altered, deleted, reordered or
truncated entry; the databases refuse UPDATE and DELETE on it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import msgspec
import pytest

from router.governance import audit
from router.governance.model import AuditDraft, GovernanceConfig
from router.governance.store import Commit, PostgresGovernanceStore, SqliteGovernanceStore
from tests.governance import T0, build_world


def drafts(n: int) -> list[AuditDraft]:
    return [
        AuditDraft(at=T0, actor=f"adm_{i}", action="request.create", object=f"config:{i}", outcome="ok")
        for i in range(n)
    ]


def chain_rows(n: int) -> list[audit.StoredEntry]:
    rows, seq, prev = [], 0, audit.GENESIS
    for d in drafts(n):
        e = audit.chain(seq, prev, d)
        rows.append(audit.StoredEntry(e.seq, audit.encode_entry(e), e.hash))
        seq, prev = e.seq, e.hash
    return rows


def test_intact_chain_verifies() -> None:
    result = audit.verify_chain(chain_rows(5))
    assert result.ok and result.checked == 5 and result.head_seq == 5


def test_altered_entry_is_named() -> None:
    rows = chain_rows(5)
    rows[2] = audit.StoredEntry(3, rows[2].doc.replace(b'"adm_2"', b'"adm_x"'), rows[2].hash)
    result = audit.verify_chain(rows)
    assert not result.ok and result.first_bad_seq == 3 and "altered" in (result.problem or "")


def test_deleted_entry_is_named() -> None:
    rows = chain_rows(5)
    del rows[1]
    result = audit.verify_chain(rows)
    assert not result.ok and result.first_bad_seq == 2 and "deleted" in (result.problem or "")


def test_reordered_entries_are_named() -> None:
    rows = chain_rows(5)
    # swap the contents of rows 2 and 3, keeping the seq column in order
    a, b = rows[1], rows[2]
    rows[1], rows[2] = audit.StoredEntry(2, b.doc, b.hash), audit.StoredEntry(3, a.doc, a.hash)
    result = audit.verify_chain(rows)
    assert not result.ok and result.first_bad_seq == 2


def test_truncation_is_caught_by_a_signed_head() -> None:
    key = b"anchor-key"
    rows = chain_rows(5)
    head = audit.make_head(key, 5, rows[-1].hash, T0)
    assert audit.verify_chain(rows, [head], key).ok
    result = audit.verify_chain(rows[:3], [head], key)
    assert not result.ok and result.first_bad_seq == 4 and "truncated" in (result.problem or "")
    forged = msgspec.structs.replace(head, signature="0" * 64)
    assert not audit.verify_chain(rows, [forged], key).ok


def test_rewritten_chain_is_caught_by_a_signed_head() -> None:
    key = b"anchor-key"
    rows = chain_rows(3)
    head = audit.make_head(key, 3, rows[-1].hash, T0)
    # rewrite entry 2 and recompute every later hash: the chain itself verifies again
    seq, prev, rewritten = 1, rows[0].hash, [rows[0]]
    for d in [AuditDraft(at=T0, actor="mallory", action="x", object="y", outcome="ok"), drafts(3)[2]]:
        e = audit.chain(seq, prev, d)
        rewritten.append(audit.StoredEntry(e.seq, audit.encode_entry(e), e.hash))
        seq, prev = e.seq, e.hash
    assert audit.verify_chain(rewritten).ok
    result = audit.verify_chain(rewritten, [head], key)
    assert not result.ok and result.first_bad_seq == 3


async def test_sqlite_tampering_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "governance.db"
    store = SqliteGovernanceStore(path)
    await store.start()
    try:
        w = await build_world(store)
        r = await w.svc.propose(w.actors["op"], "config", None, {"yaml": "channels: []\n"})
        await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
        assert (await w.svc.verify()).ok
        n = len(await store.audit_rows())

        def tamper() -> None:
            conn = sqlite3.connect(path)
            try:
                # the table refuses it ...
                with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                    conn.execute("UPDATE governance_audit SET doc = doc WHERE seq = 3")
                # ... so an attacker with the file drops the trigger first
                conn.execute("DROP TRIGGER governance_audit_no_update")
                doc = conn.execute("SELECT doc FROM governance_audit WHERE seq = ?", (n - 1,)).fetchone()[0]
                conn.execute(
                    "UPDATE governance_audit SET doc = ? WHERE seq = ?",
                    (bytes(doc).replace(b'"outcome":"ok"', b'"outcome":"refused"'), n - 1),
                )
                conn.commit()
            finally:
                conn.close()

        import asyncio

        await asyncio.to_thread(tamper)
        result = await w.svc.verify()
        assert not result.ok and result.first_bad_seq == n - 1, result
        assert f"entry {n - 1}" in (result.problem or "")
    finally:
        await store.close()


async def test_postgres_refuses_update_and_delete_of_audit_rows(fresh_postgres_dsn: str) -> None:
    store = PostgresGovernanceStore(fresh_postgres_dsn)
    await store.start()
    try:
        await store.commit(Commit(audit=drafts(2)))
        conn = await asyncpg.connect(fresh_postgres_dsn)
        try:
            for sql in (
                "UPDATE governance_audit SET hash = 'x' WHERE seq = 1",
                "DELETE FROM governance_audit WHERE seq = 2",
                "TRUNCATE governance_audit",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                    await conn.execute(sql)
        finally:
            await conn.close()
        assert audit.verify_chain(await store.audit_rows()).ok
    finally:
        await store.close()


async def test_signed_heads_are_recorded_and_checked(tmp_path: Path) -> None:
    store = SqliteGovernanceStore(tmp_path / "g.db")
    await store.start()
    try:
        w = await build_world(store, GovernanceConfig(enabled=True, audit_signing_key="k" * 32))
        head = await w.svc.sign_head()
        assert head is not None and head.signature and (await store.heads()) == [head]
        assert (await w.svc.verify()).ok
    finally:
        await store.close()
