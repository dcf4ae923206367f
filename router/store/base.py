"""The durable-record interface. SQLite implements it for the embedded default; PostgreSQL for scale-out.

Contract:
- Every write is one transaction containing the payment row, its attempts and operations, and the
  outbox events describing the change. A call returns only after that transaction committed
  durably, so the HTTP response that follows it can never announce something a crash would lose.
- `insert_payment` enforces one payment per (merchant_id, merchant_order_id): `DuplicateOrder`, naming
  the order's live payment (else its latest). With `retry_failed_order=True`, an order whose payments
  all ended in a definitive failure (`declined` / `failed`: nothing was charged) takes a new payment,
  numbered `order_attempt = max + 1`. Whatever the callers do, an order never has more than one
  payment outside `declined` / `failed` (a partial unique index): of racing retries, exactly one wins.
  `find_by_order` returns the latest attempt.
- `update_payment` is an optimistic write: it applies only if the stored version equals
  `expected_version` (and `payment.version == expected_version + 1`), else `VersionConflict`.
- Nothing here ever sees a PAN or CVC: `Payment` carries only the card summary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Protocol

import msgspec

from router.errors import DuplicateOrder
from router.model import OutboxEvent, Payment, Status
from router.money.ledger import LedgerEntry


class PaymentStore(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the store cannot serve (used by /readyz)."""

    async def insert_payment(
        self, payment: Payment, events: Sequence[OutboxEvent] = (), *, ledger: Sequence[LedgerEntry] = (),
        retry_failed_order: bool = False,
    ) -> None:
        """`ledger`: the balanced entries of this change, written in the same transaction.
        `retry_failed_order`: accept a new payment for an order whose payments all failed definitively."""

    async def update_payment(
        self, payment: Payment, expected_version: int, events: Sequence[OutboxEvent] = (),
        *, ledger: Sequence[LedgerEntry] = (),
    ) -> None: ...

    async def get_payment(self, payment_id: str) -> Payment | None: ...

    async def find_by_order(self, merchant_id: str, merchant_order_id: str) -> Payment | None:
        """The order's latest payment (highest `order_attempt`)."""

    async def list_by_status(
        self, statuses: Sequence[Status], updated_before: datetime, limit: int = 100
    ) -> list[Payment]: ...

    async def list_pending_operations(self, created_before: datetime, limit: int = 100) -> list[Payment]:
        """Payments with a capture, void or refund still `pending` (claimed before `created_before`),
        oldest operation first."""

    async def outbox_events(self, payment_id: str) -> list[OutboxEvent]: ...

    async def record_callback(
        self, channel: str, event_id: str, payload: bytes, payment_id: str | None, received_at: datetime
    ) -> str | None:
        """Store an inbound callback before it is acknowledged. Returns None the first time; for a
        callback already stored under (channel, event_id), the outcome recorded for it ("" while open)."""

    async def set_callback_outcome(self, channel: str, event_id: str, outcome: str) -> None: ...


# Statuses that free a merchant order for a new payment: a definitive failure, nothing was charged.
# Both are terminal, so a payment never leaves them; the partial unique index of migration 0004 uses
# the same list (keep them in step).
ORDER_RETRYABLE: frozenset[str] = frozenset({Status.DECLINED.value, Status.FAILED.value})


def next_order_attempt(
    existing: Sequence[tuple[str, str, int]], payment_id: str, retry_failed_order: bool
) -> int:
    """The `order_attempt` of a new payment, given the order's payments as (id, status, order_attempt)
    read inside the inserting transaction; or `DuplicateOrder` naming the live payment (else the latest).
    Re-inserting a payment id the order already has is a duplicate of itself."""
    if not existing:
        return 1
    latest = max(existing, key=lambda r: r[2])
    for pid, status, _ in existing:
        if status not in ORDER_RETRYABLE:
            raise DuplicateOrder(pid)
    if any(pid == payment_id for pid, _, _ in existing):
        raise DuplicateOrder(payment_id)
    if not retry_failed_order:
        raise DuplicateOrder(latest[0])
    return latest[2] + 1


# --------------------------------------------------------------------------- webhook outbox
#
# Contract of the webhook side of the outbox (both stores, same semantics):
# - `fan_out_events` turns committed outbox events into one delivery per (event, endpoint) of the
#   event's merchant, in commit order, exactly once (a single fan-out runs at a time, even across
#   instances: that keeps a later event of a payment from being fanned out before an earlier one).
#   An event of a merchant without endpoints is marked fanned out with no delivery.
# - A delivery is claimable when it is pending, due, not leased, its endpoint is active, and no
#   earlier delivery of the same payment to the same endpoint is still pending (per-payment order;
#   a dead letter does not block). A claim takes a lease (`locked_until`, `lease_owner`): until it
#   lapses nobody else claims the row (PostgreSQL: `FOR UPDATE SKIP LOCKED`).
# - `finish_attempt` records the attempt and the delivery's new state, and applies the breaker's
#   decision to the endpoint row, in one transaction, and only if the caller still holds the lease.
# - Nothing is ever deleted: paused and disabled endpoints keep their pending deliveries.

DeliveryStatus = str  # "pending" | "delivered" | "dead"
EndpointStatus = str  # "active" | "paused" | "disabled"


