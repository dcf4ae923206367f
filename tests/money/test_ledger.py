"""The double-entry ledger: every posting set balances per currency; the trial balance is zero."""

from __future__ import annotations

import io
import random
from collections import defaultdict
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.cost import Schedule, VolumeTier
from router.model import Status
from router.money.ledger import (
    FEE_REVENUE,
    LedgerEntry,
    OverRefund,
    Unbalanced,
    assert_balanced,
    balances,
    channel_clearing,
    chargeback_postings,
    imbalances,
    merchant_payable,
    postings_for,
)
from router.money.pricing import MonthlyActivity, NoPricing, PriceList, PriceRule
from router.money.settlement import MerchantMoney, MoneyConfig, pricing_book
from router.money.store import MoneyStore, write_journal_csv
from router.store.sqlite import SqliteStore
from tests.money.lifecycle import PRICING, T0, lifecycle, new_payment, step


def all_postings(seed: int, n: int) -> list[LedgerEntry]:
    rng = random.Random(seed)
    out: list[LedgerEntry] = []
    for i in range(n):
        for before, after in lifecycle(rng, f"pay_{seed}_{i}"):
            entries = postings_for(before, after, PRICING)
            assert imbalances(entries) == {}  # each change's posting set balances on its own
            out.extend(entries)
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=1, max_value=12))
def test_every_posting_set_balances_and_the_trial_balance_is_zero(seed: int, n: int) -> None:
    entries = all_postings(seed, n)
    totals: dict[str, int] = defaultdict(int)
    for (_, currency), balance in balances(entries).items():
        totals[currency] += balance
    assert all(v == 0 for v in totals.values())
    assert len({e.id for e in entries}) == len(entries)  # ids never repeat


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_refunds_never_exceed_the_capture_in_postings(seed: int) -> None:
    rng = random.Random(seed)
    steps = lifecycle(rng, "pay_x")
    captured = refunded = 0
    for before, after in steps:
        for e in postings_for(before, after, PRICING):
            if e.kind == "capture" and e.amount > 0:
                captured += e.amount
            if e.kind == "refund" and e.amount > 0:
                refunded += e.amount
        assert refunded <= captured
    final = steps[-1][1]
    assert (captured, refunded) == (final.captured_amount, final.refunded_amount)


def test_capture_fee_refund_postings_are_what_finance_expects() -> None:
    p = new_payment("pay_1", "m1", 10_000, "USD", "a", T0)
    captured = step(p, T0, status=Status.CAPTURED, captured_amount=10_000, channel_reference="ch_1")
    e = postings_for(p, captured, PRICING)
    b = balances(e)
    assert b[(channel_clearing("a"), "USD")] == 10_000 - 190  # 1.8 % + 10 channel cost
    assert b[(merchant_payable("m1"), "USD")] == -(10_000 - 320)  # we owe the merchant capture less our fee
    assert b[(FEE_REVENUE, "USD")] == -320
    assert b[("expense:channel:a", "USD")] == 190
    refunded = step(captured, T0, status=Status.PARTIALLY_REFUNDED, refunded_amount=2_500)
    r = postings_for(captured, refunded, PRICING)
    assert [(x.account, x.amount, x.kind) for x in r] == [
        (merchant_payable("m1"), 2_500, "refund"), (channel_clearing("a"), -2_500, "refund")]
    assert postings_for(refunded, step(refunded, T0, status=Status.PARTIALLY_REFUNDED), PRICING) == []


def test_over_refund_and_over_capture_are_refused() -> None:
    p = new_payment("pay_2", "m1", 1000, "EUR", "a", T0)
    cap = step(p, T0, status=Status.CAPTURED, captured_amount=1000)
    with pytest.raises(OverRefund):
        postings_for(cap, step(cap, T0, status=Status.REFUNDED, refunded_amount=1001), PRICING)
    with pytest.raises(OverRefund):
        postings_for(p, step(p, T0, status=Status.CAPTURED, captured_amount=1001), PRICING)
    with pytest.raises(ValueError):
        postings_for(cap, step(cap, T0, captured_amount=999), PRICING)


