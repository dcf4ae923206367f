"""Adapter for the sandbox channel (protocol: docs/sandbox-protocol.md). Sans-IO.

Authorization is `POST /v1/charges` with the attempt's deterministic channel key as
`Idempotency-Key` and its deterministic reference, so a status query (`GET /v1/charges?reference=`)
finds the charge after a timeout. Response mapping:
- 200 authorized/captured -> approved; 200 declined -> the code table (adapters/sandbox/codes.py);
- 503 with `accepted: false`, 401/403, 429 -> ChannelUnavailable (nothing was processed);
- other 5xx, 409 key conflicts, bodies we cannot read -> OutcomeUnknown (it may have been charged);
- other 4xx -> soft decline with the channel's code (nothing was charged; another channel may take it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import msgspec
import orjson

from adapters.sandbox.codes import classify
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


class _Error(msgspec.Struct):
    code: str = "unknown"
    message: str | None = None
    accepted: bool | None = None


class _ErrorBody(msgspec.Struct):
    error: _Error


class _Charge(msgspec.Struct):
    id: str
    status: str
    amount: int
    currency: str
    decline_code: str | None = None
    captured_amount: int = 0
    refunded_amount: int = 0
    reference: str | None = None


class _Refund(msgspec.Struct):
    id: str
    status: str
    amount: int


class _ChargeList(msgspec.Struct):
    data: list[_Charge]


_charge_decoder = msgspec.json.Decoder(_Charge)
_list_decoder = msgspec.json.Decoder(_ChargeList)
_refund_decoder = msgspec.json.Decoder(_Refund)
_error_decoder = msgspec.json.Decoder(_ErrorBody)


class SandboxAdapter:
    kind = "sandbox"

    def __init__(self, credentials: Mapping[str, str], capabilities: Capabilities | None = None) -> None:
        self._auth = {"Authorization": f"Bearer {credentials['api_key']}"} if credentials.get("api_key") else {}
        self._caps = capabilities or Capabilities()

    def capabilities(self) -> Capabilities:
        return self._caps

    def _headers(self, key: str | None = None) -> dict[str, str]:
        h = {"Content-Type": "application/json", **self._auth}
        if key:
            h["Idempotency-Key"] = key
        return h

    # ------------------------------------------------------------------ authorize

    def build_authorize(self, req: ChannelAuthorize) -> WireRequest:
        card: SensitiveCard = req.card
        body: dict[str, Any] = {
            "amount": req.amount,
            "currency": req.currency,
            "capture": req.capture,
            "reference": req.reference,
            "country": req.country,
            "card": {
                "number": card.number,
                "exp_month": card.exp_month,
                "exp_year": card.exp_year,
                "cvc": card.cvc,
            },
        }
        if req.description:
            body["description"] = req.description
        return WireRequest(method="POST", path="/v1/charges", headers=self._headers(req.channel_key), body=orjson.dumps(body))

    def parse_authorize(self, resp: WireResponse) -> ChannelResult:
        if resp.status == 200:
            return self._charge_result(self._decode(_charge_decoder, resp))
        return self._error(resp)

    # ------------------------------------------------------------------ status

    def build_status(self, reference: str, channel_reference: str | None) -> WireRequest:
        if channel_reference:
            return WireRequest(method="GET", path=f"/v1/charges/{quote(channel_reference, safe='')}", headers=self._headers())
        return WireRequest(method="GET", path=f"/v1/charges?reference={quote(reference, safe='')}", headers=self._headers())

    def parse_status(self, resp: WireResponse) -> ChannelResult:
        if resp.status == 404:
            return ChannelResult(outcome=Outcome.NOT_CHARGED, code="not_found")
        if resp.status != 200:
            self._error(resp)  # raises for the unavailable/unknown cases
            raise OutcomeUnknown(f"status query answered {resp.status}", code=str(resp.status))
        if resp.body.lstrip().startswith(b'{"data"'):
            charges = self._decode(_list_decoder, resp).data
            if not charges:
                return ChannelResult(outcome=Outcome.NOT_CHARGED, code="not_found")
            # the first charge under a reference is the one our key created; later ones cannot exist
            # because the reference is unique per attempt
            return self._charge_result(charges[0])
        return self._charge_result(self._decode(_charge_decoder, resp))

    # ------------------------------------------------------------------ capture / void / refund

    def build_operation(self, op: ChannelOperation) -> WireRequest:
        ref = quote(op.channel_reference, safe="")
        if op.kind == "capture":
            path, body = f"/v1/charges/{ref}/capture", {"amount": op.amount}
        elif op.kind == "void":
            path, body = f"/v1/charges/{ref}/void", {}
        elif op.kind == "refund":
            path, body = f"/v1/charges/{ref}/refunds", {"amount": op.amount}
        else:
            raise ValueError(f"unknown operation {op.kind}")
        return WireRequest(method="POST", path=path, headers=self._headers(op.channel_key), body=orjson.dumps(body))

    def parse_operation(self, op: ChannelOperation, resp: WireResponse) -> ChannelResult:
        if resp.status != 200:
            return self._error(resp)
        if op.kind == "refund":
            refund = self._decode(_refund_decoder, resp)
            ok = refund.status == "succeeded"
            return ChannelResult(
                outcome=Outcome.APPROVED if ok else Outcome.HARD_DECLINE, channel_reference=refund.id, code=refund.status
            )
        charge = self._decode(_charge_decoder, resp)
        want = "captured" if op.kind == "capture" else "voided"
        if charge.status != want:
            raise OutcomeUnknown(f"{op.kind} answered status {charge.status}", code=charge.status)
        return ChannelResult(outcome=Outcome.APPROVED, channel_reference=charge.id, code=charge.status)

    # ------------------------------------------------------------------ callbacks

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> tuple[CallbackEvent, WireResponse]:
        """The sandbox does not send callbacks: every notification is rejected."""
        raise CallbackRejected("the sandbox channel sends no callbacks")

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _decode(decoder: msgspec.json.Decoder[Any], resp: WireResponse) -> Any:
        ctype = next((v for k, v in resp.headers.items() if k.lower() == "content-type"), "")
        if not ctype.lower().startswith("application/json"):
            raise OutcomeUnknown(f"{resp.status} answer is {ctype or 'untyped'}, not JSON", code="malformed_response")
        try:
            return decoder.decode(resp.body)
        except msgspec.DecodeError:
            # bytes were sent and the answer is unreadable: we cannot say it was not charged
            raise OutcomeUnknown(f"unreadable {resp.status} body", code="malformed_response") from None

    @staticmethod
    def _charge_result(charge: _Charge) -> ChannelResult:
        if charge.status in ("authorized", "captured", "voided", "refunded"):
            return ChannelResult(
                outcome=Outcome.APPROVED,
                channel_reference=charge.id,
                code=charge.status,
                captured=charge.status in ("captured", "refunded"),
            )
        if charge.status == "declined":
            return ChannelResult(
                outcome=classify(charge.decline_code),
                channel_reference=charge.id,
                code=charge.decline_code or "declined",
                message=f"declined by the channel: {charge.decline_code or 'no code'}",
            )
        raise OutcomeUnknown(f"unexpected charge status {charge.status!r}", code="unexpected_status")

    def _error(self, resp: WireResponse) -> ChannelResult:
        try:
            err: _Error | None = _error_decoder.decode(resp.body).error
        except msgspec.DecodeError:
            err = None
        code = err.code if err else str(resp.status)
        if resp.status == 503 and err is not None and err.accepted is False:
            raise ChannelUnavailable("channel refused before accepting", code=code)
        if resp.status in (401, 403, 429):
            raise ChannelUnavailable(f"channel answered {resp.status}", code=code)
        if resp.status >= 500 or resp.status == 409 or err is None:
            raise OutcomeUnknown(f"channel answered {resp.status}", code=code)
        # the channel's free text may echo request data (card numbers): keep only the code
        return ChannelResult(outcome=Outcome.SOFT_DECLINE, code=code, message=f"channel answered {resp.status} {code}")
