"""A spec-driven fake of Adyen Checkout v71 (`/payments`, `/payments/{psp}/captures|cancels|refunds`).

Every request body is validated against the request schema of its operation in the pinned OpenAPI 3.1
document (/work/shared/specs/Adyen-CheckoutService-v71.json, JSON Schema 2020-12, `$ref`s resolved with
the whole document as the root resource); an invalid one is answered 422 *and* recorded in
`violations`, which the test fixture asserts empty. Every response the fake writes is validated against
the spec's response schema for that status; a fake bug is recorded the same way.

Behaviour (Adyen's test platform where it has one, otherwise ours):
- `X-API-Key` must equal the configured key (401 ServiceError otherwise); `Idempotency-Key` at most 64
  characters. Same key + same body replays the stored answer; same key + other body -> 409 errorCode 704.
- holderName magic (Adyen's "test refusal reasons" by cardholder name): a name equal to a refusalReason
  text from `adapters.adyen.codes` (e.g. "CVC Declined") -> Refused with that code; "PENDING" ->
  Pending; "ERROR" -> Error; card 4917610000000000 (Adyen's 3DS test card) -> RedirectShopper.
- amount magic: value 500_00 -> 500 ServiceError; value 429 -> 429 (409 and 429 are not in the v71
  document; their bodies are checked against ServiceError).
- modifications: capture/refund amounts are checked against what is left (422 otherwise); each accepted
  modification answers 201 `received` and queues a signed notification (signed with the official
  Adyen SDK's `generate_notification_sig`) in `notifications`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from adapters.adyen.codes import REFUSAL_REASONS

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from Adyen.util import generate_notification_sig

SPEC_PATH = Path("/work/shared/specs/Adyen-CheckoutService-v71.json")
_ROOT = "urn:adyen:checkout:v71"
THREEDS_CARD = "4917610000000000"
# Adyen answers these (idempotency conflicts, rate limiting) but v71 documents neither; their bodies are
# checked against ServiceError like the documented errors
UNDOCUMENTED_STATUSES = frozenset({409, 429})


class Spec:
    """Validators for the operations the fake serves, built once from the pinned document."""

    def __init__(self, path: Path = SPEC_PATH) -> None:
        self.doc: dict[str, Any] = json.loads(path.read_text())
        self.registry: Registry[Any] = Registry().with_resource(
            _ROOT, Resource.from_contents(self.doc, default_specification=DRAFT202012)
        )
        self._cache: dict[str, Draft202012Validator] = {}

    def _ref(self, ref: str) -> Draft202012Validator:
        if ref not in self._cache:
            self._cache[ref] = Draft202012Validator({"$ref": f"{_ROOT}{ref}"}, registry=self.registry)
        return self._cache[ref]

    def _op(self, path: str) -> dict[str, Any]:
        op: dict[str, Any] = self.doc["paths"][path]["post"]
        return op

    def request_errors(self, path: str, body: Any) -> list[str]:
        ref = self._op(path)["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in self._ref(ref).iter_errors(body)]

    def response_errors(self, path: str, status: int, body: Any) -> list[str]:
        responses = self._op(path)["responses"]
        if str(status) in responses:
            ref = responses[str(status)]["content"]["application/json"]["schema"]["$ref"]
        elif status in UNDOCUMENTED_STATUSES:
            ref = "#/components/schemas/ServiceError"
        else:
            return [f"status {status} is not documented for {path}"]
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in self._ref(ref).iter_errors(body)]


@dataclass
class FakePayment:
    psp: str
    merchant_account: str
    reference: str
    currency: str
    value: int
    manual: bool
    captured: int = 0
    refunded: int = 0
    cancelled: bool = False


@dataclass
class AdyenFake:
    spec: Spec
    api_key: str
    merchant_account: str
    hmac_key_hex: str
    payments: dict[str, FakePayment] = field(default_factory=dict)
    idempotency: dict[str, tuple[str, int, dict[str, Any]]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    notifications: list[dict[str, Any]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def _psp(self) -> str:
        return f"FAKE{next(self._seq):012d}"  # 16 characters, like Adyen's

    # ------------------------------------------------------------------ plumbing

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v71/payments", self._payments)
        app.router.add_post("/v71/payments/{psp}/{op:captures|cancels|refunds}", self._modification)
        return app

    def _answer(self, spec_path: str, status: int, body: dict[str, Any]) -> web.Response:
        problems = self.spec.response_errors(spec_path, status, body)
        if problems:  # the fake itself broke the spec: fail the test, do not mislead the adapter
            self.violations.append(f"fake response {spec_path} {status}: {problems}")
            return web.json_response({"status": 500, "errorCode": "fake", "message": "fake bug"}, status=500)
        return web.json_response(body, status=status)

    def _error(self, spec_path: str, status: int, code: str, message: str, etype: str = "validation") -> web.Response:
        return self._answer(spec_path, status, {"status": status, "errorCode": code, "message": message, "errorType": etype})

    async def _admit(self, request: web.Request, spec_path: str) -> tuple[dict[str, Any] | None, web.Response | None]:
        if request.headers.get("X-API-Key") != self.api_key:
            return None, self._error(spec_path, 401, "000", "HTTP Status Response - Unauthorized", "security")
        key = request.headers.get("Idempotency-Key")
        if key is None or not 1 <= len(key) <= 64:
            self.violations.append(f"{request.path}: Idempotency-Key {key!r} missing or longer than 64")
            return None, self._error(spec_path, 422, "702", "Idempotency-Key must be 1..64 characters")
        if request.content_type != "application/json":
            self.violations.append(f"{request.path}: content type {request.content_type}")
            return None, self._error(spec_path, 422, "702", "Content-Type must be application/json")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            self.violations.append(f"{request.path}: body is not JSON")
            return None, self._error(spec_path, 400, "702", "Structure could not be parsed")
        self.requests.append((request.path, body))
        problems = self.spec.request_errors(spec_path, body)
        if problems:
            self.violations.append(f"request {request.path} violates the v71 schema: {problems}")
            return None, self._error(spec_path, 422, "702", "; ".join(problems)[:500])
        return body, None

    async def _idempotent(self, request: web.Request, spec_path: str, handler: Any) -> web.Response:
        body, rejected = await self._admit(request, spec_path)
        if rejected is not None:
            return rejected
        assert body is not None
        key = request.headers["Idempotency-Key"]
        digest = hashlib.sha256(request.path.encode() + json.dumps(body, sort_keys=True).encode()).hexdigest()
        if key in self.idempotency:
            seen, status, stored = self.idempotency[key]
            if seen != digest:
                return self._error(spec_path, 409, "704", "request already processed or in progress")
            return self._answer(spec_path, status, stored)  # replay, no second effect
        status, answer = handler(request, body)
        response = self._answer(spec_path, status, answer)
        if status < 500 and response.status == status:
            self.idempotency[key] = (digest, status, answer)
        return response

    # ------------------------------------------------------------------ /payments

    async def _payments(self, request: web.Request) -> web.Response:
        return await self._idempotent(request, "/payments", self._authorize)

    def _authorize(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if body["merchantAccount"] != self.merchant_account:
            return 403, {"status": 403, "errorCode": "901", "message": "Invalid Merchant Account", "errorType": "security"}
        value, currency = body["amount"]["value"], body["amount"]["currency"]
        if value == 50000:
            return 500, {"status": 500, "errorCode": "905", "message": "Payment details are not supported", "errorType": "internal"}
        if value == 429:
            return 429, {"status": 429, "errorCode": "429", "message": "Too many requests", "errorType": "throttling"}
        pm = body["paymentMethod"]
        holder = (pm.get("holderName") or "").strip()
        psp = self._psp()
        base = {"pspReference": psp, "merchantReference": body["reference"]}
        by_name = {text.casefold(): code for code, (text, _) in REFUSAL_REASONS.items()}
        if holder.casefold() in by_name:
            code = by_name[holder.casefold()]
            return 200, {**base, "resultCode": "Refused", "refusalReason": REFUSAL_REASONS[code][0],
                         "refusalReasonCode": code}
        if holder == "PENDING":
            return 200, {**base, "resultCode": "Pending"}
        if holder == "ERROR":
            return 200, {**base, "resultCode": "Error", "refusalReason": "Acquirer Error"}
        if pm.get("number") == THREEDS_CARD:
            action = {"type": "redirect", "method": "GET", "paymentMethodType": "scheme",
                      "url": f"https://checkoutshopper-test.adyen.com/checkoutshopper/threeDS/redirect?psp={psp}"}
            return 200, {**base, "resultCode": "RedirectShopper", "action": action}
        manual = (body.get("additionalData") or {}).get("manualCapture") == "true"
        p = FakePayment(psp, body["merchantAccount"], body["reference"], currency, value, manual)
        if not manual:
            p.captured = value
        self.payments[psp] = p
        self._notify(psp, None, body["reference"], value, currency, "AUTHORISATION", True)
        return 200, {**base, "resultCode": "Authorised", "amount": {"currency": currency, "value": value},
                     "additionalData": {"authCode": "123456"}}

    # ------------------------------------------------------------------ modifications

    async def _modification(self, request: web.Request) -> web.Response:
        op = request.match_info["op"]
        return await self._idempotent(request, f"/payments/{{paymentPspReference}}/{op}", self._modify)

    def _modify(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        op, psp = request.match_info["op"], request.match_info["psp"]
        p = self.payments.get(psp)
        if p is None or p.merchant_account != body["merchantAccount"]:
            return 422, {"status": 422, "errorCode": "167", "message": "Original pspReference required for this operation",
                         "errorType": "validation"}
        mod_psp = self._psp()
        answer: dict[str, Any] = {"merchantAccount": p.merchant_account, "paymentPspReference": psp,
                                  "pspReference": mod_psp, "status": "received"}
        if "reference" in body:
            answer["reference"] = body["reference"]
        if op == "cancels":
            # Adyen accepts the cancel and reports failure later (CANCELLATION success=false)
            ok = p.captured == 0 and not p.cancelled
            p.cancelled = p.cancelled or ok
            self._notify(mod_psp, psp, p.reference, p.value, p.currency, "CANCELLATION", ok)
            return 201, answer
        value, currency = body["amount"]["value"], body["amount"]["currency"]
        if currency != p.currency:
            return 422, {"status": 422, "errorCode": "137", "message": "Invalid amount specified", "errorType": "validation"}
        if op == "captures":
            if p.cancelled or value > p.value - p.captured or value <= 0:
                return 422, {"status": 422, "errorCode": "137", "message": "Invalid amount specified",
                             "errorType": "validation"}
            p.captured += value
            self._notify(mod_psp, psp, p.reference, value, currency, "CAPTURE", True)
        else:
            if value > p.captured - p.refunded or value <= 0:
                return 422, {"status": 422, "errorCode": "137", "message": "Invalid amount specified",
                             "errorType": "validation"}
            p.refunded += value
            self._notify(mod_psp, psp, p.reference, value, currency, "REFUND", True)
        return 201, {**answer, "amount": {"currency": currency, "value": value}}

    # ------------------------------------------------------------------ notifications

    def _notify(self, psp: str, original: str | None, reference: str, value: int, currency: str, event: str,
                success: bool) -> None:
        item: dict[str, Any] = {
            "pspReference": psp, "merchantAccountCode": self.merchant_account, "merchantReference": reference,
            "amount": {"value": value, "currency": currency}, "eventCode": event,
            "success": "true" if success else "false", "eventDate": "2026-01-01T00:00:00+01:00",
            "reason": "" if success else "modification failed",
        }
        if original:
            item["originalReference"] = original
        item["additionalData"] = {"hmacSignature": generate_notification_sig(item, self.hmac_key_hex).decode()}
        self.notifications.append({"live": "false", "notificationItems": [{"NotificationRequestItem": item}]})
