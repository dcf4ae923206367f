"""Decode and validate a `POST /v1/payments` body into the canonical model, at the edge.

Contract:
- `validate_payment(body, ...)` takes the already-parsed JSON (any Python object) and returns
  `(PaymentRequest, SensitiveCard)`, or raises `ProblemError` (400 `invalid_request`) carrying one
  `FieldError` per bad field, all of them, not just the first. Field paths are dotted JSON paths
  (`payment_method.card.number`, `metadata.foo`); `""` is the body itself. No body makes it raise
  anything else (an empty `fingerprint_key` is a config bug and raises `ValueError`).
- Strict: an unknown field is an error at every level (`unknown_field`); JSON `true` is not an integer
  and neither is `10.0`. `null` for an optional field means "absent", except for `capture`, whose
  default (capture now) moves money, so a `null` there is refused. A required field that is absent or
  `null` is `missing_field`. Currency and country codes are accepted in any case and normalised to
  upper case.
- Card hygiene: the PAN and CVC leave this module only inside `SensitiveCard`. `PaymentRequest`
  carries a `CardSummary` (BIN = first 6 digits, last 4, brand, expiry, keyed fingerprint). Error
  messages never echo an input value; paths echo object keys only, with PAN-like digit runs redacted.
- Currency validity comes from pycountry (active ISO 4217, excluding units with no minor unit such as
  XAU or XXX); the exponent from babel/CLDR. Both lookups are tables built once and cached.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import re
from collections.abc import Mapping

import msgspec
import pycountry
from babel.numbers import get_currency_precision

from router.errors import FieldError, invalid_request
from router.model import CardSummary, PaymentMethod, PaymentRequest, SensitiveCard

__all__ = [
    "Limits",
    "card_brand",
    "card_fingerprint",
    "currency_exponent",
    "validate_payment",
]


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    max_amount: int = 100_000_000  # per payment, in minor units
    max_metadata_keys: int = 20
    max_metadata_key_len: int = 40
    max_metadata_value_len: int = 500
    max_description_len: int = 500


# ISO 4217 codes that are not money one can pay with (precious metals, SDR and other accounting
# units, the testing code, "no currency"): ISO lists no minor unit for them, and babel would answer 2.
_NOT_PAYABLE = frozenset(
    {"XAD", "XAG", "XAU", "XBA", "XBB", "XBC", "XBD", "XDR", "XPD", "XPT", "XSU", "XTS", "XUA", "XXX"}
)


# babel reports CLDR's *cash* digits; ISO 4217 (what channels and our amounts use) differs for these.
# Checked against ISO 4217's minor-unit column; a test pins the whole table against pycountry + babel.
_ISO_MINOR_UNITS = {
    "AFN": 2, "ALL": 2, "IQD": 3, "IRR": 2, "KPW": 2, "LAK": 2, "LBP": 2, "MGA": 2, "MMK": 2, "RSD": 2,
    "SOS": 2, "SYP": 2, "YER": 2,
}


@functools.lru_cache(maxsize=1)
def _currency_table() -> Mapping[str, int]:
    return {
        c.alpha_3: _ISO_MINOR_UNITS.get(c.alpha_3, get_currency_precision(c.alpha_3))
        for c in pycountry.currencies
        if c.alpha_3 not in _NOT_PAYABLE
    }


@functools.lru_cache(maxsize=1)
def _country_codes() -> frozenset[str]:
    return frozenset(c.alpha_2 for c in pycountry.countries)


def active_currencies() -> frozenset[str]:
    """The ISO 4217 codes a payment may be in (upper case)."""
    return frozenset(_currency_table())


def country_codes() -> frozenset[str]:
    """The ISO 3166-1 alpha-2 codes (upper case)."""
    return _country_codes()


def currency_exponent(code: str) -> int | None:
    """The number of minor-unit digits of an active ISO 4217 code (upper case), or None."""
    return _currency_table().get(code)


def card_fingerprint(pan: str, key: bytes) -> str:
    """A keyed HMAC-SHA256 of the PAN (32 hex chars): equal per key, unrecoverable without it."""
    if not key:
        raise ValueError("the card fingerprint key must not be empty")
    # hmac.new, not hmac.digest: hmac.digest releases the GIL, which the event loop then waits to take back
    return hmac.new(key, pan.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


# (prefix width, low, high, brand). The ranges do not overlap; UnionPay's 622126-622925, which
# Discover also accepts, counts as UnionPay (the issuer's network).
_BRAND_RANGES: tuple[tuple[int, int, int, str], ...] = (
    (1, 4, 4, "visa"),
    (2, 51, 55, "mastercard"),
    (4, 2221, 2720, "mastercard"),
    (2, 34, 34, "amex"),
    (2, 37, 37, "amex"),
    (4, 6011, 6011, "discover"),
    (3, 644, 649, "discover"),
    (2, 65, 65, "discover"),
    (4, 3528, 3589, "jcb"),
    (2, 62, 62, "unionpay"),
    (3, 300, 305, "diners"),
    (4, 3095, 3095, "diners"),
    (2, 36, 36, "diners"),
    (2, 38, 39, "diners"),
    (2, 50, 50, "maestro"),
    (2, 56, 58, "maestro"),
    (4, 6304, 6304, "maestro"),
    (4, 6759, 6759, "maestro"),
    (4, 6761, 6763, "maestro"),
)

_BRAND_LENGTHS: Mapping[str, frozenset[int]] = {
    "visa": frozenset({13, 16, 19}),
    "mastercard": frozenset({16}),
    "amex": frozenset({15}),
    "discover": frozenset(range(16, 20)),
    "jcb": frozenset(range(16, 20)),
    "unionpay": frozenset(range(16, 20)),
    "diners": frozenset(range(14, 20)),
    "maestro": frozenset(range(12, 20)),
}
_UNKNOWN_BRAND_LENGTHS = frozenset(range(12, 20))


def _is_digits(value: str) -> bool:
    return value.isascii() and value.isdigit()


_DOUBLED = str.maketrans("0123456789", "0246813579")  # a digit doubled, the digits of that summed


def luhn_valid(digits: str) -> bool:
    """The Luhn check of a non-empty string of ASCII digits: `stdnum.luhn.is_valid`'s answer for those,
    in two C-level passes (~10x cheaper; it runs on every card payment)."""
    return (sum(map(int, digits[-1::-2])) + sum(map(int, digits[-2::-2].translate(_DOUBLED)))) % 10 == 0


def card_brand(pan: str) -> str | None:
    """The card network of a digits-only PAN by its IIN prefix, or None if unknown."""
    if not _is_digits(pan):
        return None
    for width, low, high, brand in _BRAND_RANGES:
        if len(pan) >= width and low <= int(pan[:width]) <= high:
            return brand
    return None


# --------------------------------------------------------------------------- field checks

_TOP_LEVEL = frozenset(
    {
        "amount",
        "currency",
        "country",
        "capture",
        "merchant_order_id",
        "payment_method",
        "description",
        "customer_id",
        "metadata",
    }
)
_PAYMENT_METHOD_FIELDS = frozenset({"type", "card", "flow", "openid"})
# Wallet flows that wait for the customer (the payment answers `requires_action` with a QR code or a
# redirect). The first flow of each wallet is its default.
WALLET_FLOWS: Mapping[str, tuple[str, ...]] = {"alipay": ("qr",), "wechatpay": ("native", "jsapi")}
_CARD_FIELDS = frozenset({"number", "exp_month", "exp_year", "cvc", "holder_name"})

_PRINTABLE_ID = re.compile(r"[\x20-\x7e]{1,64}")
_CODE_SHAPE = re.compile(r"[A-Za-z]+")
# Twelve or more digits, possibly split by single separators: could be a PAN, so never echoed.
_PAN_LIKE = re.compile(r"\d(?:\D?\d){11,}")
_MAX_ECHO = 100


def _echo(key: object) -> str:
    """An object key as it may appear in a field path: PAN-like runs redacted, length bounded."""
    text = _PAN_LIKE.sub("[redacted]", str(key))
    return text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "..."


class _Errors:
    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[FieldError] = []

    def add(self, field: str, code: str, message: str) -> None:
        self.items.append(FieldError(field, code, message))

    def missing(self, field: str) -> None:
        self.add(field, "missing_field", "is required")

    def unknown(self, obj: Mapping[object, object], allowed: frozenset[str], prefix: str) -> None:
        for key in obj:
            if key not in allowed:
                self.add(prefix + _echo(key), "unknown_field", "is not a known field")


def _amount(value: object, limits: Limits, errs: _Errors) -> int:
    if value is None:
        errs.missing("amount")
    elif not isinstance(value, int) or isinstance(value, bool):
        errs.add("amount", "not_an_integer", "must be an integer number of minor units")
    elif value <= 0:
        errs.add("amount", "amount_too_small", "must be greater than 0")
    elif value > limits.max_amount:
        errs.add("amount", "amount_too_large", f"must be at most {limits.max_amount} minor units")
    else:
        return value
    return 0


def _code(value: object, length: int) -> str | None:
    """An ASCII letter code of the given length, upper-cased, or None if it has another shape."""
    if isinstance(value, str) and len(value) == length and _CODE_SHAPE.fullmatch(value):
        return value.upper()
    return None


def _currency(value: object, errs: _Errors) -> tuple[str, int]:
    if value is None:
        errs.missing("currency")
        return "", 0
    code = _code(value, 3)
    exponent = currency_exponent(code) if code else None
    if code is None or exponent is None:
        errs.add("currency", "invalid_currency", "must be an active ISO 4217 currency code")
        return "", 0
    return code, exponent


def _country(value: object, errs: _Errors) -> str:
    if value is None:
        errs.missing("country")
        return ""
    code = _code(value, 2)
    if code is None or code not in _country_codes():
        errs.add("country", "invalid_country", "must be an ISO 3166-1 alpha-2 country code")
        return ""
    return code


def _identifier(value: object, field: str, code: str, errs: _Errors, *, required: bool) -> str | None:
    if value is None:
        if required:
            errs.missing(field)
        return None
    if not isinstance(value, str) or not _PRINTABLE_ID.fullmatch(value):
        errs.add(field, code, "must be 1 to 64 printable ASCII characters")
        return None
    return value


def _text(value: object, field: str, code: str, max_len: int, errs: _Errors) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        errs.add(field, code, f"must be a string of at most {max_len} characters")
        return None
    return value


def _metadata(value: object, limits: Limits, errs: _Errors) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        errs.add("metadata", "invalid_metadata", "must be an object of string values")
        return {}
    if len(value) > limits.max_metadata_keys:
        # One error, not one per key: the body could carry thousands.
        errs.add("metadata", "invalid_metadata", f"must have at most {limits.max_metadata_keys} keys")
        return {}
    out: dict[str, str] = {}
    for key, item in value.items():
        path = "metadata." + _echo(key)
        if not isinstance(key, str) or not 1 <= len(key) <= limits.max_metadata_key_len:
            errs.add(path, "invalid_metadata", f"keys must be 1 to {limits.max_metadata_key_len} characters")
        elif not isinstance(item, str) or len(item) > limits.max_metadata_value_len:
            errs.add(
                path,
                "invalid_metadata",
                f"values must be strings of at most {limits.max_metadata_value_len} characters",
            )
        else:
            out[key] = item
    return out


def _card_number(value: object, errs: _Errors) -> str | None:
    field = "payment_method.card.number"
    if value is None:
        errs.missing(field)
        return None
    # Messages name the rule only: nothing of the number is ever echoed.
    if not isinstance(value, str) or not _is_digits(value):
        errs.add(field, "invalid_card_number", "must be a string of digits without separators")
        return None
    if not luhn_valid(value):
        errs.add(field, "invalid_card_number", "is not a valid card number")
        return None
    if len(value) not in _BRAND_LENGTHS.get(card_brand(value) or "", _UNKNOWN_BRAND_LENGTHS):
        errs.add(field, "invalid_card_length", "has a length that is not valid for its card brand")
        return None
    return value


def _expiry(card: Mapping[object, object], today: datetime.date, errs: _Errors) -> tuple[int, int]:
    month_field, year_field = "payment_method.card.exp_month", "payment_method.card.exp_year"
    month, year = card.get("exp_month"), card.get("exp_year")
    month_ok = year_ok = False
    if month is None:
        errs.missing(month_field)
    elif not isinstance(month, int) or isinstance(month, bool) or not 1 <= month <= 12:
        errs.add(month_field, "invalid_expiry", "must be an integer from 1 to 12")
    else:
        month_ok = True
    if year is None:
        errs.missing(year_field)
    elif not isinstance(year, int) or isinstance(year, bool) or not 1000 <= year <= 9999:
        errs.add(year_field, "invalid_expiry", "must be a four-digit year")
    elif year > today.year + 50:
        errs.add(year_field, "invalid_expiry", "is too far in the future")
    elif year < today.year:
        errs.add(year_field, "card_expired", "the card has expired")
    else:
        year_ok = True
    if month_ok and year_ok and isinstance(month, int) and isinstance(year, int):
        # A card is good through the last day of its expiry month.
        if year == today.year and month < today.month:
            errs.add(month_field, "card_expired", "the card has expired")
            return 0, 0
        return month, year
    return 0, 0


def _cvc(value: object, brand: str | None, errs: _Errors) -> str | None:
    if value is None:
        return None
    lengths = {4} if brand == "amex" else {3, 4} if brand is None else {3}
    if not isinstance(value, str) or not _is_digits(value) or len(value) not in lengths:
        expected = " or ".join(str(n) for n in sorted(lengths))
        errs.add("payment_method.card.cvc", "invalid_cvc", f"must be {expected} digits for this card")
        return None
    return value


def _card(value: object, fingerprint_key: bytes, today: datetime.date, errs: _Errors) -> SensitiveCard | None:
    if value is None:
        errs.missing("payment_method.card")
        return None
    if not isinstance(value, dict):
        errs.add("payment_method.card", "invalid_card", "must be an object")
        return None
    errs.unknown(value, _CARD_FIELDS, "payment_method.card.")
    number = _card_number(value.get("number"), errs)
    exp_month, exp_year = _expiry(value, today, errs)
    brand = card_brand(number) if number else None
    cvc = _cvc(value.get("cvc"), brand, errs)
    holder_name = _text(
        value.get("holder_name"), "payment_method.card.holder_name", "invalid_holder_name", 100, errs
    )
    if number is None or not exp_month:
        return None
    summary = CardSummary(
        bin=number[:6],
        last4=number[-4:],
        brand=brand or "unknown",
        exp_month=exp_month,
        exp_year=exp_year,
        fingerprint=card_fingerprint(number, fingerprint_key),
    )
    return SensitiveCard(number, cvc, exp_month, exp_year, holder_name, summary)


def _wallet(kind: str, value: Mapping[object, object], errs: _Errors) -> dict[str, str] | None:
    flows = WALLET_FLOWS[kind]
    for key in value:
        if key not in ("type", "flow", "openid"):
            errs.add(f"payment_method.{_echo(key)}", "unknown_field", f"not a field of a {kind} payment method")
    flow = value.get("flow", flows[0])
    if flow not in flows:
        errs.add("payment_method.flow", "unsupported_flow", f"{kind} supports: {', '.join(flows)}")
        return None
    wallet = {"flow": str(flow)}
    openid = value.get("openid")
    if flow == "jsapi":
        if not isinstance(openid, str) or not _PRINTABLE_ID.fullmatch(openid):
            errs.add("payment_method.openid", "invalid_openid", "the payer's openid (1-64 printable characters)")
            return None
        wallet["openid"] = openid
    elif openid is not None:
        errs.add("payment_method.openid", "unknown_field", "only the jsapi flow takes an openid")
    return wallet


def _payment_method(
    value: object, fingerprint_key: bytes, today: datetime.date, errs: _Errors
) -> SensitiveCard | PaymentMethod | None:
    """A card (the sensitive part; its summary goes in the record) or a wallet `PaymentMethod`."""
    if value is None:
        errs.missing("payment_method")
        return None
    if not isinstance(value, dict):
        errs.add("payment_method", "invalid_payment_method", "must be an object")
        return None
    kind = value.get("type")
    if kind is None:
        errs.missing("payment_method.type")
        return None
    if isinstance(kind, str) and kind in WALLET_FLOWS:
        wallet = _wallet(kind, value, errs)
        return PaymentMethod(type=kind, wallet=wallet) if wallet is not None else None
    errs.unknown(value, frozenset({"type", "card"}), "payment_method.")
    if kind != "card":
        errs.add("payment_method.type", "unsupported_payment_method", 'must be "card", "alipay" or "wechatpay"')
        return None
    return _card(value.get("card"), fingerprint_key, today, errs)


def validate_payment(
    body: object,
    *,
    merchant_id: str,
    fingerprint_key: bytes,
    limits: Limits,
    today: datetime.date,
) -> tuple[PaymentRequest, SensitiveCard | None]:
    """Validate a parsed `POST /v1/payments` body; raise `invalid_request` naming every bad field.

    Returns the canonical request and, for cards, the sensitive card (None for wallets)."""
    if not isinstance(body, dict):
        raise invalid_request([FieldError("", "invalid_body", "the body must be a JSON object")])
    errs = _Errors()
    errs.unknown(body, _TOP_LEVEL, "")
    amount = _amount(body.get("amount"), limits, errs)
    currency, exponent = _currency(body.get("currency"), errs)
    country = _country(body.get("country"), errs)
    capture = body.get("capture", True)
    if not isinstance(capture, bool):
        errs.add("capture", "not_a_boolean", "must be true or false")
    merchant_order_id = _identifier(
        body.get("merchant_order_id"), "merchant_order_id", "invalid_merchant_order_id", errs, required=True
    )
    method = _payment_method(body.get("payment_method"), fingerprint_key, today, errs)
    description = _text(
        body.get("description"), "description", "invalid_description", limits.max_description_len, errs
    )
    customer_id = _identifier(
        body.get("customer_id"), "customer_id", "invalid_customer_id", errs, required=False
    )
    metadata = _metadata(body.get("metadata"), limits, errs)
    # Every helper that returns a placeholder has recorded an error, so only the first test fires.
    if errs.items or method is None or merchant_order_id is None or not isinstance(capture, bool):
        raise invalid_request(errs.items)
    card = method if isinstance(method, SensitiveCard) else None
    request = PaymentRequest(
        merchant_id=merchant_id,
        merchant_order_id=merchant_order_id,
        amount=amount,
        currency=currency,
        exponent=exponent,
        country=country,
        capture=capture,
        payment_method=PaymentMethod(type="card", card=card.summary) if card else method,  # type: ignore[arg-type]
        description=description,
        customer_id=customer_id,
        metadata=metadata,
    )
    return request, card
