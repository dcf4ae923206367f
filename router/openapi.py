"""The OpenAPI 3.1 description served at /openapi.json (the merchant API v1 and operations)."""

from __future__ import annotations

import functools
from typing import Any

from router.validation import WALLET_FLOWS, Limits, active_currencies, country_codes

_problem = {"$ref": "#/components/schemas/Problem"}
_payment = {"$ref": "#/components/schemas/Payment"}


def _resp(desc: str, schema: dict[str, Any], ctype: str = "application/json") -> dict[str, Any]:
    return {"description": desc, "content": {ctype: {"schema": schema}}}


_errors = {
    "400": _resp("Invalid request (every bad field listed)", _problem, "application/problem+json"),
    "401": _resp("Missing or invalid API key", _problem, "application/problem+json"),
    "404": _resp("No such payment (or another merchant's)", _problem, "application/problem+json"),
    "409": _resp("Illegal transition, duplicate order, an operation of the payment still pending with the channel "
                 "(operation_pending), or Idempotency-Key in use", _problem, "application/problem+json"),
    "422": _resp("Idempotency-Key reused with different parameters", _problem, "application/problem+json"),
}
_pending_op = _resp("The channel has not told the outcome (a timeout after sending): the payment with the "
                    "operation `pending`; it is settled later, and until then no other capture, void or refund "
                    "of the payment is accepted", _payment)
_idem = {"name": "Idempotency-Key", "in": "header", "required": False,
         "schema": {"type": "string", "pattern": "^[ -~]{1,255}$", "description": "1-255 printable ASCII characters"}}
_pid = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_amount_body = {
    "required": False,
    "content": {"application/json": {"schema": {"type": "object", "properties": {
        "amount": {"type": "integer", "minimum": 1, "description": "minor units; default: all that remains"},
        "reason": {"type": "string", "maxLength": 200}}, "additionalProperties": False}}},
}

_LIMITS = Limits()
_printable_id = {"type": "string", "pattern": "^[ -~]{1,64}$", "description": "1-64 printable ASCII characters"}
_card_method = {"type": "object", "additionalProperties": False, "required": ["type", "card"], "properties": {
    "type": {"const": "card"},
    "card": {"type": "object", "additionalProperties": False, "required": ["number", "exp_month", "exp_year"],
             "properties": {
                 "number": {"type": "string", "pattern": "^[0-9]{12,19}$",
                            "description": "digits only; Luhn-checked, length checked for its brand"},
                 "exp_month": {"type": "integer", "minimum": 1, "maximum": 12},
                 "exp_year": {"type": "integer", "minimum": 1000, "maximum": 9999,
                              "description": "four digits, not past, at most 50 years ahead"},
                 "cvc": {"type": "string", "pattern": "^[0-9]{3,4}$", "description": "4 digits for amex, else 3"},
                 "holder_name": {"type": "string", "maxLength": 100}}}}}
