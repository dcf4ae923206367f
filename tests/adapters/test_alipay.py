"""The Alipay adapter: golden requests, the code tables row by row, hostile responses and
notifications, the python-alipay-sdk as a signing peer, and the lifecycle against a protocol fake.

Peers: python-alipay-sdk (import `alipay`) plays both sides with its own RSA code (PyCryptodome):
as the merchant (`client_api` signs a request, `_verify_and_return_sync_response` checks a response)
and as Alipay (`_verify` checks our request signature, `_sign` signs responses and notifications).
`alipay_fake.AlipayFake` is an independent gateway on loopback that keeps trades.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.alipay.adapter import AlipayAdapter
from adapters.alipay.codes import GATEWAY_CODES, SUB_CODES, classify, is_retryable
from adapters.alipay.wire import major_units, request_signing_string, rsa2_verify
from router.errors import CallbackRejected, ChannelUnavailable, IntegrationError, OutcomeUnknown
from router.model import (
    Capabilities,
    ChannelAuthorize,
    ChannelOperation,
    ChannelResult,
    Outcome,
    WireRequest,
    WireResponse,
)
from tests.adapters.alipay_fake import AlipayFake

with warnings.catch_warnings():  # the SDK pulls in pyOpenSSL/PyCryptodome; keep their import noise local
    warnings.simplefilter("ignore")
    from alipay import AliPay
    from alipay.exceptions import AliPayValidationError

APP_ID = "2021000000000001"
NOW = datetime(2026, 11, 25, 4, 0, 0, tzinfo=UTC)  # 12:00:00 in Shanghai
JSON_HEADERS = {"Content-Type": "text/html;charset=UTF-8"}  # what the real gateway sends
FORM = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}


def _pem_private(key: rsa.RSAPrivateKey, fmt: serialization.PrivateFormat) -> str:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()


def _pem_public(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


class Keys:
    """A fresh app key pair and a fresh "alipay" key pair per test module."""

    def __init__(self) -> None:
        self.app = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.alipay = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.app_private_pkcs1 = _pem_private(self.app, serialization.PrivateFormat.TraditionalOpenSSL)
        self.app_private_pkcs8 = _pem_private(self.app, serialization.PrivateFormat.PKCS8)
        self.app_public = _pem_public(self.app)
        self.alipay_private = _pem_private(self.alipay, serialization.PrivateFormat.PKCS8)
        self.alipay_public = _pem_public(self.alipay)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture
def adapter(keys: Keys) -> AlipayAdapter:
    creds = {"app_id": APP_ID, "app_private_key": keys.app_private_pkcs1, "alipay_public_key": keys.alipay_public}
    return AlipayAdapter(creds, clock=lambda: NOW)


@pytest.fixture
def sdk_merchant(keys: Keys) -> Any:
    """The SDK configured as a merchant: signs with the app key, verifies with Alipay's."""
    return AliPay(appid=APP_ID, app_private_key_string=keys.app_private_pkcs1, alipay_public_key_string=keys.alipay_public)


@pytest.fixture
def sdk_gateway(keys: Keys) -> Any:
    """The SDK with the roles swapped, playing Alipay: signs with Alipay's key, verifies the app's."""
    return AliPay(appid=APP_ID, app_private_key_string=keys.alipay_private, alipay_public_key_string=keys.app_public)


def authorize(**over: Any) -> ChannelAuthorize:
    fields: dict[str, Any] = {
        "payment_id": "pay_123",
        "attempt": 1,
        "channel_key": "ck_pay123_1_0123456789abcdef",
        "reference": "att_pay123_1",
        "amount": 1099,
        "currency": "CNY",
        "exponent": 2,
        "country": "CN",
        "capture": True,
        "card": None,
        "method": "alipay",
        "wallet": {"flow": "qr"},
        "notify_url": "https://pay.example/callbacks/alipay",
        "description": "Order 42",
    }
    fields.update(over)
    return ChannelAuthorize(**fields)


def operation(kind: str, amount: int = 300, key: str = "rk_pay123_1") -> ChannelOperation:
    return ChannelOperation(
        kind=kind, payment_id="pay_123", channel_reference="att_pay123_1", channel_key=key, amount=amount, currency="CNY"
    )


def form(req: WireRequest) -> dict[str, str]:
    return dict(parse_qsl(req.body.decode("ascii"), keep_blank_values=True, strict_parsing=True))


def signed(sdk_gateway: Any, method: str, payload: dict[str, Any], *, sign: str | None = None) -> WireResponse:
    """A gateway answer as Alipay lays it out, signed by the SDK over the exact inner JSON."""
    inner = json.dumps(payload, ensure_ascii=False)
    signature = sdk_gateway._sign(inner) if sign is None else sign
    key = method.replace(".", "_") + "_response"
    body = '{"' + key + '": ' + inner + ', "sign": "' + signature + '"}'
    return WireResponse(status=200, headers=JSON_HEADERS, body=body.encode())


def fail(code: str, sub_code: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"code": code, "msg": "Business Failed"}
    if sub_code:
        out.update(sub_code=sub_code, sub_msg="x")
    return out


# --------------------------------------------------------------------------- golden requests

