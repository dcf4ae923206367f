"""`router.validation`: every bad field reported with its path and code, and no card data leaking."""

from __future__ import annotations

import copy
import datetime
import pathlib
import re
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import router.validation
from router.errors import ProblemError
from router.model import PaymentRequest, SensitiveCard
from router.validation import (
    Limits,
    card_brand,
    card_fingerprint,
    currency_exponent,
    validate_payment,
)

TODAY = datetime.date(2025, 6, 15)
KEY = b"test-fingerprint-key-0123456789"
PAN = "4242424242424242"
CVC = "737"
DELETE = object()  # marks a path to remove from the good body


def good_body() -> dict[str, Any]:
    return {
        "amount": 1099,
        "currency": "USD",
        "country": "US",
        "capture": True,
        "merchant_order_id": "order-123",
        "payment_method": {
            "type": "card",
            "card": {
                "number": PAN,
                "exp_month": 12,
                "exp_year": 2030,
                "cvc": CVC,
                "holder_name": "Jane Doe",
            },
        },
        "description": "optional",
        "customer_id": "cus_42",
        "metadata": {"k": "v"},
    }


def body_with(changes: dict[str, object]) -> dict[str, Any]:
    """The good body with dotted paths set (or removed with DELETE)."""
    body = good_body()
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = body
        for part in parents:
            node = node[part]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return body


def validate(body: object, limits: Limits | None = None) -> tuple[PaymentRequest, SensitiveCard]:
    return validate_payment(
        body, merchant_id="m_1", fingerprint_key=KEY, limits=limits or Limits(), today=TODAY
    )


def reported(body: object, limits: Limits | None = None) -> tuple[ProblemError, list[tuple[str, str]]]:
    with pytest.raises(ProblemError) as info:
        validate(body, limits)
    exc = info.value
    return exc, sorted((e.field, e.code) for e in exc.errors)


def error_texts(exc: ProblemError) -> list[str]:
    """Everything a client or a log line could see of the problem, apart from fixed numbers like status."""
    return [
        str(exc),
        repr(exc),
        repr(exc.args),
        exc.detail or "",
        *(f"{e.field} {e.message}" for e in exc.errors),
        repr(exc.errors),
    ]


def assert_no_leak(exc: ProblemError, secrets: list[str]) -> None:
    texts = error_texts(exc)
    dumped = orjson.dumps(exc.body("/v1/payments")).decode()
    for secret in secrets:
        for text in texts:
            assert secret not in text
        if len(secret) >= 6:  # short ones could collide with "status": 400
            assert secret not in dumped


def secrets_of(body: object) -> list[str]:
    """The card number (and its digits) and CVC a body carries, when long enough to be recognisable."""
    try:
        card = body["payment_method"]["card"]  # type: ignore[index]
    except (KeyError, TypeError):
        return []
    if not isinstance(card, dict):
        return []
    found: list[str] = []
    number = card.get("number")
    if isinstance(number, str):
        digits = re.sub(r"\D", "", number)
        found += [s for s in (number, digits) if len(s) >= 12]
    cvc = card.get("cvc")
    if isinstance(cvc, str) and len(cvc) >= 3:
        found.append(cvc)
    return found


MAX = Limits().max_amount

