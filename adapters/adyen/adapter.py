"""Adapter for Adyen Checkout API v71, card payments. Sans-IO.

Requests (base_url e.g. https://checkout-test.adyen.com, paths carry the version):
- authorize: `POST /v71/payments`, `reference` = the attempt's deterministic reference, header
  `Idempotency-Key` = the attempt's channel key (Adyen replays the first answer for a repeated key).
  capture=False sends `additionalData.manualCapture = "true"` (v71 AdditionalDataCommon); capture=True
  sends `captureDelayHours = 0` so an account configured for delayed/manual capture still captures now.
- capture / void / refund: `POST /v71/payments/{pspReference}/captures|cancels|refunds`.
Credentials: `api_key` (X-API-Key), `merchant_account`, `hmac_key` (hex, notifications), `return_url`
(required by the v71 schema for every payment; used when the request has none).

Responses:
- 200 `resultCode` Authorised -> approved (`captured` stays False: Adyen does not echo the capture mode,
  the pipeline applies the request's own `capture`); Refused -> the refusal-reason table (codes.py);
  Cancelled -> hard decline; Pending/Received -> pending; RedirectShopper/IdentifyShopper/
  ChallengeShopper/PresentToShopper -> requires_action with Adyen's `action`; Error, PartiallyAuthorised
  (never requested) or anything else -> OutcomeUnknown.
- modifications answer 201 `status: received`: only *submitted*. We report approved; the final word
  (CAPTURE / CANCELLATION / REFUND with success true|false, or CAPTURE_FAILED / REFUND_FAILED) comes by
  notification, which `parse_callback` translates.
- 401/403/429 -> ChannelUnavailable; 409 (idempotency key in use / conflict) and 5xx -> OutcomeUnknown;
  400/404/422 with a readable ServiceError -> soft decline with Adyen's `errorCode` (nothing processed);
  wrong content type, unreadable or unexpected bodies -> OutcomeUnknown.

Status: Checkout v71 has no operation that reads a payment back (no GET /payments/{id}; /payments/details
only completes an action with data the shopper brings back). `build_status` therefore always raises
OutcomeUnknown("adyen has no status query; awaiting notification"), `capabilities().operations` omits
"status", and a pending Adyen payment is resolved by its AUTHORISATION notification.

Notifications: standard JSON (`notificationItems[].NotificationRequestItem`); every item must carry a
valid `additionalData.hmacSignature` or the whole delivery is rejected. The acknowledgement body is
literally `[accepted]`. One delivery with several items is rejected (the seam returns one event; Adyen
sends one item per delivery by default), so no item is ever acknowledged without being handled.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import msgspec
import orjson

from adapters.adyen import codes, wire
from router.errors import CallbackRejected, ChannelUnavailable, IntegrationError, OutcomeUnknown
from router.model import (
    CallbackEvent,
    Capabilities,
    ChannelAuthorize,
    ChannelOperation,
    ChannelResult,
    Outcome,
    SensitiveCard,
    WireRequest,
    WireResponse,
)

NO_STATUS_QUERY = "adyen has no status query; awaiting notification"

_ACTION_RESULTS = frozenset({"RedirectShopper", "IdentifyShopper", "ChallengeShopper", "PresentToShopper"})
_PENDING_RESULTS = frozenset({"Pending", "Received"})
_OPERATION_PATHS = {"capture": "captures", "void": "cancels", "refund": "refunds"}

# notification eventCode -> the kind of thing it reports
_EVENT_KINDS = {
    "AUTHORISATION": "authorization",
    "CAPTURE": "capture",
    "CAPTURE_FAILED": "capture",
    "CANCELLATION": "void",
    "REFUND": "refund",
    "REFUND_FAILED": "refund",
    "REFUNDED_REVERSED": "refund",
}
# these report that an earlier "received" modification did not go through, whatever `success` says
_FAILURE_EVENTS = frozenset({"CAPTURE_FAILED", "REFUND_FAILED", "REFUNDED_REVERSED"})

_ACK = WireResponse(status=200, headers={"Content-Type": "text/plain"}, body=b"[accepted]")


def _credential(credentials: Mapping[str, str], name: str) -> str:
    value = credentials.get(name, "")
    if not value:
        raise ValueError(f"adyen: credential {name!r} is required")
    return value


def _header(headers: Mapping[str, str], name: str) -> str:
    lname = name.lower()
    for k, v in headers.items():
        if k.lower() == lname:
            return v
    return ""


class AdyenAdapter:
    kind = "adyen"

    def __init__(self, credentials: Mapping[str, str], capabilities: Capabilities | None = None) -> None:
        self._api_key = _credential(credentials, "api_key")
        self._merchant = _credential(credentials, "merchant_account")
        self._return_url = _credential(credentials, "return_url")
        try:
            self._hmac_key = binascii.unhexlify(_credential(credentials, "hmac_key"))
        except (binascii.Error, ValueError):
            raise ValueError("adyen: credential 'hmac_key' must be the hex key from the Customer Area") from None
        caps = capabilities or Capabilities()
        # there is no status query: say so, so nothing schedules one
        self._caps = msgspec.structs.replace(caps, operations=caps.operations - {"status"})

    def capabilities(self) -> Capabilities:
        return self._caps

    def _request(self, path: str, key: str, body: dict[str, Any]) -> WireRequest:
        if not key or len(key) > wire.IDEMPOTENCY_KEY_MAX:
            raise IntegrationError(f"adyen idempotency key must be 1..{wire.IDEMPOTENCY_KEY_MAX} characters")
        headers = {"Content-Type": "application/json", "X-API-Key": self._api_key, "Idempotency-Key": key}
        return WireRequest(method="POST", path=path, headers=headers, body=orjson.dumps(body))

    # ------------------------------------------------------------------ authorize

    def build_authorize(self, req: ChannelAuthorize) -> WireRequest:
        if req.method != "card" or not isinstance(req.card, SensitiveCard):
            raise IntegrationError(f"the adyen adapter takes card payments only, not {req.method!r}")
        card: SensitiveCard = req.card
        method: dict[str, Any] = {
            "type": "scheme",
            "number": card.number,
            "expiryMonth": wire.expiry_month(card.exp_month),
            "expiryYear": wire.expiry_year(card.exp_year),
        }
        if card.cvc:
            method["cvc"] = card.cvc
        if card.holder_name:
            method["holderName"] = card.holder_name
        body: dict[str, Any] = {
            "merchantAccount": self._merchant,
            "amount": wire.amount(req.amount, req.currency),
            "reference": req.reference,
            "paymentMethod": method,
            "returnUrl": req.return_url or self._return_url,
            "countryCode": req.country,
            "shopperInteraction": "Ecommerce",
        }
        if req.capture:
            body["captureDelayHours"] = 0
        else:
            body["additionalData"] = {"manualCapture": "true"}
        return self._request(f"/{wire.API_VERSION}/payments", req.channel_key, body)

    def parse_authorize(self, resp: WireResponse) -> ChannelResult:
        if resp.status != 200:
            return self._error(resp)
        pr: wire.PaymentResponse = self._decode(wire.payment_response_decoder, resp)
        rc, psp = pr.result_code, pr.psp_reference
        if rc == "Authorised":
            if not psp:
                # approved but nothing to capture or refund by: never call that approved
                raise OutcomeUnknown("Authorised without a pspReference", code="missing_psp_reference")
            return ChannelResult(outcome=Outcome.APPROVED, channel_reference=psp, code=rc)
        if rc == "Refused":
            code = pr.refusal_reason_code or "refused"
            return ChannelResult(
                outcome=codes.classify(pr.refusal_reason_code),
                channel_reference=psp,
                code=code,
                message=f"refused by adyen: {pr.refusal_reason or code}",
            )
        if rc == "Cancelled":
            return ChannelResult(outcome=Outcome.HARD_DECLINE, channel_reference=psp, code="cancelled",
                                 message=pr.refusal_reason or "cancelled")
        if rc in _PENDING_RESULTS:
            return ChannelResult(outcome=Outcome.PENDING, channel_reference=psp, code=rc)
        if rc in _ACTION_RESULTS:
            return ChannelResult(outcome=Outcome.REQUIRES_ACTION, channel_reference=psp, code=rc,
                                 next_action=self._next_action(pr.action))
        # Error is Adyen's "something failed while processing": it may have reached the issuer
        raise OutcomeUnknown(f"adyen resultCode {rc!r}", code=rc or "missing_result_code")

    @staticmethod
    def _next_action(action: dict[str, Any] | None) -> dict[str, Any]:
        if not action or not isinstance(action.get("type"), str):
            raise OutcomeUnknown("adyen asked for shopper action without an action", code="missing_action")
        url = action.get("url")
        if action["type"] == "redirect" and isinstance(url, str) and url:
            return {"type": "redirect", "url": url, "method": action.get("method", "GET")}
        # 3DS2 fingerprint/challenge and the rest are completed by Adyen's client components
        return {"type": "adyen_action", "action": action}

    # ------------------------------------------------------------------ status

    def build_status(self, reference: str, channel_reference: str | None) -> WireRequest:
        raise OutcomeUnknown(NO_STATUS_QUERY, code="no_status_query")

    def parse_status(self, resp: WireResponse) -> ChannelResult:
        raise OutcomeUnknown(NO_STATUS_QUERY, code="no_status_query")

    # ------------------------------------------------------------------ capture / void / refund

    def build_operation(self, op: ChannelOperation) -> WireRequest:
        segment = _OPERATION_PATHS.get(op.kind)
        if segment is None:
            raise IntegrationError(f"unknown operation {op.kind!r}")
        body: dict[str, Any] = {"merchantAccount": self._merchant, "reference": op.channel_key}
        if op.kind != "void":
            body["amount"] = wire.amount(op.amount, op.currency)
        path = f"/{wire.API_VERSION}/payments/{quote(op.channel_reference, safe='')}/{segment}"
        return self._request(path, op.channel_key, body)

    def parse_operation(self, op: ChannelOperation, resp: WireResponse) -> ChannelResult:
        if resp.status != 201:
            return self._error(resp)
        m: wire.ModificationResponse = self._decode(wire.modification_response_decoder, resp)
        if m.status != "received" or m.payment_psp_reference != op.channel_reference:
            raise OutcomeUnknown(f"adyen {op.kind} answered an unexpected acknowledgement", code=m.status)
        if op.kind != "void" and (m.amount is None or (m.amount.value, m.amount.currency) != (op.amount, op.currency)):
            raise OutcomeUnknown(f"adyen {op.kind} acknowledged a different amount", code="amount_mismatch")
        # "received" is a submission, not a settlement: the notification confirms or reverses it
        return ChannelResult(outcome=Outcome.APPROVED, channel_reference=m.psp_reference, code="received",
                             message=f"{op.kind} submitted; adyen confirms by notification")

    # ------------------------------------------------------------------ notifications

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> tuple[CallbackEvent, WireResponse]:
        ctype = _header(headers, "Content-Type")
        if ctype and ctype.split(";", 1)[0].strip().lower() != "application/json":
            raise CallbackRejected(f"adyen notification with content type {ctype!r}")
        try:
            note = wire.notification_decoder.decode(body)
        except msgspec.DecodeError as e:
            raise CallbackRejected(f"unreadable adyen notification: {e}") from None
        if not note.notification_items:
            raise CallbackRejected("adyen notification without items")
        items = [i.item for i in note.notification_items]
        for item in items:
            if not wire.verify(item, self._hmac_key):
                raise CallbackRejected("adyen notification HMAC signature does not verify")
        if len(items) != 1:
            raise CallbackRejected(f"adyen notification batches {len(items)} items; one per delivery expected")
        return self._event(items[0]), _ACK

    @staticmethod
    def _event(item: wire.NotificationRequestItem) -> CallbackEvent:
        ev = item.event_code
        success = item.success.strip().lower() == "true"
        kind = _EVENT_KINDS.get(ev, "other")
        payment_psp = item.psp_reference if ev == "AUTHORISATION" else (item.original_reference or item.psp_reference)
        if kind == "other":
            # verified, acknowledged, and carries no state change for a payment the router knows
            result = ChannelResult(outcome=Outcome.PENDING, channel_reference=payment_psp, code=ev)
        elif success and ev not in _FAILURE_EVENTS:
            result = ChannelResult(outcome=Outcome.APPROVED, channel_reference=payment_psp, code=ev)
        elif ev == "AUTHORISATION":
            code = codes.code_for_reason(item.reason)
            result = ChannelResult(
                outcome=codes.classify(code), channel_reference=payment_psp, code=code or "refused",
                message=item.reason or "refused",
            )
        else:
            result = ChannelResult(outcome=Outcome.HARD_DECLINE, channel_reference=payment_psp, code=ev,
                                   message=item.reason or f"{ev} success={item.success}")
        return CallbackEvent(
            # Adyen re-sends the same event until acknowledged; these three identify it
            event_id=f"{item.psp_reference}:{ev}:{item.success}",
            reference=item.merchant_reference or None,
            channel_reference=payment_psp,
            result=result,
            kind=kind,
            amount=item.amount.value if kind == "authorization" else None,
            currency=item.amount.currency,
        )

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _decode(decoder: msgspec.json.Decoder[Any], resp: WireResponse) -> Any:
        ctype = _header(resp.headers, "Content-Type").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise OutcomeUnknown(f"adyen answered {resp.status} with content type {ctype!r}", code="bad_content_type")
        try:
            return decoder.decode(resp.body)
        except msgspec.DecodeError:
            # bytes went out and the answer is unreadable: we cannot say nothing was charged
            raise OutcomeUnknown(f"unreadable adyen {resp.status} body", code="malformed_response") from None

    def _error(self, resp: WireResponse) -> ChannelResult:
        if resp.status in (401, 403):
            raise ChannelUnavailable(f"adyen rejected our credentials ({resp.status})", code=str(resp.status))
        if resp.status == 429:
            raise ChannelUnavailable("adyen rate limit", code="429")
        if resp.status not in (400, 404, 422):
            # 409: the key is in use by a request still running or finished differently; 5xx: may have run
            raise OutcomeUnknown(f"adyen answered {resp.status}", code=str(resp.status))
        err: wire.ServiceError = self._decode(wire.service_error_decoder, resp)
        code = err.error_code or str(resp.status)
        return ChannelResult(outcome=Outcome.SOFT_DECLINE, code=code,
                             # the channel's free text may echo request data (card numbers): keep only the code
                             message=f"adyen answered {resp.status}")
