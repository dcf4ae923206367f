"""Adapter for WeChat Pay API v3 (Native / JSAPI, query, close, domestic refund, notifications). Sans-IO.

- authorize: `POST /v3/pay/transactions/native` (wallet flow "native"/"qr", the default) or `.../jsapi`
  (flow "jsapi", payer openid from `req.wallet["openid"]`). The order number is `out_trade_no(reference)`
  (the reference itself when it fits WeChat's 32-character limit) and the reference travels in `attach`.
  200 -> REQUIRES_ACTION with `{"type": "qr_code", "data": code_url}` or the signed JSAPI pay parameters.
- status: `GET /v3/pay/transactions/out-trade-no/{no}?mchid=` -> the trade_state table (codes.py);
  ORDER_NOT_EXIST -> NOT_CHARGED; any other error of a *query* is unavailable/unknown, never a decline.
- void: `POST .../out-trade-no/{no}/close` (204); refund: `POST /v3/refund/domestic/refunds` with
  out_refund_no = the operation's channel key. Capture is not supported (WeChat charges at once).
- Every 2xx answer must carry a valid platform signature (serial = platform_serial_no), else
  OutcomeUnknown; a signature on an error answer is verified when present (WeChat signs 2xx answers).
  Errors follow codes.py: UNKNOWN -> OutcomeUnknown, UNAVAILABLE -> ChannelUnavailable, declines as data.
  An unsigned error body never approves anything (ORDERPAID is resolved by a signed query instead).
- callbacks: signature + timestamp window + AES-256-GCM resource, translated to a CallbackEvent; every
  failure is CallbackRejected; the ack is 200 `{"code": "SUCCESS", "message": "成功"}`.
The clock (epoch seconds) and the nonce source are injectable so golden tests are exact.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import quote

import msgspec

from adapters.wechatpay import wire
from adapters.wechatpay.codes import REFUND_STATES, TRADE_STATES, classify
from router.errors import CallbackRejected, ChannelUnavailable, OutcomeUnknown
from router.model import (
    CallbackEvent,
    Capabilities,
    ChannelAuthorize,
    ChannelOperation,
    ChannelResult,
    Outcome,
    WireRequest,
    WireResponse,
)

REQUIRED_CREDENTIALS = (
    "mchid",
    "appid",
    "merchant_serial_no",
    "merchant_private_key",
    "platform_public_key",
    "platform_serial_no",
    "apiv3_key",
)
CALLBACK_TOLERANCE_S = 300  # WeChat's own guidance for rejecting replayed notifications
ACK = WireResponse(
    status=200,
    headers={"Content-Type": "application/json"},
    body='{"code":"SUCCESS","message":"成功"}'.encode(),
)
_DESCRIPTION_MAX_BYTES = 127
_T = TypeVar("_T")


class _PrepayResponse(msgspec.Struct, frozen=True, kw_only=True):
    code_url: str | None = None
    prepay_id: str | None = None


def _random_nonce() -> str:
    return secrets.token_hex(16).upper()


def _to_fen(amount: int, exponent: int) -> int:
    """Minor units at `exponent` -> fen (exponent 2), exactly; a fraction of a fen is refused."""
    fen = Decimal(amount).scaleb(2 - exponent)
    if fen != fen.to_integral_value():
        raise ValueError("amount has a fraction of a fen")
    return int(fen)


def _truncate_utf8(text: str, limit: int) -> str:
    return text.encode()[:limit].decode(errors="ignore")


class WechatpayAdapter:
    kind = "wechatpay"

    def __init__(
        self,
        credentials: Mapping[str, str],
        capabilities: Capabilities | None = None,
        *,
        clock: Callable[[], float] = time.time,
        nonce: Callable[[], str] = _random_nonce,
        callback_tolerance_s: int = CALLBACK_TOLERANCE_S,
    ) -> None:
        missing = [name for name in REQUIRED_CREDENTIALS if not credentials.get(name)]
        if missing:
            raise ValueError(f"wechatpay credentials missing: {', '.join(missing)}")
        self._mchid = credentials["mchid"]
        self._appid = credentials["appid"]
        self._serial = credentials["merchant_serial_no"]
        self._platform_serial = credentials["platform_serial_no"].upper()
        self._private_key = wire.load_private_key(credentials["merchant_private_key"])
        self._platform_key = wire.load_public_key(credentials["platform_public_key"])
        self._apiv3_key = credentials["apiv3_key"].encode()
        if len(self._apiv3_key) != 32:
            raise ValueError("wechatpay apiv3_key must be 32 bytes (AES-256-GCM)")
        self._notify_url = credentials.get("notify_url") or None
        self._clock = clock
        self._nonce = nonce
        self._tolerance = callback_tolerance_s
        caps = capabilities or Capabilities(currencies=frozenset({"CNY"}), methods=frozenset({"wechatpay"}))
        # WeChat Pay has no separate capture: never advertise it, whatever the config says
        self._caps = msgspec.structs.replace(caps, operations=caps.operations - {"capture"})

    def capabilities(self) -> Capabilities:
        return self._caps

    # ------------------------------------------------------------------ signing

    def _request(self, method: str, path: str, body: bytes = b"") -> WireRequest:
        timestamp, nonce = str(int(self._clock())), self._nonce()
        auth = wire.authorization_header(
            self._private_key, mchid=self._mchid, serial_no=self._serial, method=method, path=path,
            timestamp=timestamp, nonce=nonce, body=body,
        )
        headers = {"Accept": "application/json", "Authorization": auth, "User-Agent": "payroute-wechatpay/1"}
        if body:
            headers["Content-Type"] = "application/json"
        return WireRequest(method=method, path=path, headers=headers, body=body)

    def _signature_ok(self, headers: Mapping[str, str], body: bytes) -> bool:
        h = {k.lower(): v for k, v in headers.items()}
        signature, timestamp, nonce = h.get("wechatpay-signature"), h.get("wechatpay-timestamp"), h.get("wechatpay-nonce")
        if not (signature and timestamp and nonce):
            return False
        if h.get("wechatpay-serial", "").upper() != self._platform_serial:
            return False  # signed by a key we were not configured with (or a rotation we do not know)
        if h.get("wechatpay-signature-type", wire.SCHEME) != wire.SCHEME:
            return False
        return wire.rsa_verify(self._platform_key, wire.response_message(timestamp, nonce, body), signature)

    def _verify(self, resp: WireResponse) -> None:
        """2xx answers must be signed by the platform; error answers are checked when they are signed."""
        signed = any(k.lower() == "wechatpay-signature" for k in resp.headers)
        if (200 <= resp.status < 300 or signed) and not self._signature_ok(resp.headers, resp.body):
            raise OutcomeUnknown(f"{resp.status} answer without a valid platform signature", code="bad_signature")

    # ------------------------------------------------------------------ authorize

    def build_authorize(self, req: ChannelAuthorize) -> WireRequest:
        if req.method != "wechatpay":
            raise ValueError(f"wechatpay cannot pay with method {req.method!r}")
        if req.currency != "CNY":
            raise ValueError(f"wechatpay charges CNY only, not {req.currency}")
        notify_url = req.notify_url or self._notify_url
        if not notify_url:
            raise ValueError("wechatpay needs a notify_url (public_url or the notify_url credential)")
        wallet = req.wallet or {}
        flow = wallet.get("flow", "native")
        payer: wire.Payer | None = None
        if flow == "jsapi":
            openid = wallet.get("openid")
            if not openid:
                raise ValueError("the jsapi flow needs wallet.openid")
            payer = wire.Payer(openid=openid)
        elif flow not in ("native", "qr"):
            raise ValueError(f"wechatpay has no {flow!r} flow here (native, qr, jsapi)")
        body = wire.PrepayRequest(
            appid=self._appid,
            mchid=self._mchid,
            description=_truncate_utf8(req.description or f"payment {req.payment_id}", _DESCRIPTION_MAX_BYTES),
            out_trade_no=wire.out_trade_no(req.reference),
            notify_url=notify_url,
            amount=wire.Amount(total=_to_fen(req.amount, req.exponent), currency="CNY"),
            attach=req.reference,
            payer=payer,
        )
        path = "/v3/pay/transactions/jsapi" if payer else "/v3/pay/transactions/native"
        return self._request("POST", path, msgspec.json.encode(body))

    def parse_authorize(self, resp: WireResponse) -> ChannelResult:
        self._verify(resp)
        if resp.status != 200:
            return self._error(resp, context="authorize")
        prepay = self._decode(_PrepayResponse, resp)
        if prepay.code_url:
            return ChannelResult(
                outcome=Outcome.REQUIRES_ACTION, code="NOTPAY", next_action={"type": "qr_code", "data": prepay.code_url}
            )
        if prepay.prepay_id:
            return ChannelResult(outcome=Outcome.REQUIRES_ACTION, code="NOTPAY", next_action=self._jsapi_action(prepay.prepay_id))
        raise OutcomeUnknown("prepay answer has neither code_url nor prepay_id", code="missing_fields")

    def _jsapi_action(self, prepay_id: str) -> dict[str, Any]:
        timestamp, nonce, package = str(int(self._clock())), self._nonce(), f"prepay_id={prepay_id}"
        return {
            "type": "jsapi",
            "prepay_id": prepay_id,
            "appId": self._appid,
            "timeStamp": timestamp,
            "nonceStr": nonce,
            "package": package,
            "signType": "RSA",
            "paySign": wire.jsapi_pay_sign(self._private_key, self._appid, timestamp, nonce, package),
        }

    # ------------------------------------------------------------------ status

    def build_status(self, reference: str, channel_reference: str | None) -> WireRequest:
        # our channel_reference is always the out_trade_no (WeChat returns no id when the order is made)
        number = channel_reference or wire.out_trade_no(reference)
        path = f"/v3/pay/transactions/out-trade-no/{quote(number, safe='')}?mchid={quote(self._mchid, safe='')}"
        return self._request("GET", path)

    def parse_status(self, resp: WireResponse) -> ChannelResult:
        self._verify(resp)
        if resp.status != 200:
            code = self._error_code(resp)
            verdict = classify(code, resp.status)
            if verdict is Outcome.NOT_CHARGED:
                return ChannelResult(outcome=Outcome.NOT_CHARGED, code=code)
            if verdict is Outcome.UNAVAILABLE:
                raise ChannelUnavailable(f"status query answered {resp.status}", code=code or str(resp.status))
            # a failed *query* says nothing about the payment: never a decline
            raise OutcomeUnknown(f"status query answered {resp.status}", code=code or str(resp.status))
        return self._transaction_result(self._decode(wire.Transaction, resp))

    def _transaction_result(self, tx: wire.Transaction) -> ChannelResult:
        if tx.mchid != self._mchid:
            raise OutcomeUnknown("transaction of another merchant", code="mchid_mismatch")
        outcome = TRADE_STATES.get(tx.trade_state)
        if outcome is None:
            raise OutcomeUnknown(f"unexpected trade_state {tx.trade_state!r}", code="unexpected_status")
        detail = tx.trade_state_desc or tx.trade_state
        if tx.transaction_id:
            detail = f"{detail} (transaction_id={tx.transaction_id})"
        return ChannelResult(
            outcome=outcome,
            channel_reference=tx.out_trade_no,
            code=tx.trade_state,
            message=detail,
            captured=outcome is Outcome.APPROVED,
        )

    # ------------------------------------------------------------------ void / refund

    def build_operation(self, op: ChannelOperation) -> WireRequest:
        if op.kind == "void":
            path = f"/v3/pay/transactions/out-trade-no/{quote(wire.out_trade_no(op.channel_reference), safe='')}/close"
            return self._request("POST", path, msgspec.json.encode(wire.CloseRequest(mchid=self._mchid)))
        if op.kind == "refund":
            if op.currency != "CNY":
                raise ValueError(f"wechatpay refunds CNY only, not {op.currency}")
            # WeChat wants the order total beside the refund amount (partial refunds need both)
            body = wire.RefundRequest(
                out_trade_no=op.channel_reference,
                out_refund_no=op.channel_key,
                amount=wire.RefundAmount(refund=op.amount, total=op.payment_amount or op.amount, currency="CNY"),
                notify_url=self._notify_url,
            )
            return self._request("POST", "/v3/refund/domestic/refunds", msgspec.json.encode(body))
        raise ValueError(f"wechatpay does not support {op.kind!r} (no separate capture)")

    def parse_operation(self, op: ChannelOperation, resp: WireResponse) -> ChannelResult:
        self._verify(resp)
        if op.kind == "void":
            if resp.status == 204:
                return ChannelResult(outcome=Outcome.APPROVED, channel_reference=op.channel_reference, code="CLOSED")
            if resp.status == 200:
                raise OutcomeUnknown("close answered 200 instead of 204", code="unexpected_status")
            code = self._error_code(resp)
            if code == "ORDER_CLOSED":  # closed already: the void holds
                return ChannelResult(outcome=Outcome.APPROVED, channel_reference=op.channel_reference, code=code)
            if code == "ORDERPAID":  # paid: nothing to void, refund instead
                return ChannelResult(outcome=Outcome.HARD_DECLINE, code=code, message="the order is paid; refund it")
            return self._error(resp, context="void")
        if resp.status != 200:
            return self._error(resp, context=op.kind)
        refund = self._decode(wire.Refund, resp)
        outcome = REFUND_STATES.get(refund.status)
        if outcome is None:
            raise OutcomeUnknown(f"unexpected refund status {refund.status!r}", code="unexpected_status")
        return ChannelResult(outcome=outcome, channel_reference=refund.refund_id, code=refund.status)

    # ------------------------------------------------------------------ callbacks

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> tuple[CallbackEvent, WireResponse]:
        if not self._signature_ok(headers, body):
            raise CallbackRejected("wechatpay notification signature does not verify")
        stamp = {k.lower(): v for k, v in headers.items()}.get("wechatpay-timestamp", "")
        if not stamp.isdigit() or abs(self._clock() - int(stamp)) > self._tolerance:
            raise CallbackRejected("wechatpay notification timestamp outside the tolerance window")
        try:
            note = msgspec.json.decode(body, type=wire.Notification)
        except msgspec.DecodeError:
            raise CallbackRejected("wechatpay notification body is not a notification") from None
        if note.resource_type != "encrypt-resource" or note.resource.algorithm != "AEAD_AES_256_GCM":
            raise CallbackRejected("wechatpay notification resource is not AEAD_AES_256_GCM")
        res = note.resource
        plain = wire.decrypt_resource(self._apiv3_key, res.nonce, res.associated_data, res.ciphertext)
        if plain is None:
            raise CallbackRejected("wechatpay notification resource does not decrypt")
        try:
            if note.event_type.startswith("TRANSACTION."):
                tx = msgspec.json.decode(plain, type=wire.Transaction)
                result = self._transaction_result(tx)
                return CallbackEvent(
                    event_id=note.id, reference=tx.attach, channel_reference=tx.out_trade_no, result=result,
                    amount=tx.amount.total if tx.amount else None,
                    currency=(tx.amount.currency or "CNY") if tx.amount else None,
                ), ACK
            if note.event_type.startswith("REFUND."):
                refund = msgspec.json.decode(plain, type=wire.RefundNotice)
                outcome = REFUND_STATES.get(refund.refund_status)
                if refund.mchid != self._mchid or outcome is None:
                    raise CallbackRejected("wechatpay refund notification for another merchant or of unknown status")
                result = ChannelResult(outcome=outcome, channel_reference=refund.refund_id, code=refund.refund_status)
                return CallbackEvent(
                    event_id=note.id, reference=None, channel_reference=refund.out_trade_no, result=result, kind="refund"
                ), ACK
        except (msgspec.DecodeError, OutcomeUnknown) as e:
            raise CallbackRejected(f"wechatpay notification resource is not usable: {e}") from None
        raise CallbackRejected(f"wechatpay notification of unhandled type {note.event_type!r}")

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _decode(kind: type[_T], resp: WireResponse) -> _T:
        ctype = next((v for k, v in resp.headers.items() if k.lower() == "content-type"), "")
        if "json" not in ctype.lower():
            raise OutcomeUnknown(f"{resp.status} answer is {ctype or 'untyped'}, not JSON", code="wrong_content_type")
        try:
            return msgspec.json.decode(resp.body, type=kind)
        except msgspec.DecodeError:
            # bytes were sent and the answer is unreadable: we cannot say it was not charged
            raise OutcomeUnknown(f"unreadable {resp.status} body", code="malformed_response") from None

    @staticmethod
    def _error_body(resp: WireResponse) -> wire.ErrorBody | None:
        try:
            return msgspec.json.decode(resp.body, type=wire.ErrorBody)
        except msgspec.DecodeError:
            return None

    def _error_code(self, resp: WireResponse) -> str | None:
        err = self._error_body(resp)
        return err.code if err else None

    def _error(self, resp: WireResponse, *, context: str) -> ChannelResult:
        err = self._error_body(resp)
        code = err.code if err else None
        verdict = classify(code, resp.status)
        label = code or str(resp.status)
        if verdict is Outcome.UNAVAILABLE:
            raise ChannelUnavailable(f"{context} answered {resp.status} {label}", code=label)
        if code is None or verdict in (Outcome.UNKNOWN, Outcome.NOT_CHARGED, Outcome.APPROVED) or resp.status < 400:
            # unreadable errors, "may have acted" codes, and anything odd stay open for a status query
            if context in ("refund", "void") and verdict is Outcome.NOT_CHARGED:
                return ChannelResult(outcome=Outcome.HARD_DECLINE, code=code, message="the order does not exist")
            raise OutcomeUnknown(f"{context} answered {resp.status} {label}", code=label)
        # WeChat's message is a description for people (often Chinese); kept, cut to a sane length
        return ChannelResult(outcome=verdict, code=code, message=f"wechatpay answered {code}")
