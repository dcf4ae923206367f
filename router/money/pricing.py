"""Pricing: what we charge merchants and what channels charge us, with ONE fee engine.

The engine is `policies.cost.fee` (the cost routing policy's): percentage (basis points) + fixed,
floored at a minimum, amount tiers then monthly-volume tiers, and `policies.cost.round_half_even` on
the minor unit, the single rounding rule of the whole code base. This module does not re-implement
any of it; it only chooses WHICH `Schedule` applies and WHICH monthly figure feeds its volume tiers:

- a `PriceList` is an ordered list of `PriceRule`s; the first rule whose currency (or "default") and
  method (or "any") match wins, exact currency before "default", exact method before "any";
- a rule's `volume_basis` says whether its volume tiers read the rolling monthly *amount* (minor
  units of the payment's currency) or the rolling monthly *count* of payments;
- a `Promotion` replaces the rule's schedule during `[starts_at, ends_at)` (e.g. thresholds lowered
  during a sales festival); the first matching promotion wins. Time is the money movement's time.

Channel pricing is the channel config's `fees` (decoded by `policies.cost.decode_fees`), so routing
and the ledger's channel cost can never disagree. Policies do not import this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Literal, Protocol

import msgspec

from policies.cost import Fees, Schedule, decode_fees, fee, round_half_even, schedule_for
from router.model import Payment

__all__ = [
    "ChannelPricing",
    "MonthlyActivity",
    "PriceList",
    "PriceRule",
    "Pricing",
    "PricingBook",
    "Promotion",
    "Schedule",
    "quote",
    "round_half_even",
]

VolumeBasis = Literal["amount", "count"]


class Promotion(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    starts_at: datetime  # inclusive, aware
    ends_at: datetime  # exclusive, aware
    schedule: Schedule

    def __post_init__(self) -> None:
        if self.starts_at.tzinfo is None or self.ends_at.tzinfo is None:
            raise ValueError("promotion times must be aware (UTC)")
        if self.ends_at <= self.starts_at:
            raise ValueError("a promotion must end after it starts")


class PriceRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    currency: str = "default"  # ISO 4217 upper case, or "default"
    method: str = "any"  # card | alipay | wechatpay | any
    schedule: Schedule = Schedule()
    volume_basis: VolumeBasis = "amount"
    promotions: list[Promotion] = msgspec.field(default_factory=list)

    def schedule_at(self, at: datetime) -> Schedule:
        for promo in self.promotions:
            if promo.starts_at <= at < promo.ends_at:
                return promo.schedule
        return self.schedule


class PriceList(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    rules: list[PriceRule] = msgspec.field(default_factory=list)

    def rule_for(self, currency: str, method: str) -> PriceRule | None:
        cur = currency.upper()
        best: tuple[int, PriceRule] | None = None
        for rule in self.rules:
            cur_ok = rule.currency.upper() == cur or rule.currency == "default"
            method_ok = rule.method in (method, "any")
            if not (cur_ok and method_ok):
                continue
            rank = (0 if rule.currency.upper() == cur else 2) + (0 if rule.method == method else 1)
            if best is None or rank < best[0]:
                best = (rank, rule)
        return None if best is None else best[1]


class MonthlyActivity(msgspec.Struct, frozen=True, kw_only=True):
    """Rolling 30-day figures of one merchant (or channel) in one currency, before this payment."""

    volume: int = 0  # minor units
    count: int = 0


NO_ACTIVITY = MonthlyActivity()


def quote(
    prices: PriceList, amount: int, currency: str, method: str, at: datetime,
    activity: MonthlyActivity = NO_ACTIVITY,
) -> int:
    """The fee in minor units for moving `amount`; 0 when no rule matches (nothing is charged)."""
    rule = prices.rule_for(currency, method)
    if rule is None:
        return 0
    monthly = activity.volume if rule.volume_basis == "amount" else activity.count
    return fee(rule.schedule_at(at), amount, currency, monthly)


class Pricing(Protocol):
    """What the ledger needs to price a money movement of a payment."""

    def merchant_fee(self, payment: Payment, amount: int, at: datetime) -> int: ...

    def channel_fee(self, payment: Payment, amount: int, at: datetime) -> int: ...


class ChannelPricing:
    """A channel's configured `fees` mapping, decoded once (same decoder as the cost policy)."""

    def __init__(self, raw: Mapping[str, object] | None) -> None:
        self.fees: Fees = decode_fees(raw) if raw else {}

    def fee(self, amount: int, currency: str, monthly_volume: int = 0) -> int:
        schedule = schedule_for(self.fees, currency)
        return 0 if schedule is None else fee(schedule, amount, currency, monthly_volume)


class PricingBook:
    """`Pricing` over configured price lists and an activity snapshot (no I/O: refresh it outside).

    `activity[(owner, currency)]` holds rolling monthly figures where owner is a merchant id or
    `channel:<name>`; missing entries count as zero."""

    def __init__(
        self,
        merchants: Mapping[str, PriceList],
        default: PriceList,
        channels: Mapping[str, ChannelPricing],
        activity: Mapping[tuple[str, str], MonthlyActivity] | None = None,
    ) -> None:
        self.merchants = dict(merchants)
        self.default = default
        self.channels = dict(channels)
        self.activity = dict(activity or {})

    def merchant_fee(self, payment: Payment, amount: int, at: datetime) -> int:
        prices = self.merchants.get(payment.merchant_id, self.default)
        act = self.activity.get((payment.merchant_id, payment.currency), NO_ACTIVITY)
        return quote(prices, amount, payment.currency, payment.payment_method.type, at, act)

    def channel_fee(self, payment: Payment, amount: int, at: datetime) -> int:
        ch = self.channels.get(payment.channel or "")
        if ch is None:
            return 0
        act = self.activity.get((f"channel:{payment.channel}", payment.currency), NO_ACTIVITY)
        return ch.fee(amount, payment.currency, act.volume)


class NoPricing:
    """Charges nothing on either side (ledger without a pricing config)."""

    def merchant_fee(self, payment: Payment, amount: int, at: datetime) -> int:
        return 0

    def channel_fee(self, payment: Payment, amount: int, at: datetime) -> int:
        return 0
