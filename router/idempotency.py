"""Idempotency keys with Stripe's semantics, behind an interface (in-process here; Redis later).

Per merchant and key: the first request claims the key; when it finishes, its response (status,
body, whatever it was, errors and 5xx included) is stored and every later request with the same key
and the same parameters gets exactly those bytes back. The same key with different parameters is
`idempotency_key_reused`; the same key while the first is still running is `idempotency_key_in_use`.
Requests that fail validation never claim a key. Records expire after `ttl_s` (default 24 h).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import msgspec

from router.errors import ProblemError


class StoredResponse(msgspec.Struct, frozen=True):
    status: int
    body: bytes
    content_type: str


class Claim(msgspec.Struct, frozen=True):
    """`replay` is set when the key already has a finished response."""

    replay: StoredResponse | None = None


class IdempotencyStore(Protocol):
    async def claim(self, merchant_id: str, key: str, fingerprint: str) -> Claim: ...

    async def complete(self, merchant_id: str, key: str, response: StoredResponse) -> None: ...

    async def release(self, merchant_id: str, key: str) -> None:
        """Forget an unfinished claim (the request died before producing a response)."""


class _Record:
    __slots__ = ("fingerprint", "response", "expires_at")

    def __init__(self, fingerprint: str, expires_at: float) -> None:
        self.fingerprint = fingerprint
        self.response: StoredResponse | None = None
        self.expires_at = expires_at  # in flight: when the claim lapses; completed: when the record goes


def key_in_use() -> ProblemError:
    return ProblemError(
        409,
        "idempotency_key_in_use",
        "A request with this Idempotency-Key is still being processed",
        "retry after the first request has finished",
    )


def key_reused() -> ProblemError:
    return ProblemError(
        422,
        "idempotency_key_reused",
        "This Idempotency-Key was used with different parameters",
        "use a new key for a different request",
    )


class MemoryIdempotencyStore:
    """In-process records. An unfinished claim lapses after `in_flight_ttl_s` (its request died)."""

    def __init__(
        self, ttl_s: float = 24 * 3600, clock: Callable[[], float] = time.monotonic, in_flight_ttl_s: float = 120
    ) -> None:
        self._ttl = ttl_s
        self._in_flight_ttl = in_flight_ttl_s
        self._clock = clock
        self._records: dict[tuple[str, str], _Record] = {}
        self._next_reap = 0.0

    def _reap(self, now: float) -> None:
        if now < self._next_reap:
            return
        self._next_reap = now + 60
        dead = [k for k, r in self._records.items() if r.expires_at <= now]
        for k in dead:
            del self._records[k]

    async def claim(self, merchant_id: str, key: str, fingerprint: str) -> Claim:
        now = self._clock()
        self._reap(now)
        rec = self._records.get((merchant_id, key))
        if rec is not None and rec.expires_at <= now:
            rec = None  # expired, or an unfinished claim whose request died
        if rec is None:
            self._records[(merchant_id, key)] = _Record(fingerprint, now + self._in_flight_ttl)
            return Claim()
        if rec.fingerprint != fingerprint:
            raise key_reused()
        if rec.response is None:
            raise key_in_use()
        return Claim(replay=rec.response)

    async def complete(self, merchant_id: str, key: str, response: StoredResponse) -> None:
        rec = self._records.get((merchant_id, key))
        if rec is not None and rec.response is None:
            rec.response = response
            rec.expires_at = self._clock() + self._ttl

    async def release(self, merchant_id: str, key: str) -> None:
        rec = self._records.get((merchant_id, key))
        if rec is not None and rec.response is None:
            del self._records[(merchant_id, key)]

    def __len__(self) -> int:
        return len(self._records)
