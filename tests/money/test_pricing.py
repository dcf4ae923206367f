"""Pricing: one fee engine (policies.cost), half-even on the minor unit, tiers, promotions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.cost import Schedule, Tier, VolumeTier, fee
from router.model import CardSummary, Payment, PaymentMethod, Status
from router.money.pricing import (
    ChannelPricing,
    MonthlyActivity,
    PriceList,
    PriceRule,
    PricingBook,
    Promotion,
    quote,
    round_half_even,
)

T = datetime(2024, 11, 11, 12, tzinfo=UTC)


@given(st.integers(min_value=-(10**12), max_value=10**12), st.integers(min_value=1, max_value=10**6))
def test_round_half_even_matches_decimal(numerator: int, denominator: int) -> None:
    expected = (Decimal(numerator) / Decimal(denominator)).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
    assert round_half_even(numerator, denominator) == int(expected)


@pytest.mark.parametrize(
    ("amount", "percent_bp", "expected"),
    [
        (50, 100, 0),  # 0.5 -> 0 (even)
        (150, 100, 2),  # 1.5 -> 2 (even)
        (250, 100, 2),  # 2.5 -> 2
        (350, 100, 4),  # 3.5 -> 4
        (251, 100, 3),  # 2.51 -> 3
        (249, 100, 2),  # 2.49 -> 2
        (12345, 290, 358),  # 358.005 -> 358
        (12500, 290, 362),  # 362.5 -> 362
        (12700, 290, 368),  # 368.3 -> 368
    ],
)
def test_fee_rounds_half_even_at_point_five(amount: int, percent_bp: int, expected: int) -> None:
    prices = PriceList(rules=[PriceRule(schedule=Schedule(percent_bp=percent_bp))])
    assert quote(prices, amount, "USD", "card", T) == expected


def test_fixed_and_minimum() -> None:
    prices = PriceList(rules=[PriceRule(schedule=Schedule(percent_bp=290, fixed=30, min_fee=50))])
    assert quote(prices, 100, "USD", "card", T) == 50  # 30 + 3 = 33 < min 50
    assert quote(prices, 10_000, "USD", "card", T) == 320


TIERED = Schedule(
    percent_bp=300,
    tiers=[Tier(up_to_amount=1000, percent_bp=400, fixed=10), Tier(up_to_amount=100_000, percent_bp=250)],
    volume_tiers=[VolumeTier(monthly_volume_from=1_000_000, percent_bp=200),
                  VolumeTier(monthly_volume_from=10_000_000, percent_bp=150)],
)


@pytest.mark.parametrize(
    ("amount", "expected"),
    [(1000, 50), (1001, 25), (100_000, 2500), (100_001, 3000)],  # boundaries are inclusive
)
def test_tier_selection_by_amount(amount: int, expected: int) -> None:
    prices = PriceList(rules=[PriceRule(schedule=TIERED)])
    assert quote(prices, amount, "USD", "card", T) == expected


def test_tier_selection_by_monthly_volume_and_count() -> None:
    vol = Schedule(percent_bp=300, volume_tiers=[VolumeTier(monthly_volume_from=1_000_000, percent_bp=200),
                                                 VolumeTier(monthly_volume_from=10_000_000, percent_bp=150)])
    by_amount = PriceList(rules=[PriceRule(schedule=vol)])
    assert quote(by_amount, 200_000, "USD", "card", T, MonthlyActivity(volume=999_999)) == 6000
    assert quote(by_amount, 200_000, "USD", "card", T, MonthlyActivity(volume=1_000_000)) == 4000
    assert quote(by_amount, 200_000, "USD", "card", T, MonthlyActivity(volume=10_000_000)) == 3000
    by_count = PriceList(rules=[PriceRule(
        volume_basis="count",
        schedule=Schedule(percent_bp=300, volume_tiers=[VolumeTier(monthly_volume_from=100, percent_bp=100)]),
    )])
    # a huge amount volume does not matter when the basis is the count
    assert quote(by_count, 10_000, "USD", "card", T, MonthlyActivity(volume=10**9, count=99)) == 300
    assert quote(by_count, 10_000, "USD", "card", T, MonthlyActivity(volume=0, count=100)) == 100


def test_rule_per_currency_and_method() -> None:
    prices = PriceList(rules=[
        PriceRule(schedule=Schedule(percent_bp=300)),
        PriceRule(currency="CNY", schedule=Schedule(percent_bp=60)),
        PriceRule(currency="CNY", method="wechatpay", schedule=Schedule(percent_bp=55)),
        PriceRule(method="alipay", schedule=Schedule(percent_bp=70)),
    ])
    assert quote(prices, 10_000, "USD", "card", T) == 300
    assert quote(prices, 10_000, "CNY", "card", T) == 60
    assert quote(prices, 10_000, "cny", "wechatpay", T) == 55
    assert quote(prices, 10_000, "CNY", "alipay", T) == 60  # exact currency beats exact method
    assert quote(prices, 10_000, "USD", "alipay", T) == 70
    assert quote(PriceList(rules=[PriceRule(currency="EUR")]), 10_000, "USD", "card", T) == 0


def test_promotions_are_time_boxed() -> None:
    start, end = datetime(2024, 11, 1, tzinfo=UTC), datetime(2024, 11, 12, tzinfo=UTC)
    festival = Schedule(percent_bp=300, volume_tiers=[VolumeTier(monthly_volume_from=100_000, percent_bp=100)])
    normal = Schedule(percent_bp=300, volume_tiers=[VolumeTier(monthly_volume_from=1_000_000, percent_bp=100)])
    prices = PriceList(rules=[PriceRule(schedule=normal, promotions=[
        Promotion(name="double-11", starts_at=start, ends_at=end, schedule=festival)])])
    act = MonthlyActivity(volume=200_000)  # over the lowered threshold only
    assert quote(prices, 10_000, "USD", "card", start - timedelta(microseconds=1), act) == 300
    assert quote(prices, 10_000, "USD", "card", start, act) == 100  # start inclusive
    assert quote(prices, 10_000, "USD", "card", end - timedelta(microseconds=1), act) == 100
    assert quote(prices, 10_000, "USD", "card", end, act) == 300  # end exclusive
    with pytest.raises(ValueError):
        Promotion(name="bad", starts_at=end, ends_at=start, schedule=festival)


@given(st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=10**8))
def test_channel_side_is_the_cost_policy_engine(amount: int, volume: int) -> None:
    raw = {"USD": {"percent_bp": 290, "fixed": 30, "tiers": [{"up_to_amount": 500, "percent_bp": 350}, {"up_to_amount": None, "percent_bp": 280}]},
           "default": {"percent_bp": 100}}
    ch = ChannelPricing(raw)
    assert ch.fee(amount, "USD", volume) == fee(ch.fees, amount, "USD", volume)
    assert ch.fee(amount, "EUR", volume) == fee(ch.fees, amount, "EUR", volume)


def test_pricing_book_prices_both_sides() -> None:
    p = Payment(
        id="pay_1", merchant_id="m1", merchant_order_id="o", status=Status.CAPTURED, amount=10_000, currency="USD",
        country="US", capture=True, channel="a",
        payment_method=PaymentMethod(type="card", card=CardSummary(bin="424242", last4="4242", brand="visa",
                                                                   exp_month=1, exp_year=2030, fingerprint="f")),
    )
    book = PricingBook(
        merchants={"m1": PriceList(rules=[PriceRule(schedule=Schedule(percent_bp=300, fixed=30))])},
        default=PriceList(),
        channels={"a": ChannelPricing({"default": {"percent_bp": 200}})},
        activity={("channel:a", "USD"): MonthlyActivity(volume=5)},
    )
    assert book.merchant_fee(p, 10_000, T) == 330
    assert book.channel_fee(p, 10_000, T) == 200
    other = Payment(**{**{f: getattr(p, f) for f in p.__struct_fields__}, "merchant_id": "m2", "channel": "zzz"})
    assert book.merchant_fee(other, 10_000, T) == 0 and book.channel_fee(other, 10_000, T) == 0
