"""Reconciliation: a channel's settlement report against our record, matched by channel reference.

Reports are parsed into `ChannelRow`s (charge / refund / chargeback movements, positive minor units)
by one parser per format, using the column names the channels document:
- `stripe`: balance-transaction export (Dashboard: id, Type, Source, Amount, Fee, Currency; or the
  Reporting API itemised columns: balance_transaction_id, reporting_category, source_id, gross, fee,
  currency). Amounts in major units.
- `adyen`: Settlement details report (Psp Reference, Modification Reference, Type, Gross Currency,
  Gross Debit (GC), Gross Credit (GC), Commission (NC), Markup (NC), Scheme Fees (NC), Interchange (NC)).
- `alipay`: 账务/交易账单 CSV (支付宝交易号, 业务类型, 订单金额（元）, 退款批次号/请求号, 服务费（元）),
  `#` comment lines before and after the table; GBK or UTF-8.
- `wechatpay`: 交易账单 (微信订单号, 交易状态, 货币种类, 订单金额, 微信退款单号, 退款金额, 退款状态, 手续费),
  every value prefixed with a backtick; the summary after `总交易单数` is skipped.
- `sandbox`: the sandbox channel's GET /_sandbox/ledger JSON.

Exception types: missing_ours (the channel has it, we do not), missing_channel (we expect it, the
report lacks it), amount_mismatch, currency_mismatch (amount and fee are then not compared),
status_mismatch, fee_mismatch (only when both sides know the fee), duplicate_channel (a reference
reported twice for the same kind). Exception ids are deterministic (channel, type, kind, reference,
occurrence), so importing the same report twice yields the same exceptions, and a resolution stays.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any, Literal

import msgspec

from router.money.store import ReconRecord, StoredException
from router.validation import currency_exponent

ExceptionType = Literal[
    "missing_ours", "missing_channel", "amount_mismatch", "currency_mismatch", "status_mismatch", "fee_mismatch",
    "duplicate_channel",
]
EXCEPTION_TYPES: tuple[ExceptionType, ...] = (
    "missing_ours", "missing_channel", "amount_mismatch", "currency_mismatch", "status_mismatch", "fee_mismatch",
    "duplicate_channel",
)
Format = Literal["stripe", "adyen", "alipay", "wechatpay", "sandbox"]
FORMATS: tuple[Format, ...] = ("stripe", "adyen", "alipay", "wechatpay", "sandbox")


class ReportError(ValueError):
    """The file is not a report of the stated format (names the line and column)."""


class ChannelRow(msgspec.Struct, frozen=True, kw_only=True):
    reference: str
    kind: str  # charge | refund | chargeback
    amount: int  # positive minor units
    currency: str
    status: str  # charge: captured | authorized | voided | failed; refund: succeeded | pending | failed
    fee: int | None = None
    line: int = 0


class ReconException(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    type: ExceptionType
    channel: str
    kind: str
    reference: str
    detail: str
    payment_id: str | None = None
    ours: dict[str, Any] | None = None
    theirs: dict[str, Any] | None = None
    line: int | None = None
    resolved: bool = False
    resolution_reason: str | None = None

    def resolve(self, reason: str) -> ReconException:
        if not reason.strip():
            raise ValueError("a resolution needs a reason")
        return msgspec.structs.replace(self, resolved=True, resolution_reason=reason)


class ReconResult(msgspec.Struct, frozen=True, kw_only=True):
    channel: str
    rows: int
    matched: int
    exceptions: list[ReconException]

    def counts(self) -> dict[str, int]:
        c = Counter(e.type for e in self.exceptions)
        return {t: c.get(t, 0) for t in EXCEPTION_TYPES}


# Which of our records a report is expected to list: settlement reports carry money movements only.
_EXPECTED_IN: dict[Format, frozenset[str]] = {
    "sandbox": frozenset({"captured", "authorized", "voided", "succeeded"}),
    **{f: frozenset({"captured", "succeeded"}) for f in ("stripe", "adyen", "alipay", "wechatpay")},
}


def _exception_id(channel: str, type_: str, kind: str, reference: str, n: int) -> str:
    digest = hashlib.sha256(f"{channel}|{type_}|{kind}|{reference}|{n}".encode()).hexdigest()[:20]
    return f"rex_{digest}"


def reconcile(
    channel: str, ours: Iterable[ReconRecord], report: Iterable[ChannelRow], *, fmt: Format = "sandbox",
    on_row: Callable[[ChannelRow], None] | None = None,
) -> ReconResult:
    expected = _EXPECTED_IN[fmt]
    # Memory matters at a million rows: ours are indexed by position, keyed by their own reference
    # strings per kind (no new key objects), and "seen" is one byte per record.
    records = list(ours)
    index: dict[str, dict[str, int]] = {}
    for i, r in enumerate(records):
        index.setdefault(r.kind, {})[r.reference] = i
    seen = bytearray(len(records))
    unknown_seen: Counter[tuple[str, str]] = Counter()  # rows we have no record of (usually few)
    out: list[ReconException] = []
    rows = matched = 0

    def add(type_: ExceptionType, row_kind: str, ref: str, detail: str, mine: ReconRecord | None,
            theirs: ChannelRow | None, n: int = 0) -> None:
        out.append(ReconException(
            id=_exception_id(channel, type_, row_kind, ref, n), type=type_, channel=channel, kind=row_kind,
            reference=ref, detail=detail, payment_id=mine.payment_id if mine else None,
            ours=msgspec.to_builtins(mine) if mine else None,
            theirs=msgspec.to_builtins(theirs) if theirs else None, line=theirs.line if theirs else None,
        ))

    for row in report:
        rows += 1
        if on_row is not None:
            on_row(row)
        at = index.get(row.kind, {}).get(row.reference)
        if at is None:
            unknown_seen[(row.kind, row.reference)] += 1
            times = unknown_seen[(row.kind, row.reference)]
            if times > 1:
                add("duplicate_channel", row.kind, row.reference, f"reported {times} times", None, row, times)
            else:
                add("missing_ours", row.kind, row.reference, "the channel reports a movement we have no record of",
                    None, row)
            continue
        mine = records[at]
        if seen[at]:
            seen[at] = min(seen[at] + 1, 255)
            add("duplicate_channel", row.kind, row.reference, f"reported {seen[at]} times", mine, row, seen[at])
            continue
        seen[at] = 1
        clean = True
        if mine.currency != row.currency:
            clean = False
            add("currency_mismatch", row.kind, row.reference, f"ours {mine.currency}, channel {row.currency}",
                mine, row)
        else:
            if mine.amount != row.amount:
                clean = False
                add("amount_mismatch", row.kind, row.reference, f"ours {mine.amount}, channel {row.amount}",
                    mine, row)
            if mine.fee is not None and row.fee is not None and mine.fee != row.fee:
                clean = False
                add("fee_mismatch", row.kind, row.reference, f"ours {mine.fee}, channel {row.fee}", mine, row)
        if mine.status != row.status:
            clean = False
            add("status_mismatch", row.kind, row.reference, f"ours {mine.status}, channel {row.status}", mine, row)
        matched += clean
    for at, mine in enumerate(records):
        if not seen[at] and mine.status in expected:
            add("missing_channel", mine.kind, mine.reference, "we expect this movement; the report lacks it",
                mine, None)
    return ReconResult(channel=channel, rows=rows, matched=matched, exceptions=out)


def to_stored(result: ReconResult, run_id: str, now: datetime) -> list[StoredException]:
    return [
        StoredException(id=e.id, run_id=run_id, channel=e.channel, type=e.type, kind=e.kind, reference=e.reference,
                        payment_id=e.payment_id, detail=e.detail, ours=e.ours, theirs=e.theirs, created_at=now)
        for e in result.exceptions
    ]


def write_exceptions(result: ReconResult, out: IO[str]) -> None:
    """The machine-readable exceptions file (JSON)."""
    doc = {"channel": result.channel, "rows": result.rows, "matched": result.matched, "counts": result.counts(),
           "exceptions": msgspec.to_builtins(result.exceptions)}
    out.write(msgspec.json.format(msgspec.json.encode(doc), indent=2).decode())
    out.write("\n")


# --------------------------------------------------------------------------- parsing


def _minor(value: str, currency: str, where: str) -> int:
    """A major-unit decimal string to minor units; exact (a sub-minor fraction is an error)."""
    text = value.strip().lstrip("`").replace(",", "")
    if not text:
        return 0
    exp = currency_exponent(currency.upper())
    if exp is None:
        raise ReportError(f"{where}: unknown currency {currency!r}")
    try:
        scaled = Decimal(text).scaleb(exp)
    except InvalidOperation:
        raise ReportError(f"{where}: not an amount: {value!r}") from None
    if scaled != scaled.to_integral_value():
        raise ReportError(f"{where}: {value!r} has more than {exp} decimals")
    return abs(int(scaled))


def _norm(header: str) -> str:
    return header.strip().lstrip("\ufeff").replace("（", "(").replace("）", ")").lower()


def _dict_rows(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.reader(lines)
    header: list[str] | None = None
    for n, cells in enumerate(reader, start=1):
        if not cells or all(not c.strip() for c in cells):
            continue
        if header is None:
            header = [_norm(c) for c in cells]
            continue
        yield n, {h: (cells[i].strip() if i < len(cells) else "") for i, h in enumerate(header)}


def _need(row: dict[str, str], names: Sequence[str], where: str) -> str:
    for name in names:
        if name in row:
            return row[name]
    raise ReportError(f"{where}: missing column {names[0]!r}")


def parse_stripe(lines: Iterable[str]) -> Iterator[ChannelRow]:
    for n, row in _dict_rows(lines):
        where = f"line {n}"
        type_ = _need(row, ("type", "reporting_category"), where).lower()
        kind = {"charge": "charge", "payment": "charge", "refund": "refund", "payment_refund": "refund",
                "dispute": "chargeback"}.get(type_)
        if kind is None:
            continue  # payouts, adjustments, fees: not a payment movement
        currency = _need(row, ("currency",), where).upper()
        amount = _minor(_need(row, ("amount", "gross"), where), currency, where)
        fee_text = row.get("fee", "")
        yield ChannelRow(
            reference=_need(row, ("source", "source_id"), where), kind=kind, amount=amount, currency=currency,
            status="captured" if kind == "charge" else "succeeded",
            fee=_minor(fee_text, currency, where) if (fee_text and kind == "charge") else None, line=n,
        )


_ADYEN_FEES = ("commission (nc)", "markup (nc)", "scheme fees (nc)", "interchange (nc)")


def parse_adyen(lines: Iterable[str]) -> Iterator[ChannelRow]:
    for n, row in _dict_rows(lines):
        where = f"line {n}"
        type_ = _need(row, ("type",), where).lower()
        kind = {"settled": "charge", "refunded": "refund", "chargeback": "chargeback"}.get(type_)
        if kind is None:
            continue
        currency = _need(row, ("gross currency",), where).upper()
        gross = row.get("gross credit (gc)", "") if kind == "charge" else row.get("gross debit (gc)", "")
        psp = _need(row, ("psp reference",), where)
        reference = (row.get("modification reference") or psp) if kind == "refund" else psp
        fee = None
        if kind == "charge" and any(row.get(c) for c in _ADYEN_FEES):
            net_currency = row.get("net currency", currency) or currency
            fee = sum(_minor(row.get(c, ""), net_currency, where) for c in _ADYEN_FEES)
        yield ChannelRow(reference=reference, kind=kind, amount=_minor(gross, currency, where), currency=currency,
                         status="captured" if kind == "charge" else "succeeded", fee=fee, line=n)


def parse_alipay(lines: Iterable[str]) -> Iterator[ChannelRow]:
    table = (line for line in lines if not line.lstrip().startswith("#"))
    for n, row in _dict_rows(table):
        where = f"row {n}"
        business = _need(row, ("业务类型",), where)
        trade_no = _need(row, ("支付宝交易号",), where)
        amount = _minor(_need(row, ("订单金额(元)",), where), "CNY", where)
        fee_text = row.get("服务费(元)", "")
        if business == "交易":
            yield ChannelRow(reference=trade_no, kind="charge", amount=amount, currency="CNY", status="captured",
                             fee=_minor(fee_text, "CNY", where) if fee_text else None, line=n)
        elif business == "退款":
            ref = row.get("退款批次号/请求号") or trade_no
            yield ChannelRow(reference=ref, kind="refund", amount=amount, currency="CNY", status="succeeded", line=n)


_WECHAT_STATUS = {"SUCCESS": "captured", "REVOKED": "voided", "PAYERROR": "failed", "CLOSED": "failed"}
_WECHAT_REFUND_STATUS = {"SUCCESS": "succeeded", "PROCESSING": "pending", "FAIL": "failed", "CHANGE": "failed"}


def parse_wechatpay(lines: Iterable[str]) -> Iterator[ChannelRow]:
    def table() -> Iterator[str]:
        for line in lines:
            if line.lstrip("\ufeff").startswith("总交易单数"):
                return
            yield line

    for n, raw in _dict_rows(table()):
        row = {k: v.lstrip("`") for k, v in raw.items()}
        where = f"row {n}"
        currency = (row.get("货币种类") or "CNY").upper()
        state = _need(row, ("交易状态",), where).upper()
        fee_text = row.get("手续费", "")
        if state == "REFUND":
            yield ChannelRow(
                reference=_need(row, ("微信退款单号",), where), kind="refund",
                amount=_minor(_need(row, ("退款金额",), where), currency, where), currency=currency,
                status=_WECHAT_REFUND_STATUS.get(row.get("退款状态", "").upper(), "pending"), line=n,
            )
        else:
            yield ChannelRow(
                reference=_need(row, ("微信订单号",), where), kind="charge",
                amount=_minor(_need(row, ("订单金额", "应结订单金额"), where), currency, where), currency=currency,
                status=_WECHAT_STATUS.get(state, "failed"),
                fee=_minor(fee_text, currency, where) if fee_text else None, line=n,
            )


_SANDBOX_STATUS = {"captured": "captured", "partially_refunded": "captured", "refunded": "captured",
                   "authorized": "authorized", "voided": "voided", "declined": "failed"}


def parse_sandbox(doc: Any) -> Iterator[ChannelRow]:
    if not isinstance(doc, dict) or not isinstance(doc.get("charges"), list):
        raise ReportError("not a sandbox ledger: expected {\"charges\": [...], \"refunds\": [...]}")
    currency_of: dict[str, str] = {}
    for n, c in enumerate(doc["charges"], start=1):
        status = _SANDBOX_STATUS.get(c["status"], "failed")
        currency = str(c["currency"]).upper()
        currency_of[c["id"]] = currency
        amount = int(c["captured_amount"]) if status == "captured" else int(c["amount"])
        yield ChannelRow(reference=c["id"], kind="charge", amount=amount, currency=currency, status=status, line=n)
    for n, r in enumerate(doc.get("refunds", []), start=1):
        yield ChannelRow(reference=r["id"], kind="refund", amount=int(r["amount"]),
                         currency=currency_of.get(r["charge"], "?"), status=str(r["status"]), line=n)


def read_report(path: str | Path, fmt: Format) -> Iterator[ChannelRow]:
    """Stream a report file's rows (CSV formats are read line by line)."""
    p = Path(path)
    if fmt == "sandbox":
        yield from parse_sandbox(msgspec.json.decode(p.read_bytes()))
        return
    raw = p.read_bytes()[:4096]
    encoding = "utf-8-sig"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        encoding = "gb18030"  # Alipay and WeChat Pay bills are often GBK
    parser = {"stripe": parse_stripe, "adyen": parse_adyen, "alipay": parse_alipay,
              "wechatpay": parse_wechatpay}[fmt]
    with p.open(encoding=encoding, newline="") as f:
        yield from parser(f)


def parse_text(text: str, fmt: Format) -> list[ChannelRow]:
    if fmt == "sandbox":
        return list(parse_sandbox(msgspec.json.decode(text)))
    parser = {"stripe": parse_stripe, "adyen": parse_adyen, "alipay": parse_alipay,
              "wechatpay": parse_wechatpay}[fmt]
    return list(parser(io.StringIO(text, newline="")))


def utc_now() -> datetime:
    return datetime.now(UTC)