GOLDEN_PRECREATE_SIGNED = (
    "app_id=2021000000000001"
    '&biz_content={"out_trade_no":"att_pay123_1","total_amount":"10.99","subject":"Order 42"}'
    "&charset=utf-8&format=JSON&method=alipay.trade.precreate"
    "&notify_url=https://pay.example/callbacks/alipay"
    "&sign_type=RSA2&timestamp=2026-11-25 12:00:00&version=1.0"
)
GOLDEN_PRECREATE_BODY = (
    "app_id=2021000000000001"
    "&biz_content=%7B%22out_trade_no%22%3A%22att_pay123_1%22%2C%22total_amount%22%3A%2210.99%22"
    "%2C%22subject%22%3A%22Order+42%22%7D"
    "&charset=utf-8&format=JSON&method=alipay.trade.precreate"
    "&notify_url=https%3A%2F%2Fpay.example%2Fcallbacks%2Falipay"
    "&sign={sign}&sign_type=RSA2&timestamp=2026-11-25+12%3A00%3A00&version=1.0"
)


def test_golden_precreate_request_is_exact_and_signed_as_the_sdk_signs(adapter: AlipayAdapter, sdk_merchant: Any) -> None:
    req = adapter.build_authorize(authorize())
    assert req.method == "POST" and req.path == "/gateway.do"
    assert req.headers == {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    # PKCS#1 v1.5 is deterministic: the SDK signing the string we expect gives the very same bytes
    sign = sdk_merchant._sign(GOLDEN_PRECREATE_SIGNED)
    assert req.body.decode() == GOLDEN_PRECREATE_BODY.replace("{sign}", quote_plus(sign))


@pytest.mark.parametrize(
    ("build", "method", "biz", "notify"),
    [
        (
            lambda a: a.build_authorize(authorize(wallet={"flow": "barcode", "auth_code": "281234567890123456"})),
            "alipay.trade.pay",
            {"out_trade_no": "att_pay123_1", "total_amount": "10.99", "subject": "Order 42",
             "scene": "bar_code", "auth_code": "281234567890123456"},
            True,
        ),
        (lambda a: a.build_status("att_pay123_1", None), "alipay.trade.query", {"out_trade_no": "att_pay123_1"}, False),
        (
            lambda a: a.build_operation(operation("refund", 350)),
            "alipay.trade.refund",
            {"out_trade_no": "att_pay123_1", "refund_amount": "3.50", "out_request_no": "rk_pay123_1"},
            False,
        ),
        (lambda a: a.build_operation(operation("void")), "alipay.trade.close", {"out_trade_no": "att_pay123_1"}, False),
    ],
    ids=["pay", "query", "refund", "close"],
)
def test_golden_requests(
    adapter: AlipayAdapter, sdk_gateway: Any, build: Callable[[AlipayAdapter], WireRequest],
    method: str, biz: dict[str, str], notify: bool,
) -> None:
    req = build(adapter)
    params = form(req)
    expected = {
        "app_id": APP_ID, "method": method, "format": "JSON", "charset": "utf-8", "sign_type": "RSA2",
        "timestamp": "2026-11-25 12:00:00", "version": "1.0", "biz_content": json.dumps(biz, separators=(",", ":")),
    }
    if notify:
        expected["notify_url"] = "https://pay.example/callbacks/alipay"
    sign = params.pop("sign")
    assert params == expected
    assert list(form(req)) == sorted(form(req))  # the body is laid out in key order: stable bytes
    # peer: the SDK (as Alipay) verifies our signature over its own ordering of the same params
    unsigned = "&".join(f"{k}={v}" for k, v in sdk_gateway._ordered_data(dict(params)))
    assert sdk_gateway._verify(unsigned, sign)


def test_timestamp_is_shanghai_time_from_the_injected_clock(keys: Keys) -> None:
    creds = {"app_id": APP_ID, "app_private_key": keys.app_private_pkcs8, "alipay_public_key": keys.alipay_public}
    a = AlipayAdapter(creds, clock=lambda: datetime(2026, 12, 31, 20, 30, 5, tzinfo=UTC))
    assert form(a.build_status("r", None))["timestamp"] == "2027-01-01 04:30:05"


def test_keys_in_every_accepted_shape_sign_the_same(keys: Keys) -> None:
    def bare(pem: str) -> str:
        return "".join(line for line in pem.splitlines() if "-----" not in line)

    bodies = set()
    for private in (keys.app_private_pkcs1, keys.app_private_pkcs8, bare(keys.app_private_pkcs8),
                    keys.app_private_pkcs1.replace("\n", "\\n")):
        for public in (keys.alipay_public, bare(keys.alipay_public)):
            a = AlipayAdapter({"app_id": APP_ID, "app_private_key": private, "alipay_public_key": public}, clock=lambda: NOW)
            bodies.add(a.build_authorize(authorize()).body)
    assert len(bodies) == 1


def test_missing_credentials_are_named(keys: Keys) -> None:
    with pytest.raises(ValueError, match="app_private_key"):
        AlipayAdapter({"app_id": APP_ID, "alipay_public_key": keys.alipay_public})


def test_notify_url_is_omitted_when_absent(adapter: AlipayAdapter) -> None:
    assert "notify_url" not in form(adapter.build_authorize(authorize(notify_url=None)))


def test_subject_falls_back_to_reference(adapter: AlipayAdapter) -> None:
    biz = json.loads(form(adapter.build_authorize(authorize(description=None)))["biz_content"])
    assert biz["subject"] == "att_pay123_1"


@pytest.mark.parametrize(
    ("amount", "exponent", "text"),
    [(1099, 2, "10.99"), (5, 2, "0.05"), (100, 2, "1.00"), (10, 2, "0.10"), (7, 0, "7"), (1, 3, "0.001"),
     (12345678901234567890, 2, "123456789012345678.90")],
)
def test_major_units_is_exact(amount: int, exponent: int, text: str) -> None:
    assert major_units(amount, exponent) == text


def test_wire_amounts_are_exact_beyond_float_precision(adapter: AlipayAdapter) -> None:
    big = 2**53 + 1  # a float would round this
    biz = json.loads(form(adapter.build_authorize(authorize(amount=big)))["biz_content"])
    assert biz["total_amount"] == "90071992547409.93"
    refund = json.loads(form(adapter.build_operation(operation("refund", big)))["biz_content"])
    assert refund["refund_amount"] == "90071992547409.93"


@pytest.mark.parametrize("bad", [authorize(currency="USD"), authorize(exponent=0), authorize(method="card"),
                                 authorize(wallet={"flow": "jsapi", "openid": "o"}), authorize(wallet={"flow": "barcode"})])
def test_unsupported_requests_are_refused_clearly(adapter: AlipayAdapter, bad: ChannelAuthorize) -> None:
    with pytest.raises(IntegrationError):
        adapter.build_authorize(bad)


def test_capture_is_not_supported(adapter: AlipayAdapter, keys: Keys) -> None:
    assert "capture" not in adapter.capabilities().operations
    assert adapter.capabilities().methods == frozenset({"alipay"})
    from_config = AlipayAdapter(
        {"app_id": APP_ID, "app_private_key": keys.app_private_pkcs8, "alipay_public_key": keys.alipay_public},
        Capabilities(currencies=frozenset({"CNY"}), methods=frozenset({"alipay"})),
    )
    assert from_config.capabilities().operations == frozenset({"authorize", "void", "refund", "status"})
    with pytest.raises(IntegrationError, match="no capture"):
        adapter.build_operation(operation("capture"))


# --------------------------------------------------------------------------- idempotency and reference


def test_reference_is_out_trade_no_and_channel_key_is_out_request_no(adapter: AlipayAdapter) -> None:
    assert json.loads(form(adapter.build_authorize(authorize(reference="att_X_2")))["biz_content"])["out_trade_no"] == "att_X_2"
    assert json.loads(form(adapter.build_status("att_X_2", "ignored"))["biz_content"]) == {"out_trade_no": "att_X_2"}
    refund = json.loads(form(adapter.build_operation(operation("refund", key="rk_7")))["biz_content"])
    assert refund["out_request_no"] == "rk_7"


def test_same_attempt_builds_the_same_bytes_on_retry(adapter: AlipayAdapter) -> None:
    assert adapter.build_authorize(authorize()).body == adapter.build_authorize(authorize()).body
    assert adapter.build_authorize(authorize()).body != adapter.build_authorize(authorize(reference="att_pay123_2")).body


# --------------------------------------------------------------------------- code tables, one row each


@pytest.mark.parametrize(("sub_code", "outcome"), sorted(SUB_CODES.items()))
def test_sub_code_rows(adapter: AlipayAdapter, sdk_gateway: Any, sub_code: str, outcome: Outcome) -> None:
    code = "40002" if sub_code.startswith("isv.") else "40004"
    resp = signed(sdk_gateway, "alipay.trade.pay", fail(code, sub_code))
    assert_outcome(lambda: adapter.parse_authorize(resp), outcome, sub_code)


@pytest.mark.parametrize(("code", "outcome"), sorted(GATEWAY_CODES.items()))
def test_gateway_code_rows(adapter: AlipayAdapter, sdk_gateway: Any, code: str, outcome: Outcome) -> None:
    resp = signed(sdk_gateway, "alipay.trade.precreate", fail(code, "some.unlisted-sub-code"))
    assert_outcome(lambda: adapter.parse_authorize(resp), outcome, "some.unlisted-sub-code")


def assert_outcome(parse: Callable[[], ChannelResult], outcome: Outcome, code: str) -> None:
    if outcome is Outcome.UNKNOWN:
        with pytest.raises(OutcomeUnknown) as unknown:
            parse()
        assert unknown.value.code == code
        assert is_retryable(code) or code not in SUB_CODES
    elif outcome is Outcome.UNAVAILABLE:
        with pytest.raises(ChannelUnavailable) as unavailable:
            parse()
        assert unavailable.value.code == code
    else:
        result = parse()
        assert (result.outcome, result.code) == (outcome, code)
        assert not is_retryable(code)


def test_unknown_codes(adapter: AlipayAdapter, sdk_gateway: Any) -> None:
    assert classify("40004", "ACQ.SOMETHING_NEW") is Outcome.HARD_DECLINE  # unknown decline: the safe side
    with pytest.raises(OutcomeUnknown):  # unknown gateway code: it may have acted
        adapter.parse_authorize(signed(sdk_gateway, "alipay.trade.pay", fail("99999")))
    assert is_retryable("20000") and is_retryable("ACQ.SYSTEM_ERROR") and not is_retryable("ACQ.PAYMENT_FAIL")


def test_success_rows(adapter: AlipayAdapter, sdk_gateway: Any) -> None:
    pre = adapter.parse_authorize(signed(sdk_gateway, "alipay.trade.precreate",
                                         {"code": "10000", "msg": "Success", "out_trade_no": "r1", "qr_code": "https://qr.alipay.com/x"}))
    assert pre == ChannelResult(outcome=Outcome.REQUIRES_ACTION, channel_reference="r1", code="10000",
                                next_action={"type": "qr_code", "data": "https://qr.alipay.com/x"})
    paid = adapter.parse_authorize(signed(sdk_gateway, "alipay.trade.pay",
                                          {"code": "10000", "msg": "Success", "out_trade_no": "r1", "trade_no": "t1"}))
    assert (paid.outcome, paid.captured, paid.channel_reference) == (Outcome.APPROVED, True, "r1")
    waiting = adapter.parse_authorize(signed(sdk_gateway, "alipay.trade.pay", {"code": "10003", "out_trade_no": "r1"}))
    assert waiting.outcome is Outcome.PENDING


@pytest.mark.parametrize(
    ("trade_status", "outcome"),
    [("TRADE_SUCCESS", Outcome.APPROVED), ("TRADE_FINISHED", Outcome.APPROVED),
     ("WAIT_BUYER_PAY", Outcome.PENDING), ("TRADE_CLOSED", Outcome.HARD_DECLINE)],
)
def test_query_trade_status_rows(adapter: AlipayAdapter, sdk_gateway: Any, trade_status: str, outcome: Outcome) -> None:
    result = adapter.parse_status(signed(sdk_gateway, "alipay.trade.query",
                                         {"code": "10000", "out_trade_no": "r1", "trade_status": trade_status}))
    assert (result.outcome, result.code, result.captured) == (outcome, trade_status, outcome is Outcome.APPROVED)


def test_query_not_exist_is_not_charged_and_other_failures_are_unknown(adapter: AlipayAdapter, sdk_gateway: Any) -> None:
    assert adapter.parse_status(signed(sdk_gateway, "alipay.trade.query", fail("40004", "ACQ.TRADE_NOT_EXIST"))).outcome \
        is Outcome.NOT_CHARGED
    # a query that failed is not a decline of the payment
    for payload in (fail("40004", "ACQ.INVALID_PARAMETER"), fail("40002"), fail("20000")):
        with pytest.raises(OutcomeUnknown):
            adapter.parse_status(signed(sdk_gateway, "alipay.trade.query", payload))
    with pytest.raises(ChannelUnavailable):
        adapter.parse_status(signed(sdk_gateway, "alipay.trade.query", fail("20001")))


def test_refund_needs_fund_change_y(adapter: AlipayAdapter, sdk_gateway: Any) -> None:
    op = operation("refund")
    ok = adapter.parse_operation(op, signed(sdk_gateway, "alipay.trade.refund",
                                            {"code": "10000", "out_trade_no": "att_pay123_1", "fund_change": "Y"}))
    assert (ok.outcome, ok.channel_reference) == (Outcome.APPROVED, "rk_pay123_1")
    for flag in ("N", None):
        with pytest.raises(OutcomeUnknown):
            adapter.parse_operation(op, signed(sdk_gateway, "alipay.trade.refund",
                                               {"code": "10000", "out_trade_no": "att_pay123_1", "fund_change": flag}))
    with pytest.raises(OutcomeUnknown, match="another trade"):
        adapter.parse_operation(op, signed(sdk_gateway, "alipay.trade.refund",
                                           {"code": "10000", "out_trade_no": "other", "fund_change": "Y"}))


# --------------------------------------------------------------------------- hostile responses


def test_bad_http_answers(adapter: AlipayAdapter, sdk_gateway: Any) -> None:
    good = signed(sdk_gateway, "alipay.trade.pay", {"code": "10000", "out_trade_no": "r1"})
    for status in (500, 502, 503, 504, 404, 400, 302, 201):
        with pytest.raises(OutcomeUnknown):
            adapter.parse_authorize(WireResponse(status=status, headers=good.headers, body=good.body))
    with pytest.raises(ChannelUnavailable):
        adapter.parse_authorize(WireResponse(status=429, headers=good.headers, body=good.body))
    for headers in ({"Content-Type": "application/xml"}, {"Content-Type": "image/png"}, {}):
        with pytest.raises(OutcomeUnknown, match="alipay answered"):
            adapter.parse_authorize(WireResponse(status=200, headers=headers, body=good.body))
    assert adapter.parse_authorize(WireResponse(status=200, headers={"content-type": "application/json"}, body=good.body)).outcome \
        is Outcome.APPROVED


def _bodies(sdk_gateway: Any) -> dict[str, bytes]:
    good = signed(sdk_gateway, "alipay.trade.pay", {"code": "10000", "out_trade_no": "r1"}).body
    inner = '{"code":"10000","out_trade_no":"r1"}'
    sig = sdk_gateway._sign(inner)
    return {
        "empty": b"",
        "non_json": b"<html>502 Bad Gateway</html>",
        "truncated": good[: len(good) // 2],
        "array": b"[]",
        "trailing_garbage": good + b"x",
        "unsigned": b'{"alipay_trade_pay_response": ' + inner.encode() + b"}",
        "null_sign": b'{"alipay_trade_pay_response": ' + inner.encode() + b', "sign": null}',
        "numeric_sign": b'{"alipay_trade_pay_response": ' + inner.encode() + b', "sign": 7}',
        "not_base64_sign": b'{"alipay_trade_pay_response": ' + inner.encode() + b', "sign": "%%%"}',
        "signed_by_app_key": signed(sdk_gateway, "x", {}).body,  # placeholder replaced below
        "reserialized": b'{"alipay_trade_pay_response": {"code": "10000", "out_trade_no": "r1"}, "sign": "' + sig.encode() + b'"}',
        "tampered_value": good.replace(b'"r1"', b'"r2"'),
        "wrong_key": good.replace(b"alipay_trade_pay_response", b"alipay_trade_query_response"),
        "two_responses": b'{"alipay_trade_pay_response": ' + inner.encode() + b', "alipay_trade_precreate_response": '
        + inner.encode() + b', "sign": "' + sig.encode() + b'"}',
        "duplicate_member": b'{"alipay_trade_pay_response": {"code":"40004"}, "alipay_trade_pay_response": '
        + inner.encode() + b', "sign": "' + sig.encode() + b'"}',
        "missing_code": b'{"alipay_trade_pay_response": {"out_trade_no":"r1"}, "sign": "'
        + sdk_gateway._sign('{"out_trade_no":"r1"}').encode() + b'"}',
        "numeric_code": b'{"alipay_trade_pay_response": {"code":10000,"out_trade_no":"r1"}, "sign": "'
        + sdk_gateway._sign('{"code":10000,"out_trade_no":"r1"}').encode() + b'"}',
        "response_not_object": b'{"alipay_trade_pay_response": "x", "sign": "' + sdk_gateway._sign('"x"').encode() + b'"}',
    }


def test_unreadable_or_unverifiable_responses_are_unknown(adapter: AlipayAdapter, sdk_gateway: Any, sdk_merchant: Any) -> None:
    bodies = _bodies(sdk_gateway)
    inner = '{"code":"10000","out_trade_no":"r1"}'
    bodies["signed_by_app_key"] = (b'{"alipay_trade_pay_response": ' + inner.encode()
                                   + b', "sign": "' + sdk_merchant._sign(inner).encode() + b'"}')
    for name, body in bodies.items():
        with pytest.raises(OutcomeUnknown):
            adapter.parse_authorize(WireResponse(status=200, headers=JSON_HEADERS, body=body))
            pytest.fail(f"{name} was accepted")


def test_missing_success_fields_are_unknown(adapter: AlipayAdapter, sdk_gateway: Any) -> None:
    cases = [
        ("alipay.trade.precreate", {"code": "10000", "out_trade_no": "r1"}, adapter.parse_authorize),
        ("alipay.trade.precreate", {"code": "10000", "qr_code": "q"}, adapter.parse_authorize),
        ("alipay.trade.precreate", {"code": "10003", "out_trade_no": "r1"}, adapter.parse_authorize),
        ("alipay.trade.pay", {"code": "10000"}, adapter.parse_authorize),
        ("alipay.trade.pay", {"code": "10000", "out_trade_no": "r1", "trade_status": "TRADE_CLOSED"}, adapter.parse_authorize),
        ("alipay.trade.query", {"code": "10000", "out_trade_no": "r1"}, adapter.parse_status),
        ("alipay.trade.query", {"code": "10000", "trade_status": "TRADE_SUCCESS"}, adapter.parse_status),
        ("alipay.trade.query", {"code": "10000", "out_trade_no": "r1", "trade_status": "TRADE_PAID_MAYBE"}, adapter.parse_status),
    ]
    for method, payload, parse in cases:
        with pytest.raises(OutcomeUnknown):
            parse(signed(sdk_gateway, method, payload))


def test_braces_and_keys_inside_strings_do_not_move_the_signed_substring(adapter: AlipayAdapter, sdk_gateway: Any) -> None:
    payload = {"code": "40004", "msg": 'a } "alipay_trade_pay_response": {', "sub_code": "ACQ.PAYMENT_FAIL",
               "sub_msg": "\\\"}{ 支付失败"}
    resp = signed(sdk_gateway, "alipay.trade.pay", payload)
    # what the SDK cannot do: its brace counter ignores strings, so it extracts the wrong bytes
    assert sdk_gateway._get_string_to_be_signed(resp.body.decode(), "alipay_trade_pay_response") != json.dumps(
        payload, ensure_ascii=False)
    result = adapter.parse_authorize(resp)
    assert (result.outcome, result.code) == (Outcome.HARD_DECLINE, "ACQ.PAYMENT_FAIL")


def test_error_response_member_is_read_when_signed(adapter: AlipayAdapter, sdk_gateway: Any) -> None:
    resp = signed(sdk_gateway, "error", fail("40002", "isv.invalid-app-id"))
    with pytest.raises(ChannelUnavailable):
        adapter.parse_authorize(resp)


@settings(max_examples=200, deadline=None)
@given(body=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                      st.recursive(st.none() | st.text(max_size=5) | st.integers(),
                                   lambda c: st.dictionaries(st.sampled_from(
                                       ["alipay_trade_pay_response", "alipay_trade_query_response", "sign", "code",
                                        "out_trade_no", "trade_status", "qr_code"]), c, max_size=4), max_leaves=8)
                      .map(lambda v: json.dumps(v).encode())))
def test_fuzzed_bodies_never_crash_and_never_approve(keys: Keys, body: bytes) -> None:
    a = AlipayAdapter({"app_id": APP_ID, "app_private_key": keys.app_private_pkcs8,
                       "alipay_public_key": keys.alipay_public}, clock=lambda: NOW)
    resp = WireResponse(status=200, headers=JSON_HEADERS, body=body)
    for parse in (a.parse_authorize, a.parse_status, lambda r: a.parse_operation(operation("refund"), r)):
        with pytest.raises((OutcomeUnknown, ChannelUnavailable)):
            parse(resp)


# --------------------------------------------------------------------------- notifications


def notify_params(**over: str) -> dict[str, str]:
    params = {
        "notify_time": "2026-11-25 12:01:00", "notify_type": "trade_status_sync", "notify_id": "nid-1",
        "app_id": APP_ID, "charset": "utf-8", "version": "1.0", "trade_no": "2026112522001400000001",
        "out_trade_no": "att_pay123_1", "trade_status": "TRADE_SUCCESS", "total_amount": "10.99",
        "subject": "Order 42 & more = 支付",
    }
    params.update(over)
    return params


def sdk_signed_notify(sdk_gateway: Any, params: dict[str, str]) -> bytes:
    """Alipay's notify rule, with the SDK's own ordering and signer: all params but sign/sign_type."""
    unsigned = "&".join(f"{k}={v}" for k, v in sdk_gateway._ordered_data(dict(params)))
    return urlencode({**params, "sign": sdk_gateway._sign(unsigned), "sign_type": "RSA2"}).encode()


def test_sdk_signed_notify_verifies_with_ours(adapter: AlipayAdapter, sdk_gateway: Any) -> None:
    event, ack = adapter.parse_callback(FORM, sdk_signed_notify(sdk_gateway, notify_params()))
    assert (event.event_id, event.reference, event.kind) == ("nid-1", "att_pay123_1", "authorization")
    assert (event.result.outcome, event.result.captured) == (Outcome.APPROVED, True)
    assert ack == WireResponse(status=200, headers={"Content-Type": "text/plain; charset=utf-8"}, body=b"success")


def test_fake_signed_notify_verifies_with_the_sdk_and_ours(adapter: AlipayAdapter, keys: Keys, sdk_merchant: Any) -> None:
    fake = AlipayFake(APP_ID, keys.app.public_key(), keys.alipay)
    fake._precreate({"out_trade_no": "att_pay123_1", "total_amount": "10.99"})
    fake.mark_paid("att_pay123_1")
    body = fake.notify_form("att_pay123_1")
    params = dict(parse_qsl(body.decode()))
    sign = params.pop("sign")
    assert sdk_merchant.verify(dict(params), sign)  # the SDK's notify check (it drops sign_type itself)
    assert adapter.parse_callback(FORM, body)[0].result.outcome is Outcome.APPROVED
    params["total_amount"] = "0.01"
    assert not sdk_merchant.verify(dict(params), sign)


@pytest.mark.parametrize(
    ("over", "kind", "outcome"),
    [({"trade_status": "TRADE_FINISHED"}, "authorization", Outcome.APPROVED),
     ({"trade_status": "WAIT_BUYER_PAY"}, "authorization", Outcome.PENDING),
     ({"trade_status": "TRADE_CLOSED"}, "authorization", Outcome.HARD_DECLINE),
     ({"trade_status": "TRADE_SUCCESS", "refund_fee": "3.00", "gmt_refund": "2026-11-25 12:05:00", "out_biz_no": "rk_1"},
      "refund", Outcome.APPROVED),
     ({"trade_status": "TRADE_CLOSED", "refund_fee": "10.99", "out_biz_no": "rk_2"}, "refund", Outcome.APPROVED)],
)
def test_notify_status_rows(adapter: AlipayAdapter, sdk_gateway: Any, over: dict[str, str], kind: str, outcome: Outcome) -> None:
    event, _ = adapter.parse_callback(FORM, sdk_signed_notify(sdk_gateway, notify_params(**over)))
    assert (event.kind, event.result.outcome) == (kind, outcome)


def test_hostile_notifications_are_rejected(adapter: AlipayAdapter, sdk_gateway: Any, sdk_merchant: Any) -> None:
    good = sdk_signed_notify(sdk_gateway, notify_params())
    params = dict(parse_qsl(good.decode()))
    cases: dict[str, tuple[dict[str, str], bytes]] = {
        "json_type": ({"Content-Type": "application/json"}, good),
        "no_type": ({}, good),
        "tampered": (FORM, urlencode({**params, "total_amount": "0.01"}).encode()),
        "added_param": (FORM, urlencode({**params, "extra": "1"}).encode()),
        "no_sign": (FORM, urlencode({k: v for k, v in params.items() if k != "sign"}).encode()),
        "rsa1": (FORM, urlencode({**params, "sign_type": "RSA"}).encode()),
        "no_sign_type": (FORM, urlencode({k: v for k, v in params.items() if k != "sign_type"}).encode()),
        "other_app": (FORM, sdk_signed_notify(sdk_gateway, notify_params(app_id="2021000000009999"))),
        "signed_by_app_key": (FORM, sdk_signed_notify(sdk_merchant, notify_params())),
        "unknown_status": (FORM, sdk_signed_notify(sdk_gateway, notify_params(trade_status="TRADE_MAYBE"))),
        "no_notify_id": (FORM, sdk_signed_notify(sdk_gateway, {k: v for k, v in notify_params().items() if k != "notify_id"})),
        "gbk": (FORM, sdk_signed_notify(sdk_gateway, notify_params(charset="gbk"))),
        "not_utf8": (FORM, b"\xff\xfe=1"),
        "duplicate": (FORM, good + b"&trade_status=TRADE_SUCCESS"),
        "not_a_form": (FORM, b"{}"),
        "empty": (FORM, b""),
    }
    for name, (headers, body) in cases.items():
        with pytest.raises(CallbackRejected):
            adapter.parse_callback(headers, body)
            pytest.fail(f"{name} was accepted")


# --------------------------------------------------------------------------- SDK as the signing peer


def test_sdk_signed_request_verifies_with_ours(keys: Keys, sdk_merchant: Any) -> None:
    query = sdk_merchant.client_api("alipay.trade.precreate", biz_content={"out_trade_no": "o1", "total_amount": "10.99",
                                                                           "subject": "中文 & = +"},
                                    notify_url="https://pay.example/cb")
    params = dict(parse_qsl(query, strict_parsing=True))
    assert rsa2_verify(keys.app.public_key(), request_signing_string(params).encode(), params["sign"])
    params["biz_content"] = params["biz_content"].replace("10.99", "0.01")
    assert not rsa2_verify(keys.app.public_key(), request_signing_string(params).encode(), params["sign"])


def test_sdk_verifies_responses_we_accept_and_we_refuse_what_it_refuses(
    adapter: AlipayAdapter, sdk_gateway: Any, sdk_merchant: Any
) -> None:
    resp = signed(sdk_gateway, "alipay.trade.query",
                  {"code": "10000", "out_trade_no": "r1", "trade_status": "TRADE_SUCCESS", "buyer_logon_id": "a***@x.cn"})
    assert sdk_merchant._verify_and_return_sync_response(resp.body.decode(), "alipay_trade_query_response")["code"] == "10000"
    assert adapter.parse_status(resp).outcome is Outcome.APPROVED
    bad = WireResponse(status=200, headers=JSON_HEADERS, body=resp.body.replace(b"TRADE_SUCCESS", b"TRADE_FINISHED"))
    with pytest.raises(AliPayValidationError):
        sdk_merchant._verify_and_return_sync_response(bad.body.decode(), "alipay_trade_query_response")
    with pytest.raises(OutcomeUnknown):
        adapter.parse_status(bad)


# --------------------------------------------------------------------------- lifecycle through the fake

Send = Callable[[WireRequest], Awaitable[WireResponse]]


@pytest.fixture
async def fake(keys: Keys) -> AsyncIterator[tuple[AlipayFake, str]]:
    fake = AlipayFake(APP_ID, keys.app.public_key(), keys.alipay)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield fake, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


@pytest.fixture
async def send(fake: tuple[AlipayFake, str]) -> AsyncIterator[Send]:
    base = fake[1]
    async with aiohttp.ClientSession() as session:
        async def _send(req: WireRequest) -> WireResponse:
            async with session.request(req.method, base + req.path, headers=req.headers, data=req.body) as r:
                return WireResponse(status=r.status, headers=dict(r.headers), body=await r.read())

        yield _send


async def test_qr_lifecycle_with_partial_refunds(adapter: AlipayAdapter, fake: tuple[AlipayFake, str], send: Send) -> None:
    gw, _ = fake
    pre = adapter.parse_authorize(await send(adapter.build_authorize(authorize())))
    assert pre.outcome is Outcome.REQUIRES_ACTION and pre.next_action and pre.next_action["type"] == "qr_code"
    assert pre.next_action["data"].startswith("https://qr.alipay.com/")
    assert gw.requests[-1]["notify_url"] == "https://pay.example/callbacks/alipay"
    assert (await _status(adapter, send)).outcome is Outcome.PENDING

    gw.mark_paid("att_pay123_1")
    paid = await _status(adapter, send)
    assert (paid.outcome, paid.captured, paid.channel_reference) == (Outcome.APPROVED, True, "att_pay123_1")

    async def refund(amount: int, key: str) -> ChannelResult:
        op = operation("refund", amount, key)
        return adapter.parse_operation(op, await send(adapter.build_operation(op)))

    assert (await refund(300, "rk_1")).outcome is Outcome.APPROVED
    assert (await refund(500, "rk_2")).outcome is Outcome.APPROVED
    with pytest.raises(OutcomeUnknown):  # a replayed refund: Alipay answers fund_change=N
        await refund(300, "rk_1")
    over = await refund(300, "rk_3")  # 800 + 300 > 1099
    assert (over.outcome, over.code) == (Outcome.HARD_DECLINE, "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL")
    assert (await refund(299, "rk_4")).outcome is Outcome.APPROVED
    trade = gw.trades["att_pay123_1"]
    assert (trade.refunded, trade.status) == (trade.total, "TRADE_CLOSED")
    closed = await refund(1, "rk_5")
    assert (closed.outcome, closed.code) == (Outcome.HARD_DECLINE, "ACQ.TRADE_HAS_CLOSE")
    assert trade.refunded == trade.total  # never more than the total


async def _status(adapter: AlipayAdapter, send: Send, reference: str = "att_pay123_1") -> ChannelResult:
    return adapter.parse_status(await send(adapter.build_status(reference, None)))


async def test_close_unpaid_and_refuse_closing_paid(adapter: AlipayAdapter, fake: tuple[AlipayFake, str], send: Send) -> None:
    gw, _ = fake
    await send(adapter.build_authorize(authorize()))
    void = operation("void")
    assert adapter.parse_operation(void, await send(adapter.build_operation(void))).outcome is Outcome.APPROVED
    assert (await _status(adapter, send)).outcome is Outcome.HARD_DECLINE
    await send(adapter.build_authorize(authorize(reference="att_paid_1")))
    gw.mark_paid("att_paid_1")
    paid_void = ChannelOperation(kind="void", payment_id="p", channel_reference="att_paid_1", channel_key="k", amount=0, currency="CNY")
    refused = adapter.parse_operation(paid_void, await send(adapter.build_operation(paid_void)))
    assert (refused.outcome, refused.code) == (Outcome.HARD_DECLINE, "ACQ.TRADE_STATUS_ERROR")


async def test_unknown_trade_is_not_charged(adapter: AlipayAdapter, send: Send) -> None:
    result = await _status(adapter, send, "att_never_sent")
    assert (result.outcome, result.code) == (Outcome.NOT_CHARGED, "ACQ.TRADE_NOT_EXIST")


async def test_tampered_response_signature_is_unknown(adapter: AlipayAdapter, fake: tuple[AlipayFake, str], send: Send) -> None:
    gw, _ = fake
    gw.tamper_next = True
    with pytest.raises(OutcomeUnknown) as exc:
        adapter.parse_authorize(await send(adapter.build_authorize(authorize())))
    assert exc.value.code == "bad_signature"
    assert "att_pay123_1" in gw.trades  # it was processed: exactly why this must not fail over
    gw.tamper_next = True
    with pytest.raises(OutcomeUnknown):
        await _status(adapter, send)


async def test_barcode_pay_through_the_fake(adapter: AlipayAdapter, fake: tuple[AlipayFake, str], send: Send) -> None:
    gw, _ = fake

    async def pay(reference: str, auth_code: str) -> ChannelResult:
        req = authorize(reference=reference, wallet={"flow": "barcode", "auth_code": auth_code})
        return adapter.parse_authorize(await send(adapter.build_authorize(req)))

    ok = await pay("att_bar_1", "281234567890123456")
    assert (ok.outcome, ok.captured) == (Outcome.APPROVED, True)
    with pytest.raises(OutcomeUnknown):  # a retry of a paid trade: ACQ.TRADE_HAS_SUCCESS
        await pay("att_bar_1", "281234567890123456")
    assert (await _status(adapter, send, "att_bar_1")).outcome is Outcome.APPROVED
    gw.pay_script["289999999999999999"] = "wait"
    assert (await pay("att_bar_2", "289999999999999999")).outcome is Outcome.PENDING
    gw.pay_script["288888888888888888"] = "ACQ.BUYER_BALANCE_NOT_ENOUGH"
    poor = await pay("att_bar_3", "288888888888888888")
    assert (poor.outcome, poor.code) == (Outcome.HARD_DECLINE, "ACQ.BUYER_BALANCE_NOT_ENOUGH")
    bad = await pay("att_bar_4", "not-a-code")
    assert (bad.outcome, bad.code) == (Outcome.HARD_DECLINE, "ACQ.PAYMENT_AUTH_CODE_INVALID")


async def test_wrong_app_key_is_refused_by_the_fake_as_unavailable(keys: Keys, send: Send) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    a = AlipayAdapter({"app_id": APP_ID, "app_private_key": _pem_private(other, serialization.PrivateFormat.PKCS8),
                       "alipay_public_key": keys.alipay_public}, clock=lambda: NOW)
    with pytest.raises(ChannelUnavailable) as exc:
        a.parse_authorize(await send(a.build_authorize(authorize())))
    assert exc.value.code == "isv.invalid-signature"


async def test_sdk_signed_request_is_accepted_by_the_fake(sdk_merchant: Any, fake: tuple[AlipayFake, str], send: Send) -> None:
    gw, _ = fake
    query = sdk_merchant.client_api("alipay.trade.precreate",
                                    biz_content={"out_trade_no": "sdk_1", "total_amount": "1.00", "subject": "sdk"})
    resp = await send(WireRequest(method="POST", path="/gateway.do", headers=FORM, body=query.encode()))
    assert "sdk_1" in gw.trades
    assert sdk_merchant._verify_and_return_sync_response(resp.body.decode(), "alipay_trade_precreate_response")["code"] == "10000"


async def test_fake_notification_round_trip(adapter: AlipayAdapter, fake: tuple[AlipayFake, str], send: Send) -> None:
    gw, _ = fake
    await send(adapter.build_authorize(authorize()))
    gw.mark_paid("att_pay123_1")
    event, ack = adapter.parse_callback(FORM, gw.notify_form("att_pay123_1"))
    assert (event.reference, event.result.outcome, ack.body) == ("att_pay123_1", Outcome.APPROVED, b"success")