# (id, body, expected sorted [(field, code)])
MALFORMED: list[tuple[str, object, list[tuple[str, str]]]] = [
    ("body-list", [good_body()], [("", "invalid_body")]),
    ("body-string", "amount=1099", [("", "invalid_body")]),
    ("body-null", None, [("", "invalid_body")]),
    ("unknown-typo", body_with({"ammount": 1099}), [("ammount", "unknown_field")]),
    (
        "typo-instead-of-field",
        body_with({"amount": DELETE, "ammount": 1099}),
        [("amount", "missing_field"), ("ammount", "unknown_field")],
    ),
    ("unknown-pan-like-key", body_with({PAN: "x"}), [("[redacted]", "unknown_field")]),
    ("amount-missing", body_with({"amount": DELETE}), [("amount", "missing_field")]),
    ("amount-null", body_with({"amount": None}), [("amount", "missing_field")]),
    ("amount-bool", body_with({"amount": True}), [("amount", "not_an_integer")]),
    ("amount-fraction", body_with({"amount": 10.5}), [("amount", "not_an_integer")]),
    ("amount-integral-float", body_with({"amount": 10.0}), [("amount", "not_an_integer")]),
    ("amount-string", body_with({"amount": "1099"}), [("amount", "not_an_integer")]),
    ("amount-zero", body_with({"amount": 0}), [("amount", "amount_too_small")]),
    ("amount-negative", body_with({"amount": -5}), [("amount", "amount_too_small")]),
    ("amount-over-limit", body_with({"amount": MAX + 1}), [("amount", "amount_too_large")]),
    ("currency-missing", body_with({"currency": DELETE}), [("currency", "missing_field")]),
    ("currency-short", body_with({"currency": "US"}), [("currency", "invalid_currency")]),
    ("currency-unknown", body_with({"currency": "ABC"}), [("currency", "invalid_currency")]),
    ("currency-numeric", body_with({"currency": 840}), [("currency", "invalid_currency")]),
    ("currency-withdrawn", body_with({"currency": "HRK"}), [("currency", "invalid_currency")]),
    ("currency-no-currency", body_with({"currency": "XXX"}), [("currency", "invalid_currency")]),
    ("currency-gold", body_with({"currency": "XAU"}), [("currency", "invalid_currency")]),
    ("currency-non-ascii", body_with({"currency": "ÜSD"}), [("currency", "invalid_currency")]),
    ("country-missing", body_with({"country": DELETE}), [("country", "missing_field")]),
    ("country-alpha3", body_with({"country": "USA"}), [("country", "invalid_country")]),
    ("country-not-iso", body_with({"country": "UK"}), [("country", "invalid_country")]),
    ("country-number", body_with({"country": 1}), [("country", "invalid_country")]),
    ("capture-string", body_with({"capture": "yes"}), [("capture", "not_a_boolean")]),
    ("capture-int", body_with({"capture": 1}), [("capture", "not_a_boolean")]),
    ("capture-null", body_with({"capture": None}), [("capture", "not_a_boolean")]),
    (
        "order-id-missing",
        body_with({"merchant_order_id": DELETE}),
        [("merchant_order_id", "missing_field")],
    ),
    (
        "order-id-empty",
        body_with({"merchant_order_id": ""}),
        [("merchant_order_id", "invalid_merchant_order_id")],
    ),
    (
        "order-id-too-long",
        body_with({"merchant_order_id": "a" * 65}),
        [("merchant_order_id", "invalid_merchant_order_id")],
    ),
    (
        "order-id-control-char",
        body_with({"merchant_order_id": "order\n123"}),
        [("merchant_order_id", "invalid_merchant_order_id")],
    ),
    (
        "order-id-non-ascii",
        body_with({"merchant_order_id": "ordér"}),
        [("merchant_order_id", "invalid_merchant_order_id")],
    ),
    (
        "order-id-number",
        body_with({"merchant_order_id": 123}),
        [("merchant_order_id", "invalid_merchant_order_id")],
    ),
    ("pm-missing", body_with({"payment_method": DELETE}), [("payment_method", "missing_field")]),
    ("pm-string", body_with({"payment_method": "card"}), [("payment_method", "invalid_payment_method")]),
    (
        "pm-type-missing",
        body_with({"payment_method.type": DELETE}),
        [("payment_method.type", "missing_field")],
    ),
    (
        "pm-type-unknown",
        body_with({"payment_method.type": "bitcoin"}),
        [("payment_method.type", "unsupported_payment_method")],
    ),
    (
        "pm-unknown-field",
        body_with({"payment_method.wallet": {}}),
        [("payment_method.wallet", "unknown_field")],
    ),
    (
        "card-missing",
        body_with({"payment_method.card": DELETE}),
        [("payment_method.card", "missing_field")],
    ),
    (
        "card-not-object",
        body_with({"payment_method.card": PAN}),
        [("payment_method.card", "invalid_card")],
    ),
    (
        "card-unknown-field",
        body_with({"payment_method.card.cvv": CVC}),
        [("payment_method.card.cvv", "unknown_field")],
    ),
    (
        "number-missing",
        body_with({"payment_method.card.number": DELETE}),
        [("payment_method.card.number", "missing_field")],
    ),
    (
        "number-spaces",
        body_with({"payment_method.card.number": "4242 4242 4242 4242"}),
        [("payment_method.card.number", "invalid_card_number")],
    ),
    (
        "number-dashes",
        body_with({"payment_method.card.number": "4242-4242-4242-4242"}),
        [("payment_method.card.number", "invalid_card_number")],
    ),
    (
        "number-as-integer",
        body_with({"payment_method.card.number": 4242424242424242}),
        [("payment_method.card.number", "invalid_card_number")],
    ),
    (
        "number-non-ascii-digits",
        body_with({"payment_method.card.number": "٤٢٤٢٤٢٤٢٤٢٤٢٤٢٤٢"}),
        [("payment_method.card.number", "invalid_card_number")],
    ),
    (
        "number-empty",
        body_with({"payment_method.card.number": ""}),
        [("payment_method.card.number", "invalid_card_number")],
    ),
    (
        "number-luhn",
        body_with({"payment_method.card.number": "4242424242424241"}),
        [("payment_method.card.number", "invalid_card_number")],
    ),
    (
        "length-visa-15",
        body_with({"payment_method.card.number": "400000000000006"}),
        [("payment_method.card.number", "invalid_card_length")],
    ),
    (
        "length-visa-20",
        body_with({"payment_method.card.number": "40000000000000000002"}),
        [("payment_method.card.number", "invalid_card_length")],
    ),
    (
        "length-amex-16",
        body_with({"payment_method.card.number": "3700000000000007", "payment_method.card.cvc": "1234"}),
        [("payment_method.card.number", "invalid_card_length")],
    ),
    (
        "length-mastercard-19",
        body_with({"payment_method.card.number": "5111111111111111119"}),
        [("payment_method.card.number", "invalid_card_length")],
    ),
    (
        "length-unknown-brand-11",
        body_with({"payment_method.card.number": "99999999990"}),
        [("payment_method.card.number", "invalid_card_length")],
    ),
    (
        "exp-month-zero",
        body_with({"payment_method.card.exp_month": 0}),
        [("payment_method.card.exp_month", "invalid_expiry")],
    ),
    (
        "exp-month-13",
        body_with({"payment_method.card.exp_month": 13}),
        [("payment_method.card.exp_month", "invalid_expiry")],
    ),
    (
        "exp-month-string",
        body_with({"payment_method.card.exp_month": "12"}),
        [("payment_method.card.exp_month", "invalid_expiry")],
    ),
    (
        "exp-month-bool",
        body_with({"payment_method.card.exp_month": True}),
        [("payment_method.card.exp_month", "invalid_expiry")],
    ),
    (
        "exp-month-missing",
        body_with({"payment_method.card.exp_month": DELETE}),
        [("payment_method.card.exp_month", "missing_field")],
    ),
    (
        "exp-year-two-digits",
        body_with({"payment_method.card.exp_year": 30}),
        [("payment_method.card.exp_year", "invalid_expiry")],
    ),
    (
        "exp-year-float",
        body_with({"payment_method.card.exp_year": 2030.0}),
        [("payment_method.card.exp_year", "invalid_expiry")],
    ),
    (
        "exp-year-too-far",
        body_with({"payment_method.card.exp_year": TODAY.year + 51}),
        [("payment_method.card.exp_year", "invalid_expiry")],
    ),
    (
        "expired-last-year",
        body_with({"payment_method.card.exp_year": TODAY.year - 1}),
        [("payment_method.card.exp_year", "card_expired")],
    ),
    (
        "expired-last-month",
        body_with(
            {"payment_method.card.exp_year": TODAY.year, "payment_method.card.exp_month": TODAY.month - 1}
        ),
        [("payment_method.card.exp_month", "card_expired")],
    ),
    (
        "cvc-too-short",
        body_with({"payment_method.card.cvc": "12"}),
        [("payment_method.card.cvc", "invalid_cvc")],
    ),
    (
        "cvc-too-long",
        body_with({"payment_method.card.cvc": "12345"}),
        [("payment_method.card.cvc", "invalid_cvc")],
    ),
    (
        "cvc-letters",
        body_with({"payment_method.card.cvc": "12a"}),
        [("payment_method.card.cvc", "invalid_cvc")],
    ),
    (
        "cvc-integer",
        body_with({"payment_method.card.cvc": 737}),
        [("payment_method.card.cvc", "invalid_cvc")],
    ),
    (
        "cvc-4-digits-on-visa",
        body_with({"payment_method.card.cvc": "9731"}),
        [("payment_method.card.cvc", "invalid_cvc")],
    ),
    (
        "cvc-3-digits-on-amex",
        body_with({"payment_method.card.number": "378282246310005", "payment_method.card.cvc": "864"}),
        [("payment_method.card.cvc", "invalid_cvc")],
    ),
    (
        "holder-name-too-long",
        body_with({"payment_method.card.holder_name": "J" * 101}),
        [("payment_method.card.holder_name", "invalid_holder_name")],
    ),
    (
        "holder-name-number",
        body_with({"payment_method.card.holder_name": 5}),
        [("payment_method.card.holder_name", "invalid_holder_name")],
    ),
    ("description-too-long", body_with({"description": "d" * 501}), [("description", "invalid_description")]),
    ("description-object", body_with({"description": {}}), [("description", "invalid_description")]),
    ("customer-id-empty", body_with({"customer_id": ""}), [("customer_id", "invalid_customer_id")]),
    ("customer-id-too-long", body_with({"customer_id": "c" * 65}), [("customer_id", "invalid_customer_id")]),
    ("customer-id-control", body_with({"customer_id": "c\x00"}), [("customer_id", "invalid_customer_id")]),
    ("metadata-list", body_with({"metadata": ["k", "v"]}), [("metadata", "invalid_metadata")]),
    (
        "metadata-too-many-keys",
        body_with({"metadata": {f"k{i}": "v" for i in range(21)}}),
        [("metadata", "invalid_metadata")],
    ),
    (
        "metadata-key-too-long",
        body_with({"metadata": {"k" * 41: "v"}}),
        [("metadata." + "k" * 41, "invalid_metadata")],
    ),
    ("metadata-empty-key", body_with({"metadata": {"": "v"}}), [("metadata.", "invalid_metadata")]),
    ("metadata-number-value", body_with({"metadata": {"foo": 1}}), [("metadata.foo", "invalid_metadata")]),
    ("metadata-object-value", body_with({"metadata": {"foo": {}}}), [("metadata.foo", "invalid_metadata")]),
    ("metadata-null-value", body_with({"metadata": {"foo": None}}), [("metadata.foo", "invalid_metadata")]),
    (
        "metadata-value-too-long",
        body_with({"metadata": {"foo": "v" * 501}}),
        [("metadata.foo", "invalid_metadata")],
    ),
    (
        "metadata-pan-like-key",
        body_with({"metadata": {"card " + PAN: 1}}),
        [("metadata.card [redacted]", "invalid_metadata")],
    ),
    (
        "many-errors-at-once",
        body_with(
            {
                "amount": 0,
                "currency": "usdd",
                "country": "ZZ",
                "capture": "no",
                "merchant_order_id": "",
                "payment_method.card.number": "4242424242424241",
                "payment_method.card.exp_month": 13,
                "payment_method.card.exp_year": 2019,
                "payment_method.card.cvc": "1",
                "payment_method.card.holder_name": "J" * 101,
                "description": 7,
                "customer_id": 7,
                "metadata": {"a": 1, "b": "ok", "c": []},
                "extra": True,
            }
        ),
        sorted(
            [
                ("amount", "amount_too_small"),
                ("currency", "invalid_currency"),
                ("country", "invalid_country"),
                ("capture", "not_a_boolean"),
                ("merchant_order_id", "invalid_merchant_order_id"),
                ("payment_method.card.number", "invalid_card_number"),
                ("payment_method.card.exp_month", "invalid_expiry"),
                ("payment_method.card.exp_year", "card_expired"),
                ("payment_method.card.cvc", "invalid_cvc"),
                ("payment_method.card.holder_name", "invalid_holder_name"),
                ("description", "invalid_description"),
                ("customer_id", "invalid_customer_id"),
                ("metadata.a", "invalid_metadata"),
                ("metadata.c", "invalid_metadata"),
                ("extra", "unknown_field"),
            ]
        ),
    ),
    (
        "all-required-missing",
        {},
        sorted(
            [
                ("amount", "missing_field"),
                ("currency", "missing_field"),
                ("country", "missing_field"),
                ("merchant_order_id", "missing_field"),
                ("payment_method", "missing_field"),
            ]
        ),
    ),
]


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_body_reports_each_bad_field(body: object, expected: list[tuple[str, str]]) -> None:
    exc, errors = reported(body)
    assert errors == sorted(expected)
    assert exc.status == 400
    assert exc.code == "invalid_request"
    listed = exc.body()["errors"]
    assert isinstance(listed, list)
    assert sorted((e["field"], e["code"]) for e in listed) == sorted(expected)
    assert_no_leak(exc, secrets_of(body))


