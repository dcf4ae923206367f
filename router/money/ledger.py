"""The double-entry ledger: pure functions from state changes to balanced postings.

Sign convention: an entry's `amount` is signed integer minor units, debit positive, credit negative.
Every transaction (`txn_id`) sums to zero per currency; `assert_balanced` checks it.

Accounts (chart, `:`-separated so statements can filter by prefix):
- `channel:<ch>:clearing`   asset: what the channel owes us for captured money, less its fees/refunds
- `merchant:<m>:payable`    liability: what we owe the merchant (credit balance = we owe)
- `merchant:<m>:reserve`    liability: the rolling reserve held back from payouts
- `revenue:fees`            our fee revenue (credit)
- `expense:channel:<ch>`    what channels charge us (debit)
- `bank:payouts`            money paid out to merchants

Movements (`kind`): capture, fee, channel_fee, refund, chargeback (placeholder: the state machine has
no chargeback status yet; `chargeback_postings` is the posting the future dispute flow will use),
reserve_hold, reserve_release, payout. Authorization holds are not posted (no money moved).
Fees are charged on capture and are not returned on refund (the stated policy).

Entry ids are deterministic (`<payment>:v<version>:<n>`; settlement: `<batch key>:<n>`), so a
replayed write collides on the primary key instead of posting twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from router.model import Payment, utcnow

if TYPE_CHECKING:  # the stores import this module: keep it free of the pricing/policies imports
    from router.money.pricing import Pricing


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    txn_id: str
    account: str
    amount: int  # signed minor units: debit > 0, credit < 0
    currency: str
    payment_id: str | None
    merchant_id: str
    kind: str
    created_at: datetime = msgspec.field(default_factory=utcnow)


class Unbalanced(ValueError):
    """A transaction whose entries do not sum to zero in some currency (a bug: never written)."""


class OverRefund(ValueError):
    """Refunded more than captured, or captured more than authorized (never posted)."""


def merchant_payable(merchant_id: str) -> str:
    return f"merchant:{merchant_id}:payable"


def merchant_reserve(merchant_id: str) -> str:
    return f"merchant:{merchant_id}:reserve"


def channel_clearing(channel: str) -> str:
    return f"channel:{channel}:clearing"


def channel_expense(channel: str) -> str:
    return f"expense:channel:{channel}"


FEE_REVENUE = "revenue:fees"
BANK_PAYOUTS = "bank:payouts"


class _Txn:
    """Collects the legs of one posting set; ids numbered in order."""

    def __init__(self, prefix: str, merchant_id: str, payment_id: str | None, currency: str, at: datetime) -> None:
        self.prefix, self.merchant_id, self.payment_id = prefix, merchant_id, payment_id
        self.currency, self.at = currency, at
        self.entries: list[LedgerEntry] = []

    def move(self, kind: str, debit: str, credit: str, amount: int) -> None:
        """Move `amount` from `credit` to `debit` (no-op for 0)."""
        if amount == 0:
            return
        txn = f"{self.prefix}:{kind}"
        for account, signed in ((debit, amount), (credit, -amount)):
            self.entries.append(
                LedgerEntry(
                    id=f"{self.prefix}:{len(self.entries) + 1}", txn_id=txn, account=account, amount=signed,
                    currency=self.currency, payment_id=self.payment_id, merchant_id=self.merchant_id,
                    kind=kind, created_at=self.at,
                )
            )


def postings_for(before: Payment | None, after: Payment, pricing: Pricing) -> list[LedgerEntry]:
    """The entries a state change `before -> after` posts (pure; empty when no money moved).

    Money moves when `captured_amount` or `refunded_amount` grows. Raises `OverRefund` when the
    new state would refund more than it captured or capture more than it authorized, and
    `ValueError` when amounts shrink (the record only moves forward)."""
    captured_before = before.captured_amount if before is not None else 0
    refunded_before = before.refunded_amount if before is not None else 0
    captured = after.captured_amount - captured_before
    refunded = after.refunded_amount - refunded_before
    if captured < 0 or refunded < 0:
        raise ValueError(f"payment {after.id}: captured/refunded amounts never decrease")
    if after.captured_amount > after.amount:
        raise OverRefund(f"payment {after.id}: captured {after.captured_amount} > authorized {after.amount}")
    if after.refunded_amount > after.captured_amount:
        raise OverRefund(f"payment {after.id}: refunded {after.refunded_amount} > captured {after.captured_amount}")
    if captured == 0 and refunded == 0:
        return []
    channel = after.channel or "unknown"
    m = after.merchant_id
    txn = _Txn(f"{after.id}:v{after.version}", m, after.id, after.currency, after.updated_at)
    if captured:
        txn.move("capture", channel_clearing(channel), merchant_payable(m), captured)
        txn.move("fee", merchant_payable(m), FEE_REVENUE, pricing.merchant_fee(after, captured, after.updated_at))
        txn.move("channel_fee", channel_expense(channel), channel_clearing(channel),
                 pricing.channel_fee(after, captured, after.updated_at))
    if refunded:
        txn.move("refund", merchant_payable(m), channel_clearing(channel), refunded)
    assert_balanced(txn.entries)
    return txn.entries


def chargeback_postings(payment: Payment, amount: int, at: datetime, seq: int = 1) -> list[LedgerEntry]:
    """Placeholder for the dispute flow: the channel pulls `amount` back and we recover it from the merchant."""
    channel = payment.channel or "unknown"
    txn = _Txn(f"{payment.id}:cb{seq}", payment.merchant_id, payment.id, payment.currency, at)
    txn.move("chargeback", merchant_payable(payment.merchant_id), channel_clearing(channel), amount)
    return txn.entries


def settlement_postings(
    batch_key: str, merchant_id: str, currency: str, at: datetime, *, reserve_held: int, reserve_released: int,
    net: int,
) -> list[LedgerEntry]:
    """A settlement batch: hold reserve, release matured reserve, pay out the net."""
    txn = _Txn(batch_key, merchant_id, None, currency, at)
    txn.move("reserve_hold", merchant_payable(merchant_id), merchant_reserve(merchant_id), reserve_held)
    txn.move("reserve_release", merchant_reserve(merchant_id), merchant_payable(merchant_id), reserve_released)
    txn.move("payout", merchant_payable(merchant_id), BANK_PAYOUTS, net)
    assert_balanced(txn.entries)
    return txn.entries


def imbalances(entries: Iterable[LedgerEntry]) -> dict[tuple[str, str], int]:
    """(txn_id, currency) -> non-zero sum. Empty when every transaction balances."""
    sums: dict[tuple[str, str], int] = defaultdict(int)
    for e in entries:
        sums[(e.txn_id, e.currency)] += e.amount
    return {k: v for k, v in sums.items() if v != 0}


def assert_balanced(entries: Sequence[LedgerEntry]) -> None:
    bad = imbalances(entries)
    if bad:
        raise Unbalanced(f"unbalanced transactions: {bad}")


def balances(entries: Iterable[LedgerEntry]) -> dict[tuple[str, str], int]:
    """(account, currency) -> balance (debit positive)."""
    out: dict[tuple[str, str], int] = defaultdict(int)
    for e in entries:
        out[(e.account, e.currency)] += e.amount
    return dict(out)