def test_unbalanced_sets_are_caught() -> None:
    e = postings_for(None, step(new_payment("pay_3", "m1", 500, "JPY", "a", T0), T0, status=Status.CAPTURED,
                                captured_amount=500), NoPricing())
    assert_balanced(e)
    with pytest.raises(Unbalanced):
        assert_balanced(e[:-1])
    cb = chargeback_postings(step(new_payment("pay_4", "m1", 500, "JPY", "a", T0), T0), 200, T0)
    assert imbalances(cb) == {} and {x.kind for x in cb} == {"chargeback"}


async def test_store_trial_balance_statement_and_export(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    store = SqliteStore(db)
    await store.start()
    expected: list[LedgerEntry] = []
    try:
        rng = random.Random(7)
        for i in range(25):
            for before, after in lifecycle(rng, f"pay_s{i}"):
                entries = postings_for(before, after, PRICING)
                expected.extend(entries)
                if before is None:
                    await store.insert_payment(after, ledger=entries)
                else:
                    await store.update_payment(after, before.version, ledger=entries)
    finally:
        await store.close()
    money = MoneyStore.sqlite(db)
    tb = await money.trial_balance()
    assert tb.balanced and tb.totals  # zero per currency, and there is something in it
    assert {(a.account, a.currency): a.balance for a in tb.accounts} == balances(expected)
    payable = [a for a in await money.balances("merchant:m1:") if a.currency == "USD"]
    since, until = T0.replace(year=2000), T0.replace(year=2100)
    st_ = await money.statement("m1", "USD", since, until)
    assert st_.opening == 0 and st_.closing == -sum(a.balance for a in payable)
    running = 0
    for line in st_.lines:
        running += line.amount
        assert line.balance == running
    buf = io.StringIO()
    n = write_journal_csv(await money.entries(), buf)
    rows = buf.getvalue().splitlines()
    assert n == len(expected) == len(rows) - 1
    debit = sum(int(r.split(",")[4]) for r in rows[1:])
    credit = sum(int(r.split(",")[5]) for r in rows[1:])
    assert debit == credit > 0
    assert msgspec.structs.asdict(expected[0]).keys() >= {"id", "txn_id", "account", "amount", "currency"}


async def test_monthly_activity_feeds_the_volume_tiers(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    store = SqliteStore(db)
    await store.start()
    try:
        for i, amount in enumerate([1000, 2500, 4000]):
            p = new_payment(f"pay_v{i}", "m1", amount, "USD", "a", T0)
            cap = step(p, T0, status=Status.CAPTURED, captured_amount=amount)
            await store.insert_payment(p)
            await store.update_payment(cap, p.version, ledger=postings_for(p, cap, PRICING))
    finally:
        await store.close()
    act = await MoneyStore.sqlite(db).monthly_activity(T0.replace(day=1))
    assert act[("m1", "USD")] == MonthlyActivity(volume=7500, count=3)
    assert act[("channel:a", "USD")] == MonthlyActivity(volume=7500, count=3)
    assert await MoneyStore.sqlite(db).monthly_activity(T0.replace(year=2030)) == {}
    cfg = MoneyConfig(merchants={"m1": MerchantMoney(pricing=PriceList(rules=[PriceRule(volume_basis="count",
        schedule=Schedule(percent_bp=300, volume_tiers=[VolumeTier(monthly_volume_from=3, percent_bp=100)]))]))})
    book = pricing_book(cfg, {"a": {"default": {"percent_bp": 50}}}, act)
    p = new_payment("pay_next", "m1", 10_000, "USD", "a", T0)
    assert book.merchant_fee(p, 10_000, T0) == 100  # third payment this month reached the count tier
    assert book.channel_fee(p, 10_000, T0) == 50
