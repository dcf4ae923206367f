"""Stripe wire types, the form encoder, amount conversion and `Stripe-Signature` helpers. No I/O.

- `form_encode` produces exactly the body the official SDK sends: nested keys in bracket notation
  (`payment_method_data[card][number]`), lists indexed (`payment_method_types[0]`), booleans as
  `true`/`false`, `None` omitted, then `urlencode` with the brackets left literal.
- Response structs decode only the fields the adapter reads; unknown fields are ignored, missing
  required ones are a `msgspec.ValidationError` (the adapter turns it into `OutcomeUnknown`).
- Webhook signatures: `t=<unix ts>,v1=<hex HMAC-SHA256(secret, "<ts>.<raw body>")>`, possibly with
  several `v1` entries while Stripe rolls a secret.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlencode

import msgspec

API_VERSION = "2023-08-16"
REFERENCE_METADATA_KEY = "payroute_reference"

# --------------------------------------------------------------------------- form encoding


def _flatten(key: str, value: Any) -> Iterator[tuple[str, str]]:
    if value is None:
        return
    if isinstance(value, Mapping):
        for sub, v in value.items():
            yield from _flatten(f"{key}[{sub}]", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _flatten(f"{key}[{i}]", v)
    elif isinstance(value, bool):  # before int: bool is an int
        yield key, "true" if value else "false"
    elif isinstance(value, (int, str)):
        yield key, str(value)
    else:  # floats and the like have no exact form encoding we want on a payment
        raise TypeError(f"cannot form-encode {type(value).__name__} at {key}")


def form_pairs(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [pair for key, value in params.items() for pair in _flatten(key, value)]


def form_encode(params: Mapping[str, Any]) -> bytes:
    # the SDK leaves brackets literal (Stripe accepts both); matching it keeps bodies readable and
    # lets a test compare ours with the SDK's byte for byte
    encoded = urlencode(form_pairs(params)).replace("%5B", "[").replace("%5D", "]")
    return encoded.encode("ascii")


# --------------------------------------------------------------------------- money

# Where Stripe's smallest unit differs from ISO 4217's minor unit.
# ISK: ISO exponent 0, Stripe wants two decimals (a whole-krona amount times 100).
_STRIPE_EXPONENT: dict[str, int] = {"ISK": 2}
# Three-decimal currencies: Stripe takes thousandths but the last digit must be 0.
_LAST_DIGIT_ZERO: frozenset[str] = frozenset({"BHD", "JOD", "KWD", "OMR", "TND"})


class AmountNotSupported(ValueError):
    """The amount cannot be expressed exactly in Stripe's unit for the currency."""


def stripe_amount(amount: int, currency: str, exponent: int) -> int:
    """ISO minor units -> Stripe's integer amount, exactly (integer arithmetic only)."""
    cur = currency.upper()
    target = _STRIPE_EXPONENT.get(cur, exponent)
    if target < exponent:
        raise AmountNotSupported(f"{cur}: Stripe has fewer decimals than ISO 4217")
    factor: int = 10 ** (target - exponent)  # target >= exponent: an exact integer
    value = amount * factor
    if cur in _LAST_DIGIT_ZERO and value % 10:
        raise AmountNotSupported(f"{cur}: Stripe requires the last of three decimals to be 0")
    return value


# --------------------------------------------------------------------------- response bodies


class LastPaymentError(msgspec.Struct, kw_only=True):
    type: str | None = None
    code: str | None = None
    decline_code: str | None = None
    message: str | None = None


class PaymentIntent(msgspec.Struct, kw_only=True):
    id: str
    status: str
    amount: int
    currency: str
    object: str = "payment_intent"
    amount_capturable: int = 0
    amount_received: int = 0
    capture_method: str | None = None
    client_secret: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    last_payment_error: LastPaymentError | None = None
    next_action: dict[str, Any] | None = None


class PaymentIntentList(msgspec.Struct, kw_only=True):
    object: str  # "search_result" (search) or "list"
    data: list[PaymentIntent]
    has_more: bool = False


class Refund(msgspec.Struct, kw_only=True):
    id: str
    amount: int
    status: str | None = None
    payment_intent: str | None = None
    failure_reason: str | None = None


class ErrorIntent(msgspec.Struct, kw_only=True):
    # only the id: a decline must stay readable even if the embedded intent is unusual
    id: str


class ApiError(msgspec.Struct, kw_only=True):
    type: str | None = None
    code: str | None = None
    decline_code: str | None = None
    message: str | None = None
    param: str | None = None
    charge: str | None = None
    payment_intent: ErrorIntent | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    error: ApiError


class Charge(msgspec.Struct, kw_only=True):
    id: str
    amount: int
    amount_refunded: int = 0
    refunded: bool = False
    payment_intent: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


class EventData(msgspec.Struct, kw_only=True):
    object: msgspec.Raw


class Event(msgspec.Struct, kw_only=True):
    id: str
    type: str
    data: EventData


intent_decoder = msgspec.json.Decoder(PaymentIntent)
intent_list_decoder = msgspec.json.Decoder(PaymentIntentList)
refund_decoder = msgspec.json.Decoder(Refund)
error_decoder = msgspec.json.Decoder(ErrorBody)
charge_decoder = msgspec.json.Decoder(Charge)
event_decoder = msgspec.json.Decoder(Event)


class _Kind(msgspec.Struct):
    object: str | None = None


kind_decoder = msgspec.json.Decoder(_Kind)

# --------------------------------------------------------------------------- webhook signatures


class SignatureError(ValueError):
    """The `Stripe-Signature` header does not verify (the message says why, never the secret)."""


def compute_signature(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={compute_signature(secret, timestamp, body)}"


def parse_signature_header(header: str) -> tuple[int, list[str]]:
    """`t=...,v1=...,v1=...,v0=...` -> (timestamp, the v1 signatures). Other schemes are ignored."""
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError("malformed Stripe-Signature element")
        if key == "t":
            if timestamp is not None or not value.isascii() or not value.isdigit():
                raise SignatureError("malformed Stripe-Signature timestamp")
            timestamp = int(value)
        elif key == "v1":
            signatures.append(value)
    if timestamp is None:
        raise SignatureError("Stripe-Signature has no timestamp")
    if not signatures:
        raise SignatureError("Stripe-Signature has no v1 signature")
    return timestamp, signatures


def verify_signature(header: str, body: bytes, secrets: Iterable[str], now: float, tolerance_s: int) -> int:
    """Check the header against every secret; return the signed timestamp or raise SignatureError."""
    timestamp, signatures = parse_signature_header(header)
    matched = False
    for secret in secrets:
        expected = compute_signature(secret, timestamp, body)
        for sig in signatures:
            # compare_digest on ASCII str: constant time in the content of the strings
            if sig.isascii() and hmac.compare_digest(expected, sig):
                matched = True
    if not matched:
        raise SignatureError("no v1 signature matches")
    # checked after the MAC, as Stripe does: a forged header learns nothing from which check failed
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError("signature timestamp outside the tolerance")
    return timestamp
