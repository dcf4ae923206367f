"""The async gate around pybreaker: what counts as failure, and one half-open probe at a time."""

from __future__ import annotations

import asyncio

import pytest

from router.breaker import BreakerOpen, ChannelBreaker
from router.config import BreakerSettings
from router.errors import ChannelUnavailable, OutcomeUnknown


async def fail(b: ChannelBreaker, exc: Exception) -> None:
    with pytest.raises(type(exc)):
        async with b.guard():
            raise exc


async def test_opens_after_fail_max_channel_failures_and_keeps_the_exception_type() -> None:
    b = ChannelBreaker("c", BreakerSettings(fail_max=3, reset_timeout_s=60))
    await fail(b, ChannelUnavailable("x"))
    await fail(b, OutcomeUnknown("x"))
    assert b.state == "closed" and b.admits()
    await fail(b, OutcomeUnknown("x"))  # the tripping failure still surfaces as OutcomeUnknown
    assert b.state == "open" and not b.admits()
    with pytest.raises(BreakerOpen):
        async with b.guard():
            raise AssertionError("must not run")


async def test_other_errors_do_not_count() -> None:
    b = ChannelBreaker("c", BreakerSettings(fail_max=1, reset_timeout_s=60))
    await fail(b, ValueError("a decline or our own bug is not the channel failing"))
    assert b.state == "closed"


async def test_success_resets_the_count() -> None:
    b = ChannelBreaker("c", BreakerSettings(fail_max=2, reset_timeout_s=60))
    await fail(b, ChannelUnavailable("x"))
    async with b.guard():
        pass
    await fail(b, ChannelUnavailable("x"))
    assert b.state == "closed"


async def test_half_open_admits_exactly_one_probe_at_a_time() -> None:
    changes: list[str] = []
    b = ChannelBreaker("c", BreakerSettings(fail_max=1, reset_timeout_s=0.05), lambda ch, st: changes.append(st))
    await fail(b, ChannelUnavailable("x"))
    assert changes == ["open"]
    await asyncio.sleep(0.06)
    assert b.admits()
    release = asyncio.Event()
    entered = 0

    async def probe() -> str:
        nonlocal entered
        try:
            async with b.guard():
                entered += 1
                await release.wait()
            return "ran"
        except BreakerOpen:
            return "refused"

    tasks = [asyncio.create_task(probe()) for _ in range(10)]
    await asyncio.sleep(0.01)
    assert entered == 1 and not b.admits()  # the others were refused while the probe runs
    release.set()
    results = await asyncio.gather(*tasks)
    assert results.count("ran") == 1 and results.count("refused") == 9
    assert b.state == "closed" and changes == ["open", "half-open", "closed"]


async def test_failed_probe_reopens() -> None:
    b = ChannelBreaker("c", BreakerSettings(fail_max=1, reset_timeout_s=0.05))
    await fail(b, ChannelUnavailable("x"))
    await asyncio.sleep(0.06)
    await fail(b, OutcomeUnknown("probe failed"))
    assert b.state == "open" and not b.admits()
