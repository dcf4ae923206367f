"""The hash-chained audit log: entries, their canonical form, verification and signed heads.

Entry n stores `hash_n = sha256(hash_{n-1} + canonical(entry_n))` where the canonical form is the
sorted-key JSON of every field except `hash` (so it includes `seq` and `prev_hash`); entry 1 chains
from `GENESIS`. `verify_chain` walks the entries in stored order and names the first one that was
altered (its hash no longer matches its content), deleted (a gap in `seq`), reordered (`seq` out of
order or a `prev_hash` that is not its predecessor's hash) or truncated (the chain ends before a
signed head it must contain). The chain alone cannot tell a truncated tail from a short log, and a
writer who recomputes every later hash can rewrite it; signed heads (HMAC with a key from config,
exported off the machine) anchor it against both.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson

from router.governance.model import AuditDraft, AuditEntry, SignedHead

GENESIS = "0" * 64


def _ts(dt: datetime) -> str:
    if dt.tzinfo is None:
        raise ValueError(f"naive datetime {dt!r}")
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(entry: AuditEntry | dict[str, Any]) -> bytes:
    """The bytes the hash covers: every field but `hash`, sorted keys, times as fixed-width UTC text."""
    doc = msgspec.to_builtins(entry) if isinstance(entry, AuditEntry) else dict(entry)
    doc.pop("hash", None)
    if isinstance(doc.get("at"), datetime):
        doc["at"] = _ts(doc["at"])
    elif isinstance(entry, AuditEntry):
        doc["at"] = _ts(entry.at)
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def entry_hash(prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(prev_hash.encode() + body).hexdigest()


def chain(prev_seq: int, prev_hash: str, draft: AuditDraft) -> AuditEntry:
    """The next entry after (prev_seq, prev_hash)."""
    unhashed = AuditEntry(
        seq=prev_seq + 1, at=draft.at, actor=draft.actor, action=draft.action, object=draft.object,
        outcome=draft.outcome, source=draft.source, request_id=draft.request_id,
        before_hash=draft.before_hash, after_hash=draft.after_hash, detail=draft.detail,
        prev_hash=prev_hash, hash="",
    )  # fmt: skip
    return msgspec.structs.replace(unhashed, hash=entry_hash(prev_hash, canonical(unhashed)))


def encode_entry(entry: AuditEntry) -> bytes:
    """The stored document: the canonical bytes (so verification re-hashes exactly what was stored)."""
    return canonical(entry)


def decode_entry(doc: bytes, stored_hash: str) -> AuditEntry:
    raw = orjson.loads(doc)
    raw["hash"] = stored_hash
    return msgspec.convert(raw, AuditEntry)


def content_hash(value: Any) -> str:
    """A stable hash of an object's state, for the before/after hashes of an entry."""
    return hashlib.sha256(orjson.dumps(msgspec.to_builtins(value), option=orjson.OPT_SORT_KEYS)).hexdigest()


# ------------------------------------------------------------------ verification


class StoredEntry(msgspec.Struct, frozen=True):
    """One row as stored: the row's seq column, its document and its hash column."""

    seq: int
    doc: bytes
    hash: str


class VerifyResult(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    checked: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str | None = None


def verify_chain(
    rows: Iterable[StoredEntry], heads: Iterable[SignedHead] = (), key: bytes | None = None
) -> VerifyResult:
    """Check every entry in stored order; on failure name the first bad entry and what is wrong."""
    prev_seq, prev_hash, checked = 0, GENESIS, 0
    seen: dict[int, str] = {}

    def bad(seq: int, problem: str) -> VerifyResult:
        return VerifyResult(
            ok=False,
            checked=checked,
            head_seq=prev_seq,
            head_hash=prev_hash,
            first_bad_seq=seq,
            problem=problem,
        )

    for row in rows:
        expected_seq = prev_seq + 1
        if row.seq != expected_seq:
            what = "missing (deleted)" if row.seq > expected_seq else "out of order (reordered)"
            return bad(
                expected_seq if row.seq > expected_seq else row.seq,
                f"entry {expected_seq} {what}: found entry {row.seq} after entry {prev_seq}",
            )
        try:
            raw = orjson.loads(row.doc)
        except orjson.JSONDecodeError:
            return bad(row.seq, f"entry {row.seq} is not valid JSON (altered)")
        if not isinstance(raw, dict) or raw.get("seq") != row.seq:
            return bad(
                row.seq,
                f"entry {row.seq} carries seq {raw.get('seq') if isinstance(raw, dict) else None} (moved or altered)",
            )
        if raw.get("prev_hash") != prev_hash:
            return bad(
                row.seq,
                f"entry {row.seq} does not chain from entry {prev_seq} (reordered, or a predecessor was removed)",
            )
        if entry_hash(prev_hash, row.doc) != row.hash:
            return bad(row.seq, f"entry {row.seq} was altered: its hash does not match its content")
        # the document must be canonical: the same fields re-encoded give the same bytes
        if orjson.dumps(raw, option=orjson.OPT_SORT_KEYS) != row.doc:
            return bad(row.seq, f"entry {row.seq} is not in canonical form (altered)")
        seen[row.seq] = row.hash
        prev_seq, prev_hash = row.seq, row.hash
        checked += 1
    for head in sorted(heads, key=lambda h: h.seq):
        if key is not None and not hmac.compare_digest(
            head.signature, sign_head(key, head.seq, head.hash, head.at)
        ):
            return bad(head.seq, f"signed head at entry {head.seq} has a bad signature")
        if head.seq not in seen:
            return bad(
                prev_seq + 1,
                f"entry {prev_seq + 1} onwards is missing (truncated): a head was signed at entry {head.seq}",
            )
        if seen[head.seq] != head.hash:
            return bad(head.seq, f"entry {head.seq} differs from the signed head (the chain was rewritten)")
    return VerifyResult(ok=True, checked=checked, head_seq=prev_seq, head_hash=prev_hash)


def sign_head(key: bytes, seq: int, head_hash: str, at: datetime) -> str:
    return hmac.new(key, f"{seq}:{head_hash}:{_ts(at)}".encode(), hashlib.sha256).hexdigest()


def make_head(key: bytes | None, seq: int, head_hash: str, at: datetime) -> SignedHead:
    return SignedHead(
        seq=seq, hash=head_hash, at=at, signature=sign_head(key, seq, head_hash, at) if key else ""
    )