def test_table_is_large_and_covers_every_code() -> None:
    codes = {code for _, _, expected in MALFORMED for _, code in expected}
    assert len(MALFORMED) >= 30
    assert codes == {
        "invalid_body",
        "unknown_field",
        "missing_field",
        "not_an_integer",
        "amount_too_small",
        "amount_too_large",
        "invalid_currency",
        "invalid_country",
        "not_a_boolean",
        "invalid_merchant_order_id",
        "invalid_payment_method",
        "unsupported_payment_method",
        "invalid_card",
        "invalid_card_number",
        "invalid_card_length",
        "invalid_expiry",
        "card_expired",
        "invalid_cvc",
        "invalid_holder_name",
        "invalid_description",
        "invalid_customer_id",
        "invalid_metadata",
    }


def test_validation_does_not_mutate_the_body() -> None:
    body = body_with({"currency": "usd", "amount": 0})
    before = copy.deepcopy(body)
    reported(body)
    assert body == before


# --------------------------------------------------------------------------- good bodies

BRANDS = [
    ("4242424242424242", "visa", "737"),
    ("4000056655665556", "visa", "737"),
    ("4222222222222", "visa", "737"),  # 13-digit Visa
    ("5555555555554444", "mastercard", "737"),
    ("2223003122003222", "mastercard", "737"),
    ("378282246310005", "amex", "9731"),
    ("6011111111111117", "discover", "737"),
    ("3056930009020004", "diners", "737"),
    ("36227206271667", "diners", "737"),  # 14-digit Diners
    ("3566002020360505", "jcb", "737"),
    ("6200000000000005", "unionpay", "737"),
    ("6759649826438453", "maestro", "737"),
    ("501800000009", "maestro", "737"),  # 12-digit Maestro
    ("111111111113", None, "9731"),  # unknown brand: 12-19 digits, CVC of 3 or 4
]


