"""Per-channel circuit breakers: pybreaker's state machine behind an asyncio-safe gate.

pybreaker is synchronous: `breaker.calling()` wraps the `await` so the state machine sees the
outcome, with in-memory storage per instance. pybreaker alone would let every concurrent caller
through while half-open; the gate admits exactly one probe at a time and refuses the rest with
`BreakerOpen`, so a recovering channel sees one request, not a thundering herd.

Only `ChannelUnavailable` and `OutcomeUnknown` count as failures: a decline means the channel works.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import pybreaker

from router.config import BreakerSettings
from router.errors import ChannelUnavailable, OutcomeUnknown

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class BreakerOpen(Exception):
    """The breaker refused the call: nothing was sent."""


def _not_channel_failure(exc: BaseException) -> bool:
    return not isinstance(exc, ChannelUnavailable | OutcomeUnknown)


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, on_change: Callable[[str, str], None]) -> None:
        self._on_change = on_change

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: object, new_state: object) -> None:
        self._on_change(cb.name or "", getattr(new_state, "name", str(new_state)))


class ChannelBreaker:
    def __init__(
        self,
        channel: str,
        settings: BreakerSettings,
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self.channel = channel
        self._storage = pybreaker.CircuitMemoryStorage(CLOSED)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=settings.fail_max,
            reset_timeout=settings.reset_timeout_s,
            exclude=[_not_channel_failure],
            state_storage=self._storage,
            name=channel,
            # keep our own exception type: OutcomeUnknown must stay OutcomeUnknown when the breaker trips
            throw_new_error_on_trip=False,
            listeners=[_Listener(on_change)] if on_change else [],
        )
        self._probe_in_flight = False

    @property
    def state(self) -> str:
        return str(self._cb.current_state)

    def _cooldown_over(self) -> bool:
        opened = self._storage.opened_at
        return opened is None or datetime.now(UTC) >= opened + timedelta(seconds=self._cb.reset_timeout)

    def admits(self) -> bool:
        """Would a call be let through now? (The routing snapshot's `breaker_open` is its negation.)"""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN and not self._cooldown_over():
            return False
        return not self._probe_in_flight

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Run the block under the breaker; raise BreakerOpen if it may not run."""
        state = self.state
        probe = state != CLOSED
        if probe:
            if (state == OPEN and not self._cooldown_over()) or self._probe_in_flight:
                raise BreakerOpen(self.channel)
            self._probe_in_flight = True
        try:
            try:
                with self._cb.calling():
                    yield
            except pybreaker.CircuitBreakerError:
                raise BreakerOpen(self.channel) from None
        finally:
            if probe:
                self._probe_in_flight = False
