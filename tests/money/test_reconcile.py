"""Reconciliation: channel reports against our record; every exception type, every format."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.cost import Schedule
from router.money.pricing import ChannelPricing, PriceList, PriceRule, PricingBook, round_half_even
from router.money.reconcile import (
    EXCEPTION_TYPES,
    ChannelRow,
    Format,
    ReportError,
    parse_sandbox,
    parse_text,
    read_report,
    reconcile,
    to_stored,
    write_exceptions,
)
from router.money.settlement import Cycle, MoneyConfig, payout_date, run_settlement
from router.money.store import MoneyStore, ReconRecord
from tests.conftest import GOOD_CARD

DATA = Path(__file__).parent / "data"

STRIPE_OURS = [
    ReconRecord(reference="ch_A", kind="charge", amount=10_000, currency="USD", status="captured", payment_id="pay_A",
                fee=320),
    ReconRecord(reference="ch_B", kind="charge", amount=5_000, currency="USD", status="captured", payment_id="pay_B",
                fee=175),
    ReconRecord(reference="re_B1", kind="refund", amount=2_000, currency="USD", status="succeeded",
                payment_id="pay_B"),
    ReconRecord(reference="ch_C", kind="charge", amount=7_000, currency="USD", status="authorized", payment_id="pay_C"),
]
ADYEN_OURS = [
    ReconRecord(reference="8815000000000001", kind="charge", amount=10_000, currency="EUR", status="captured",
                payment_id="pay_1", fee=120),
    ReconRecord(reference="8815000000000009", kind="refund", amount=2_500, currency="EUR", status="succeeded",
                payment_id="pay_1"),
]
ALIPAY_OURS = [
    ReconRecord(reference="2024060322001400000000000001", kind="charge", amount=8_800, currency="CNY",
                status="captured", payment_id="pay_1", fee=53),
    ReconRecord(reference="pay_1-r1", kind="refund", amount=800, currency="CNY", status="succeeded",
                payment_id="pay_1"),
]
WECHAT_OURS = [
    ReconRecord(reference="4200000000202406030000000001", kind="charge", amount=8_800, currency="CNY",
                status="captured", payment_id="pay_1", fee=53),
    ReconRecord(reference="50300000000202406030000000001", kind="refund", amount=800, currency="CNY",
                status="succeeded", payment_id="pay_1"),
]
SANDBOX_OURS = [
    ReconRecord(reference="ch_s1", kind="charge", amount=1099, currency="USD", status="captured", payment_id="pay_1"),
    ReconRecord(reference="ch_s2", kind="charge", amount=3000, currency="USD", status="captured", payment_id="pay_2"),
    ReconRecord(reference="re_s2", kind="refund", amount=1000, currency="USD", status="succeeded", payment_id="pay_2"),
    ReconRecord(reference="ch_s3", kind="charge", amount=700, currency="USD", status="authorized", payment_id="pay_3"),
]


def run(file: str, fmt: Format, ours: list[ReconRecord]) -> list[tuple[str, str]]:
    result = reconcile("ch", ours, read_report(DATA / file, fmt), fmt=fmt)
    return sorted((e.type, e.reference) for e in result.exceptions)


@pytest.mark.parametrize(
    ("file", "fmt", "ours"),
    [
        ("stripe_clean.csv", "stripe", STRIPE_OURS),
        ("stripe_itemized_clean.csv", "stripe", STRIPE_OURS),
        ("adyen_clean.csv", "adyen", ADYEN_OURS),
        ("alipay_clean.csv", "alipay", ALIPAY_OURS),
        ("alipay_clean_gbk.csv", "alipay", ALIPAY_OURS),
        ("wechatpay_clean.csv", "wechatpay", WECHAT_OURS),
        ("sandbox_clean.json", "sandbox", SANDBOX_OURS),
    ],
)
def test_clean_reports_match_completely(file: str, fmt: Format, ours: list[ReconRecord]) -> None:
    result = reconcile("ch", ours, read_report(DATA / file, fmt), fmt=fmt)
    assert result.exceptions == []
    assert result.matched == result.rows > 0


def test_missing_ours() -> None:
    assert run("stripe_missing_ours.csv", "stripe", STRIPE_OURS) == [("missing_ours", "ch_Z")]


def test_missing_channel() -> None:
    # ch_C is only authorized: a settlement report need not list it, so only ch_B is missing
    assert run("stripe_missing_channel.csv", "stripe", STRIPE_OURS) == [("missing_channel", "ch_B")]


def test_amount_mismatch() -> None:
    assert run("stripe_amount_mismatch.csv", "stripe", STRIPE_OURS) == [("amount_mismatch", "ch_A")]


def test_currency_mismatch_skips_the_amount_comparison() -> None:
    assert run("stripe_currency_mismatch.csv", "stripe", STRIPE_OURS) == [("currency_mismatch", "ch_A")]


def test_status_mismatch() -> None:
    assert run("stripe_status_mismatch.csv", "stripe", STRIPE_OURS) == [("status_mismatch", "ch_C")]
    assert run("wechatpay_status_mismatch.csv", "wechatpay", WECHAT_OURS) == [
        ("status_mismatch", "4200000000202406030000000001")]


def test_fee_mismatch() -> None:
    assert run("stripe_fee_mismatch.csv", "stripe", STRIPE_OURS) == [("fee_mismatch", "ch_A")]
    assert run("adyen_fee_mismatch.csv", "adyen", ADYEN_OURS) == [("fee_mismatch", "8815000000000001")]


def test_duplicate_channel() -> None:
    assert run("stripe_duplicate_channel.csv", "stripe", STRIPE_OURS) == [("duplicate_channel", "ch_A")]
    assert run("alipay_duplicate_channel.csv", "alipay", ALIPAY_OURS) == [
        ("duplicate_channel", "2024060322001400000000000001")]


def test_exceptions_file_is_machine_readable_and_ids_are_stable(tmp_path: Path) -> None:
    first = reconcile("stripe", STRIPE_OURS, read_report(DATA / "stripe_fee_mismatch.csv", "stripe"), fmt="stripe")
    again = reconcile("stripe", STRIPE_OURS, read_report(DATA / "stripe_fee_mismatch.csv", "stripe"), fmt="stripe")
    assert [e.id for e in first.exceptions] == [e.id for e in again.exceptions]
    buf = io.StringIO()
    write_exceptions(first, buf)
    doc = json.loads(buf.getvalue())
    assert doc["counts"]["fee_mismatch"] == 1 and sum(doc["counts"].values()) == 1
    [exc] = doc["exceptions"]
    assert exc["ours"]["fee"] == 320 and exc["theirs"]["fee"] == 321 and exc["payment_id"] == "pay_A"
    resolved = first.exceptions[0].resolve("Stripe re-priced the card brand; accepted by finance")
    assert resolved.resolved and resolved.resolution_reason
    with pytest.raises(ValueError):
        first.exceptions[0].resolve("  ")


def test_bad_reports_name_the_line() -> None:
    with pytest.raises(ReportError, match="line 2"):
        parse_text("id,Type,Source,Amount,Fee,Currency\ntxn,charge,ch_A,1.005,0,usd\n", "stripe")
    with pytest.raises(ReportError, match="missing column"):
        parse_text("id,Type,Amount,Currency\ntxn,charge,1.00,usd\n", "stripe")
    with pytest.raises(ReportError):
        parse_text('{"nope": 1}', "sandbox")


# --------------------------------------------------------------------------- generated reports


@st.composite
def report_with_injections(draw: st.DrawFn) -> tuple[list[ReconRecord], list[ChannelRow], set[tuple[str, str]]]:
    n = draw(st.integers(min_value=len(EXCEPTION_TYPES), max_value=60))
    ours = [
        ReconRecord(reference=f"ch_{i}", kind="charge", amount=draw(st.integers(1, 10**7)),
                    currency=draw(st.sampled_from(["USD", "EUR", "JPY"])), status="captured", payment_id=f"pay_{i}",
                    fee=draw(st.integers(0, 10**4)))
        for i in range(n)
    ]
    rows = [ChannelRow(reference=o.reference, kind=o.kind, amount=o.amount, currency=o.currency, status=o.status,
                       fee=o.fee) for o in ours]
    # each type injected at least once, at distinct references
    picks = draw(st.permutations(range(n)))
    types = list(EXCEPTION_TYPES) + draw(st.lists(st.sampled_from(EXCEPTION_TYPES), max_size=n - len(EXCEPTION_TYPES)))
    expected: set[tuple[str, str]] = set()
    extra: list[ChannelRow] = []
    drop: set[int] = set()
    for i, t in zip(picks, types, strict=False):
        r = rows[i]
        if t == "missing_channel":
            drop.add(i)
        elif t == "missing_ours":
            extra.append(ChannelRow(reference=f"ch_x{i}", kind="charge", amount=1, currency="USD", status="captured"))
            expected.add((t, f"ch_x{i}"))
            continue
        elif t == "amount_mismatch":
            rows[i] = _with(r, amount=r.amount + 1)
        elif t == "currency_mismatch":
            rows[i] = _with(r, currency="GBP")
        elif t == "status_mismatch":
            rows[i] = _with(r, status="voided")
        elif t == "fee_mismatch":
            rows[i] = _with(r, fee=(r.fee or 0) + 1)
        elif t == "duplicate_channel":
            extra.append(r)
        expected.add((t, r.reference))
    report = [r for i, r in enumerate(rows) if i not in drop] + extra
    order = draw(st.permutations(range(len(report))))
    return ours, [report[j] for j in order], expected


def _with(row: ChannelRow, **changes: object) -> ChannelRow:
    return msgspec.structs.replace(row, **changes)


@settings(max_examples=80, deadline=None)
@given(report_with_injections())
def test_generated_reports_find_every_injection_and_nothing_else(
    case: tuple[list[ReconRecord], list[ChannelRow], set[tuple[str, str]]],
) -> None:
    ours, report, expected = case
    result = reconcile("gen", ours, report, fmt="stripe")
    assert {(e.type, e.reference) for e in result.exceptions} == expected
    assert len(result.exceptions) == len(expected)


# --------------------------------------------------------------------------- end to end


async def test_end_to_end_sandbox_payments_settle_and_reconcile(sandbox: Any, payroute: Any, tmp_path: Path) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    pricing = PricingBook(
        merchants={"alpha": PriceList(rules=[PriceRule(schedule=Schedule(percent_bp=290, fixed=30))])},
        default=PriceList(), channels={"a": ChannelPricing({"default": {"percent_bp": 180, "fixed": 10}})},
    )
    pr.pipeline._pricing = pricing  # this test's price lists instead of the config's (none)
    paid = []
    for i, amount in enumerate([1099, 25_000, 777]):
        r = await pr.pay(merchant_order_id=f"e2e-{i}", amount=amount)
        assert r.status_code == 201, r.text
        paid.append(r.json())
    auth = (await pr.pay(merchant_order_id="e2e-auth", amount=5000, capture=False)).json()
    assert (await pr.client.post(f"/v1/payments/{auth['id']}/capture", json={"amount": 3000})).status_code == 200
    r = await pr.client.post(f"/v1/payments/{paid[1]['id']}/refunds", json={"amount": 4000})
    assert r.status_code == 200, r.text
    declined = await pr.pay(merchant_order_id="e2e-declined",
                            payment_method={"type": "card", "card": {**GOOD_CARD, "number": "4000000000000002"}})
    assert declined.json()["status"] == "declined"

    money = MoneyStore.sqlite(tmp_path / "payroute.db")
    tb = await money.trial_balance()
    assert tb.balanced and tb.totals == {"USD": 0}

    cfg = MoneyConfig(default_cycle=Cycle(kind="t_plus", days=0))
    today = datetime.now(UTC).date()
    on = payout_date(cfg.default_cycle, cfg.calendar_for(cfg.default_cycle, "USD"), today)
    [result] = await run_settlement(money, cfg, on)
    gross = 1099 + 25_000 + 777 + 3000
    fees = sum(30 + round_half_even(x * 290, 10_000) for x in (1099, 25_000, 777, 3000))
    assert (result.batch.gross, result.batch.fees, result.batch.refunds) == (gross, fees, 4000)
    assert result.batch.net == gross - fees - 4000
    assert (await run_settlement(money, cfg, on))[0].created is False
    assert (await money.trial_balance()).balanced

    async with httpx.AsyncClient() as client:
        doc = (await client.get(f"{a.base_url}/_sandbox/ledger")).json()
    ours = await money.channel_records("a")
    clean = reconcile("a", ours, parse_sandbox(doc), fmt="sandbox")
    assert clean.exceptions == [] and clean.matched == clean.rows == len(doc["charges"]) + len(doc["refunds"])

    victim = next(c for c in doc["charges"] if c["status"] == "captured")
    victim["captured_amount"] += 1
    tampered = reconcile("a", ours, parse_sandbox(doc), fmt="sandbox")
    assert [(e.type, e.reference) for e in tampered.exceptions] == [("amount_mismatch", victim["id"])]
    doc["refunds"] = []
    victim["captured_amount"] -= 1
    [missing] = reconcile("a", ours, parse_sandbox(doc), fmt="sandbox").exceptions
    assert missing.type == "missing_channel" and missing.kind == "refund" and missing.payment_id == paid[1]["id"]

    await money.save_exceptions(to_stored(tampered, "run_1", datetime.now(UTC)))
    [stored] = await money.exceptions(channel="a", open_only=True)
    assert await money.resolve_exception(stored.id, "sandbox row edited by the test", "tester", datetime.now(UTC))
    assert await money.exceptions(channel="a", open_only=True) == []
    assert not await money.resolve_exception(stored.id, "again", "tester", datetime.now(UTC))