class WebhookEndpointRow(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    merchant_id: str
    url: str
    state: EndpointStatus = "active"
    consecutive_failures: int = 0
    failing_since: datetime | None = None
    paused_until: datetime | None = None
    disabled_reason: str | None = None
    updated_at: datetime | None = None


class DeliveryClaim(msgspec.Struct, frozen=True, kw_only=True):
    """A leased delivery: the event to send to one endpoint."""

    event_id: str
    endpoint_id: str
    merchant_id: str
    payment_id: str
    type: str
    payload: bytes
    attempts: int  # attempts made so far (all rounds)
    round_attempts: int  # attempts since creation or the last re-drive: the position in the schedule
    lease_owner: str


class WebhookAttemptRow(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str
    endpoint_id: str
    attempt: int  # 1-based over the delivery's whole life
    started_at: datetime
    latency_ms: float
    outcome: str  # delivered | failed | gone | refused | timeout | unreachable | throttled
    status_code: int | None = None
    error: str | None = None
    response_snippet: str | None = None  # at most 512 bytes of UTF-8


class DeliveryUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """What becomes of a delivery after an attempt."""

    status: DeliveryStatus
    next_attempt_at: datetime  # ignored unless pending


class WebhookDeliveryRow(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str
    endpoint_id: str
    merchant_id: str
    payment_id: str
    type: str
    status: DeliveryStatus
    attempts: int
    round_attempts: int
    created_at: datetime
    next_attempt_at: datetime
    delivered_at: datetime | None = None
    dead_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    locked_until: datetime | None = None


# Given the endpoint as stored (read under a row lock), return it as it must be after the attempt.
EndpointDecision = Callable[[WebhookEndpointRow], WebhookEndpointRow]


def manual_endpoint_state(ep: WebhookEndpointRow, state: EndpointStatus, now: datetime, reason: str | None) -> WebhookEndpointRow:
    """An operator's enable / pause / disable: the endpoint as it must be stored afterwards."""
    if state == "active":
        return msgspec.structs.replace(ep, state="active", consecutive_failures=0, failing_since=None,
                                       paused_until=None, disabled_reason=None, updated_at=now)
    if state == "paused":
        return msgspec.structs.replace(ep, state="paused", paused_until=now, updated_at=now)
    if state == "disabled":
        return msgspec.structs.replace(ep, state="disabled", disabled_reason=reason or "operator", updated_at=now)
    raise ValueError(f"unknown endpoint state {state!r}")


class OutboxStore(Protocol):
    async def sync_webhook_endpoints(self, endpoints: Sequence[WebhookEndpointRow], now: datetime) -> None:
        """Insert endpoints not yet known (active); known ones keep their state, url/merchant refreshed."""

    async def list_webhook_endpoints(self) -> list[WebhookEndpointRow]: ...

    async def set_webhook_endpoint_state(
        self, endpoint_id: str, state: EndpointStatus, now: datetime, reason: str | None = None
    ) -> WebhookEndpointRow | None:
        """Operator action (enable / pause / disable). Enabling resets the failure count."""

    async def fan_out_events(
        self, endpoints_by_merchant: Mapping[str, Sequence[str]], now: datetime, limit: int = 500
    ) -> int:
        """Create deliveries for events not fanned out yet; returns how many events were taken."""

    async def claim_deliveries(
        self, endpoint_id: str, now: datetime, lease_until: datetime, owner: str, limit: int
    ) -> list[DeliveryClaim]: ...

    async def claim_probe(
        self, endpoint_id: str, now: datetime, next_probe_at: datetime, lease_until: datetime, owner: str
    ) -> DeliveryClaim | None:
        """For a paused endpoint whose `paused_until` has passed: move it to `next_probe_at` and lease
        one claimable delivery, atomically (one probe per interval across instances)."""

    async def finish_attempt(
        self, claim: DeliveryClaim, attempt: WebhookAttemptRow, update: DeliveryUpdate,
        decide: EndpointDecision, now: datetime,
    ) -> tuple[WebhookEndpointRow, WebhookEndpointRow] | None:
        """(endpoint before, endpoint after), or None if the lease was lost (nothing written)."""

    async def next_webhook_due(self, now: datetime) -> datetime | None:
        """The earliest instant something may become claimable (a due delivery or a probe)."""

    async def list_webhook_deliveries(
        self, *, status: DeliveryStatus | None = None, endpoint_id: str | None = None,
        merchant_id: str | None = None, since: datetime | None = None, until: datetime | None = None,
        limit: int = 100,
    ) -> list[WebhookDeliveryRow]:
        """Newest first (by event creation)."""

    async def get_webhook_deliveries(self, event_id: str) -> list[WebhookDeliveryRow]: ...

    async def webhook_attempts(self, event_id: str) -> list[WebhookAttemptRow]:
        """Every attempt of every delivery of the event, oldest first."""

    async def redrive_deliveries(
        self, now: datetime, *, event_id: str | None = None, endpoint_id: str | None = None,
        since: datetime | None = None, until: datetime | None = None,
    ) -> int:
        """Dead letters matching the filter (event creation time in [since, until)) become pending
        again, due now, at the start of the schedule. Returns how many."""


class DurableStore(PaymentStore, OutboxStore, Protocol):
    """What both stores implement: the payment record and the webhook side of its outbox."""
