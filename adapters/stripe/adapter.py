"""Adapter for Stripe's PaymentIntents API (`Stripe-Version: 2023-08-16`). Sans-IO.

Authorization creates and confirms in one call: `POST /v1/payment_intents` with `confirm=true`,
`capture_method` manual/automatic, the card as `payment_method_data`, our attempt reference as
`metadata[payroute_reference]` and the attempt's channel key as `Idempotency-Key`. Form-encoded,
`Authorization: Bearer <secret_key>`.

Response mapping (the first rule that matches wins):
- 200 PaymentIntent: `succeeded` -> approved+captured, `requires_capture` -> approved,
  `processing` -> pending, `requires_action` -> requires action (redirect or Stripe.js),
  `requires_payment_method` + `last_payment_error` -> the code table (adapters/stripe/codes.py);
- 401/403 (authentication/permission), 429 (rate limit, lock timeout) -> ChannelUnavailable;
- 409 or `idempotency_error`, 5xx or `api_error` -> OutcomeUnknown;
- 402 or `card_error` -> decline through the code table (`decline_code`, else `code`);
- other 400/404 `invalid_request_error` -> soft decline (Stripe refused the request: nothing charged);
- anything unreadable, non-JSON, of an unexpected status or shape -> OutcomeUnknown.

Status: `GET /v1/payment_intents/{id}` when the id is known, else Stripe Search on the reference
metadata. Search is eventually consistent (Stripe: "usually under a minute, up to an hour"), so an
empty result is *not* proof that nothing was charged: it is OutcomeUnknown, and only Stripe's
explicit `resource_missing` 404 yields NOT_CHARGED.

Callbacks: `Stripe-Signature` verified against `webhook_secret` (several secrets may be given,
comma-separated, for our own rotation) within a tolerance (300 s by default) on an injectable clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import msgspec

from adapters.stripe import wire
from adapters.stripe.codes import classify
from router.errors import CallbackRejected, ChannelUnavailable, OutcomeUnknown
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

_ACK = WireResponse(status=200, headers={"Content-Type": "application/json"}, body=b'{"received": true}')

# Which PaymentIntent states a status query prefers when a reference matches several intents
# (possible only if a retry came after Stripe's 24 h idempotency window): money moved beats waiting
# beats declined.
_PREFERENCE = {"succeeded": 0, "requires_capture": 1, "processing": 2, "requires_action": 3}


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lname = name.lower()
    for key, value in headers.items():
        if key.lower() == lname:
            return value
    return None


def _is_json(resp: WireResponse) -> bool:
    ctype = (_header(resp.headers, "Content-Type") or "").split(";")[0].strip().lower()
    return ctype == "application/json"


class StripeAdapter:
    kind = "stripe"

    def __init__(
        self,
        credentials: Mapping[str, str],
        capabilities: Capabilities | None = None,
        *,
        clock: Callable[[], float] = time.time,
        webhook_tolerance_s: int = 300,
    ) -> None:
        secret_key = credentials.get("secret_key", "")
        if not secret_key:
            raise ValueError("the stripe adapter needs the credential 'secret_key'")
        self._auth = f"Bearer {secret_key}"
        self._webhook_secrets = tuple(
            s.strip() for s in credentials.get("webhook_secret", "").split(",") if s.strip()
        )
        self._caps = capabilities or Capabilities()
        self._clock = clock
        self._tolerance_s = webhook_tolerance_s

    def capabilities(self) -> Capabilities:
        return self._caps

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._auth, "Stripe-Version": wire.API_VERSION}

    def _post(self, path: str, params: Mapping[str, Any], idempotency_key: str) -> WireRequest:
        headers = {
            **self._headers(),
            "Content-Type": "application/x-www-form-urlencoded",
            # every POST carries the deterministic key: a retry is replayed by Stripe, never re-executed
            "Idempotency-Key": idempotency_key,
        }
        return WireRequest(method="POST", path=path, headers=headers, body=wire.form_encode(params))

    # ------------------------------------------------------------------ authorize

    def build_authorize(self, req: ChannelAuthorize) -> WireRequest:
        if req.method != "card" or not isinstance(req.card, SensitiveCard):
            # nothing is sent: the router may try another channel
            raise ChannelUnavailable(f"stripe adapter takes cards only, not {req.method}", code="method_not_supported")
        try:
            amount = wire.stripe_amount(req.amount, req.currency, req.exponent)
        except wire.AmountNotSupported as e:
            raise ChannelUnavailable(str(e), code="amount_not_supported") from None
        card = req.card
        card_params: dict[str, Any] = {"number": card.number, "exp_month": card.exp_month, "exp_year": card.exp_year}
        if card.cvc:
            card_params["cvc"] = card.cvc
        pm: dict[str, Any] = {"type": "card", "card": card_params}
        if card.holder_name:
            pm["billing_details"] = {"name": card.holder_name}
        params: dict[str, Any] = {
            "amount": amount,
            "currency": req.currency.lower(),
            "confirm": True,
            "capture_method": "automatic" if req.capture else "manual",
            # explicit types: since 2023-08-16 automatic payment methods are on by default and a
            # confirm without return_url would be refused ("might redirect")
            "payment_method_types": ["card"],
            "payment_method_data": pm,
            "metadata": {wire.REFERENCE_METADATA_KEY: req.reference},
            "description": req.description,
            "return_url": req.return_url,  # only when given: 3DS then answers with a redirect URL
        }
        return self._post("/v1/payment_intents", params, req.channel_key)

    def parse_authorize(self, resp: WireResponse) -> ChannelResult:
        if resp.status == 200:
            return self._intent_result(self._decode(wire.intent_decoder, resp), for_status=False)
        return self._error(resp)

    # ------------------------------------------------------------------ status

    def build_status(self, reference: str, channel_reference: str | None) -> WireRequest:
        if channel_reference:
            path = f"/v1/payment_intents/{quote(channel_reference, safe='')}"
        else:
            escaped = reference.replace("\\", "\\\\").replace("'", "\\'")
            query = f"metadata['{wire.REFERENCE_METADATA_KEY}']:'{escaped}'"
            path = f"/v1/payment_intents/search?query={quote(query, safe='')}"
        return WireRequest(method="GET", path=path, headers=self._headers())

    def parse_status(self, resp: WireResponse) -> ChannelResult:
        if resp.status == 404:
            err = self._read_error(resp)
            # only Stripe's explicit "no such object" is proof; a bare 404 (a proxy, a fake without
            # the route) says nothing about the payment
            if err is not None and err.code == "resource_missing":
                return ChannelResult(outcome=Outcome.NOT_CHARGED, code="resource_missing")
            raise OutcomeUnknown("status query answered 404 without resource_missing", code="404")
        if resp.status != 200:
            self._error(resp)  # raises for unavailable/unknown
            raise OutcomeUnknown(f"status query answered {resp.status}", code=str(resp.status))
        obj = self._decode(wire.kind_decoder, resp).object
        if obj == "payment_intent":
            return self._intent_result(self._decode(wire.intent_decoder, resp), for_status=True)
        if obj in ("search_result", "list"):
            found = self._decode(wire.intent_list_decoder, resp).data
            if not found:
                # search lags writes: absence now is not absence
                raise OutcomeUnknown("no PaymentIntent found for the reference (yet)", code="not_found_yet")
            best = min(found, key=lambda pi: _PREFERENCE.get(pi.status, 9))
            return self._intent_result(best, for_status=True)
        raise OutcomeUnknown(f"status query answered an unexpected object {obj!r}", code="unexpected_object")

    # ------------------------------------------------------------------ capture / void / refund

    def build_operation(self, op: ChannelOperation) -> WireRequest:
        pi = quote(op.channel_reference, safe="")
        if op.kind == "capture":
            return self._post(f"/v1/payment_intents/{pi}/capture", {"amount_to_capture": op.amount}, op.channel_key)
        if op.kind == "void":
            return self._post(f"/v1/payment_intents/{pi}/cancel", {}, op.channel_key)
        if op.kind == "refund":
            return self._post("/v1/refunds", {"payment_intent": op.channel_reference, "amount": op.amount}, op.channel_key)
        raise ValueError(f"unknown operation {op.kind!r}")  # our own bug, not the channel's

    def parse_operation(self, op: ChannelOperation, resp: WireResponse) -> ChannelResult:
        if resp.status != 200:
            return self._error(resp)
        if op.kind == "refund":
            refund = self._decode(wire.refund_decoder, resp)
            if refund.status == "succeeded":
                outcome = Outcome.APPROVED
            elif refund.status in ("pending", "requires_action"):
                outcome = Outcome.PENDING
            elif refund.status in ("failed", "canceled"):
                outcome = Outcome.HARD_DECLINE
            else:
                raise OutcomeUnknown(f"refund answered status {refund.status!r}", code="unexpected_status")
            return ChannelResult(
                outcome=outcome, channel_reference=refund.id, code=refund.failure_reason or refund.status
            )
        pi = self._decode(wire.intent_decoder, resp)
        if op.kind == "capture" and pi.status == "succeeded":
            return ChannelResult(outcome=Outcome.APPROVED, channel_reference=pi.id, code=pi.status, captured=True)
        if op.kind == "capture" and pi.status == "processing":
            return ChannelResult(outcome=Outcome.PENDING, channel_reference=pi.id, code=pi.status)
        if op.kind == "void" and pi.status == "canceled":
            return ChannelResult(outcome=Outcome.APPROVED, channel_reference=pi.id, code=pi.status)
        raise OutcomeUnknown(f"{op.kind} answered status {pi.status!r}", code="unexpected_status")

    # ------------------------------------------------------------------ callbacks

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> tuple[CallbackEvent, WireResponse]:
        if not self._webhook_secrets:
            raise CallbackRejected("no webhook_secret configured")
        header = _header(headers, "Stripe-Signature")
        if not header:
            raise CallbackRejected("missing Stripe-Signature")
        try:
            wire.verify_signature(header, body, self._webhook_secrets, self._clock(), self._tolerance_s)
        except wire.SignatureError as e:
            raise CallbackRejected(str(e)) from None
        try:
            event = wire.event_decoder.decode(body)
            return self._translate_event(event), _ACK
        except (msgspec.DecodeError, OutcomeUnknown) as e:
            raise CallbackRejected(f"unreadable event: {e.__class__.__name__}") from None

    def _translate_event(self, event: wire.Event) -> CallbackEvent:
        raw = event.data.object
        if event.type == "charge.refunded":
            charge = wire.charge_decoder.decode(raw)
            return CallbackEvent(
                event_id=event.id,
                reference=charge.metadata.get(wire.REFERENCE_METADATA_KEY),
                channel_reference=charge.payment_intent,
                result=ChannelResult(
                    outcome=Outcome.APPROVED,
                    channel_reference=charge.payment_intent,
                    code="refunded" if charge.refunded else "partially_refunded",
                    captured=True,
                ),
                kind="refund",
            )
        if event.type not in (
            "payment_intent.succeeded",
            "payment_intent.payment_failed",
            "payment_intent.amount_capturable_updated",
            "payment_intent.canceled",
        ):
            # subscribe the endpoint to the handled events only (config/examples/stripe.yaml)
            raise CallbackRejected(f"unhandled event type {event.type!r}")
        pi = wire.intent_decoder.decode(raw)
        if event.type == "payment_intent.canceled":
            result = ChannelResult(outcome=Outcome.APPROVED, channel_reference=pi.id, code="canceled")
            kind = "void"
        else:
            result = self._intent_result(pi, for_status=False)
            # a manual-capture intent reaches `succeeded` only by our capture call
            kind = "capture" if (event.type == "payment_intent.succeeded" and pi.capture_method == "manual") else "authorization"
        return CallbackEvent(
            event_id=event.id,
            reference=pi.metadata.get(wire.REFERENCE_METADATA_KEY),
            channel_reference=pi.id,
            result=result,
            kind=kind,
        )

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _decode(decoder: msgspec.json.Decoder[Any], resp: WireResponse) -> Any:
        if not _is_json(resp):
            raise OutcomeUnknown(f"{resp.status} answer is not application/json", code="bad_content_type")
        try:
            return decoder.decode(resp.body)
        except msgspec.DecodeError:  # ValidationError included: a missing field or a wrong type
            # bytes were sent and the answer is unreadable: we cannot say it was not charged
            raise OutcomeUnknown(f"unreadable {resp.status} body", code="malformed_response") from None

    @staticmethod
    def _intent_result(pi: wire.PaymentIntent, *, for_status: bool) -> ChannelResult:
        if pi.status == "succeeded":
            return ChannelResult(outcome=Outcome.APPROVED, channel_reference=pi.id, code=pi.status, captured=True)
        if pi.status == "requires_capture":
            return ChannelResult(outcome=Outcome.APPROVED, channel_reference=pi.id, code=pi.status)
        if pi.status == "processing":
            return ChannelResult(outcome=Outcome.PENDING, channel_reference=pi.id, code=pi.status)
        if pi.status == "requires_action":
            return ChannelResult(
                outcome=Outcome.REQUIRES_ACTION,
                channel_reference=pi.id,
                code=pi.status,
                next_action=_next_action(pi),
            )
        if pi.status == "requires_payment_method" and pi.last_payment_error is not None:
            err = pi.last_payment_error
            code = err.decline_code or err.code or "card_declined"
            return ChannelResult(
                outcome=classify(code),
                channel_reference=pi.id,
                code=code,
                message=f"declined by Stripe: {code}",
            )
        if for_status and pi.status in ("requires_payment_method", "requires_confirmation", "canceled"):
            # the intent exists but holds no charge (never confirmed, or its authorization released)
            return ChannelResult(outcome=Outcome.NOT_CHARGED, channel_reference=pi.id, code=pi.status)
        raise OutcomeUnknown(f"unexpected PaymentIntent status {pi.status!r}", code="unexpected_status")

    @staticmethod
    def _read_error(resp: WireResponse) -> wire.ApiError | None:
        if not _is_json(resp):
            return None
        try:
            return wire.error_decoder.decode(resp.body).error
        except msgspec.DecodeError:
            return None

    def _error(self, resp: WireResponse) -> ChannelResult:
        status = resp.status
        err = self._read_error(resp)
        code = (err.code if err else None) or str(status)
        etype = err.type if err else None
        # the status code alone is enough here: a proxy's 429/401 did not process the request either
        if status in (401, 403):
            raise ChannelUnavailable(f"Stripe refused the credentials ({status})", code=code)
        if status == 429:
            raise ChannelUnavailable("Stripe rate limited the request", code=code)
        if err is None:
            raise OutcomeUnknown(f"unreadable {status} answer", code="malformed_response")
        if status == 409 or etype == "idempotency_error":
            raise OutcomeUnknown(
                "idempotency conflict: the first request's outcome is unknown", code=err.code or "idempotency_error"
            )
        if status >= 500 or etype == "api_error":
            raise OutcomeUnknown(f"Stripe answered {status} {etype or ''}".strip(), code=code)
        if status == 402 or etype == "card_error":
            decline = err.decline_code or err.code or "card_declined"
            return ChannelResult(
                outcome=classify(decline),
                channel_reference=err.payment_intent.id if err.payment_intent else None,
                code=decline,
                message=f"declined by Stripe: {decline}",
            )
        if status in (400, 404) and etype == "invalid_request_error":
            return ChannelResult(
                outcome=Outcome.SOFT_DECLINE,
                code=err.code or "invalid_request_error",
                message=f"Stripe refused the request: {err.code or err.param or 'invalid_request_error'}",
            )
        raise OutcomeUnknown(f"unexpected Stripe answer {status} {etype or ''}".strip(), code=code)


def _next_action(pi: wire.PaymentIntent) -> dict[str, Any]:
    action = pi.next_action or {}
    redirect = action.get("redirect_to_url")
    if isinstance(redirect, dict) and isinstance(redirect.get("url"), str):
        return {"type": "redirect", "url": redirect["url"]}
    # 3DS without a return_url: Stripe.js finishes it on the client with the intent's client secret
    return {"type": str(action.get("type") or "use_stripe_sdk"), "payment_intent": pi.id, "client_secret": pi.client_secret}
