"""The OpenAPI document (/openapi.json) describes what validation accepts: a body the schema allows is
one validation takes, except for the rules a schema cannot say (Luhn, expiry against today, a
brand's length, 1099.0 as an amount), and every rule a schema can say is in it."""

from __future__ import annotations

import datetime
from typing import Any

import jsonschema
import pytest

from router.errors import ProblemError
from router.openapi import document
from router.validation import Limits, validate_payment
from tests.conftest import GOOD_CARD, payment_body

TODAY = datetime.date(2026, 12, 4)


def schema_valid(body: Any) -> bool:
    doc = document()
    schema = {**doc["components"]["schemas"]["PaymentRequest"], "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema).is_valid(body)


def accepted(body: Any) -> bool:
    try:
        validate_payment(body, merchant_id="m", fingerprint_key=b"k", limits=Limits(), today=TODAY)
    except ProblemError:
        return False
    return True


def card(**over: Any) -> dict[str, Any]:
    return payment_body(payment_method={"type": "card", "card": {**GOOD_CARD, **over}})


GOOD = [
    payment_body(),
    payment_body(currency="JPY", country="JP", amount=100_000_000, capture=False, description="d" * 500,
                 customer_id="c" * 64, metadata={"k" * 40: "v" * 500}),
    card(number="378282246310005", cvc="1234", holder_name="A B"),
    payment_body(payment_method={"type": "card", "card": {"number": "4242424242424242", "exp_month": 1,
                                                          "exp_year": 2030}}),  # no cvc
    payment_body(payment_method={"type": "alipay"}),
    payment_body(payment_method={"type": "alipay", "flow": "qr"}),
    payment_body(payment_method={"type": "wechatpay", "flow": "native"}),
    payment_body(payment_method={"type": "wechatpay", "flow": "jsapi", "openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"}),
]

# what a schema can say, each broken once: the schema and validation both refuse it
BAD = {
    "amount-missing": {k: v for k, v in payment_body().items() if k != "amount"},
    "amount-zero": payment_body(amount=0),
    "amount-float": payment_body(amount=10.5),
    "amount-string": payment_body(amount="100"),
    "amount-huge": payment_body(amount=Limits().max_amount + 1),
    "currency-unknown": payment_body(currency="AAA"),
    "currency-metal": payment_body(currency="XAU"),
    "country-unknown": payment_body(country="AA"),
    "capture-string": payment_body(capture="yes"),
    "order-empty": payment_body(merchant_order_id=""),
    "order-long": payment_body(merchant_order_id="o" * 65),
    "order-control": payment_body(merchant_order_id="a\nb"),
    "order-non-ascii": payment_body(merchant_order_id="ä"),
    "customer-empty": payment_body(customer_id=""),
    "description-long": payment_body(description="d" * 501),
    "metadata-number": payment_body(metadata={"k": 1}),
    "metadata-many": payment_body(metadata={f"k{i}": "v" for i in range(21)}),
    "metadata-key-long": payment_body(metadata={"k" * 41: "v"}),
    "metadata-value-long": payment_body(metadata={"k": "v" * 501}),
    "unknown-field": {**payment_body(), "ammount": 5},
    "method-unknown": payment_body(payment_method={"type": "bitcoin"}),
    "card-missing": payment_body(payment_method={"type": "card"}),
    "card-letters": card(number="4242abcd42424242"),
    "card-short": card(number="42424242424"),
    "card-month-13": card(exp_month=13),
    "card-year-2-digits": card(exp_year=34),
    "card-cvc-2": card(cvc="12"),
    "card-unknown-field": card(pin="1234"),
    "card-holder-long": card(holder_name="h" * 101),
    "alipay-flow": payment_body(payment_method={"type": "alipay", "flow": "jsapi"}),
    "alipay-card": payment_body(payment_method={"type": "alipay", "card": dict(GOOD_CARD)}),
    "wechat-jsapi-no-openid": payment_body(payment_method={"type": "wechatpay", "flow": "jsapi"}),
    "wechat-native-openid": payment_body(payment_method={"type": "wechatpay", "openid": "o1"}),
}


@pytest.mark.parametrize("body", GOOD)
def test_good_bodies_are_schema_valid_and_accepted(body: dict[str, Any]) -> None:
    assert schema_valid(body)
    assert accepted(body)


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_rule_a_schema_can_say_is_in_it(case: str) -> None:
    assert not accepted(BAD[case])
    assert not schema_valid(BAD[case])


def test_the_rules_it_cannot_say_are_told_in_words() -> None:
    props = document()["components"]["schemas"]["PaymentRequest"]["properties"]
    card_props = props["payment_method"]["oneOf"][0]["properties"]["card"]["properties"]
    assert "Luhn" in card_props["number"]["description"]
    assert "not past" in card_props["exp_year"]["description"]
    assert "never" in props["amount"]["description"] and "1099.0" in props["amount"]["description"]
    for body in (card(number="4242424242424241"), card(exp_year=2020), payment_body(amount=1099.0)):
        assert schema_valid(body) and not accepted(body)