@pytest.mark.parametrize(("pan", "brand", "cvc"), BRANDS)
def test_good_card_per_brand(pan: str, brand: str | None, cvc: str) -> None:
    body = body_with({"payment_method.card.number": pan, "payment_method.card.cvc": cvc})
    request, card = validate(body)

    assert card_brand(pan) == brand
    summary = request.payment_method.card
    assert summary is not None
    assert summary.bin == pan[:6]
    assert summary.last4 == pan[-4:]
    assert summary.brand == (brand or "unknown")
    assert (summary.exp_month, summary.exp_year) == (12, 2030)
    assert summary.fingerprint == card_fingerprint(pan, KEY)
    assert card.summary == summary
    assert (card.number, card.cvc, card.holder_name) == (pan, cvc, "Jane Doe")
    assert (card.exp_month, card.exp_year) == (12, 2030)

    encoded = msgspec.json.encode(request).decode()
    assert pan not in encoded
    assert pan[:8] not in encoded  # the BIN is the first 6 digits, never 8
    assert '"cvc"' not in encoded


def test_good_body_maps_every_field() -> None:
    request, _ = validate(good_body())
    assert request == PaymentRequest(
        merchant_id="m_1",
        merchant_order_id="order-123",
        amount=1099,
        currency="USD",
        exponent=2,
        country="US",
        capture=True,
        payment_method=request.payment_method,
        description="optional",
        customer_id="cus_42",
        metadata={"k": "v"},
    )
    assert request.payment_method.type == "card"


