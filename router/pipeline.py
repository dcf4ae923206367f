"""The payment pipeline, in one straight line.

    screen -> route -> record `processing` -> for each channel in the plan:
        breaker gate -> build -> send (retry only ChannelUnavailable) -> parse -> stop or fail over
    -> record the outcome (payment + attempts + outbox event, one transaction) -> return

Authentication, validation and the idempotency claim happen before, in the HTTP layer. Rules:
- approval or hard decline stops; soft decline and unavailable fail over to the next channel;
- an unknown outcome stops at once: the payment goes `pending` and only a status query on that same
  channel may resolve it. It is never failed over;
- every channel call carries a deterministic key (payment id + attempt number), the same on retries;
- the caller gets the payment only after the final write committed.
Captures, voids and refunds follow the state machine in `router.model`; an illegal one is a 409.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable

import msgspec
import orjson

from policies.base import Chain
from policies.rules import RulesPolicy
from policies.success_rate import SuccessStats, counts_for_channel
from router.breaker import BreakerOpen
from router.duplicates import FingerprintWindow, MemoryFingerprintWindow, fingerprint
from router.errors import (
    ChannelUnavailable,
    DuplicateOrder,
    FieldError,
    IllegalTransition,
    IntegrationError,
    OutcomeUnknown,
    ProblemError,
    VersionConflict,
)
from router.faults import crash_point
from router.locks import MemoryOrderLocks, OrderLocks, order_lock
from router.metrics import Metrics
from router.model import (
    Attempt,
    CallbackEvent,
    ChannelAuthorize,
    ChannelOperation,
    ChannelResult,
    Decline,
    DeclineCategory,
    Operation,
    OutboxEvent,
    Outcome,
    Payment,
    PaymentRequest,
    RouteContext,
    RouteStep,
    RoutingDecision,
    SensitiveCard,
    Status,
    WireRequest,
    can_transition,
    route_context,
    utcnow,
)
from router.money.ledger import postings_for
from router.money.pricing import NoPricing, Pricing
from router.runtime import ChannelRuntime, Runtime
from router.store.base import PaymentStore
from router.validation import currency_exponent

log = logging.getLogger("payroute.pipeline")

_RECORD_TRIES = 5  # re-reads of a payment changed between an operation's claim and its result
_FINAL_FOR_METRICS = {Status.CAPTURED, Status.AUTHORIZED, Status.DECLINED, Status.FAILED, Status.PENDING, Status.REQUIRES_ACTION}


class _RandomHex:
    """10 random bytes (hex) at a time, from os.urandom read 40 KB at once: the same kernel CSPRNG as
    `secrets.token_hex`, but one getrandom() per 4,000 ids instead of one per id. Each getrandom() releases
    and re-takes the GIL, which under load means waiting for the SQLite threads (measured with one busy
    thread: ~0.7 ms per call, whatever its size). Thread-safe (a lock around the slice) and fork-safe (a
    child never reuses its parent's buffer)."""

    _CHUNK = 40_000  # a multiple of 10

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf = b""
        self._pos = 0

    def reset(self) -> None:
        self._buf, self._pos = b"", 0

    def __call__(self) -> str:
        with self._lock:
            if self._pos >= len(self._buf):
                self._buf, self._pos = secrets.token_bytes(self._CHUNK), 0
            pos = self._pos
            self._pos = pos + 10
            return self._buf[pos:pos + 10].hex()


_random_hex = _RandomHex()
os.register_at_fork(after_in_child=_random_hex.reset)


def new_id(prefix: str) -> str:
    # time-ordered (ms) then random: ids sort by creation, and collide with probability ~2^-80
    return f"{prefix}_{int(time.time() * 1000):011x}{_random_hex()}"


def channel_key(payment_id: str, attempt: int) -> str:
    """Deterministic per payment and attempt: retries and recovery reuse it, so a channel that
    honours idempotency keys can never charge the attempt twice. Max 40 chars (Adyen allows 64)."""
    return f"{payment_id}-a{attempt}"


def payment_json(p: Payment) -> dict[str, object]:
    """The public payment object (no internal fields)."""
    doc: dict[str, object] = msgspec.to_builtins(p)
    doc.pop("idempotency_key", None)
    doc["object"] = "payment"
    doc["attempts"] = [
        {
            "channel": a.channel,
            "outcome": a.outcome.value,
            "code": a.code,
            "latency_ms": round(a.latency_ms, 3),
            "retries": a.retries,
        }
        for a in p.attempts
    ]
    return doc


# The public JSON of the last payments serialized, by object identity: a payment's outbox event and
# its HTTP response carry the same document, so it is built and encoded once. A `Payment` is immutable
# (frozen struct) and the entry holds a reference to it, so an id can never be reused while cached.
_BODY_CACHE: dict[int, tuple[Payment, bytes]] = {}
_BODY_CACHE_MAX = 512  # only needs to outlive event -> commit -> response of the payments in flight


def payment_body(p: Payment) -> bytes:
    """`payment_json(p)` encoded (orjson), built once per payment object."""
    hit = _BODY_CACHE.get(id(p))
    if hit is not None and hit[0] is p:
        return hit[1]
    body = orjson.dumps(payment_json(p))
    if len(_BODY_CACHE) >= _BODY_CACHE_MAX:
        with contextlib.suppress(KeyError, RuntimeError, StopIteration):  # another thread evicted it first
            del _BODY_CACHE[next(iter(_BODY_CACHE))]  # oldest first (dicts keep insertion order)
    _BODY_CACHE[id(p)] = (p, body)
    return body


def event_for(p: Payment, kind: str | None = None) -> OutboxEvent:
    etype = f"payment.{kind or p.status.value}"
    eid = new_id("evt")
    now = utcnow()  # one clock reading for the event's row and its payload
    payload = orjson.dumps(
        {"id": eid, "type": etype, "created_at": now.isoformat(), "data": orjson.Fragment(payment_body(p))}
    )
    return OutboxEvent(id=eid, merchant_id=p.merchant_id, payment_id=p.id, type=etype, payload=payload, created_at=now)


class Pipeline:
    def __init__(
        self,
        runtime: Callable[[], Runtime],
        store: PaymentStore,
        metrics: Metrics,
        *,
        locks: OrderLocks | None = None,
        window: FingerprintWindow | None = None,
        pricing: Pricing | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._runtime = runtime
        self.store = store
        self.locks: OrderLocks = locks or MemoryOrderLocks()
        self.window: FingerprintWindow = window or MemoryFingerprintWindow()
        self._pricing = pricing

        self.metrics = metrics
        self._sleep = sleep
        self._clock = clock
        self._op_locks: dict[str, asyncio.Lock] = {}

    @property
    def pricing(self) -> Pricing:
        """What channels charge us and what we charge merchants (the ledger posts both with each change):
        the config's, unless one was given."""
        return self._pricing or getattr(self._runtime(), "pricing", None) or NoPricing()

    # ------------------------------------------------------------------ authorize

    async def create_payment(
        self, req: PaymentRequest, card: SensitiveCard | None, idempotency_key: str | None
    ) -> Payment:
        rt = self._runtime()  # one config snapshot for the whole payment
        dup = rt.config.duplicates
        # a lock per order keeps two devices from running the same order at once; it is only an
        # optimization: the unique (merchant, order id) in the durable store is what guarantees it
        async with order_lock(self.locks, f"{req.merchant_id}:{req.merchant_order_id}", dup.order_lock_ttl_ms) as tok:
            if tok is None:
                raise ProblemError(
                    409, "order_in_progress", "A payment for this merchant_order_id is being processed",
                    "retry shortly: you will get the existing payment's id",
                    [FieldError("merchant_order_id", "in_progress", "another request is processing this order")],
                )
            if dup.fingerprint_mode == "block":
                # a retry of the same order must be told about its payment, not called a look-alike;
                # otherwise the insert's unique constraint says so without this extra read
                existing = await self.store.find_by_order(req.merchant_id, req.merchant_order_id)
                retryable = dup.allow_retry_after_failure and existing is not None and existing.status in (
                    Status.DECLINED, Status.FAILED)
                if existing is not None and not retryable:
                    raise _duplicate_order(existing.id)
            payment_id = new_id("pay")
            duplicate_of = None
            fp = fingerprint(req) if dup.fingerprint_mode != "off" else None
            if fp is not None:
                duplicate_of = await self.window.remember(fp, payment_id, dup.fingerprint_window_s)
                if duplicate_of is not None and dup.fingerprint_mode == "block":
                    raise ProblemError(
                        409, "duplicate_payment_suspected",
                        "The same customer paid the same amount moments ago",
                        f"within {int(dup.fingerprint_window_s)} s; use another merchant_order_id after checking",
                        extra={"earlier_payment_id": duplicate_of},
                    )
            return await self._create(rt, payment_id, req, card, idempotency_key, duplicate_of)

    async def _create(
        self, rt: Runtime, payment_id: str, req: PaymentRequest, card: SensitiveCard | None,
        idempotency_key: str | None, duplicate_of: str | None,
    ) -> Payment:
        cfg = rt.config
        now = utcnow()
        payment = Payment(
            id=payment_id,
            merchant_id=req.merchant_id,
            merchant_order_id=req.merchant_order_id,
            status=Status.PROCESSING,
            amount=req.amount,
            currency=req.currency,
            country=req.country,
            capture=req.capture,
            payment_method=req.payment_method,
            description=req.description,
            customer_id=req.customer_id,
            metadata=req.metadata,
            idempotency_key=idempotency_key,
            duplicate_of=duplicate_of,
            created_at=now,
            updated_at=now,
        )
        chain = rt.chain_for(req.merchant_id)
        all_names = list(rt.channels)

        # 1. compliance, before any routing or channel
        rule = rt.blocked.get(req.country)
        if rule is not None:
            self.metrics.compliance_blocks.labels(rule.id).inc()
            decision = RoutingDecision(
                chain=chain.name, config_version=rt.version, candidates=all_names, plan=[], blocked_by=rule.id
            )
            failed = msgspec.structs.replace(
                payment,
                status=Status.FAILED,
                routing=decision,
                decline=Decline(code="compliance_blocked", message=f"{rule.reason} (rule {rule.id})", category=DeclineCategory.HARD),
            )
            await self._insert(failed)
            return self._count(failed)

        # 2. route
        ctx = route_context(payment)
        plan, removed, trace = chain.explain(ctx, rt.candidates())
        blocking_rule = _blocking_rule(chain, ctx) if not plan else None
        decision = RoutingDecision(
            chain=chain.name, config_version=rt.version, candidates=all_names, plan=[c.name for c in plan],
            removed=removed, steps=[RouteStep(policy=t.policy, output=t.names) for t in trace],
            blocked_by=f"rule:{blocking_rule[0]}" if blocking_rule else None,
        )
        payment = msgspec.structs.replace(payment, routing=decision)
        if not plan:
            refusal = (
                Decline(code=blocking_rule[1], message=f"blocked by routing rule {blocking_rule[0]}",
                        category=DeclineCategory.HARD)
                if blocking_rule else
                Decline(code="no_eligible_channel", message="no channel can take this payment", category=DeclineCategory.HARD)
            )
            failed = msgspec.structs.replace(payment, status=Status.FAILED, decline=refusal)
            await self._insert(failed)
            return self._count(failed)

        # 3. record that we are about to call channels: a crash from here on leaves a trace to recover
        await self._insert(payment)
        crash_point("after_record")

        # 4. attempts
        deadline = self._clock() + cfg.server.payment_deadline_ms / 1000
        attempts: list[Attempt] = []
        final: Status | None = None
        result: ChannelResult | None = None
        last_soft: Attempt | None = None
        used: ChannelRuntime | None = None
        stats = rt.env.state.get("success_stats")
        for seq, cand in enumerate(plan, start=1):
            ch = rt.channels[cand.name]
            if self._clock() >= deadline:
                break
            attempt, result = await self._attempt(ch, seq, payment, req, card, deadline, cfg.server.public_url)
            attempts.append(attempt)
            outcome = attempt.outcome
            if stats is not None and seq == 1 and outcome in (Outcome.PENDING, Outcome.REQUIRES_ACTION):
                stats.expect(ch.name, ctx)  # learnt when it settles (_settle): delayed feedback
            if stats is not None and (seq == 1 or outcome in (Outcome.UNAVAILABLE, Outcome.UNKNOWN)):
                # only what the channel caused moves its success rate (a card's own decline does not);
                # a fail-over attempt carries a card another channel just declined, so its approval
                # odds are not the channel's: only its infrastructure failures count
                verdict = counts_for_channel(outcome.value, attempt.code)
                if verdict is not None:
                    stats.record_outcome(ch.name, ctx, verdict, time.time())
            if outcome is Outcome.APPROVED and result is not None:
                final = Status.CAPTURED if (req.capture or result.captured) else Status.AUTHORIZED
            elif outcome is Outcome.HARD_DECLINE:
                final = Status.DECLINED
            elif outcome in (Outcome.UNKNOWN, Outcome.PENDING):
                final = Status.PENDING
            elif outcome is Outcome.REQUIRES_ACTION:
                final = Status.REQUIRES_ACTION
            if final is not None:
                used = ch
                break
            if outcome is Outcome.SOFT_DECLINE:
                last_soft = attempt
            if outcome is not Outcome.SKIPPED:
                self.metrics.failovers.labels(ch.name, outcome.value).inc()

        decline: Decline | None = None
        if final is None:
            if last_soft is not None:
                final = Status.DECLINED
                decline = Decline(
                    code=last_soft.code or "declined", message="every channel in the plan declined",
                    category=DeclineCategory.SOFT, channel=last_soft.channel,
                )
            else:
                final = Status.FAILED
                decline = Decline(
                    code="channels_unavailable", message="no channel in the plan could be reached",
                    category=DeclineCategory.SOFT,
                )
        elif final is Status.DECLINED and result is not None and used is not None:
            decline = Decline(
                code=result.code or "declined", message=result.message or "declined", category=DeclineCategory.HARD,
                channel=used.name,
            )
        done = msgspec.structs.replace(
            payment,
            status=final,
            attempts=attempts,
            decline=decline,
            channel=used.name if used else None,
            channel_reference=result.channel_reference if (used and result) else None,
            captured_amount=payment.amount if final is Status.CAPTURED else 0,
            next_action=result.next_action if (used and result) else None,
            version=payment.version + 1,
            updated_at=utcnow(),
        )
        crash_point("before_commit")
        try:
            await self.store.update_payment(
            done, payment.version, [event_for(done)], ledger=postings_for(payment, done, self.pricing)
        )
        except VersionConflict:
            # the janitor settled it first (only possible past the deadline): the record is the truth
            current = await self.store.get_payment(payment.id)
            if current is None:
                raise
            log.error("payment settled elsewhere while in flight", extra={"payment_id": payment.id})
            return current
        return self._count(done)

    async def _attempt(
        self,
        ch: ChannelRuntime,
        seq: int,
        payment: Payment,
        req: PaymentRequest,
        card: SensitiveCard | None,
        deadline: float,
        public_url: str | None,
    ) -> tuple[Attempt, ChannelResult | None]:
        key = channel_key(payment.id, seq)
        try:
            wire = self._build_authorize(ch, ChannelAuthorize(
                payment_id=payment.id, attempt=seq, channel_key=key, reference=key, amount=req.amount,
                currency=req.currency, exponent=req.exponent, country=req.country, capture=req.capture, card=card,
                method=req.payment_method.type, wallet=req.payment_method.wallet,
                notify_url=f"{public_url.rstrip('/')}/callbacks/{ch.name}" if public_url else None,
                description=req.description,
            ))
        except IntegrationError as e:
            # the adapter cannot express this payment for its channel: nothing was sent, try the next
            self.metrics.integration_errors.labels(ch.name).inc()
            log.error("adapter could not build the request", extra={"channel": ch.name, "reason": str(e)})
            attempt = Attempt(seq=seq, channel=ch.name, outcome=Outcome.UNAVAILABLE, code="unsupported_request",
                              latency_ms=0.0, channel_key=key)
            self.metrics.attempts.labels(ch.name, attempt.outcome.value).inc()
            return attempt, None
        started = utcnow()
        t0 = self._clock()
        retries = 0

        def count_retry() -> None:
            nonlocal retries
            retries += 1
            self.metrics.retries.labels(ch.name).inc()

        result: ChannelResult | None = None
        code: str | None = None
        try:
            async with ch.breaker.guard():
                result = await self._send(ch, wire, deadline, ch.adapter.parse_authorize, count_retry)
            outcome, code = result.outcome, result.code
        except BreakerOpen:
            outcome, code = Outcome.SKIPPED, "breaker_open"
        except ChannelUnavailable as e:
            outcome, code = Outcome.UNAVAILABLE, e.code
        except OutcomeUnknown as e:
            outcome, code = Outcome.UNKNOWN, e.code
        latency = self._clock() - t0
        self.metrics.child(self.metrics.attempts, ch.name, outcome.value).inc()
        if outcome is not Outcome.SKIPPED:
            self.metrics.child(self.metrics.attempt_latency, ch.name).observe(latency)
        if outcome is Outcome.UNKNOWN:
            log.warning("channel outcome unknown; payment goes pending", extra={"payment_id": payment.id, "channel": ch.name, "code": code})
        attempt = Attempt(
            seq=seq, channel=ch.name, outcome=outcome, code=code, latency_ms=latency * 1000, channel_key=key,
            channel_reference=result.channel_reference if result else None, retries=retries, started_at=started,
        )
        return attempt, result

    @staticmethod
    def _build_authorize(ch: ChannelRuntime, req: ChannelAuthorize) -> WireRequest:
        try:
            return ch.adapter.build_authorize(req)
        except (ValueError, KeyError, TypeError) as e:  # an adapter's refusal, typed or not
            raise IntegrationError(f"{type(e).__name__}: {e}") from None

    async def _send(
        self,
        ch: ChannelRuntime,
        wire: WireRequest,
        deadline: float,
        parse: Callable[..., ChannelResult],
        on_retry: Callable[[], None],
    ) -> ChannelResult:
        from router.transport import with_retries

        async def once() -> ChannelResult:
            crash_point("during_send")
            resp = await ch.transport.send(wire, timeout_s=deadline - self._clock())
            try:
                return parse(resp)
            except IntegrationError as e:
                self.metrics.integration_errors.labels(ch.name).inc()
                raise OutcomeUnknown(str(e), code="integration_error") from None

        retry = ch.config.retry
        return await with_retries(
            once, attempts=retry.attempts, base_s=retry.base_ms / 1000, max_s=retry.max_ms / 1000, deadline=deadline,
            budget=ch.budget, sleep=self._sleep, on_retry=on_retry, clock=self._clock,
        )

    async def _insert(self, p: Payment) -> None:
        events = [event_for(p)] if p.status is not Status.PROCESSING else []
        try:
            await self.store.insert_payment(
                p, events, ledger=postings_for(None, p, self.pricing),
                retry_failed_order=self._runtime().config.duplicates.allow_retry_after_failure,
            )
        except DuplicateOrder as e:
            raise _duplicate_order(e.existing_payment_id) from None

    def _count(self, p: Payment) -> Payment:
        if p.status in _FINAL_FOR_METRICS:
            self.metrics.child(self.metrics.payments, p.channel or "none", p.status.value).inc()
        return p

    # ------------------------------------------------------------------ reads

    async def get(self, merchant_id: str, payment_id: str) -> Payment:
        p = await self.store.get_payment(payment_id)
        if p is None or p.merchant_id != merchant_id:
            # another merchant's payment is indistinguishable from a missing one
            raise ProblemError(404, "payment_not_found", "No such payment", f"no payment {payment_id!r}")
        return p

    # ------------------------------------------------------------------ status query (pending -> final)

    async def resolve_pending(self, payment: Payment) -> Payment:
        """Ask the channel that was tried what became of a pending payment, and apply the answer."""
        if payment.status not in (Status.PENDING, Status.REQUIRES_ACTION, Status.MANUAL_REVIEW) or not payment.attempts \
                or not payment.channel:
            return payment
        rt = self._runtime()
        ch = rt.channels.get(payment.channel)
        if ch is None:
            return payment
        last = payment.attempts[-1]
        try:
            resp = await ch.transport.send(ch.adapter.build_status(last.channel_key, last.channel_reference))
            result = ch.adapter.parse_status(resp)
        except (ChannelUnavailable, OutcomeUnknown):
            return payment
        return await self._settle(payment, result)

    async def recover(self, payment: Payment) -> Payment:
        """Settle a payment that a crash or a timeout left in flight, by asking the channels.

        `processing` (a crash between recording and finishing): every channel of the recorded plan is
        asked, in plan order, about the attempt's deterministic reference. The first that has the
        payment decides it (a soft decline moves on, as the live run would have); when every one says
        "not charged", nothing was charged and the payment fails. `pending` / `requires_action`: the
        channel that was tried is asked. When any channel cannot answer yet, nothing changes.
        """
        if payment.status is not Status.PROCESSING:
            return await self.resolve_pending(payment)
        rt = self._runtime()
        plan = payment.routing.plan if payment.routing else []
        attempts: list[Attempt] = []
        last_soft: Attempt | None = None
        for seq, name in enumerate(plan, start=1):
            ch = rt.channels.get(name)
            if ch is None:
                return payment  # its channel is gone from the config: leave it to an operator
            key = channel_key(payment.id, seq)
            t0 = self._clock()
            try:
                resp = await ch.transport.send(ch.adapter.build_status(key, None))
                result = ch.adapter.parse_status(resp)
            except (ChannelUnavailable, OutcomeUnknown):
                return payment  # cannot tell yet: ask again later
            attempt = Attempt(seq=seq, channel=name, outcome=result.outcome, code=result.code,
                              latency_ms=(self._clock() - t0) * 1000, channel_key=key,
                              channel_reference=result.channel_reference)
            attempts.append(attempt)
            if result.outcome in (Outcome.NOT_CHARGED, Outcome.SOFT_DECLINE):
                last_soft = attempt if result.outcome is Outcome.SOFT_DECLINE else last_soft
                continue
            if result.outcome is Outcome.APPROVED:
                status = Status.CAPTURED if (payment.capture or result.captured) else Status.AUTHORIZED
            elif result.outcome is Outcome.HARD_DECLINE:
                status = Status.DECLINED
            elif result.outcome is Outcome.REQUIRES_ACTION:
                status = Status.REQUIRES_ACTION
            else:
                status = Status.PENDING
            return await self._finish_recovery(payment, status, attempts, ch.name, result)
        if last_soft is not None:
            decline = Decline(code=last_soft.code or "declined", message="every channel in the plan declined",
                              category=DeclineCategory.SOFT, channel=last_soft.channel)
            return await self._finish_recovery(payment, Status.DECLINED, attempts, None, None, decline)
        decline = Decline(code="not_charged", message="interrupted before any channel charged it",
                          category=DeclineCategory.SOFT)
        return await self._finish_recovery(payment, Status.FAILED, attempts, None, None, decline)

    async def _finish_recovery(
        self, payment: Payment, status: Status, attempts: list[Attempt], channel: str | None,
        result: ChannelResult | None, decline: Decline | None = None,
    ) -> Payment:
        if decline is None and status is Status.DECLINED and result is not None:
            decline = Decline(code=result.code or "declined", message=result.message or "declined",
                              category=DeclineCategory.HARD, channel=channel)
        done = msgspec.structs.replace(
            payment, status=status, attempts=attempts, decline=decline, channel=channel,
            channel_reference=result.channel_reference if result else None,
            captured_amount=payment.amount if status is Status.CAPTURED else 0,
            next_action=result.next_action if result else None,
            version=payment.version + 1, updated_at=utcnow(),
        )
        await self.store.update_payment(
            done, payment.version, [event_for(done)], ledger=postings_for(payment, done, self.pricing)
        )
        return self._count(done)

    async def expire_action(self, payment: Payment) -> Payment:
        """A wallet payment the customer never completed: close it at the channel, then fail it."""
        settled = await self.resolve_pending(payment)
        if settled.status is not payment.status:
            return settled  # the customer paid (or the channel failed it) after all
        rt = self._runtime()
        ch = rt.channels.get(payment.channel or "")
        if ch is None or not payment.attempts:
            return payment
        last = payment.attempts[-1]
        op = ChannelOperation(kind="void", payment_id=payment.id, channel_reference=payment.channel_reference or last.channel_key,
                              channel_key=f"{payment.id}-close", amount=payment.amount, currency=payment.currency,
                              exponent=currency_exponent(payment.currency) or 0, payment_amount=payment.amount)
        try:
            resp = await ch.transport.send(ch.adapter.build_operation(op))
            result = ch.adapter.parse_operation(op, resp)
        except (ChannelUnavailable, OutcomeUnknown, IntegrationError, ValueError):
            return payment
        if result.outcome is not Outcome.APPROVED:
            return payment
        done = msgspec.structs.replace(
            payment, status=Status.FAILED, version=payment.version + 1, updated_at=utcnow(), next_action=None,
            decline=Decline(code="action_expired", message="the customer did not complete the payment in time",
                            category=DeclineCategory.SOFT, channel=payment.channel),
        )
        await self.store.update_payment(
            done, payment.version, [event_for(done)], ledger=postings_for(payment, done, self.pricing)
        )
        return self._count(done)

    async def to_manual_review(self, payment: Payment, reason: str) -> Payment:
        done = msgspec.structs.replace(
            payment, status=Status.MANUAL_REVIEW, version=payment.version + 1, updated_at=utcnow(),
            decline=Decline(code="manual_review", message=reason, category=DeclineCategory.SOFT, channel=payment.channel),
        )
        await self.store.update_payment(
            done, payment.version, [event_for(done)], ledger=postings_for(payment, done, self.pricing)
        )
        return done

    async def apply_callback(self, channel: str, event: CallbackEvent, payload: bytes) -> tuple[Payment | None, str]:
        """Apply a verified channel notification; returns the payment and what happened:
        `applied`, `unchanged`, `duplicate`, `unmatched` or `mismatch`.

        The payload is stored (deduplicated by the channel's event id) before anything else, so it is
        durable before the acknowledgement. Late, repeated or out-of-order notifications change nothing:
        the state machine only moves forward. A notification whose amount or currency disagrees with
        the record raises an alert and changes nothing."""
        payment_id = (event.reference or "").rpartition("-a")[0]
        event_id = event.event_id or hashlib.sha256(payload).hexdigest()
        seen = await self.store.record_callback(channel, event_id, payload, payment_id or None, utcnow())
        if seen is not None:
            return None, "duplicate"  # already stored (and applied, or being applied): nothing more to do
        payment = await self.store.get_payment(payment_id) if payment_id else None
        outcome = "unchanged"
        if payment is None or payment.channel not in (None, channel):
            log.warning("callback for an unknown payment", extra={"channel": channel, "event_id": event_id})
            payment, outcome = None, "unmatched"
        elif (event.amount is not None and event.amount != payment.amount) or (
            event.currency is not None and event.currency.upper() != payment.currency
        ):
            self.metrics.integration_errors.labels(channel).inc()
            log.error("callback amount or currency disagrees with the record; nothing changed", extra={
                "channel": channel, "payment_id": payment.id, "event_id": event_id,
                "callback_amount": event.amount, "callback_currency": event.currency,
                "amount": payment.amount, "currency": payment.currency})
            outcome = "mismatch"
        elif event.kind == "authorization" and payment.status in (
            Status.PENDING, Status.REQUIRES_ACTION, Status.MANUAL_REVIEW
        ):
            try:
                settled = await self._settle(payment, event.result)
                outcome = "applied" if settled.status is not payment.status else "unchanged"
                payment = settled
            except VersionConflict:
                payment = await self.store.get_payment(payment.id)  # a concurrent settle won; that is the answer
        await self.store.set_callback_outcome(channel, event_id, outcome)
        return payment, outcome

    async def _settle(self, payment: Payment, result: ChannelResult) -> Payment:
        """Move a pending / requires_action payment to what the channel says became of it."""
        if result.outcome is Outcome.APPROVED:
            status = Status.CAPTURED if (payment.capture or result.captured) else Status.AUTHORIZED
        elif result.outcome in (Outcome.HARD_DECLINE, Outcome.SOFT_DECLINE):
            status = Status.DECLINED
        elif result.outcome is Outcome.NOT_CHARGED:
            status = Status.FAILED  # the channel says it never charged: safe to call it failed
        else:
            return payment
        if not can_transition(payment.status, status):
            return payment
        done = msgspec.structs.replace(
            payment,
            status=status,
            channel_reference=result.channel_reference or payment.channel_reference,
            captured_amount=payment.amount if status is Status.CAPTURED else 0,
            next_action=None,
            decline=(
                Decline(code=result.code or "declined", message=result.message or "declined",
                        category=DeclineCategory.HARD, channel=payment.channel)
                if status is Status.DECLINED else
                Decline(code="not_charged", message="the channel has no charge for this attempt",
                        category=DeclineCategory.SOFT, channel=payment.channel)
                if status is Status.FAILED else None
            ),
            version=payment.version + 1,
            updated_at=utcnow(),
        )
        await self.store.update_payment(
            done, payment.version, [event_for(done)], ledger=postings_for(payment, done, self.pricing)
        )
        self._learn_late(payment, result)
        return self._count(done)

    def _learn_late(self, payment: Payment, result: ChannelResult) -> None:
        """A payment whose first attempt ended pending or requires_action (a wallet QR, a redirect) has
        its outcome now: the channel's success rate learns it, as at once for any other payment. One
        that went pending on an unknown outcome (a timeout) was counted against the channel then."""
        stats = self._runtime().env.state.get("success_stats")
        first = payment.attempts[0] if payment.attempts else None
        if not isinstance(stats, SuccessStats) or first is None or first.channel != payment.channel or \
                first.outcome not in (Outcome.PENDING, Outcome.REQUIRES_ACTION):
            return
        ctx = route_context(payment)
        verdict = counts_for_channel(result.outcome.value, result.code)
        if verdict is None:
            stats.settle(ctx)  # the card's decline, or not charged: nothing about the channel
        else:
            stats.record_outcome(first.channel, ctx, verdict, time.time())

    # ------------------------------------------------------------------ capture / void / refund

    async def capture(self, merchant_id: str, payment_id: str, amount: int | None) -> Payment:
        async with self._lock(payment_id):
            p = await self.get(merchant_id, payment_id)
            _refuse_while_pending(p, ("capture", "void"))
            if not can_transition(p.status, Status.CAPTURED) or p.status is not Status.AUTHORIZED:
                raise IllegalTransition(p.status.value, "capture")
            amt = p.amount if amount is None else amount
            if amt > p.amount:
                raise ProblemError(
                    400, "invalid_request", "The request is invalid", "capture amount exceeds the authorized amount",
                    [FieldError("amount", "amount_exceeds_authorized", f"at most {p.amount} may be captured")],
                )
            p, op = await self._operation(p, "capture", amt)
            return await self._record_op(p, op, _applied(op) if op.status == "succeeded" else _unchanged)

    async def void(self, merchant_id: str, payment_id: str) -> Payment:
        async with self._lock(payment_id):
            p = await self.get(merchant_id, payment_id)
            _refuse_while_pending(p, ("capture", "void"))
            if not can_transition(p.status, Status.VOIDED):
                raise IllegalTransition(p.status.value, "void")
            p, op = await self._operation(p, "void", p.amount)
            return await self._record_op(p, op, _applied(op) if op.status == "succeeded" else _unchanged)

    async def refund(self, merchant_id: str, payment_id: str, amount: int | None, reason: str | None) -> Payment:
        async with self._lock(payment_id):
            p = await self.get(merchant_id, payment_id)
            _refuse_while_pending(p, ("capture", "void", "refund"))
            if p.status not in (Status.CAPTURED, Status.PARTIALLY_REFUNDED):
                raise IllegalTransition(p.status.value, "refund")
            # pending refunds count as spent: an unknown outcome may have moved the money
            committed = sum(o.amount for o in p.operations if o.kind == "refund" and o.status in ("succeeded", "pending"))
            remaining = p.captured_amount - committed
            amt = remaining if amount is None else amount
            if amt <= 0 or amt > remaining:
                raise ProblemError(
                    400, "invalid_request", "The request is invalid", "refunds may not exceed the captured amount",
                    [FieldError("amount", "amount_exceeds_refundable", f"at most {max(remaining, 0)} may be refunded")],
                )
            p, op = await self._operation(p, "refund", amt, reason)
            return await self._record_op(p, op, _applied(op) if op.status == "succeeded" else _unchanged)

    def _lock(self, payment_id: str) -> _LockCtx:
        return _LockCtx(self._op_locks, payment_id)

    async def _operation(
        self, p: Payment, kind: str, amount: int, reason: str | None = None
    ) -> tuple[Payment, Operation]:
        """Claim the operation in the record, then ask the channel; returns (the payment as recorded with
        the claim, the operation with the channel's verdict). The claim (the operation `pending`, the
        version bumped) is committed before the channel hears of it: of two requests racing on two
        instances only one gets past it, so the channel is asked at most once, and a crash after the
        send leaves a pending operation in the record, never an unrecorded capture or refund."""
        claim = Operation(id=new_id(kind[:2] if kind != "refund" else "re"), kind=kind, amount=amount,
                          status="pending", reason=reason)
        claimed = msgspec.structs.replace(
            p, operations=[*p.operations, claim], version=p.version + 1, updated_at=utcnow()
        )
        ch, op, wire = self._operation_request(claimed, claim)
        try:
            await self.store.update_payment(claimed, p.version, [])
        except VersionConflict:
            raise ProblemError(409, "concurrent_update", "The payment changed while this request ran; fetch it and retry") from None
        deadline = self._clock() + self._runtime().config.server.payment_deadline_ms / 1000
        status, code, ref = "failed", None, None
        try:
            async with ch.breaker.guard():
                result = await self._send(ch, wire, deadline, lambda r: ch.adapter.parse_operation(op, r), lambda: None)
            code, ref = result.code, result.channel_reference
            status = "succeeded" if result.outcome is Outcome.APPROVED else "failed"
        except (BreakerOpen, ChannelUnavailable) as e:
            # the channel did not process it: the claim ends failed, so a retry may claim again
            self.metrics.operations.labels(ch.name, kind, "unavailable").inc()
            unsent = msgspec.structs.replace(claim, status="failed", code="channel_unavailable")
            await self._record_op(claimed, unsent, _unchanged, quiet=True)
            raise ProblemError(
                503, "channel_unavailable", f"The channel could not be reached to {kind}; nothing was changed",
                extra={"retryable": True},
            ) from e
        except OutcomeUnknown as e:
            status, code = "pending", e.code
        self.metrics.operations.labels(ch.name, kind, status).inc()
        return claimed, msgspec.structs.replace(claim, status=status, channel_reference=ref, code=code)

    def _operation_request(self, p: Payment, claim: Operation) -> tuple[ChannelRuntime, ChannelOperation, WireRequest]:
        """The channel request for an operation of `p` (which holds `claim`). Its channel key is the same
        whenever it is built (`<payment>-capture`, `-void`, `-r<n>` for the n-th refund), so a re-send
        is an idempotent replay at the channel."""
        rt = self._runtime()
        ch = rt.channels.get(p.channel or "")
        if ch is None or p.channel_reference is None:
            raise ProblemError(503, "channel_not_configured", "The payment's channel is not configured any more")
        if claim.kind == "refund":
            n = 1 + [o.id for o in p.operations if o.kind == "refund"].index(claim.id)
            key = f"{p.id}-r{n}"
        else:
            key = f"{p.id}-{claim.kind}"
        op = ChannelOperation(
            kind=claim.kind, payment_id=p.id, channel_reference=p.channel_reference, channel_key=key,
            amount=claim.amount, currency=p.currency, exponent=currency_exponent(p.currency) or 0,
            payment_amount=p.amount,
        )
        try:
            return ch, op, ch.adapter.build_operation(op)
        except (IntegrationError, ValueError, KeyError, TypeError) as e:
            raise ProblemError(
                409, "operation_not_supported", f"The channel {ch.name} cannot {claim.kind} this payment", str(e)
            ) from None

    async def settle_operation(self, p: Payment, claim: Operation) -> Payment:
        """Ask the channel again about an operation left `pending` (its answer was lost, or we crashed
        after the send): the same request with the same channel key, which the channel answers from its
        idempotency record (or processes now, if it never got it). Records the verdict; an answer still
        unknown, or no answer, leaves it pending. Callers keep this within the channel's idempotency
        window (the janitor: `janitor.max_age_s`)."""
        ch, op, wire = self._operation_request(p, claim)
        deadline = self._clock() + self._runtime().config.server.payment_deadline_ms / 1000
        try:
            async with ch.breaker.guard():
                result = await self._send(ch, wire, deadline, lambda r: ch.adapter.parse_operation(op, r), lambda: None)
        except (BreakerOpen, ChannelUnavailable, OutcomeUnknown):
            return p
        verdict = msgspec.structs.replace(
            claim, status="succeeded" if result.outcome is Outcome.APPROVED else "failed",
            channel_reference=result.channel_reference, code=result.code,
        )
        self.metrics.operations.labels(ch.name, claim.kind, verdict.status).inc()
        if verdict.status != "succeeded":
            return await self._record_op(p, verdict, _unchanged, quiet=True)
        return await self._record_op(p, verdict, _applied(verdict))

    async def _record_op(
        self, p: Payment, op: Operation, decide: Callable[[Payment], tuple[Status | None, dict[str, int]]],
        *, quiet: bool = False,
    ) -> Payment:
        """Record the channel's verdict on `op`, claimed in `p` (replaced by its id). `decide` gives the
        new status (None: unchanged) and amounts from the payment as it is when written: should something
        else have changed it since the claim (a late callback, the janitor), it is read again and the
        verdict applied to that. `quiet`: the caller raises its own error."""
        current = p
        for _ in range(_RECORD_TRIES):
            status, changes = decide(current)
            if status is not None and not can_transition(current.status, status):
                raise IllegalTransition(current.status.value, op.kind)
            updated = msgspec.structs.replace(
                current, status=status or current.status, operations=[op if o.id == op.id else o for o in current.operations],
                version=current.version + 1, updated_at=utcnow(), **changes,
            )
            kind = None if status is not None else f"{op.kind}.{op.status}"
            try:
                await self.store.update_payment(
                    updated, current.version, [event_for(updated, kind)], ledger=postings_for(current, updated, self.pricing)
                )
                break
            except VersionConflict:
                fresh = await self.store.get_payment(p.id)
                if fresh is None or not any(o.id == op.id and o.status == "pending" for o in fresh.operations):
                    log.error("operation claim vanished before its result", extra={"payment_id": p.id, "operation": op.id})
                    raise ProblemError(409, "concurrent_update", "The payment changed while this request ran; fetch it") from None
                current = fresh
        else:
            log.error("operation result lost every version race", extra={"payment_id": p.id, "operation": op.id})
            raise ProblemError(409, "concurrent_update", "The payment changed while this request ran; fetch it and retry")
        if op.status == "failed" and not quiet:
            raise ProblemError(
                402, f"{op.kind}_declined", f"The channel declined the {op.kind}", op.code,
                extra={"payment": payment_json(updated)},
            )
        return updated


def _unchanged(cur: Payment) -> tuple[Status | None, dict[str, int]]:
    return None, {}


def _applied(op: Operation) -> Callable[[Payment], tuple[Status | None, dict[str, int]]]:
    """What a succeeded capture, void or refund does to the payment as it is when recorded."""

    def decide(cur: Payment) -> tuple[Status | None, dict[str, int]]:
        if op.kind == "capture":
            return Status.CAPTURED, {"captured_amount": op.amount}
        if op.kind == "void":
            return Status.VOIDED, {}
        total = cur.refunded_amount + op.amount
        return (Status.REFUNDED if total >= cur.captured_amount else Status.PARTIALLY_REFUNDED,
                {"refunded_amount": total})

    return decide


def _refuse_while_pending(p: Payment, kinds: tuple[str, ...]) -> None:
    """An operation of one of `kinds` whose outcome the channel has not told us blocks this one (a capture or
    void blocks captures and voids; any of them blocks a refund): the money may already have moved (it is
    settled by the channel's callback, the janitor's re-send or an operator)."""
    for o in p.operations:
        if o.kind in kinds and o.status == "pending":
            raise ProblemError(
                409, "operation_pending", f"A {o.kind} of this payment is pending with the channel",
                "wait until it is settled; fetch the payment to see it",
                extra={"operation_id": o.id},
            )


def _blocking_rule(chain: Chain, ctx: RouteContext) -> tuple[str, str] | None:
    """(rule id, block code) when a routing rule blocked the payment, for the record."""
    for step in chain.steps:
        if isinstance(step, RulesPolicy):
            rule = step.match(ctx)
            if rule is not None and rule.outcome.block:
                return rule.id, rule.outcome.block_code
    return None


def _duplicate_order(existing_id: str) -> ProblemError:
    return ProblemError(
        409, "duplicate_merchant_order_id", "A payment for this merchant_order_id already exists",
        f"payment {existing_id} already exists for this order",
        [FieldError("merchant_order_id", "duplicate", "already used by another payment")],
        extra={"existing_payment_id": existing_id},
    )


class _LockCtx:
    """An in-process lock per payment for operations (an optimization: the version check is the truth)."""

    def __init__(self, locks: dict[str, asyncio.Lock], key: str) -> None:
        self._locks, self._key = locks, key

    async def __aenter__(self) -> None:
        lock = self._locks.get(self._key)
        if lock is None:
            lock = self._locks[self._key] = asyncio.Lock()
        await lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        lock = self._locks[self._key]
        lock.release()
        if not lock.locked() and not getattr(lock, "_waiters", None):
            del self._locks[self._key]


