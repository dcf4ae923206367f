"""A lock per order (or payment), held for a bounded time: an optimization, never the source of truth.

Contract of `OrderLocks`:
- `acquire(key, ttl_ms)` returns a `LockToken` if nobody holds `key`, else `None` (it never waits).
  The lock frees itself after `ttl_ms` even if the holder crashed.
- `release(token)` deletes the lock only if `token` still holds it (compare-and-delete) and says so.
  A holder whose lock expired while a slow call ran must not delete the lock someone else acquired
  since; its release returns False and changes nothing.
- Redis being unreachable or slow raises `CoordinationUnavailable`: callers fail closed (503).

Why an optimization only: a lock can expire under a slow holder, and Redis can lose a lock on
failover. Two writers for one order are therefore still possible, and the durable record (unique
constraints on the merchant order id, optimistic versions on every payment update) decides who
wins. The lock only keeps the common case (a client double-clicking) from reaching a channel twice.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Protocol

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.errors import CoordinationUnavailable

log = logging.getLogger("payroute.locks")
__all__ = ["CoordinationUnavailable", "LockToken", "MemoryOrderLocks", "OrderLocks", "RedisOrderLocks", "order_lock"]


# CoordinationUnavailable lives in router.errors; re-exported here for the modules that raise it.



@contextmanager
def coordination_errors(operation: str) -> Iterator[None]:
    """The one place Redis client errors become `CoordinationUnavailable`."""
    try:
        yield
    except RedisTimeoutError as e:
        raise CoordinationUnavailable(f"{operation}: Redis timed out") from e
    except RedisConnectionError as e:
        # also the BlockingConnectionPool's "No connection available." after its wait timeout
        raise CoordinationUnavailable(f"{operation}: Redis unreachable: {e}") from e


class LockToken(msgspec.Struct, frozen=True):
    """Proof of one acquisition: `token` is random per acquisition, so a stale holder cannot release."""

    key: str
    token: str


class OrderLocks(Protocol):
    async def acquire(self, key: str, ttl_ms: int) -> LockToken | None: ...

    async def release(self, token: LockToken) -> bool:
        """True if this token still held the lock and it is now free; False if it had expired."""
        ...


def _new_token(key: str) -> LockToken:
    return LockToken(key, secrets.token_hex(16))


def _check_ttl(ttl_ms: int) -> None:
    if ttl_ms <= 0:
        raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")


class MemoryOrderLocks:
    """In-process locks with expiry, for the embedded (single-instance) mode and tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._held: dict[str, tuple[str, float]] = {}
        # tokens only need to differ within this process: a counter, not a getrandom() per payment
        self._tokens = map(str, itertools.count(1))
        self._next_reap = 0.0

    def _reap(self, now: float) -> None:
        # locks whose holder never released (crashed, cancelled) would otherwise accumulate
        if now < self._next_reap:
            return
        self._next_reap = now + 60
        for key in [k for k, (_, expires_at) in self._held.items() if expires_at <= now]:
            del self._held[key]

    async def acquire(self, key: str, ttl_ms: int) -> LockToken | None:
        _check_ttl(ttl_ms)
        now = self._clock()
        self._reap(now)
        held = self._held.get(key)
        if held is not None and held[1] > now:
            return None
        token = LockToken(key, next(self._tokens))
        self._held[key] = (token.token, now + ttl_ms / 1000)
        return token

    async def release(self, token: LockToken) -> bool:
        held = self._held.get(token.key)
        if held is None or held[0] != token.token:
            return False
        del self._held[token.key]
        # an expired lock was no longer ours even if nobody took it since
        return held[1] > self._clock()

    def __len__(self) -> int:
        now = self._clock()
        return sum(1 for _, expires_at in self._held.values() if expires_at > now)


# KEYS[1] = lock key, ARGV[1] = token
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisOrderLocks:
    """`SET key token NX PX ttl` to acquire; a compare-and-delete Lua script to release."""

    def __init__(self, redis: Redis, *, prefix: str = "payroute:lock:") -> None:
        self._redis = redis
        self._prefix = prefix
        self._release = redis.register_script(_RELEASE)

    async def acquire(self, key: str, ttl_ms: int) -> LockToken | None:
        _check_ttl(ttl_ms)
        token = _new_token(key)
        with coordination_errors("lock acquire"):
            ok = await self._redis.set(self._prefix + key, token.token, nx=True, px=ttl_ms)
        return token if ok else None

    async def release(self, token: LockToken) -> bool:
        with coordination_errors("lock release"):
            deleted = await self._release(keys=[self._prefix + token.key], args=[token.token])
        return bool(deleted)


@asynccontextmanager
async def order_lock(locks: OrderLocks, key: str, ttl_ms: int) -> AsyncIterator[LockToken | None]:
    """`async with order_lock(locks, key, ttl) as token:` — `token` is None when someone else holds it.

    Releases on exit only what it acquired. A release that finds the lock expired, or that cannot
    reach Redis, is logged and never masks the body's own outcome: the lock frees itself by TTL.
    """
    token = await locks.acquire(key, ttl_ms)
    try:
        yield token
    finally:
        if token is not None:
            try:
                if not await locks.release(token):
                    log.warning(
                        "order lock expired before release", extra={"lock_key": key, "ttl_ms": ttl_ms}
                    )
            except CoordinationUnavailable as e:
                log.warning(
                    "order lock not released; it will expire", extra={"lock_key": key, "reason": str(e)}
                )
