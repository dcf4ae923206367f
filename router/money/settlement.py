"""Settlement cycles per merchant, business-day calendars, reserves, and batches.

Cycles (`Cycle.kind`), mapping an activity date d (UTC day of the ledger entry) to a payout date:
- `t_plus`:  d rolled to a business day, then `days` business days later (`days: 0` is T+0);
- `weekly`:  the first `weekday` (0 = Monday) strictly after d, rolled forward to a business day;
- `monthly`: day `day` (clamped to the month's length) of the month after d, rolled forward.
A business day is a weekday that is not a holiday of the calendar chosen for the currency
(`MoneyConfig.calendars[cycle.calendar or currency]`, via the `holidays` package); no calendar:
weekends only.

A batch for (merchant, currency, payout date P) covers the activity dates d with payout(d) == P
(contiguous: payout is monotonic in d). Its figures come from the merchant's payable account:
gross (captures), fees, refunds, chargebacks; then a rolling reserve `percent_bp` of gross is held
and released `hold_days` calendar days after its payout date, in the first batch on or after that
day. net = gross - fees - refunds - chargebacks - reserve_held + reserve_released.
Batches are keyed `merchant|currency|P`: running the same date twice finds the key and writes
nothing (the batch row, its release marks and its postings share one transaction).
"""

from __future__ import annotations

import calendar as _calendar
import csv
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from functools import cached_property
from typing import IO, TYPE_CHECKING, Annotated, Literal

import holidays
import msgspec

from policies.cost import round_half_even
from router.money.ledger import LedgerEntry, settlement_postings
from router.money.pricing import ChannelPricing, MonthlyActivity, PriceList, PricingBook

