"""The payment-fingerprint window: the same customer paying the same amount in the same currency to the
same merchant within `window_s` is a likely double submission from two devices (多端重复支付).

The customer is the merchant's `customer_id` when given, else the card fingerprint. Modes:
`off`; `flag` (the payment proceeds and carries `duplicate_of` in its metadata-free `flags`); `block`
(409 `duplicate_payment_suspected` naming the earlier payment; nothing is charged). The window is
kept in process (embedded) or in Redis (`SET NX EX`, shared by every instance).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis

from router.locks import coordination_errors
from router.model import PaymentRequest


def fingerprint(req: PaymentRequest) -> str | None:
    customer = req.customer_id or (req.payment_method.card.fingerprint if req.payment_method.card else None)
    if customer is None:
        return None
    raw = f"{req.merchant_id}\x1f{customer}\x1f{req.amount}\x1f{req.currency}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


class FingerprintWindow(Protocol):
    async def remember(self, fp: str, payment_id: str, window_s: float) -> str | None:
        """Record `payment_id` under `fp` unless one is already there; return the earlier payment id."""


class MemoryFingerprintWindow:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[str, tuple[str, float]] = {}
        self._next_reap = 0.0

    async def remember(self, fp: str, payment_id: str, window_s: float) -> str | None:
        now = self._clock()
        if now >= self._next_reap:
            self._seen = {k: v for k, v in self._seen.items() if v[1] > now}
            self._next_reap = now + 30
        earlier = self._seen.get(fp)
        if earlier is not None and earlier[1] > now:
            return earlier[0]
        self._seen[fp] = (payment_id, now + window_s)
        return None


class RedisFingerprintWindow:
    def __init__(self, redis: Redis, prefix: str = "payroute:fp:") -> None:
        self._redis = redis
        self._prefix = prefix

    async def remember(self, fp: str, payment_id: str, window_s: float) -> str | None:
        key = self._prefix + fp
        with coordination_errors("fingerprint window"):
            if await self._redis.set(key, payment_id, nx=True, px=max(1, int(window_s * 1000))):
                return None
            earlier = await self._redis.get(key)
        return earlier.decode() if isinstance(earlier, bytes) else (str(earlier) if earlier else None)
