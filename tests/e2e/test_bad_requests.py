"""Bad input over real HTTP: a problem+json naming the field and a code, and nothing charged."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import GOOD_CARD, payment_body


def with_card(**over: Any) -> dict[str, Any]:
    return payment_body(payment_method={"type": "card", "card": {**GOOD_CARD, **over}})


def without(key: str) -> dict[str, Any]:
    body = payment_body()
    del body[key]
    return body


JSON = {"Content-Type": "application/json"}
CASES: list[tuple[str, str, str, bytes | dict[str, Any], dict[str, str], int, str, str | None]] = [
    # (id, method, path, body, headers, status, code, field)
    ("not-json", "POST", "/v1/payments", b"{nope", JSON, 400, "malformed_json", None),
    ("empty", "POST", "/v1/payments", b"", JSON, 400, "empty_body", None),
    ("wrong-ctype", "POST", "/v1/payments", b'{"amount": 1}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type", None),
    ("array", "POST", "/v1/payments", b"[1, 2]", JSON, 400, "invalid_request", ""),
    ("too-large", "POST", "/v1/payments", b'{"description": "' + b"x" * 70_000 + b'"}', JSON, 413, "body_too_large", None),
    ("unknown-route", "GET", "/v1/nothing", b"", {}, 404, "not_found", None),
    ("wrong-method", "DELETE", "/v1/payments", b"", {}, 405, "method_not_allowed", None),
    ("amount-missing", "POST", "/v1/payments", without("amount"), {}, 400, "missing_field", "amount"),
    ("amount-zero", "POST", "/v1/payments", payment_body(amount=0), {}, 400, "amount_too_small", "amount"),
    ("amount-negative", "POST", "/v1/payments", payment_body(amount=-5), {}, 400, "amount_too_small", "amount"),
    ("amount-float", "POST", "/v1/payments", payment_body(amount=10.5), {}, 400, "not_an_integer", "amount"),
    ("amount-string", "POST", "/v1/payments", payment_body(amount="100"), {}, 400, "not_an_integer", "amount"),
    ("amount-bool", "POST", "/v1/payments", payment_body(amount=True), {}, 400, "not_an_integer", "amount"),
    ("amount-huge", "POST", "/v1/payments", payment_body(amount=10**12), {}, 400, "amount_too_large", "amount"),
    ("currency-bad", "POST", "/v1/payments", payment_body(currency="ABC"), {}, 400, "invalid_currency", "currency"),
    ("currency-num", "POST", "/v1/payments", payment_body(currency=840), {}, 400, "invalid_currency", "currency"),
    ("country-bad", "POST", "/v1/payments", payment_body(country="XX"), {}, 400, "invalid_country", "country"),
    ("capture-str", "POST", "/v1/payments", payment_body(capture="yes"), {}, 400, "not_a_boolean", "capture"),
    ("order-empty", "POST", "/v1/payments", payment_body(merchant_order_id=""), {}, 400, "invalid_merchant_order_id", "merchant_order_id"),
    ("order-long", "POST", "/v1/payments", payment_body(merchant_order_id="o" * 65), {}, 400, "invalid_merchant_order_id", "merchant_order_id"),
    ("order-ctrl", "POST", "/v1/payments", payment_body(merchant_order_id="a\nb"), {}, 400, "invalid_merchant_order_id", "merchant_order_id"),
    ("pm-wallet", "POST", "/v1/payments", payment_body(payment_method={"type": "bitcoin"}), {}, 400, "unsupported_payment_method", "payment_method.type"),
    ("luhn", "POST", "/v1/payments", with_card(number="4242424242424241"), {}, 400, "invalid_card_number", "payment_method.card.number"),
    ("pan-letters", "POST", "/v1/payments", with_card(number="4242abcd42424242"), {}, 400, "invalid_card_number", "payment_method.card.number"),
    ("pan-length", "POST", "/v1/payments", with_card(number="42424242424242"), {}, 400, "invalid_card_length", "payment_method.card.number"),
    ("expired", "POST", "/v1/payments", with_card(exp_year=2020), {}, 400, "card_expired", "payment_method.card.exp_year"),
    ("exp-month", "POST", "/v1/payments", with_card(exp_month=13), {}, 400, "invalid_expiry", "payment_method.card.exp_month"),
    ("cvc", "POST", "/v1/payments", with_card(cvc="12"), {}, 400, "invalid_cvc", "payment_method.card.cvc"),
    ("metadata-num", "POST", "/v1/payments", payment_body(metadata={"k": 1}), {}, 400, "invalid_metadata", "metadata.k"),
    ("typo-field", "POST", "/v1/payments", {**payment_body(), "ammount": 5}, {}, 400, "unknown_field", "ammount"),
    ("idem-key-long", "POST", "/v1/payments", payment_body(), {"Idempotency-Key": "k" * 300}, 400, "invalid_request", "Idempotency-Key"),
    ("capture-amount-str", "POST", "/v1/payments/pay_x/capture", {"amount": "5"}, {}, 400, "invalid_request", "amount"),
    ("refund-no-body", "POST", "/v1/payments/pay_x/refunds", b"", JSON, 400, "empty_body", None),
]


@pytest.mark.parametrize(("case", "method", "path", "body", "headers", "status", "code", "field"), CASES, ids=[c[0] for c in CASES])
async def test_bad_request(sandbox, payroute, case, method, path, body, headers, status, code, field) -> None:  # type: ignore[no-untyped-def]
    a = await sandbox("a")
    pr = await payroute({"a": a})
    if isinstance(body, dict):
        r = await pr.client.request(method, path, json=body, headers=headers)
    else:
        r = await pr.client.request(method, path, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    doc = r.json()
    assert doc["status"] == status
    if field is None:
        assert doc["code"] == code and doc["type"].endswith(code)
    else:
        # a field-level problem: code invalid_request, and the field named with its own code
        assert doc["code"] == "invalid_request"
        assert (field, code) in [(e["field"], e["code"]) for e in doc["errors"]] or code == "invalid_request", doc
        assert field in [e["field"] for e in doc["errors"]]
    assert a.channel.charges == []


async def test_every_bad_field_is_named_at_once(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    body = payment_body(amount=0, currency="usdx", country="ZZ", payment_method={"type": "card", "card": {**GOOD_CARD, "cvc": "1"}})
    r = await pr.client.post("/v1/payments", json=body)
    fields = {e["field"] for e in r.json()["errors"]}
    assert {"amount", "currency", "country", "payment_method.card.cvc"} <= fields
    assert a.channel.charges == []


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 25


async def test_a_wrong_method_names_the_allowed_ones(sandbox, payroute) -> None:  # type: ignore[no-untyped-def]
    pr = await payroute({"a": await sandbox("a")})
    for method, path, allowed in (("DELETE", "/v1/payments", {"POST"}),
                                  ("TRACE", "/v1/payments/pay_x/refunds", {"POST"}),
                                  ("PUT", "/v1/payments/pay_x", {"GET", "HEAD"})):
        r = await pr.client.request(method, path)
        assert r.status_code == 405, r.text
        assert {m.strip() for m in r.headers["Allow"].split(",")} == allowed, (path, r.headers)
        assert r.json()["code"] == "method_not_allowed" and "allowed:" in r.json()["detail"]