if TYPE_CHECKING:
    from router.money.store import MoneyStore

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class HolidayCalendar(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    country: str | None = None  # ISO 3166 code known to `holidays`; None: weekends only
    subdiv: str | None = None
    extra: list[date] = msgspec.field(default_factory=list)  # bank closures the package does not know
    weekend: list[int] = msgspec.field(default_factory=lambda: [5, 6])


class Cycle(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    kind: Literal["t_plus", "weekly", "monthly"] = "t_plus"
    days: Annotated[int, msgspec.Meta(ge=0, le=30)] = 1  # t_plus
    weekday: Annotated[int, msgspec.Meta(ge=0, le=6)] = 0  # weekly: 0 = Monday
    day: Annotated[int, msgspec.Meta(ge=1, le=31)] = 1  # monthly
    calendar: str | None = None  # key into MoneyConfig.calendars; default: the batch currency


class Reserve(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    percent_bp: Annotated[int, msgspec.Meta(ge=0, le=10_000)]
    hold_days: NonNegative  # calendar days after the payout date


class MerchantMoney(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pricing: PriceList | None = None  # None: MoneyConfig.default_pricing
    settlement: Cycle | None = None  # None: MoneyConfig.default_cycle
    reserve: Reserve | None = None


class MoneyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `money:` section of the config."""

    default_pricing: PriceList = PriceList()
    default_cycle: Cycle = Cycle()
    merchants: dict[str, MerchantMoney] = msgspec.field(default_factory=dict)
    calendars: dict[str, HolidayCalendar] = msgspec.field(default_factory=dict)  # currency or region name
    payout_dir: str = "payouts"  # where `settle run` writes payout files

    def merchant(self, merchant_id: str) -> MerchantMoney:
        return self.merchants.get(merchant_id, MerchantMoney())

    def cycle_for(self, merchant_id: str) -> Cycle:
        return self.merchant(merchant_id).settlement or self.default_cycle

    def calendar_for(self, cycle: Cycle, currency: str) -> BusinessCalendar:
        cal = self.calendars.get(cycle.calendar or currency.upper(), HolidayCalendar())
        key = msgspec.json.encode(cal)
        found = _CALENDARS.get(key)
        if found is None:  # building a holiday table is slow: one per distinct calendar per process
            found = _CALENDARS[key] = BusinessCalendar(cal)
        return found


_CALENDARS: dict[bytes, BusinessCalendar] = {}


def pricing_book(
    cfg: MoneyConfig, channel_fees: Mapping[str, Mapping[str, object] | None],
    activity: Mapping[tuple[str, str], MonthlyActivity] | None = None,
) -> PricingBook:
    """The `Pricing` of a config: merchant price lists from `money:`, channel fees from each channel's
    `fees` (the same mapping the cost routing policy reads). Build it when the config loads."""
    return PricingBook(
        merchants={m: mm.pricing for m, mm in cfg.merchants.items() if mm.pricing is not None},
        default=cfg.default_pricing,
        channels={name: ChannelPricing(fees) for name, fees in channel_fees.items()},
        activity=activity,
    )


class BusinessCalendar:
    def __init__(self, cal: HolidayCalendar) -> None:
        self.cal = cal

    @cached_property
    def _holidays(self) -> holidays.HolidayBase | None:
        if self.cal.country is None:
            return None
        return holidays.country_holidays(self.cal.country, subdiv=self.cal.subdiv)

    def is_business_day(self, d: date) -> bool:
        if d.weekday() in self.cal.weekend or d in self.cal.extra:
            return False
        return self._holidays is None or d not in self._holidays

    def roll_forward(self, d: date) -> date:
        while not self.is_business_day(d):
            d += timedelta(days=1)
        return d

    def add_business_days(self, d: date, n: int) -> date:
        d = self.roll_forward(d)
        for _ in range(n):
            d = self.roll_forward(d + timedelta(days=1))
        return d


def payout_date(cycle: Cycle, cal: BusinessCalendar, activity: date) -> date:
    if cycle.kind == "t_plus":
        return cal.add_business_days(activity, cycle.days)
    if cycle.kind == "weekly":
        ahead = (cycle.weekday - activity.weekday() - 1) % 7 + 1
        return cal.roll_forward(activity + timedelta(days=ahead))
    year, month = (activity.year + 1, 1) if activity.month == 12 else (activity.year, activity.month + 1)
    day = min(cycle.day, _calendar.monthrange(year, month)[1])
    return cal.roll_forward(date(year, month, day))


_LOOKBACK = timedelta(days=80)  # longer than any cycle (a month) plus any run of holidays


def period_for(cycle: Cycle, cal: BusinessCalendar, payout: date) -> tuple[date, date] | None:
    """The activity dates [start, end] (inclusive) paid out on `payout`, or None."""
    found = [
        d for d in (payout - _LOOKBACK + timedelta(days=i) for i in range(_LOOKBACK.days + 1))
        if payout_date(cycle, cal, d) == payout
    ]
    return (found[0], found[-1]) if found else None


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    batch_key: str
    merchant_id: str
    currency: str
    payout_date: date
    period_start: date
    period_end: date
    gross: int
    fees: int
    refunds: int
    chargebacks: int
    reserve_held: int
    reserve_released: int
    net: int
    release_date: date | None = None
    released_by: str | None = None


def batch_key(merchant_id: str, currency: str, payout: date) -> str:
    return f"{merchant_id}|{currency}|{payout.isoformat()}"


def day_start(d: date) -> datetime:
    return datetime.combine(d, time(0), tzinfo=UTC)


def compute_batch(
    merchant_id: str, currency: str, payout: date, period: tuple[date, date], by_kind: dict[str, int],
    reserve: Reserve | None, releasable: int,
) -> Batch:
    """Pure: figures from the payable account's sums per kind (credits negative, as posted)."""
    gross = -by_kind.get("capture", 0)
    fees = by_kind.get("fee", 0)
    refunds = by_kind.get("refund", 0)
    chargebacks = by_kind.get("chargeback", 0)
    held = round_half_even(max(gross, 0) * reserve.percent_bp, 10_000) if reserve else 0
    net = gross - fees - refunds - chargebacks - held + releasable
    return Batch(
        batch_key=batch_key(merchant_id, currency, payout), merchant_id=merchant_id, currency=currency,
        payout_date=payout, period_start=period[0], period_end=period[1], gross=gross, fees=fees,
        refunds=refunds, chargebacks=chargebacks, reserve_held=held, reserve_released=releasable, net=net,
        release_date=payout + timedelta(days=reserve.hold_days) if (reserve and held) else None,
    )


def batch_postings(batch: Batch, at: datetime) -> list[LedgerEntry]:
    return settlement_postings(
        batch.batch_key, batch.merchant_id, batch.currency, at,
        reserve_held=batch.reserve_held, reserve_released=batch.reserve_released, net=batch.net,
    )


class RunResult(msgspec.Struct, frozen=True, kw_only=True):
    batch: Batch
    created: bool  # False: it existed already (a re-run), nothing was written


async def run_settlement(
    store: MoneyStore, cfg: MoneyConfig, on: date, *, merchants: Iterable[str] | None = None,
) -> list[RunResult]:
    """Create every batch whose payout date is `on` (idempotent). Ordered by merchant, currency."""
    results: list[RunResult] = []
    ids = sorted(set(merchants) if merchants is not None else set(await store.merchant_ids()) | set(cfg.merchants))
    for merchant_id in ids:
        cycle = cfg.cycle_for(merchant_id)
        reserve = cfg.merchant(merchant_id).reserve
        for currency in sorted(await store.merchant_currencies(merchant_id)):
            key = batch_key(merchant_id, currency, on)
            existing = await store.get_batch(key)
            if existing is not None:
                results.append(RunResult(batch=existing, created=False))
                continue
            period = period_for(cycle, cfg.calendar_for(cycle, currency), on)
            if period is None:
                continue
            by_kind = await store.payable_sums(
                merchant_id, currency, day_start(period[0]), day_start(period[1] + timedelta(days=1))
            )
            release = await store.releasable_reserves(merchant_id, currency, on)
            batch = compute_batch(merchant_id, currency, on, period, by_kind, reserve, sum(a for _, a in release))
            if not any((batch.gross, batch.fees, batch.refunds, batch.chargebacks, batch.reserve_released)):
                continue
            created = await store.save_batch(batch, batch_postings(batch, day_start(on)), [k for k, _ in release])
            results.append(RunResult(batch=batch if created else (await store.get_batch(key) or batch),
                                     created=created))
    return results


PAYOUT_COLUMNS = (
    "batch_key", "merchant_id", "currency", "payout_date", "period_start", "period_end", "gross", "fees",
    "refunds", "chargebacks", "reserve_held", "reserve_released", "net",
)


def write_payout_file(batches: Sequence[Batch], out: IO[str]) -> None:
    """One row per batch, amounts in minor units: the same batches always give the same bytes."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(PAYOUT_COLUMNS)
    for b in sorted(batches, key=lambda b: b.batch_key):
        row = msgspec.to_builtins(b)
        w.writerow([row[c] for c in PAYOUT_COLUMNS])