def test_optional_fields_default_when_absent_or_null() -> None:
    absent = body_with(
        {
            "capture": DELETE,
            "description": DELETE,
            "customer_id": DELETE,
            "metadata": DELETE,
            "payment_method.card.cvc": DELETE,
            "payment_method.card.holder_name": DELETE,
        }
    )
    null = body_with(
        {
            "description": None,
            "customer_id": None,
            "metadata": None,
            "payment_method.card.cvc": None,
            "payment_method.card.holder_name": None,
        }
    )
    for body in (absent, null):
        request, card = validate(body)
        assert request.capture is True
        assert (request.description, request.customer_id, request.metadata) == (None, None, {})
        assert (card.cvc, card.holder_name) == (None, None)


def test_capture_false_is_kept() -> None:
    request, _ = validate(body_with({"capture": False}))
    assert request.capture is False


@pytest.mark.parametrize(("code", "exponent"), [("JPY", 0), ("USD", 2), ("KWD", 3), ("EUR", 2), ("CLF", 4), ("IQD", 3), ("RSD", 2), ("BHD", 3), ("ISK", 0), ("CLP", 0)])
def test_currency_exponent(code: str, exponent: int) -> None:
    assert currency_exponent(code) == exponent
    request, _ = validate(body_with({"currency": code}))
    assert (request.currency, request.exponent) == (code, exponent)


