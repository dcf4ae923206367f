"""The durable-record interface. SQLite implements it for the embedded default; PostgreSQL for scale-out.

Contract:
- Every write is one transaction containing the payment row, its attempts and operations, and the
  outbox events describing the change. A call returns only after that transaction committed
  durably, so the HTTP response that follows it can never announce something a crash would lose.
- `insert_payment` enforces one payment per (merchant_id, merchant_order_id): `DuplicateOrder`.
- `update_payment` is an optimistic write: it applies only if the stored version equals
  `expected_version` (and `payment.version == expected_version + 1`), else `VersionConflict`.
- Nothing here ever sees a PAN or CVC: `Payment` carries only the card summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from router.model import OutboxEvent, Payment, Status


class PaymentStore(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the store cannot serve (used by /readyz)."""

    async def insert_payment(self, payment: Payment, events: Sequence[OutboxEvent] = ()) -> None: ...

    async def update_payment(
        self, payment: Payment, expected_version: int, events: Sequence[OutboxEvent] = ()
    ) -> None: ...

    async def get_payment(self, payment_id: str) -> Payment | None: ...

    async def find_by_order(self, merchant_id: str, merchant_order_id: str) -> Payment | None: ...

    async def list_by_status(
        self, statuses: Sequence[Status], updated_before: datetime, limit: int = 100
    ) -> list[Payment]: ...

    async def outbox_events(self, payment_id: str) -> list[OutboxEvent]: ...
