"""One contract suite over every OrderLocks (in-process and Redis), the context manager, and failures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from router.idempotency_redis import make_redis
from router.locks import (
    CoordinationUnavailable,
    LockToken,
    MemoryOrderLocks,
    OrderLocks,
    RedisOrderLocks,
    order_lock,
)
from tests.services import free_port

TTL_MS = 60_000
SHORT_MS = 200


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    locks: OrderLocks
    other_instance: OrderLocks  # a second payroute instance sharing the same lock space
    wait_past_ms: Callable[[int], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
def harness(request: pytest.FixtureRequest) -> Harness:
    if request.param == "memory":
        clock = FakeClock()
        locks = MemoryOrderLocks(clock=clock)

        async def advance(ms: int) -> None:
            clock.now += ms / 1000 + 0.001

        return Harness(locks, locks, advance)

    client: Redis = request.getfixturevalue("redis_client")

    async def sleep_past(ms: int) -> None:
        # Redis expires by its own clock; waiting well beyond the TTL keeps this about behaviour
        await asyncio.sleep(ms / 1000 * 1.5 + 0.05)

    return Harness(RedisOrderLocks(client), RedisOrderLocks(client), sleep_past)


async def test_a_held_lock_is_exclusive(harness: Harness) -> None:
    token = await harness.locks.acquire("order-1", TTL_MS)
    assert token is not None and token.key == "order-1"
    assert await harness.locks.acquire("order-1", TTL_MS) is None
    assert await harness.other_instance.acquire("order-1", TTL_MS) is None
    assert await harness.locks.acquire("order-2", TTL_MS) is not None


async def test_exactly_one_of_100_concurrent_acquirers_wins(harness: Harness) -> None:
    results = await asyncio.gather(
        *(
            inst.acquire("order-1", TTL_MS)
            for _ in range(50)
            for inst in (harness.locks, harness.other_instance)
        )
    )
    assert len([t for t in results if t is not None]) == 1


async def test_release_frees_the_lock_once(harness: Harness) -> None:
    token = await harness.locks.acquire("order-1", TTL_MS)
    assert token is not None
    assert await harness.locks.release(token) is True
    assert await harness.locks.release(token) is False
    again = await harness.other_instance.acquire("order-1", TTL_MS)
    assert again is not None and again.token != token.token


async def test_expiry_frees_the_lock(harness: Harness) -> None:
    assert await harness.locks.acquire("order-1", SHORT_MS) is not None
    await harness.wait_past_ms(SHORT_MS)
    assert await harness.other_instance.acquire("order-1", TTL_MS) is not None


async def test_releasing_an_expired_lock_reports_false(harness: Harness) -> None:
    token = await harness.locks.acquire("order-1", SHORT_MS)
    assert token is not None
    await harness.wait_past_ms(SHORT_MS)
    assert await harness.locks.release(token) is False


async def test_a_stale_token_never_releases_the_new_holders_lock(harness: Harness) -> None:
    stale = await harness.locks.acquire("order-1", SHORT_MS)
    assert stale is not None
    await harness.wait_past_ms(SHORT_MS)  # the slow holder's call is still running...
    fresh = await harness.other_instance.acquire("order-1", TTL_MS)
    assert fresh is not None
    assert await harness.locks.release(stale) is False  # ...and finishes late
    assert await harness.locks.acquire("order-1", TTL_MS) is None
    assert await harness.other_instance.release(fresh) is True


async def test_a_forged_token_releases_nothing(harness: Harness) -> None:
    token = await harness.locks.acquire("order-1", TTL_MS)
    assert token is not None
    assert await harness.locks.release(LockToken("order-1", "not-the-token")) is False
    assert await harness.locks.acquire("order-1", TTL_MS) is None


@pytest.mark.parametrize("ttl_ms", [0, -1])
async def test_a_non_positive_ttl_is_refused(harness: Harness, ttl_ms: int) -> None:
    with pytest.raises(ValueError):
        await harness.locks.acquire("order-1", ttl_ms)


# ------------------------------------------------------------------ order_lock


async def test_order_lock_holds_for_the_block_and_releases_after(harness: Harness) -> None:
    async with order_lock(harness.locks, "order-1", TTL_MS) as token:
        assert token is not None
        assert await harness.other_instance.acquire("order-1", TTL_MS) is None
    assert await harness.other_instance.acquire("order-1", TTL_MS) is not None


async def test_order_lock_releases_when_the_block_raises(harness: Harness) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with order_lock(harness.locks, "order-1", TTL_MS):
            raise RuntimeError("boom")
    assert await harness.other_instance.acquire("order-1", TTL_MS) is not None


async def test_order_lock_when_busy_yields_none_and_leaves_the_holders_lock(harness: Harness) -> None:
    holder = await harness.other_instance.acquire("order-1", TTL_MS)
    assert holder is not None
    async with order_lock(harness.locks, "order-1", TTL_MS) as token:
        assert token is None
    assert await harness.locks.acquire("order-1", TTL_MS) is None
    assert await harness.other_instance.release(holder) is True


class ReleaseFails:
    """An OrderLocks whose Redis goes away between acquire and release."""

    def __init__(self) -> None:
        self.inner = MemoryOrderLocks()

    async def acquire(self, key: str, ttl_ms: int) -> LockToken | None:
        return await self.inner.acquire(key, ttl_ms)

    async def release(self, token: LockToken) -> bool:
        raise CoordinationUnavailable("lock release: Redis unreachable")


async def test_order_lock_release_failure_never_masks_the_outcome(caplog: pytest.LogCaptureFixture) -> None:
    locks = ReleaseFails()
    with caplog.at_level(logging.WARNING, logger="payroute.locks"):
        async with order_lock(locks, "order-1", TTL_MS) as token:
            assert token is not None
        with pytest.raises(KeyError):
            async with order_lock(locks, "order-2", TTL_MS):
                raise KeyError("the body's own error")
    assert [r.message for r in caplog.records] == ["order lock not released; it will expire"] * 2


# ------------------------------------------------------------------ Redis failures


async def test_unreachable_redis_is_coordination_unavailable() -> None:
    client = make_redis(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    try:
        locks = RedisOrderLocks(client)
        async with asyncio.timeout(30):  # a guard against hanging, not a measurement
            with pytest.raises(CoordinationUnavailable):
                await locks.acquire("order-1", TTL_MS)
            with pytest.raises(CoordinationUnavailable):
                await locks.release(LockToken("order-1", "t"))
    finally:
        await client.aclose()