@pytest.mark.parametrize("code", ["XXX", "XAU", "XTS", "HRK", "ABC", "US", "", "usd"])
def test_currency_exponent_refuses_non_currencies(code: str) -> None:
    assert currency_exponent(code) is None


def test_codes_are_normalised_to_upper_case() -> None:
    request, _ = validate(body_with({"currency": "jpy", "country": "jp"}))
    assert (request.currency, request.exponent, request.country) == ("JPY", 0, "JP")


def test_limits_are_inclusive_boundaries() -> None:
    limits = Limits()
    metadata = {
        f"{i:02d}".ljust(limits.max_metadata_key_len, "k"): "v" * limits.max_metadata_value_len
        for i in range(limits.max_metadata_keys)
    }
    body = body_with(
        {
            "amount": limits.max_amount,
            "merchant_order_id": " !~" + "o" * 61,
            "customer_id": "c" * 64,
            "description": "d" * limits.max_description_len,
            "metadata": metadata,
            "payment_method.card.holder_name": "J" * 100,
            "payment_method.card.exp_year": TODAY.year,
            "payment_method.card.exp_month": TODAY.month,  # good through the end of this month
        }
    )
    request, _ = validate(body)
    assert request.amount == limits.max_amount
    assert request.metadata == metadata
    request, _ = validate(body_with({"payment_method.card.exp_year": TODAY.year + 50}))
    assert request.payment_method.card is not None
    assert request.payment_method.card.exp_year == TODAY.year + 50


def test_custom_limits_are_applied() -> None:
    limits = Limits(
        max_amount=500,
        max_metadata_keys=1,
        max_metadata_key_len=2,
        max_metadata_value_len=3,
        max_description_len=4,
    )
    request, _ = validate(
        body_with({"amount": 500, "metadata": {"ab": "xyz"}, "description": "abcd"}), limits
    )
    assert request.amount == 500
    _, errors = reported(body_with({"amount": 501, "metadata": {"abc": "x"}, "description": "abcde"}), limits)
    assert errors == [
        ("amount", "amount_too_large"),
        ("description", "invalid_description"),
        ("metadata.abc", "invalid_metadata"),
    ]
    within = {"amount": 500, "description": "abcd"}
    _, errors = reported(body_with({**within, "metadata": {"a": "wxyz"}}), limits)
    assert errors == [("metadata.a", "invalid_metadata")]
    _, errors = reported(body_with({**within, "metadata": {"a": "x", "b": "y"}}), limits)
    assert errors == [("metadata", "invalid_metadata")]


