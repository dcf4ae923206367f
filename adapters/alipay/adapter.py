"""Adapter for the Alipay open platform gateway. Sans-IO.

Every call is `POST /gateway.do`, a form of Alipay's common parameters (`app_id`, `method`, `format`,
`charset`, `sign_type=RSA2`, `timestamp` in Asia/Shanghai, `version`, `notify_url`, `biz_content`)
signed RSA2 with the app private key. The attempt's deterministic `reference` is the `out_trade_no`,
so `alipay.trade.query` finds the trade after a timeout, and it is also the `channel_reference` we
return (Alipay's own `trade_no` does not exist yet for a QR trade nobody has scanned).

- authorize: wallet {"auth_code": ...} -> `alipay.trade.pay` (barcode): 10000 approved and captured,
  10003 pending; otherwise `alipay.trade.precreate` -> REQUIRES_ACTION with the `qr_code`.
- status: `alipay.trade.query`; TRADE_SUCCESS/FINISHED approved, WAIT_BUYER_PAY pending, TRADE_CLOSED
  hard decline, ACQ.TRADE_NOT_EXIST not charged; any other failure of the query itself is unknown.
- void: `alipay.trade.close`; refund: `alipay.trade.refund` with `out_request_no` = the operation's
  channel key; capture does not exist (Alipay trades are captured when paid) and is refused.
- every response must carry a valid Alipay signature over the raw `*_response` JSON; anything
  unsigned, unverifiable, unreadable or unexpected is `OutcomeUnknown`, never approved.
- notifications: form posts verified with Alipay's public key and our app_id; the ack is `success`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl, urlencode

import msgspec
import orjson

from adapters.alipay.codes import SUCCESS, WAITING, classify
from adapters.alipay.wire import (
    EXPONENTS,
    FORM_CONTENT_TYPE,
    GATEWAY_PATH,
    TIMESTAMP_FORMAT,
    TradeResponse,
    load_private_key,
    load_public_key,
    major_units,
    notify_signing_string,
    request_signing_string,
    rsa2_sign,
    rsa2_verify,
    top_level_members,
    trade_response_decoder,
)
from router.errors import CallbackRejected, ChannelUnavailable, IntegrationError, OutcomeUnknown
from router.model import (
    CallbackEvent,
    Capabilities,
    ChannelAuthorize,
    ChannelOperation,
    ChannelResult,
    Outcome,
    WireRequest,
    WireResponse,
    utcnow,
)

# China Standard Time has had no DST since 1991: a fixed offset avoids depending on tzdata.
SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")

PRECREATE = "alipay.trade.precreate"
PAY = "alipay.trade.pay"
QUERY = "alipay.trade.query"
REFUND = "alipay.trade.refund"
CLOSE = "alipay.trade.close"

# Alipay's gateway answers JSON as text/html;charset=UTF-8; anything else is not a gateway answer.
_JSON_TYPES = ("application/json", "text/html", "text/plain", "text/javascript")
_PAID = ("TRADE_SUCCESS", "TRADE_FINISHED")
_SUBJECT_MAX = 256


def _response_key(method: str) -> str:
    return method.replace(".", "_") + "_response"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for k, v in headers.items():
        if k.lower() == name:
            return v
    return None


class AlipayAdapter:
    kind = "alipay"

    def __init__(
        self,
        credentials: Mapping[str, str],
        capabilities: Capabilities | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        missing = [k for k in ("app_id", "app_private_key", "alipay_public_key") if not credentials.get(k)]
        if missing:
            raise ValueError(f"alipay credentials missing: {', '.join(missing)}")
        self._app_id = credentials["app_id"]
        self._private_key = load_private_key(credentials["app_private_key"])
        self._alipay_key = load_public_key(credentials["alipay_public_key"])
        self._clock = clock
        caps = capabilities or Capabilities(currencies=frozenset(EXPONENTS), methods=frozenset({"alipay"}))
        # config-built capabilities carry the default operations: Alipay has no capture, whatever they say
        self._caps = msgspec.structs.replace(caps, operations=caps.operations - {"capture"})

    def capabilities(self) -> Capabilities:
        return self._caps

    # ------------------------------------------------------------------ request side

    def _request(self, method: str, biz: Mapping[str, Any], notify_url: str | None = None) -> WireRequest:
        params = {
            "app_id": self._app_id,
            "method": method,
            "format": "JSON",
            "charset": "utf-8",
            "sign_type": "RSA2",
            "timestamp": self._clock().astimezone(SHANGHAI).strftime(TIMESTAMP_FORMAT),
            "version": "1.0",
            "biz_content": orjson.dumps(dict(biz)).decode(),
        }
        if notify_url:
            params["notify_url"] = notify_url
        params["sign"] = rsa2_sign(self._private_key, request_signing_string(params).encode())
        return WireRequest(
            method="POST",
            path=GATEWAY_PATH,
            headers={"Content-Type": FORM_CONTENT_TYPE},
            body=urlencode(sorted(params.items())).encode("ascii"),
        )

    @staticmethod
    def _amount(amount: int, currency: str, exponent: int | None = None) -> str:
        if currency not in EXPONENTS:
            raise IntegrationError(f"alipay trades are priced in CNY, not {currency}")
        want = EXPONENTS[currency]
        if exponent is not None and exponent != want:
            raise IntegrationError(f"{currency} has exponent {want}, the request says {exponent}")
        return major_units(amount, want)

    def build_authorize(self, req: ChannelAuthorize) -> WireRequest:
        if req.method != "alipay":
            raise IntegrationError(f"the alipay adapter cannot pay with {req.method!r}")
        wallet = req.wallet or {}
        biz: dict[str, Any] = {
            "out_trade_no": req.reference,
            "total_amount": self._amount(req.amount, req.currency, req.exponent),
            "subject": (req.description or req.reference)[:_SUBJECT_MAX],
        }
        flow = wallet.get("flow")
        if wallet.get("auth_code") or flow in ("barcode", "bar_code"):
            if not wallet.get("auth_code"):
                raise IntegrationError("an alipay barcode payment needs wallet.auth_code")
            biz = {**biz, "scene": "bar_code", "auth_code": wallet["auth_code"]}
            return self._request(PAY, biz, req.notify_url)
        if flow not in (None, "qr", "native"):
            raise IntegrationError(f"alipay flow {flow!r} is not supported (qr, native, barcode)")
        return self._request(PRECREATE, biz, req.notify_url)

    def build_status(self, reference: str, channel_reference: str | None) -> WireRequest:
        # channel_reference is the out_trade_no too; the reference is always there
        return self._request(QUERY, {"out_trade_no": reference})

    def build_operation(self, op: ChannelOperation) -> WireRequest:
        if op.kind == "refund":
            biz = {
                "out_trade_no": op.channel_reference,
                "refund_amount": self._amount(op.amount, op.currency),
                "out_request_no": op.channel_key,  # Alipay's idempotency key for one refund
            }
            return self._request(REFUND, biz)
        if op.kind == "void":
            return self._request(CLOSE, {"out_trade_no": op.channel_reference})
        if op.kind == "capture":
            raise IntegrationError("alipay has no capture: a trade is captured when the buyer pays")
        raise IntegrationError(f"unknown operation {op.kind!r}")

    # ------------------------------------------------------------------ response side

    def parse_authorize(self, resp: WireResponse) -> ChannelResult:
        method, tr = self._read(resp, (PRECREATE, PAY))
        if method == PRECREATE and tr.code == SUCCESS:
            if not tr.qr_code or not tr.out_trade_no:
                raise OutcomeUnknown("precreate succeeded without qr_code/out_trade_no", code="missing_fields")
            return ChannelResult(
                outcome=Outcome.REQUIRES_ACTION,
                channel_reference=tr.out_trade_no,
                code=tr.code,
                next_action={"type": "qr_code", "data": tr.qr_code},
            )
        if method == PAY and tr.code == SUCCESS:
            if not tr.out_trade_no:
                raise OutcomeUnknown("pay succeeded without out_trade_no", code="missing_fields")
            # trade.pay's 10000 means "paid" (trade_status is often absent); a status that says
            # otherwise is read as it says, and anything unexpected stays unknown
            if tr.trade_status in (None, *_PAID):
                return ChannelResult(
                    outcome=Outcome.APPROVED,
                    channel_reference=tr.out_trade_no,
                    code=tr.trade_status or tr.code,
                    captured=True,
                )
            if tr.trade_status == "WAIT_BUYER_PAY":
                return ChannelResult(outcome=Outcome.PENDING, channel_reference=tr.out_trade_no, code=tr.trade_status)
            raise OutcomeUnknown(f"pay answered trade_status {tr.trade_status!r}", code="unexpected_status")
        if method == PAY and tr.code == WAITING:
            return ChannelResult(
                outcome=Outcome.PENDING,
                channel_reference=tr.out_trade_no,
                code=tr.code,
                message="waiting for the buyer to confirm",
            )
        return self._failure(tr)

    def parse_status(self, resp: WireResponse) -> ChannelResult:
        _, tr = self._read(resp, (QUERY,))
        if tr.code == SUCCESS:
            ref = tr.out_trade_no
            if not ref or not tr.trade_status:
                raise OutcomeUnknown("query succeeded without out_trade_no/trade_status", code="missing_fields")
            if tr.trade_status in _PAID:
                return ChannelResult(outcome=Outcome.APPROVED, channel_reference=ref, code=tr.trade_status, captured=True)
            if tr.trade_status == "WAIT_BUYER_PAY":
                return ChannelResult(outcome=Outcome.PENDING, channel_reference=ref, code=tr.trade_status)
            if tr.trade_status == "TRADE_CLOSED":
                return ChannelResult(
                    outcome=Outcome.HARD_DECLINE,
                    channel_reference=ref,
                    code=tr.trade_status,
                    message="the trade was closed (unpaid and expired, or fully refunded)",
                )
            raise OutcomeUnknown(f"query answered trade_status {tr.trade_status!r}", code="unexpected_status")
        if tr.sub_code == "ACQ.TRADE_NOT_EXIST":
            return ChannelResult(outcome=Outcome.NOT_CHARGED, code=tr.sub_code)
        # a query that failed says nothing about the payment: never turn it into a decline
        outcome = classify(tr.code, tr.sub_code)
        code = tr.sub_code or tr.code
        if outcome is Outcome.UNAVAILABLE:
            raise ChannelUnavailable(f"alipay refused the query: {code}", code=code)
        raise OutcomeUnknown(f"alipay query failed: {code}", code=code)

    def parse_operation(self, op: ChannelOperation, resp: WireResponse) -> ChannelResult:
        if op.kind == "capture":
            raise IntegrationError("alipay has no capture")
        method = REFUND if op.kind == "refund" else CLOSE
        _, tr = self._read(resp, (method,))
        if tr.code != SUCCESS:
            return self._failure(tr)
        if tr.out_trade_no and tr.out_trade_no != op.channel_reference:
            raise OutcomeUnknown("alipay answered for another trade", code="reference_mismatch")
        if op.kind == "void":
            return ChannelResult(outcome=Outcome.APPROVED, channel_reference=op.channel_reference, code="TRADE_CLOSED")
        # Alipay: only fund_change=Y confirms the money moved; N (e.g. a replayed out_request_no) or
        # no flag must be confirmed by a refund query
        if tr.fund_change != "Y":
            raise OutcomeUnknown(f"refund answered fund_change={tr.fund_change!r}", code="refund_unconfirmed")
        return ChannelResult(outcome=Outcome.APPROVED, channel_reference=op.channel_key, code=tr.code)

    # ------------------------------------------------------------------ callbacks

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> tuple[CallbackEvent, WireResponse]:
        ctype = (_header(headers, "content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise CallbackRejected(f"alipay notifications are forms, not {ctype or 'untyped'}")
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            raise CallbackRejected("unreadable notification body") from None
        params = dict(pairs)
        if len(params) != len(pairs):
            raise CallbackRejected("duplicate notification parameters")
        sign = params.get("sign")
        if not sign or params.get("sign_type") != "RSA2":
            raise CallbackRejected("notification is not RSA2-signed")
        if params.get("charset", "utf-8").lower() != "utf-8":
            raise CallbackRejected("notification charset is not utf-8")
        if not rsa2_verify(self._alipay_key, notify_signing_string(params).encode(), sign):
            raise CallbackRejected("notification signature does not verify")
        # Alipay signs every merchant's notifications with the same key: only ours are for us
        if params.get("app_id") != self._app_id:
            raise CallbackRejected("notification for another app_id")
        event = self._notify_event(params)
        ack = WireResponse(status=200, headers={"Content-Type": "text/plain; charset=utf-8"}, body=b"success")
        return event, ack

    @staticmethod
    def _notify_event(p: Mapping[str, str]) -> CallbackEvent:
        status = p.get("trade_status")
        ref = p.get("out_trade_no") or None
        refunded = bool(p.get("refund_fee") or p.get("gmt_refund") or p.get("out_biz_no"))
        if not ref or not p.get("notify_id"):
            raise CallbackRejected("notification without out_trade_no/notify_id")
        if refunded and status in ("TRADE_SUCCESS", "TRADE_CLOSED"):
            # a refund notifies with the trade's status after it (closed when fully refunded)
            result = ChannelResult(outcome=Outcome.APPROVED, channel_reference=p.get("out_biz_no") or ref, code=status)
            return CallbackEvent(event_id=p["notify_id"], reference=ref, channel_reference=ref, result=result, kind="refund")
        if status in _PAID:
            result = ChannelResult(outcome=Outcome.APPROVED, channel_reference=ref, code=status, captured=True)
        elif status == "WAIT_BUYER_PAY":
            result = ChannelResult(outcome=Outcome.PENDING, channel_reference=ref, code=status)
        elif status == "TRADE_CLOSED":
            result = ChannelResult(outcome=Outcome.HARD_DECLINE, channel_reference=ref, code=status)
        else:
            raise CallbackRejected(f"unknown trade_status {status!r}")
        total = p.get("total_amount")
        try:
            fen = int((Decimal(total) * 100).to_integral_exact()) if total else None  # CNY: 2 minor digits
        except (InvalidOperation, ArithmeticError):
            raise CallbackRejected("notification with an unreadable total_amount") from None
        return CallbackEvent(event_id=p["notify_id"], reference=ref, channel_reference=ref, result=result,
                             amount=fen, currency="CNY" if fen is not None else None)

    # ------------------------------------------------------------------ helpers

    def _read(self, resp: WireResponse, methods: tuple[str, ...]) -> tuple[str, TradeResponse]:
        """Check status, type and signature; return the method answered and its decoded body."""
        if resp.status == 429:
            raise ChannelUnavailable("alipay rate limited the request", code="429")
        if resp.status != 200:
            # the gateway answers 200 for every API result; anything else came from in front of it
            raise OutcomeUnknown(f"alipay answered HTTP {resp.status}", code=str(resp.status))
        ctype = (_header(resp.headers, "content-type") or "").split(";")[0].strip().lower()
        if ctype not in _JSON_TYPES:
            raise OutcomeUnknown(f"alipay answered {ctype or 'no content type'}", code="wrong_content_type")
        try:
            members = top_level_members(resp.body)
        except (ValueError, msgspec.DecodeError):
            raise OutcomeUnknown("unreadable alipay response", code="malformed_response") from None
        found = [(m, _response_key(m)) for m in methods if _response_key(m) in members]
        if not found and "error_response" in members:
            found = [(methods[0], "error_response")]
        if len(found) != 1:
            raise OutcomeUnknown("alipay response without the expected *_response", code="malformed_response")
        method, key = found[0]
        raw = members[key]
        try:
            sign = msgspec.json.decode(members.get("sign", b"null"), type=str | None)
        except msgspec.DecodeError:
            sign = None
        if not sign:
            raise OutcomeUnknown("unsigned alipay response", code="unsigned_response")
        if not rsa2_verify(self._alipay_key, raw, sign):
            raise OutcomeUnknown("alipay response signature does not verify", code="bad_signature")
        try:
            return method, trade_response_decoder.decode(raw)
        except msgspec.DecodeError:
            raise OutcomeUnknown("alipay response missing fields", code="malformed_response") from None

    @staticmethod
    def _failure(tr: TradeResponse) -> ChannelResult:
        """A non-success answer: decline data, or the two steering exceptions."""
        outcome = classify(tr.code, tr.sub_code)
        code = tr.sub_code or tr.code
        if outcome is Outcome.UNKNOWN:
            raise OutcomeUnknown(f"alipay answered {code}: outcome unknown", code=code)
        if outcome is Outcome.UNAVAILABLE:
            raise ChannelUnavailable(f"alipay did not process the request: {code}", code=code)
        return ChannelResult(
            outcome=outcome,
            channel_reference=tr.out_trade_no,
            code=code,
            message=tr.sub_msg or tr.msg or f"alipay answered {code}",
        )