_wallet_methods = [
    {"type": "object", "additionalProperties": False, "required": ["type"], "properties": {
        "type": {"const": kind}, "flow": {"enum": list(flows), "default": flows[0]},
        **({"openid": {**_printable_id, "description": "the payer's openid, for the jsapi flow only"}}
           if "jsapi" in flows else {})},
     **({"if": {"required": ["flow"], "properties": {"flow": {"const": "jsapi"}}},
         "then": {"required": ["openid"]}, "else": {"not": {"required": ["openid"]}}} if "jsapi" in flows else {})}
    for kind, flows in WALLET_FLOWS.items()
]


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document (built on first use: the code lists load pycountry's tables)."""
    currencies = sorted(active_currencies())
    countries = sorted(country_codes())
    return {
        "openapi": "3.1.0",
        "info": {"title": "payroute merchant API", "version": "1"},
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Problem": {"type": "object", "required": ["type", "title", "status", "code"], "properties": {
                    "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                    "code": {"type": "string"}, "detail": {"type": "string"}, "instance": {"type": "string"},
                    "errors": {"type": "array", "items": {"type": "object", "properties": {
                        "field": {"type": "string"}, "code": {"type": "string"}, "message": {"type": "string"}}}}}},
                "PaymentRequest": {"type": "object", "additionalProperties": False,
                    "required": ["amount", "currency", "country", "merchant_order_id", "payment_method"],
                    "properties": {
                        "amount": {"type": "integer", "minimum": 1, "maximum": _LIMITS.max_amount,
                                   "description": "minor units of the currency, a JSON integer (1099, never 10.99 "
                                                  "or 1099.0); at most the server's `max_amount` (default shown) and "
                                                  "the merchant's"},
                        "currency": {"type": "string", "enum": currencies,
                                     "description": "an active ISO 4217 code (upper case here; lower case is accepted)"},
                        "country": {"type": "string", "enum": countries, "description": "ISO 3166-1 alpha-2"},
                        "capture": {"type": "boolean", "default": True},
                        "merchant_order_id": _printable_id,
                        "payment_method": {"oneOf": [_card_method, *_wallet_methods]},
                        "description": {"type": "string", "maxLength": _LIMITS.max_description_len},
                        "customer_id": _printable_id,
                        "metadata": {"type": "object", "maxProperties": _LIMITS.max_metadata_keys,
                                     "propertyNames": {"minLength": 1, "maxLength": _LIMITS.max_metadata_key_len},
                                     "additionalProperties": {"type": "string",
                                                              "maxLength": _LIMITS.max_metadata_value_len}}}},
                "Payment": {"type": "object", "required": ["id", "status", "amount", "currency", "merchant_order_id", "attempts", "created_at"],
                    "properties": {
                        "id": {"type": "string"},
                        "status": {"enum": ["processing", "authorized", "captured", "declined", "failed", "pending",
                                            "requires_action", "voided", "partially_refunded", "refunded"]},
                        "amount": {"type": "integer"}, "currency": {"type": "string"},
                        "captured_amount": {"type": "integer"}, "refunded_amount": {"type": "integer"},
                        "merchant_order_id": {"type": "string"},
                        "channel": {"type": ["string", "null"]}, "channel_reference": {"type": ["string", "null"]},
                        "decline": {"type": ["object", "null"], "properties": {
                            "code": {"type": "string"}, "message": {"type": "string"}, "category": {"enum": ["hard", "soft"]}}},
                        "attempts": {"type": "array", "items": {"type": "object", "properties": {
                            "channel": {"type": "string"}, "outcome": {"type": "string"}, "code": {"type": ["string", "null"]},
                            "latency_ms": {"type": "number"}}}},
                        "routing": {"type": ["object", "null"]},
                        "created_at": {"type": "string", "format": "date-time"}}},
            },
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/v1/payments": {"post": {
                "summary": "Create a payment (authorize, or authorize and capture)",
                "parameters": [_idem],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PaymentRequest"}}}},
                "responses": {"201": _resp("The payment, whatever its outcome", _payment), **_errors}}},
            "/v1/payments/{id}": {"get": {"summary": "Retrieve a payment", "parameters": [_pid],
                "responses": {"200": _resp("The payment", _payment), **_errors}}},
            "/v1/payments/{id}/capture": {"post": {"summary": "Capture an authorized payment (partial allowed, once)",
                "parameters": [_pid, _idem], "requestBody": _amount_body,
                "responses": {"200": _resp("The payment", _payment), "202": _pending_op, **_errors}}},
            "/v1/payments/{id}/void": {"post": {"summary": "Void an authorized payment", "parameters": [_pid, _idem],
                "responses": {"200": _resp("The payment", _payment), "202": _pending_op, **_errors}}},
            "/v1/payments/{id}/refunds": {"post": {
                "summary": "Refund a captured payment (partial and multiple allowed, one at a time)",
                "parameters": [_pid, _idem], "requestBody": _amount_body,
                "responses": {"200": _resp("The payment", _payment), "202": _pending_op, **_errors}}},
            "/healthz": {"get": {"security": [], "summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"security": [], "summary": "Readiness", "responses": {"200": {"description": "ready"},
                                                                                   "503": {"description": "not ready"}}}},
            "/metrics": {"get": {"security": [], "summary": "Prometheus metrics", "responses": {"200": {"description": "metrics"}}}},
        },
    }
