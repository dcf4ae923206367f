"""Idempotency records in Redis, shared by every payroute instance; the same contract as the in-process store.

Per (merchant, Idempotency-Key), one Redis hash:
- `claim` atomically (one Lua script) creates `{fp, state=in_flight, token}` with a TTL of
  `in_flight_ttl_s`, so the claim of an instance that crashed frees the key by itself; or raises
  `key_reused()` (422, other fingerprint) before `key_in_use()` (409, same fingerprint, still in
  flight); or returns `Claim(replay=...)` with the stored response, byte-exact.
- `complete` stores status, content type and body (binary hash fields, never re-encoded) and sets
  the TTL to `ttl_s`, but only if the record is still the in-flight claim this instance made (the
  claim token is compared in Lua): a claim that outlived `in_flight_ttl_s` and was re-claimed
  elsewhere is not overwritten. `release` deletes the record under the same condition, so it never
  deletes a completed record.
- Redis unreachable, slow, or the pool exhausted beyond `timeout_s`: `CoordinationUnavailable`.
  Nothing is retried here; a claim applied but not acknowledged expires after `in_flight_ttl_s`.

`in_flight_ttl_s` must exceed the longest a request can run (every channel's total timeout, all
attempts), or a slow request's key may be claimed a second time; the durable record (unique merchant
order id, optimistic versions) still prevents a second charge.
"""

from __future__ import annotations

import logging
import secrets

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from router.idempotency import Claim, StoredResponse, key_in_use, key_reused
from router.locks import CoordinationUnavailable, coordination_errors

__all__ = ["CoordinationUnavailable", "RedisIdempotencyStore", "make_redis"]

log = logging.getLogger("payroute.idempotency")


def make_redis(url: str, *, max_connections: int = 50, timeout_s: float = 2.0) -> Redis:
    """A client whose pool waits (up to `timeout_s`) for a free connection instead of raising.

    Connect, read and pool-wait are each bounded by `timeout_s`, and nothing is retried (a retried
    claim script could find its own first run and answer 409), so an unreachable Redis fails fast.
    Responses stay bytes (`decode_responses=False`): stored bodies must come back byte-exact.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )
    return Redis.from_pool(pool)


# KEYS[1] record; ARGV: fingerprint, claim token, in-flight ttl (ms)
_CLAIM = """
local rec = redis.call('HMGET', KEYS[1], 'fp', 'state', 'status', 'ctype', 'body')
if not rec[1] then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'state', 'in_flight', 'token', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'claimed'}
end
if rec[1] ~= ARGV[1] then
  return {'reused'}
end
if rec[2] ~= 'done' then
  return {'in_use'}
end
return {'done', rec[3], rec[4], rec[5]}
"""

# KEYS[1] record; ARGV: claim token, status, content type, body, ttl (ms)
_COMPLETE = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'token')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'done', 'status', ARGV[2], 'ctype', ARGV[3], 'body', ARGV[4])
redis.call('HDEL', KEYS[1], 'token')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS[1] record; ARGV: claim token
_RELEASE = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'token')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] then
  return 0
end
return redis.call('DEL', KEYS[1])
"""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisIdempotencyStore:
    """`IdempotencyStore` over Redis. Build the client with `make_redis` (bytes, bounded timeouts)."""

    def __init__(
        self,
        redis: Redis,
        *,
        ttl_s: float = 24 * 3600,
        in_flight_ttl_s: float = 120,
        prefix: str = "payroute:idem:",
    ) -> None:
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisIdempotencyStore needs decode_responses=False to keep bodies byte-exact")
        if ttl_s <= 0 or in_flight_ttl_s <= 0:
            raise ValueError("ttl_s and in_flight_ttl_s must be positive")
        self._redis = redis
        self._ttl_ms = _ms(ttl_s)
        self._in_flight_ttl_ms = _ms(in_flight_ttl_s)
        self._prefix = prefix
        self._claim = redis.register_script(_CLAIM)
        self._complete = redis.register_script(_COMPLETE)
        self._release = redis.register_script(_RELEASE)
        # The protocol hands no claim handle back to complete/release, so this instance remembers
        # the token of each claim it holds; the Lua compare makes a stale holder's writes no-ops.
        self._tokens: dict[tuple[str, str], str] = {}

    def _key(self, merchant_id: str, key: str) -> str:
        # length-prefixed: merchant "a:b" + key "c" must not collide with merchant "a" + key "b:c"
        return f"{self._prefix}{len(merchant_id)}:{merchant_id}:{key}"

    async def claim(self, merchant_id: str, key: str, fingerprint: str) -> Claim:
        token = secrets.token_hex(16)
        with coordination_errors("idempotency claim"):
            res = await self._claim(
                keys=[self._key(merchant_id, key)], args=[fingerprint, token, self._in_flight_ttl_ms]
            )
        outcome = res[0]
        if outcome == b"claimed":
            self._tokens[(merchant_id, key)] = token
            return Claim()
        if outcome == b"reused":
            raise key_reused()
        if outcome == b"in_use":
            raise key_in_use()
        if outcome == b"done":
            status, ctype, body = res[1], res[2], res[3]
            return Claim(replay=StoredResponse(int(status), bytes(body), ctype.decode()))
        raise RuntimeError(f"unexpected idempotency claim result {res!r}")

    async def complete(self, merchant_id: str, key: str, response: StoredResponse) -> None:
        token = self._tokens.pop((merchant_id, key), None)
        if token is None:
            log.warning("idempotency complete without a claim held here", extra={"merchant_id": merchant_id})
            return
        with coordination_errors("idempotency complete"):
            stored = await self._complete(
                keys=[self._key(merchant_id, key)],
                args=[token, response.status, response.content_type, response.body, self._ttl_ms],
            )
        if not stored:
            log.warning(
                "idempotency claim expired before the response was stored; not overwriting",
                extra={"merchant_id": merchant_id},
            )

    async def release(self, merchant_id: str, key: str) -> None:
        token = self._tokens.pop((merchant_id, key), None)
        if token is None:
            return
        with coordination_errors("idempotency release"):
            await self._release(keys=[self._key(merchant_id, key)], args=[token])