# --------------------------------------------------------------------------- brand and fingerprint


@pytest.mark.parametrize(
    ("pan", "brand"),
    [
        ("2221000000000009", "mastercard"),
        ("2720990000000007", "mastercard"),
        ("2200000000000000", None),  # Mir is not a brand we know
        ("2721000000000000", None),
        ("6440000000000000", "discover"),
        ("6500000000000000", "discover"),
        ("3528000000000000", "jcb"),
        ("3527000000000000", None),
        ("3095000000000000", "diners"),
        ("6304000000000000", "maestro"),
        ("", None),
        ("4242 4242", None),
        ("٤٢٤٢", None),
    ],
)
def test_card_brand_ranges(pan: str, brand: str | None) -> None:
    assert card_brand(pan) == brand


def test_fingerprint_is_stable_per_key_and_differs_across_keys() -> None:
    first = card_fingerprint(PAN, KEY)
    assert first == card_fingerprint(PAN, KEY)
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != card_fingerprint(PAN, b"another-key")
    assert first != card_fingerprint("5555555555554444", KEY)
    assert PAN not in first
    with pytest.raises(ValueError):
        card_fingerprint(PAN, b"")

    # the same card in two requests gets the same fingerprint; another key gives another one
    a, _ = validate(good_body())
    b, _ = validate(good_body())
    c, _ = validate_payment(
        good_body(), merchant_id="m_1", fingerprint_key=b"other", limits=Limits(), today=TODAY
    )
    assert a.payment_method.card is not None and b.payment_method.card is not None
    assert c.payment_method.card is not None
    assert a.payment_method.card.fingerprint == b.payment_method.card.fingerprint
    assert a.payment_method.card.fingerprint != c.payment_method.card.fingerprint


# --------------------------------------------------------------------------- card data hygiene


def test_sensitive_card_repr_hides_pan_and_cvc() -> None:
    _, card = validate(
        body_with({"payment_method.card.cvc": "9731", "payment_method.card.number": "378282246310005"})
    )
    for text in (repr(card), str(card), f"{card}", repr([card])):
        assert "378282246310005" not in text
        assert "9731" not in text
        assert "378282" in text and "0005" in text  # first 6 + last 4 at most


@pytest.mark.parametrize(
    "changes",
    [
        {"payment_method.card.exp_year": 2019},  # a good PAN and CVC, rejected for another reason
        {"payment_method.card.cvc": "9731"},  # CVC of the wrong length
        {"payment_method.card.number": "4242424242424241"},  # Luhn
        {"payment_method.card.number": "40000000000000000002"},  # length
        {"payment_method.card.number": "4242 4242 4242 4242"},
        {"payment_method.card.number": "4242424242424242x", "payment_method.card.cvc": "97a1"},
        {"payment_method.card": {"number": PAN, "cvc": CVC, "pan": PAN}},
    ],
)
def test_errors_never_contain_pan_or_cvc(changes: dict[str, object]) -> None:
    body = body_with(changes)
    exc, errors = reported(body)
    assert errors  # each body here is invalid
    secrets = secrets_of(body) + [PAN, CVC]
    assert_no_leak(exc, secrets)


def test_package_resolves_inside_this_repo() -> None:
    repo = pathlib.Path(__file__).resolve().parents[2]
    assert pathlib.Path(router.validation.__file__).resolve().is_relative_to(repo)


