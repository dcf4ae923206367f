"""ExamplePay wire types, amount conversion, redaction and webhook signatures. No I/O.

- Response structs decode only the fields the adapter reads: unknown fields are ignored (PSPs add
  fields without notice), a missing required field or a wrong type is a `msgspec.DecodeError`, which
  the adapter turns into `OutcomeUnknown` (a response) or `CallbackRejected` (a callback).
- Amounts: ExamplePay takes integers in its own smallest unit. For most currencies that is the ISO 4217
  minor unit; where it is not (see `_EXAMPLEPAY_EXPONENT`) the conversion is integer arithmetic only:
  never a float, never a rounding. An amount that cannot be expressed exactly is refused.
- Webhooks: header `ExamplePay-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

import msgspec

SIGNATURE_HEADER = "ExamplePay-Signature"

# --------------------------------------------------------------------------- money

# Where ExamplePay's unit differs from ISO 4217's minor unit (fictional: it wants ISK in hundredths,
# although ISO gives ISK no decimals, and it cannot express the third decimal of three-decimal currencies).
_EXAMPLEPAY_EXPONENT: dict[str, int] = {"ISK": 2, "BHD": 2, "JOD": 2, "KWD": 2, "OMR": 2, "TND": 2}


class AmountNotSupported(ValueError):
    """The amount cannot be expressed exactly in ExamplePay's unit (nothing is sent)."""


def wire_amount(amount: int, currency: str, exponent: int) -> int:
    """Canonical minor units (at ISO `exponent`) -> ExamplePay's integer, exactly."""
    if amount <= 0:
        raise AmountNotSupported("ExamplePay amounts are positive")
    target = _EXAMPLEPAY_EXPONENT.get(currency.upper(), exponent)
    # `int` annotations: `10 ** n` is typed Any (n could be negative); here n >= 0 is checked first
    if target >= exponent:
        up: int = 10 ** (target - exponent)
        return amount * up
    factor: int = 10 ** (exponent - target)
    if amount % factor:
        # e.g. 1.005 KWD: ExamplePay has no unit for the last digit; rounding would charge another amount
        raise AmountNotSupported(f"{currency}: ExamplePay cannot express {amount} at {target} decimals")
    return amount // factor


def canonical_amount(value: int, currency: str, exponent: int) -> int:
    """ExamplePay's integer -> canonical minor units, exactly (for comparing echoed amounts)."""
    target = _EXAMPLEPAY_EXPONENT.get(currency.upper(), exponent)
    if target >= exponent:
        factor: int = 10 ** (target - exponent)
        if value % factor:
            raise AmountNotSupported(f"{currency}: {value} is not a whole minor unit")
        return value // factor
    up: int = 10 ** (exponent - target)
    return value * up


# --------------------------------------------------------------------------- redaction

# Runs of 12-19 digits, possibly split by spaces or dashes: what a card number looks like in free text.
_PAN_LIKE = re.compile(r"(?:\d[ -]?){11,18}\d")


def safe_text(text: str | None, limit: int = 200) -> str | None:
    """A channel-provided token made safe to store and show: card-number-like runs masked, length cut.

    Use it on short tokens (codes). Never copy a channel's free-text message into a result: it may
    echo the CVC too, and no pattern can tell a 3-digit CVC from any other number."""
    if text is None:
        return None
    return _PAN_LIKE.sub("[redacted]", text[:limit])


# --------------------------------------------------------------------------- response bodies


class Money(msgspec.Struct, kw_only=True):
    value: int
    currency: str


class NextAction(msgspec.Struct, kw_only=True):
    type: str
    url: str | None = None


class Payment(msgspec.Struct, kw_only=True):
    id: str
    status: str  # authorized | captured | declined | pending | requires_action | voided | refunded
    amount: Money
    reference: str | None = None
    decline_code: str | None = None
    next_action: NextAction | None = None


class PaymentList(msgspec.Struct, kw_only=True):
    data: list[Payment]


class OperationBody(msgspec.Struct, kw_only=True):
    id: str
    payment_id: str
    type: str  # capture | cancel | refund
    status: str  # succeeded | pending | failed
    amount: Money | None = None  # absent on cancel
    failure_code: str | None = None


class ApiError(msgspec.Struct, kw_only=True):
    code: str | None = None
    message: str | None = None
    # ExamplePay says explicitly whether it processed a request it answers 5xx to; absent means "cannot tell"
    processed: bool | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    error: ApiError


class Event(msgspec.Struct, kw_only=True):
    id: str
    type: str  # payment.updated | operation.updated
    data: msgspec.Raw  # decoded by type once the signature verified


payment_decoder = msgspec.json.Decoder(Payment)
payment_list_decoder = msgspec.json.Decoder(PaymentList)
operation_decoder = msgspec.json.Decoder(OperationBody)
error_decoder = msgspec.json.Decoder(ErrorBody)
event_decoder = msgspec.json.Decoder(Event)


def encode(body: dict[str, Any]) -> bytes:
    """Request bodies: msgspec's JSON (keys in insertion order), so the same input gives the same bytes."""
    return msgspec.json.encode(body)


# --------------------------------------------------------------------------- webhook signatures


class SignatureError(ValueError):
    """The signature header does not verify. The message says why, never the secret or the body."""


def compute_signature(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """What ExamplePay sends (used by tests and protocol fakes)."""
    return f"t={timestamp},v1={compute_signature(secret, timestamp, body)}"


def verify_signature(header: str, body: bytes, secret: str, now: float, tolerance_s: int) -> int:
    """Check `t=...,v1=...` against the raw body; return the signed timestamp or raise SignatureError."""
    timestamp: int | None = None
    given: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError("malformed signature element")
        if key == "t":
            if timestamp is not None or not (value.isascii() and value.isdigit()) or len(value) > 12:
                raise SignatureError("malformed signature timestamp")
            timestamp = int(value)
        elif key == "v1":
            given.append(value)
    if timestamp is None or not given:
        raise SignatureError("signature header without timestamp or v1")
    expected = compute_signature(secret, timestamp, body)
    # compare_digest: constant time, so an attacker cannot find the MAC byte by byte from response times;
    # every candidate is compared (no early exit on the first mismatch either)
    matched = False
    for sig in given:
        if sig.isascii() and hmac.compare_digest(expected, sig):
            matched = True
    if not matched:
        raise SignatureError("no v1 signature matches")
    # the tolerance stops replays of a captured, validly signed notification
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError("signature timestamp outside the tolerance")
    return timestamp
