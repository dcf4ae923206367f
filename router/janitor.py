"""The janitor: settles payments that a crash or a timeout left in flight.

Every `interval_s` it pages through payments in `processing`, `pending` or `requires_action` that
have not changed for `min_age_s` (longer than a payment's deadline, so a live payment is never
touched) and asks the channels (`Pipeline.recover`). A payment the channels cannot settle yet is asked
again with exponential back-off. Past `max_age_s` it moves to `manual_review`, with a metric and a
log line. A `requires_action` payment past `action_expiry_s` is closed at the channel first and
fails only when the close succeeded, so a customer cannot pay an order we already called failed.
Operations (captures, voids, refunds) left `pending` (their answer was lost, or a crash came after the
send) are asked again the same way: the same request with the same channel key, which the channel
answers from its idempotency record, or processes now if it never got it. Past `max_age_s` (keep it
inside the channels' idempotency windows: Stripe keeps keys 24 h) an operation is no longer re-sent:
a metric and a log line call an operator, and it stays pending (refusing further operations on the
payment) until settled by hand.
Several instances may run janitors: optimistic versions make their writes safe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from router.config import JanitorSettings
from router.errors import ProblemError, VersionConflict
from router.metrics import Metrics
from router.model import Payment, Status
from router.pipeline import Pipeline

log = logging.getLogger("payroute.janitor")
IN_FLIGHT = (Status.PROCESSING, Status.PENDING, Status.REQUIRES_ACTION)


class Janitor:
    def __init__(
        self,
        pipeline: Pipeline,
        metrics: Metrics,
        settings: JanitorSettings,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pipeline = pipeline
        self.metrics = metrics
        self.settings = settings
        self._now = now
        self._clock = clock
        self._backoff: dict[str, tuple[int, float]] = {}  # payment or operation id -> (tries, not before)
        self._reported: set[str] = set()  # operations past max_age_s already reported for manual review

    async def run_once(self) -> int:
        """One sweep; returns how many payments it settled or moved."""
        s = self.settings
        now = self._now()
        moved = 0
        payments = await self.pipeline.store.list_by_status(IN_FLIGHT, now - timedelta(seconds=s.min_age_s), s.page)
        for p in payments:
            tries, not_before = self._backoff.get(p.id, (0, 0.0))
            if self._clock() < not_before:
                continue
            try:
                result = await self._settle(p, now)
            except VersionConflict:
                result = None  # another instance (or a callback) moved it: fine
            if result is None or result.status is not p.status:
                self._backoff.pop(p.id, None)
                moved += 1
                continue
            delay = min(s.backoff_max_s, s.interval_s * 2**tries)
            self._backoff[p.id] = (tries + 1, self._clock() + delay)
        return moved + await self._settle_operations(now)

    async def _settle_operations(self, now: datetime) -> int:
        s = self.settings
        moved = 0
        for p in await self.pipeline.store.list_pending_operations(now - timedelta(seconds=s.min_age_s), s.page):
            claim = next((o for o in p.operations if o.status == "pending"), None)
            if claim is None:
                continue
            tries, not_before = self._backoff.get(claim.id, (0, 0.0))
            if self._clock() < not_before:
                continue
            age = (now - claim.created_at).total_seconds()
            if age > s.max_age_s:
                if claim.id not in self._reported:
                    self._reported.add(claim.id)
                    self.metrics.manual_reviews.inc()
                    log.error("operation could not be settled in time: manual review",
                              extra={"payment_id": p.id, "operation": claim.id, "kind": claim.kind})
                continue
            try:
                settled: Payment | None = await self.pipeline.settle_operation(p, claim)
            except VersionConflict:
                settled = None  # something else changed the payment: the next sweep reads it again
            except ProblemError as e:  # e.g. the channel is no longer configured: back off, say why
                log.warning("pending operation cannot be settled now", extra={"payment_id": p.id,
                                                                               "operation": claim.id, "code": e.code})
                settled = p
            if settled is not p:
                self._backoff.pop(claim.id, None)
                moved += 1
                continue
            delay = min(s.backoff_max_s, s.interval_s * 2**tries)
            self._backoff[claim.id] = (tries + 1, self._clock() + delay)
        return moved

    async def _settle(self, p: Payment, now: datetime) -> Payment:
        age = (now - p.created_at).total_seconds()
        if p.status is Status.REQUIRES_ACTION and age > self.settings.action_expiry_s:
            return await self.pipeline.expire_action(p)
        settled = await self.pipeline.recover(p)
        if settled.status is p.status and age > self.settings.max_age_s:
            self.metrics.manual_reviews.inc()
            log.error("payment could not be settled in time: manual review", extra={"payment_id": p.id,
                                                                                   "status": p.status.value})
            return await self.pipeline.to_manual_review(p, f"unsettled after {int(age)} s in {p.status.value}")
        if settled.status is not p.status:
            self.metrics.recoveries.labels(p.status.value, settled.status.value).inc()
        return settled

    async def run_forever(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # noqa: BLE001 - a failed sweep is logged and retried, never fatal
                log.exception("janitor sweep failed")
            await asyncio.sleep(self.settings.interval_s)
