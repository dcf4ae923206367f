"""Random payment lifecycles as (before, after) pairs, for ledger and settlement tests."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import msgspec

from policies.cost import Schedule
from router.model import CardSummary, Operation, Payment, PaymentMethod, Status
from router.money.pricing import ChannelPricing, PriceList, PriceRule, PricingBook

T0 = datetime(2024, 6, 3, 9, tzinfo=UTC)  # a Monday

CARD = PaymentMethod(type="card", card=CardSummary(bin="424242", last4="4242", brand="visa", exp_month=1,
                                                   exp_year=2030, fingerprint="f"))

PRICING = PricingBook(
    merchants={"m1": PriceList(rules=[PriceRule(schedule=Schedule(percent_bp=290, fixed=30))])},
    default=PriceList(rules=[PriceRule(schedule=Schedule(percent_bp=250, min_fee=5))]),
    channels={"a": ChannelPricing({"default": {"percent_bp": 180, "fixed": 10}}),
              "b": ChannelPricing({"USD": {"percent_bp": 150}})},
)


def new_payment(pid: str, merchant: str, amount: int, currency: str, channel: str, at: datetime) -> Payment:
    return Payment(id=pid, merchant_id=merchant, merchant_order_id=f"o-{pid}", status=Status.PROCESSING,
                   amount=amount, currency=currency, country="US", capture=True, payment_method=CARD,
                   channel=channel, created_at=at, updated_at=at)


def step(p: Payment, at: datetime, **changes: object) -> Payment:
    return msgspec.structs.replace(p, version=p.version + 1, updated_at=at, **changes)


def lifecycle(rng: random.Random, pid: str, at: datetime = T0) -> list[tuple[Payment | None, Payment]]:
    """A legal sequence of writes of one payment, as the pipeline makes them."""
    merchant = rng.choice(["m1", "m2"])
    currency = rng.choice(["USD", "EUR", "JPY"])
    p = new_payment(pid, merchant, rng.randint(1, 1_000_000), currency, rng.choice(["a", "b"]), at)
    out: list[tuple[Payment | None, Payment]] = [(None, p)]
    t = at

    def go(**changes: object) -> None:
        nonlocal p, t
        t += timedelta(minutes=rng.randint(1, 3000))
        nxt = step(p, t, **changes)
        out.append((p, nxt))
        p = nxt

    mode = rng.choice(["capture", "authorize", "decline"])
    ref = f"ch_{pid}"
    if mode == "decline":
        go(status=Status.DECLINED, channel_reference=ref)
        return out
    if mode == "capture":
        go(status=Status.CAPTURED, captured_amount=p.amount, channel_reference=ref)
    else:
        go(status=Status.AUTHORIZED, channel_reference=ref)
        if rng.random() < 0.3:
            go(status=Status.VOIDED)
            return out
        amt = rng.randint(1, p.amount)
        go(status=Status.CAPTURED, captured_amount=amt,
           operations=[*p.operations, Operation(id=f"ca_{pid}", kind="capture", amount=amt, status="succeeded")])
    n = 0
    while p.refunded_amount < p.captured_amount and rng.random() < 0.6:
        n += 1
        amt = rng.randint(1, p.captured_amount - p.refunded_amount)
        refunded = p.refunded_amount + amt
        op = Operation(id=f"re_{pid}_{n}", kind="refund", amount=amt, status="succeeded",
                       channel_reference=f"re_{pid}_{n}")
        go(status=Status.REFUNDED if refunded == p.captured_amount else Status.PARTIALLY_REFUNDED,
           refunded_amount=refunded, operations=[*p.operations, op])
    return out