# --------------------------------------------------------------------------- properties

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def near_valid_bodies() -> st.SearchStrategy[dict[str, Any]]:
    """The good body with any subset of its fields replaced by random JSON, so deep paths get hit."""
    good = good_body()
    card = good["payment_method"]["card"]
    card_st = st.fixed_dictionaries({k: st.just(v) | json_values for k, v in card.items()})
    pm_st = st.fixed_dictionaries({"type": st.just("card") | json_values, "card": card_st | json_values})
    fields = {k: st.just(v) | json_values for k, v in good.items() if k != "payment_method"}
    fields["payment_method"] = pm_st | json_values
    return st.fixed_dictionaries(fields, optional={"extra": json_values})


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(body=json_values | near_valid_bodies())
def test_any_body_yields_a_request_or_a_problem(body: object) -> None:
    try:
        request, card = validate(body)
    except ProblemError as exc:
        assert exc.status == 400
        assert exc.errors, "a rejection must name at least one field"
        orjson.dumps(exc.body())  # always serialisable
    else:
        assert isinstance(request, PaymentRequest)
        assert card.summary == request.payment_method.card


digit_strings = st.text(alphabet="0123456789", min_size=12, max_size=24)


@settings(max_examples=300)
@given(
    pan=digit_strings,
    cvc=st.text(alphabet="0123456789", min_size=3, max_size=5),
    amount=st.sampled_from([1099, 0]),
    key_leak=st.booleans(),
)
def test_random_digit_strings_never_leak(pan: str, cvc: str, amount: int, key_leak: bool) -> None:
    changes: dict[str, object] = {
        "payment_method.card.number": pan,
        "payment_method.card.cvc": cvc,
        "amount": amount,
    }
    if key_leak:
        changes[pan] = pan
        changes["metadata"] = {pan: 1}
    body = body_with(changes)
    try:
        request, card = validate(body)
    except ProblemError as exc:
        assert_no_leak(exc, [pan])
        # messages elsewhere may quote limits such as 500; the CVC is checked where it could surface
        for error in exc.errors:
            if error.field.startswith("payment_method"):
                assert cvc not in f"{error.field} {error.message}"
    else:
        assert card.number == pan
        encoded = msgspec.json.encode(request).decode()
        assert pan not in encoded
        assert repr(card).count(pan) == 0


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ({"type": "alipay"}, {"flow": "qr"}),
        ({"type": "wechatpay"}, {"flow": "native"}),
        ({"type": "wechatpay", "flow": "jsapi", "openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
         {"flow": "jsapi", "openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"}),
    ],
)
def test_wallets_carry_their_flow_and_no_card(method: dict[str, Any], expected: dict[str, str]) -> None:
    body = {**good_body(), "payment_method": method, "currency": "CNY", "country": "CN"}
    request, card = validate_payment(body, merchant_id="m", fingerprint_key=b"k", limits=Limits(), today=TODAY)
    assert card is None
    assert request.payment_method.type == method["type"] and request.payment_method.wallet == expected


@pytest.mark.parametrize(
    ("method", "field", "code"),
    [
        ({"type": "alipay", "flow": "jsapi"}, "payment_method.flow", "unsupported_flow"),
        ({"type": "wechatpay", "flow": "jsapi"}, "payment_method.openid", "invalid_openid"),
        ({"type": "wechatpay", "openid": "x"}, "payment_method.openid", "unknown_field"),
        ({"type": "alipay", "card": {}}, "payment_method.card", "unknown_field"),
    ],
)
def test_bad_wallet_methods(method: dict[str, Any], field: str, code: str) -> None:
    body = {**good_body(), "payment_method": method}
    with pytest.raises(ProblemError) as e:
        validate_payment(body, merchant_id="m", fingerprint_key=b"k", limits=Limits(), today=TODAY)
    assert (field, code) in [(x.field, x.code) for x in e.value.errors]


@given(st.text(alphabet="0123456789", min_size=1, max_size=25))
def test_luhn_check_agrees_with_stdnum(digits: str) -> None:
    from stdnum import luhn

    assert router.validation.luhn_valid(digits) is luhn.is_valid(digits)


def test_luhn_check_on_known_numbers() -> None:
    assert router.validation.luhn_valid("4242424242424242")
    assert router.validation.luhn_valid("378282246310005")
    assert not router.validation.luhn_valid("4242424242424241")
