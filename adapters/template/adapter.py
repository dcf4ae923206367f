"""Adapter for ExamplePay, a fictional JSON PSP: the template every new channel starts from. Sans-IO.

The contract (router.model.ChannelAdapter) in one paragraph: an adapter translates, it never sends.
`build_*` turn canonical requests into `WireRequest`s; `parse_*` turn the channel's answers into
`ChannelResult`s, where a decline is data (an outcome from the code table), not an exception. Two
exceptions steer the pipeline and must be chosen exactly:
- `ChannelUnavailable`: the channel certainly did NOT process the request (it said so: 401/403, 429, an
  explicit "not processed"). The pipeline retries it, then fails over to the next channel.
- `OutcomeUnknown`: it MAY have processed it (5xx, 409 key conflicts, unreadable or unexpected answers,
  wrong content type). Never failed over: the payment goes pending and a status query resolves it.
  When in doubt, it is OutcomeUnknown: a wrong "unavailable" can charge the customer twice.
`IntegrationError` (or ValueError) from a `build_*` means "this channel cannot express the request":
nothing was sent and the router tries the next channel.

ExamplePay's protocol (base_url e.g. https://api.examplepay.test):
- `Authorization: Bearer <api_key>`; every POST carries `Idempotency-Key: <channel_key>`; ExamplePay
  replays the first answer for a repeated key, so a retry never charges twice.
- authorize: `POST /v1/payments` {amount: {value, currency}, reference, capture, card, ...} -> 201 Payment.
- status: `GET /v1/payments/{id}` when the id is known, else `GET /v1/payments?reference=<reference>`
  (strongly consistent, so an empty list proves nothing was charged; check this for your PSP: Stripe's
  search, for one, is not).
- capture / void / refund: `POST /v1/payments/{id}/capture|cancel|refund` -> 201 Operation.
- errors: `{"error": {"code", "message", "processed"}}`.
- webhooks: JSON events signed with HMAC-SHA256 (see `wire.verify_signature`); the ack is 200.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import msgspec

from adapters.template import wire
from adapters.template.codes import classify
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

REQUIRED_CREDENTIALS = ("api_key", "webhook_secret")
WEBHOOK_TOLERANCE_S = 300

_ACK = WireResponse(status=200, headers={"Content-Type": "application/json"}, body=b'{"received":true}')
_OPERATION_PATHS = {"capture": "capture", "void": "cancel", "refund": "refund"}
_APPROVED_STATES = frozenset({"authorized", "captured"})


def _header(headers: Mapping[str, str], name: str) -> str:
    """HTTP header names are case-insensitive; transports and fakes spell them differently."""
    lname = name.lower()
    for key, value in headers.items():
        if key.lower() == lname:
            return value
    return ""


def _is_json(headers: Mapping[str, str]) -> bool:
    # a 200 text/html is a proxy, a captive portal or a maintenance page: never the PSP's answer
    return _header(headers, "Content-Type").split(";", 1)[0].strip().lower() == "application/json"


class ExamplePayAdapter:
    kind = "examplepay"  # the name configs use in `adapter:`; the key of its line in adapters/registry.py

    def __init__(
        self,
        credentials: Mapping[str, str],
        capabilities: Capabilities | None = None,
        *,
        clock: Callable[[], float] = time.time,  # injectable: tests check the tolerance without waiting
        webhook_tolerance_s: int = WEBHOOK_TOLERANCE_S,
    ) -> None:
        # Check credentials here, at config load: a missing secret rejects the reload (the old config
        # stays), instead of failing the first payment at 3 a.m. Name what is missing, never a value.
        missing = [name for name in REQUIRED_CREDENTIALS if not credentials.get(name)]
        if missing:
            raise ValueError(f"examplepay credentials missing: {', '.join(missing)}")
        self._auth = f"Bearer {credentials['api_key']}"
        self._webhook_secret = credentials["webhook_secret"]
        self._clock = clock
        self._tolerance_s = webhook_tolerance_s
        caps = capabilities or Capabilities(methods=frozenset({"card"}))
        # what the config says is narrowed by what the channel can do: never advertise a wallet we
        # cannot build (the method filter would route wallet payments here)
        self._caps = msgspec.structs.replace(caps, methods=caps.methods & {"card"})

    def capabilities(self) -> Capabilities:
        return self._caps

    def _post(self, path: str, body: dict[str, Any], idempotency_key: str) -> WireRequest:
        headers = {
            "Authorization": self._auth,
            "Content-Type": "application/json",
            "Accept": "application/json",
            # deterministic per attempt (or operation) and reused on every retry of it
            "Idempotency-Key": idempotency_key,
        }
        return WireRequest(method="POST", path=path, headers=headers, body=wire.encode(body))

    # ------------------------------------------------------------------ authorize

    def build_authorize(self, req: ChannelAuthorize) -> WireRequest:
        if req.method != "card" or not isinstance(req.card, SensitiveCard):
            raise IntegrationError(f"examplepay takes cards only, not {req.method!r}")
        try:
            value = wire.wire_amount(req.amount, req.currency, req.exponent)
        except wire.AmountNotSupported as e:
            raise IntegrationError(str(e)) from None
        card: SensitiveCard = req.card
        # the PAN and CVC go into the body and nowhere else: not in a header, not in a log line, not in
        # an exception message. The body bytes live only as long as the transport call.
        card_body: dict[str, Any] = {"number": card.number, "exp_month": card.exp_month, "exp_year": card.exp_year}
        if card.cvc:
            card_body["cvc"] = card.cvc
        if card.holder_name:
            card_body["holder_name"] = card.holder_name
        body: dict[str, Any] = {
            "amount": {"value": value, "currency": req.currency.upper()},
            # deterministic: same payment + attempt -> same reference, so a status query after a timeout
            # finds the charge this attempt made (and only that one)
            "reference": req.reference,
            "capture": req.capture,
            "card": card_body,
        }
        # optional fields only when present: identical input gives identical bytes
        if req.description:
            body["description"] = req.description[:255]
        if req.notify_url:
            body["notify_url"] = req.notify_url
        if req.return_url:
            body["return_url"] = req.return_url
        return self._post("/v1/payments", body, req.channel_key)

    def parse_authorize(self, resp: WireResponse) -> ChannelResult:
        if resp.status not in (200, 201):
            return self._error(resp)
        return self._payment_result(self._decode(wire.payment_decoder, resp))

    # ------------------------------------------------------------------ status

    def build_status(self, reference: str, channel_reference: str | None) -> WireRequest:
        headers = {"Authorization": self._auth, "Accept": "application/json"}
        if channel_reference:
            return WireRequest(method="GET", path=f"/v1/payments/{quote(channel_reference, safe='')}", headers=headers)
        return WireRequest(method="GET", path=f"/v1/payments?reference={quote(reference, safe='')}", headers=headers)

    def parse_status(self, resp: WireResponse) -> ChannelResult:
        if resp.status == 404 and _is_json(resp.headers):
            err = self._read_error(resp)
            # only ExamplePay's own "no such payment" proves absence; a bare 404 may be a proxy
            if err is not None and err.code == "payment_not_found":
                return ChannelResult(outcome=Outcome.NOT_CHARGED, code=err.code)
        if resp.status != 200:
            self._error(resp)  # raises for the unavailable/unknown cases
            # a failed *query* says nothing about the payment: never turn it into a decline
            raise OutcomeUnknown(f"status query answered {resp.status}", code=str(resp.status))
        if not _is_json(resp.headers):
            raise OutcomeUnknown("status answer is not application/json", code="bad_content_type")
        if resp.body.lstrip().startswith(b"{") and b'"data"' in resp.body:
            found = self._decode(wire.payment_list_decoder, resp).data
            if not found:
                return ChannelResult(outcome=Outcome.NOT_CHARGED, code="not_found")
            if len(found) > 1:
                # one reference per attempt: two payments under one reference is a bug on some side
                raise OutcomeUnknown("several payments under one reference", code="ambiguous_reference")
            return self._payment_result(found[0])
        return self._payment_result(self._decode(wire.payment_decoder, resp))

    # ------------------------------------------------------------------ capture / void / refund

    def build_operation(self, op: ChannelOperation) -> WireRequest:
        segment = _OPERATION_PATHS.get(op.kind)
        if segment is None:
            raise IntegrationError(f"unknown operation {op.kind!r}")  # our bug, not the channel's
        body: dict[str, Any] = {}
        if op.kind != "void":
            try:
                value = wire.wire_amount(op.amount, op.currency, op.exponent)
            except wire.AmountNotSupported as e:
                raise IntegrationError(str(e)) from None
            body["amount"] = {"value": value, "currency": op.currency.upper()}
        path = f"/v1/payments/{quote(op.channel_reference, safe='')}/{segment}"
        return self._post(path, body, op.channel_key)

    def parse_operation(self, op: ChannelOperation, resp: WireResponse) -> ChannelResult:
        if resp.status not in (200, 201):
            return self._error(resp)
        body: wire.OperationBody = self._decode(wire.operation_decoder, resp)
        if body.payment_id != op.channel_reference or body.type != _OPERATION_PATHS.get(op.kind):
            raise OutcomeUnknown(f"{op.kind} answered for another payment or operation", code="mismatch")
        if op.kind != "void":
            # an echoed amount that differs from what we asked for is not "approved": find out first
            try:
                echoed = (
                    wire.canonical_amount(body.amount.value, body.amount.currency, op.exponent)
                    if body.amount is not None
                    else None
                )
            except wire.AmountNotSupported:
                echoed = None
            if body.amount is None or echoed != op.amount or body.amount.currency.upper() != op.currency.upper():
                raise OutcomeUnknown(f"{op.kind} acknowledged a different amount", code="amount_mismatch")
        if body.status == "succeeded":
            return ChannelResult(
                outcome=Outcome.APPROVED, channel_reference=body.id, code=body.status, captured=op.kind == "capture"
            )
        if body.status == "pending":
            return ChannelResult(outcome=Outcome.PENDING, channel_reference=body.id, code=body.status)
        if body.status == "failed":
            code = body.failure_code or "failed"
            return ChannelResult(outcome=Outcome.HARD_DECLINE, channel_reference=body.id, code=code,
                                 message=f"examplepay {op.kind} failed: {code}")
        raise OutcomeUnknown(f"{op.kind} answered status {body.status!r}", code="unexpected_status")

    # ------------------------------------------------------------------ callbacks

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> tuple[CallbackEvent, WireResponse]:
        # order matters: verify the signature over the RAW bytes before parsing anything, so an
        # attacker's body never reaches a decoder; every failure is CallbackRejected (a 400 to the
        # sender), never another exception (a 500 the PSP would retry forever)
        header = _header(headers, wire.SIGNATURE_HEADER)
        if not header:
            raise CallbackRejected(f"missing {wire.SIGNATURE_HEADER}")
        try:
            wire.verify_signature(header, body, self._webhook_secret, self._clock(), self._tolerance_s)
        except wire.SignatureError as e:
            raise CallbackRejected(str(e)) from None
        try:
            event = wire.event_decoder.decode(body)
            return self._event(event), _ACK
        except (msgspec.DecodeError, OutcomeUnknown) as e:
            # the class name only: a decode error's text may quote the body
            raise CallbackRejected(f"unreadable examplepay event: {e.__class__.__name__}") from None

    def _event(self, event: wire.Event) -> CallbackEvent:
        if event.type == "payment.updated":
            payment = wire.payment_decoder.decode(event.data)
            return CallbackEvent(
                event_id=event.id,  # the pipeline deduplicates redeliveries by it
                reference=payment.reference,
                channel_reference=payment.id,
                result=self._payment_result(payment),
            )
        if event.type == "operation.updated":
            op = wire.operation_decoder.decode(event.data)
            kind = {"capture": "capture", "cancel": "void", "refund": "refund"}.get(op.type)
            outcome = {"succeeded": Outcome.APPROVED, "pending": Outcome.PENDING, "failed": Outcome.HARD_DECLINE}.get(
                op.status
            )
            if kind is None or outcome is None:
                raise CallbackRejected(f"operation event of type {op.type!r} status {op.status!r}")
            return CallbackEvent(
                event_id=event.id,
                reference=None,
                channel_reference=op.payment_id,
                result=ChannelResult(outcome=outcome, channel_reference=op.id, code=op.failure_code or op.status,
                                     captured=kind == "capture" and outcome is Outcome.APPROVED),
                kind=kind,
            )
        # subscribe the endpoint to the handled types only; anything else is refused loudly
        raise CallbackRejected(f"unhandled event type {event.type!r}")

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _decode(decoder: msgspec.json.Decoder[Any], resp: WireResponse) -> Any:
        if not _is_json(resp.headers):
            raise OutcomeUnknown(f"{resp.status} answer is not application/json", code="bad_content_type")
        try:
            return decoder.decode(resp.body)
        except msgspec.DecodeError:  # ValidationError included: a missing field or a wrong type
            # bytes were sent and the answer is unreadable: we cannot say nothing was charged.
            # The message never quotes the body: it may echo the card we sent.
            raise OutcomeUnknown(f"unreadable {resp.status} body", code="malformed_response") from None

    @staticmethod
    def _payment_result(payment: wire.Payment) -> ChannelResult:
        if payment.status in _APPROVED_STATES:
            return ChannelResult(outcome=Outcome.APPROVED, channel_reference=payment.id, code=payment.status,
                                 captured=payment.status == "captured")
        if payment.status == "declined":
            code = payment.decline_code or "card_declined"
            return ChannelResult(outcome=classify(code), channel_reference=payment.id, code=code,
                                 message=f"declined by examplepay: {code}")
        if payment.status == "pending":
            return ChannelResult(outcome=Outcome.PENDING, channel_reference=payment.id, code=payment.status)
        if payment.status == "requires_action":
            action = payment.next_action
            if action is None or action.type != "redirect" or not action.url:
                raise OutcomeUnknown("requires_action without a redirect", code="missing_action")
            return ChannelResult(outcome=Outcome.REQUIRES_ACTION, channel_reference=payment.id, code=payment.status,
                                 next_action={"type": "redirect", "url": action.url})
        # voided/refunded on an authorize answer, or a status we do not know: never guess
        raise OutcomeUnknown(f"unexpected payment status {payment.status!r}", code="unexpected_status")

    @staticmethod
    def _read_error(resp: WireResponse) -> wire.ApiError | None:
        if not _is_json(resp.headers):
            return None
        try:
            return wire.error_decoder.decode(resp.body).error
        except msgspec.DecodeError:
            return None

    def _error(self, resp: WireResponse) -> ChannelResult:
        """A non-2xx answer: a decline as data, or one of the two steering exceptions."""
        status = resp.status
        err = self._read_error(resp)
        code = (err.code if err else None) or str(status)
        # --- ChannelUnavailable: ExamplePay certainly did not process the request
        if status in (401, 403):
            raise ChannelUnavailable(f"examplepay refused our credentials ({status})", code=code)
        if status == 429:
            raise ChannelUnavailable("examplepay rate limited the request", code=code)
        if status == 503 and err is not None and err.processed is False:
            # only because ExamplePay documents `processed: false` as a promise; a bare 503 from a
            # load balancer proves nothing
            raise ChannelUnavailable("examplepay did not process the request", code=code)
        # --- OutcomeUnknown: it may have acted
        if err is None:
            raise OutcomeUnknown(f"unreadable {status} answer", code="malformed_response")
        if status == 409 or status >= 500:
            # 409: the idempotency key is in use by a request still running, or with other parameters
            raise OutcomeUnknown(f"examplepay answered {status}", code=code)
        # --- a decline as data
        if status == 402:
            return ChannelResult(outcome=classify(err.code), code=code, message=f"declined by examplepay: {code}")
        if status in (400, 422):
            # refused before processing: nothing was charged, another channel may take it. The message is
            # built from the code, never copied from the channel's prose: PSPs echo the request in it
            # ("invalid card number 4111...", "cvc 737"), and Decline.message is stored and shown
            return ChannelResult(outcome=Outcome.SOFT_DECLINE, code=code,
                                 message=f"examplepay refused the request: {wire.safe_text(code)}")
        raise OutcomeUnknown(f"unexpected examplepay answer {status}", code=code)
