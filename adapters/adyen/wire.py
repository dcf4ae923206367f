"""Adyen Checkout v71 wire types, body encoders and the notification HMAC.

Request bodies are built as plain dicts (field names exactly as in the v71 OpenAPI spec, checked by the
spec-driven fake in tests/adapters/adyen_fake.py) and encoded with orjson. Responses and notifications
decode into lenient msgspec Structs: unknown fields are ignored, wrong types raise `msgspec.DecodeError`,
which the adapter turns into `OutcomeUnknown` / `CallbackRejected`.

Notification HMAC (docs.adyen.com "Verify HMAC signatures", same as `Adyen.util`): base64 of
HMAC-SHA256, keyed with the hex-decoded key, over
`pspReference:originalReference:merchantAccountCode:merchantReference:value:currency:eventCode:success`
(absent fields as empty strings).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import msgspec

API_VERSION = "v71"
IDEMPOTENCY_KEY_MAX = 64  # Checkout API: "a maximum of 64 characters"


class Amount(msgspec.Struct):
    currency: str
    value: int


class PaymentResponse(msgspec.Struct, rename="camel"):
    result_code: str | None = None
    psp_reference: str | None = None
    merchant_reference: str | None = None
    refusal_reason: str | None = None
    refusal_reason_code: str | None = None
    amount: Amount | None = None
    action: dict[str, Any] | None = None


class ModificationResponse(msgspec.Struct, rename="camel"):
    """PaymentCaptureResponse / PaymentCancelResponse / PaymentRefundResponse (all answer 201)."""

    status: str
    psp_reference: str
    payment_psp_reference: str
    merchant_account: str
    reference: str | None = None
    amount: Amount | None = None


class ServiceError(msgspec.Struct, rename="camel"):
    status: int | None = None
    error_code: str | None = None
    error_type: str | None = None
    message: str | None = None
    psp_reference: str | None = None


class NotificationRequestItem(msgspec.Struct, rename="camel"):
    psp_reference: str
    merchant_account_code: str
    merchant_reference: str
    amount: Amount
    event_code: str
    success: str
    original_reference: str | None = None
    reason: str | None = None
    event_date: str | None = None
    additional_data: dict[str, Any] | None = None


class NotificationItem(msgspec.Struct):
    item: NotificationRequestItem = msgspec.field(name="NotificationRequestItem")


class Notification(msgspec.Struct, rename="camel"):
    notification_items: list[NotificationItem]
    live: str | None = None


payment_response_decoder = msgspec.json.Decoder(PaymentResponse)
modification_response_decoder = msgspec.json.Decoder(ModificationResponse)
service_error_decoder = msgspec.json.Decoder(ServiceError)
notification_decoder = msgspec.json.Decoder(Notification)


def amount(value: int, currency: str) -> dict[str, Any]:
    # Adyen wants minor units as an integer, which is what the canonical model already holds
    return {"currency": currency, "value": value}


def expiry_month(month: int) -> str:
    return f"{month:02d}"


def expiry_year(year: int) -> str:
    # Adyen wants four digits; a two-digit year from a card form means this century
    return f"{year + 2000 if year < 100 else year:04d}"


def signing_string(item: NotificationRequestItem) -> str:
    fields = (
        item.psp_reference,
        item.original_reference or "",
        item.merchant_account_code,
        item.merchant_reference,
        str(item.amount.value),
        item.amount.currency,
        item.event_code,
        item.success,
    )
    return ":".join(fields)


def sign(item: NotificationRequestItem, key: bytes) -> str:
    """The base64 HMAC-SHA256 signature of one notification item under the (hex-decoded) key."""
    digest = hmac.new(key, signing_string(item).encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def verify(item: NotificationRequestItem, key: bytes) -> bool:
    """True when the item carries `additionalData.hmacSignature` and it matches (constant time)."""
    given = (item.additional_data or {}).get("hmacSignature")
    if not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(sign(item, key).encode("ascii"), given.encode("ascii", "replace"))
