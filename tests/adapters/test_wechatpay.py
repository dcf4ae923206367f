"""The WeChat Pay API v3 adapter: golden requests, code tables, hostile answers, callbacks, peers.

Peers: the wechatpayv3 SDK's primitives (`build_authorization`, `rsa_sign`, `rsa_verify`,
`aes_decrypt`, `Core.sign`, `Core.callback`) and a protocol fake on loopback (tests/adapters/wechatpay_fake.py).
Keys are generated per session with cryptography; the clock and nonce source are injected.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from adapters.wechatpay import codes, wire
from adapters.wechatpay.adapter import ACK, REQUIRED_CREDENTIALS, WechatpayAdapter
from router.errors import CallbackRejected, ChannelUnavailable, OutcomeUnknown
from router.model import ChannelAuthorize, ChannelOperation, ChannelResult, Outcome, WireRequest, WireResponse
from tests.adapters.wechatpay_fake import WechatpayFake

with warnings.catch_warnings():
    # the SDK imports `requests`; keep any import-time deprecation noise from failing collection
    warnings.simplefilter("ignore", DeprecationWarning)
    from wechatpayv3 import utils as sdk
    from wechatpayv3.core import Core

NOW = 1_764_000_000  # 2025-11-24T16:00:00Z; everything here uses this clock
MCHID, APPID = "1900000109", "wxd678efh567hg6787"
MERCHANT_SERIAL, PLATFORM_SERIAL = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1", "7132D72A03E93CDDF8C03BBD1F37EEDF"
APIV3_KEY = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"  # 32 ASCII bytes, like a real API v3 key
NOTIFY = "https://payroute.example.com/callbacks/wechat"
REFERENCE = "pay_0193f5c2a1b8e6d0c4f2a9b7e3d1-a1"  # the pipeline's shape: 36 chars, longer than 32
OUT_NO = hashlib.sha256(REFERENCE.encode()).hexdigest()[:32]


def _pem_private(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _pem_public(key: rsa.RSAPublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture(scope="session")
def merchant_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def platform_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def creds(merchant_key: rsa.RSAPrivateKey, platform_key: rsa.RSAPrivateKey) -> dict[str, str]:
    return {
        "mchid": MCHID,
        "appid": APPID,
        "merchant_serial_no": MERCHANT_SERIAL,
        "merchant_private_key": _pem_private(merchant_key),
        "platform_public_key": _pem_public(platform_key.public_key()),
        "platform_serial_no": PLATFORM_SERIAL,
        "apiv3_key": APIV3_KEY,
    }


def nonces() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"NONCE{next(counter):04d}"


@pytest.fixture
def adapter(creds: dict[str, str]) -> WechatpayAdapter:
    return WechatpayAdapter(creds, clock=lambda: NOW + 0.75, nonce=nonces())


def authorize(**over: Any) -> ChannelAuthorize:
    fields: dict[str, Any] = dict(
        payment_id="pay_0193f5c2a1b8e6d0c4f2a9b7e3d1", attempt=1, channel_key=REFERENCE, reference=REFERENCE,
        amount=1099, currency="CNY", exponent=2, country="CN", capture=True, card=None, method="wechatpay",
        wallet={"flow": "native"}, notify_url=NOTIFY, description="Order 42",
    )
    fields.update(over)
    return ChannelAuthorize(**fields)


def operation(kind: str, **over: Any) -> ChannelOperation:
    fields: dict[str, Any] = dict(
        kind=kind, payment_id="pay_x", channel_reference=OUT_NO, channel_key="pay_x-refund-1", amount=1099, currency="CNY"
    )
    fields.update(over)
    return ChannelOperation(**fields)


def signed(
    platform_key: rsa.RSAPrivateKey, status: int, doc: Any = None, *, body: bytes | None = None,
    extra: dict[str, str] | None = None,
) -> WireResponse:
    """A response as WeChat signs it (the signature made with the SDK's rsa_sign, not ours)."""
    raw = body if body is not None else (json.dumps(doc, ensure_ascii=False).encode() if doc is not None else b"")
    h = {
        "Content-Type": "application/json",
        "Wechatpay-Timestamp": str(NOW),
        "Wechatpay-Nonce": "respnonce",
        "Wechatpay-Serial": PLATFORM_SERIAL,
        "Wechatpay-Signature-Type": "WECHATPAY2-SHA256-RSA2048",
        "Wechatpay-Signature": sdk.rsa_sign(platform_key, f"{NOW}\nrespnonce\n{raw.decode()}\n"),
    }
    h.update(extra or {})
    return WireResponse(status=status, headers=h, body=raw)


def tx(state: str, **over: Any) -> dict[str, Any]:
    doc = {"appid": APPID, "mchid": MCHID, "out_trade_no": OUT_NO, "trade_state": state, "attach": REFERENCE,
           "trade_state_desc": "desc", "amount": {"total": 1099, "currency": "CNY"}}
    if state in ("SUCCESS", "REFUND"):
        doc["transaction_id"] = "4200000000000000000000000001"
    doc.update(over)
    return doc


# --------------------------------------------------------------------------- golden requests


def test_golden_native(adapter: WechatpayAdapter, merchant_key: rsa.RSAPrivateKey) -> None:
    wr = adapter.build_authorize(authorize())
    body = (
        '{"appid":"wxd678efh567hg6787","mchid":"1900000109","description":"Order 42",'
        f'"out_trade_no":"{OUT_NO}","notify_url":"{NOTIFY}",'
        '"amount":{"total":1099,"currency":"CNY"},"attach":"pay_0193f5c2a1b8e6d0c4f2a9b7e3d1-a1"}'
    ).encode()
    assert (wr.method, wr.path, wr.body) == ("POST", "/v3/pay/transactions/native", body)
    sign_str = f"POST\n/v3/pay/transactions/native\n{NOW}\nNONCE0001\n{body.decode()}\n"
    signature = sdk.rsa_sign(merchant_key, sign_str)  # computed by the SDK from the literal sign string
    assert wr.headers == {
        "Accept": "application/json",
        "Content-Type": "application/json",
        "User-Agent": "payroute-wechatpay/1",
        "Authorization": f'WECHATPAY2-SHA256-RSA2048 mchid="{MCHID}",nonce_str="NONCE0001",signature="{signature}",'
        f'timestamp="{NOW}",serial_no="{MERCHANT_SERIAL}"',
    }


def test_golden_jsapi(adapter: WechatpayAdapter, merchant_key: rsa.RSAPrivateKey) -> None:
    wr = adapter.build_authorize(authorize(wallet={"flow": "jsapi", "openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"}, amount=1))
    assert wr.path == "/v3/pay/transactions/jsapi"
    assert json.loads(wr.body) == {
        "appid": APPID, "mchid": MCHID, "description": "Order 42", "out_trade_no": OUT_NO, "notify_url": NOTIFY,
        "amount": {"total": 1, "currency": "CNY"}, "attach": REFERENCE, "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
    }
    fields = wire.parse_authorization(wr.headers["Authorization"])
    assert fields is not None
    assert sdk.rsa_verify(  # the SDK's verifier over the request sign string (method/path folded into the first line)
        f"POST\n{wr.path}", f"{NOW}\n{fields['nonce_str']}", wr.body.decode(), fields["signature"], merchant_key.public_key()
    )


def test_golden_status_close_refund(adapter: WechatpayAdapter, merchant_key: rsa.RSAPrivateKey) -> None:
    st = adapter.build_status(REFERENCE, None)
    assert (st.method, st.path, st.body) == ("GET", f"/v3/pay/transactions/out-trade-no/{OUT_NO}?mchid={MCHID}", b"")
    assert "Content-Type" not in st.headers
    sig = sdk.rsa_sign(merchant_key, f"GET\n{st.path}\n{NOW}\nNONCE0001\n\n")
    assert f'signature="{sig}"' in st.headers["Authorization"]

    close = adapter.build_operation(operation("void"))
    assert (close.method, close.path, close.body) == (
        "POST", f"/v3/pay/transactions/out-trade-no/{OUT_NO}/close", b'{"mchid":"1900000109"}'
    )
    refund = adapter.build_operation(operation("refund"))
    assert (refund.method, refund.path) == ("POST", "/v3/refund/domestic/refunds")
    assert refund.body == (
        f'{{"out_trade_no":"{OUT_NO}","out_refund_no":"pay_x-refund-1",'
        '"amount":{"refund":1099,"total":1099,"currency":"CNY"}}'
    ).encode()


def test_capture_is_not_offered(adapter: WechatpayAdapter) -> None:
    assert "capture" not in adapter.capabilities().operations
    assert adapter.capabilities().methods == frozenset({"wechatpay"})
    with pytest.raises(ValueError):
        adapter.build_operation(operation("capture"))


def test_reference_and_idempotency_derivation(adapter: WechatpayAdapter) -> None:
    a, b = adapter.build_authorize(authorize()), adapter.build_authorize(authorize())
    assert a.body == b.body  # same attempt -> same order: WeChat dedups by out_trade_no
    assert json.loads(a.body)["out_trade_no"] == OUT_NO and len(OUT_NO) == 32
    assert json.loads(a.body)["attach"] == REFERENCE  # the reference comes back in queries and callbacks
    assert f"/{OUT_NO}?" in adapter.build_status(REFERENCE, None).path  # a query after a timeout finds it
    other = adapter.build_authorize(authorize(reference=REFERENCE[:-1] + "2"))
    assert json.loads(other.body)["out_trade_no"] != OUT_NO
    short = adapter.build_authorize(authorize(reference="order_2024-0001"))
    assert json.loads(short.body)["out_trade_no"] == "order_2024-0001"  # fits: used as is
    assert json.loads(adapter.build_operation(operation("refund", channel_key="k-77")).body)["out_refund_no"] == "k-77"


def test_amount_is_exact(adapter: WechatpayAdapter) -> None:
    assert json.loads(adapter.build_authorize(authorize(amount=123456789012)).body)["amount"]["total"] == 123456789012
    assert json.loads(adapter.build_authorize(authorize(amount=7, exponent=0)).body)["amount"]["total"] == 700
    assert json.loads(adapter.build_authorize(authorize(amount=1230, exponent=3)).body)["amount"]["total"] == 123
    with pytest.raises(ValueError):
        adapter.build_authorize(authorize(amount=1231, exponent=3))


@pytest.mark.parametrize(
    "over",
    [
        {"currency": "USD"},
        {"method": "card"},
        {"notify_url": None},
        {"wallet": {"flow": "jsapi"}},
        {"wallet": {"flow": "redirect"}},
    ],
)
def test_unbuildable_requests_raise_before_sending(adapter: WechatpayAdapter, over: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        adapter.build_authorize(authorize(**over))


def test_description_is_cut_to_127_bytes_on_a_character_boundary(adapter: WechatpayAdapter) -> None:
    desc = json.loads(adapter.build_authorize(authorize(description="商品" * 100)).body)["description"]
    assert len(desc.encode()) <= 127 and desc == "商品" * 21  # 42 chars * 3 bytes = 126


def test_credentials_are_checked(creds: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="apiv3_key"):
        WechatpayAdapter({**creds, "apiv3_key": "short"})
    with pytest.raises(ValueError, match="platform_serial_no"):
        WechatpayAdapter({k: v for k, v in creds.items() if k != "platform_serial_no"})
    # PEMs pasted into env vars with literal "\n" still load
    escaped = {**creds, "merchant_private_key": creds["merchant_private_key"].replace("\n", "\\n")}
    WechatpayAdapter(escaped)


# --------------------------------------------------------------------------- responses


def test_native_answer_requires_action(adapter: WechatpayAdapter, platform_key: rsa.RSAPrivateKey) -> None:
    r = adapter.parse_authorize(signed(platform_key, 200, {"code_url": "weixin://wxpay/bizpayurl?pr=p4lpSuKzz"}))
    assert r.outcome is Outcome.REQUIRES_ACTION
    assert r.next_action == {"type": "qr_code", "data": "weixin://wxpay/bizpayurl?pr=p4lpSuKzz"}


def test_jsapi_answer_carries_pay_sign(
    adapter: WechatpayAdapter, merchant_key: rsa.RSAPrivateKey, platform_key: rsa.RSAPrivateKey
) -> None:
    r = adapter.parse_authorize(signed(platform_key, 200, {"prepay_id": "wx201410272009395522657a690389285100"}))
    assert r.outcome is Outcome.REQUIRES_ACTION and r.next_action is not None
    na = r.next_action
    assert {k: na[k] for k in ("type", "prepay_id", "appId", "timeStamp", "package", "signType")} == {
        "type": "jsapi", "prepay_id": "wx201410272009395522657a690389285100", "appId": APPID, "timeStamp": str(NOW),
        "package": "prepay_id=wx201410272009395522657a690389285100", "signType": "RSA",
    }
    # the SDK's own JSAPI signer (Core.sign) over the same four values gives the same paySign
    core = Core(MCHID, MERCHANT_SERIAL, _pem_private(merchant_key), APIV3_KEY,
                public_key=_pem_public(platform_key.public_key()), public_key_id=PLATFORM_SERIAL)
    assert na["paySign"] == core.sign([APPID, na["timeStamp"], na["nonceStr"], na["package"]])


@pytest.mark.parametrize(
    ("state", "outcome", "captured"),
    [
        ("SUCCESS", Outcome.APPROVED, True),
        ("REFUND", Outcome.APPROVED, True),
        ("NOTPAY", Outcome.REQUIRES_ACTION, False),
        ("USERPAYING", Outcome.PENDING, False),
        ("ACCEPT", Outcome.PENDING, False),
        ("CLOSED", Outcome.HARD_DECLINE, False),
        ("REVOKED", Outcome.HARD_DECLINE, False),
        ("PAYERROR", Outcome.SOFT_DECLINE, False),
    ],
)
def test_trade_state_table(
    adapter: WechatpayAdapter, platform_key: rsa.RSAPrivateKey, state: str, outcome: Outcome, captured: bool
) -> None:
    r = adapter.parse_status(signed(platform_key, 200, tx(state)))
    assert (r.outcome, r.captured, r.code, r.channel_reference) == (outcome, captured, state, OUT_NO)


def test_trade_state_rows_cover_the_table() -> None:
    rows = {"SUCCESS", "REFUND", "NOTPAY", "USERPAYING", "ACCEPT", "CLOSED", "REVOKED", "PAYERROR"}
    assert rows == set(codes.TRADE_STATES)


# One row per error code: (code, HTTP status WeChat uses, what authorize must do).
ERROR_ROWS: list[tuple[str, int, Any]] = [
    ("SYSTEM_ERROR", 500, OutcomeUnknown),
    ("BANK_ERROR", 500, OutcomeUnknown),
    ("ORDERPAID", 403, OutcomeUnknown),
    ("OUT_TRADE_NO_USED", 403, OutcomeUnknown),
    ("FREQUENCY_LIMITED", 429, ChannelUnavailable),
    ("SIGN_ERROR", 401, ChannelUnavailable),
    ("MCH_NOT_EXISTS", 400, ChannelUnavailable),
    ("APPID_MCHID_NOT_MATCH", 400, ChannelUnavailable),
    ("NO_AUTH", 403, ChannelUnavailable),
    ("PARAM_ERROR", 400, Outcome.SOFT_DECLINE),
    ("INVALID_REQUEST", 400, Outcome.SOFT_DECLINE),
    ("OPENID_MISMATCH", 400, Outcome.SOFT_DECLINE),
    ("ORDER_CLOSED", 400, Outcome.SOFT_DECLINE),
    ("NOTENOUGH", 403, Outcome.HARD_DECLINE),
    ("NOT_ENOUGH", 403, Outcome.HARD_DECLINE),
    ("ACCOUNTERROR", 403, Outcome.HARD_DECLINE),
    ("USER_ACCOUNT_ABNORMAL", 403, Outcome.HARD_DECLINE),
    ("RULELIMIT", 403, Outcome.HARD_DECLINE),
    ("TRADE_ERROR", 403, Outcome.HARD_DECLINE),
    ("REQUEST_BLOCKED", 403, Outcome.HARD_DECLINE),
    ("ORDER_NOT_EXIST", 404, OutcomeUnknown),  # at authorize time "no order" is nonsense: stay open
    ("ORDERNOTEXIST", 404, OutcomeUnknown),
    ("RESOURCE_NOT_EXISTS", 404, OutcomeUnknown),
]


def test_error_rows_cover_the_table() -> None:
    assert {row[0] for row in ERROR_ROWS} == set(codes.ERRORS)


@pytest.mark.parametrize(("code", "status", "expected"), ERROR_ROWS, ids=[r[0] for r in ERROR_ROWS])
@pytest.mark.parametrize("sign", [True, False], ids=["signed", "unsigned"])
def test_error_code_table(
    adapter: WechatpayAdapter, platform_key: rsa.RSAPrivateKey, code: str, status: int, expected: Any, sign: bool
) -> None:
    doc = {"code": code, "message": "描述"}
    resp = (
        signed(platform_key, status, doc)
        if sign
        else WireResponse(status=status, headers={"Content-Type": "application/json"}, body=json.dumps(doc).encode())
    )
    if isinstance(expected, Outcome):
        r = adapter.parse_authorize(resp)
        assert (r.outcome, r.code) == (expected, code)
    else:
        with pytest.raises(expected) as info:
            adapter.parse_authorize(resp)
        assert info.value.code == code


def test_unknown_codes(adapter: WechatpayAdapter, platform_key: rsa.RSAPrivateKey) -> None:
    assert adapter.parse_authorize(signed(platform_key, 403, {"code": "BRAND_NEW", "message": "x"})).outcome is Outcome.HARD_DECLINE
    with pytest.raises(OutcomeUnknown):  # any 5xx stays open, whatever the code says
        adapter.parse_authorize(signed(platform_key, 502, {"code": "NOTENOUGH", "message": "x"}))
    with pytest.raises(ChannelUnavailable):
        adapter.parse_authorize(signed(platform_key, 429, {"code": "SOMETHING", "message": "x"}))
    assert codes.is_retryable("SYSTEM_ERROR") and codes.is_retryable("FREQUENCY_LIMITED")
    assert not codes.is_retryable("NOTENOUGH") and not codes.is_retryable(None)


def test_status_not_found_and_query_errors(adapter: WechatpayAdapter, platform_key: rsa.RSAPrivateKey) -> None:
    for code in ("ORDER_NOT_EXIST", "ORDERNOTEXIST"):
        r = adapter.parse_status(signed(platform_key, 404, {"code": code, "message": "订单不存在"}))
        assert (r.outcome, r.code) == (Outcome.NOT_CHARGED, code)
    # a failed query is never a decline of the payment
    for code, status in (("PARAM_ERROR", 400), ("NOTENOUGH", 403), ("SYSTEM_ERROR", 500), ("", 404)):
        with pytest.raises(OutcomeUnknown):
            adapter.parse_status(signed(platform_key, status, {"code": code, "message": "x"}))
    with pytest.raises(ChannelUnavailable):
        adapter.parse_status(signed(platform_key, 429, {"code": "FREQUENCY_LIMITED", "message": "x"}))


@pytest.mark.parametrize(
    ("status", "outcome"),
    [("SUCCESS", Outcome.APPROVED), ("PROCESSING", Outcome.PENDING), ("ABNORMAL", Outcome.PENDING),
     ("CLOSED", Outcome.HARD_DECLINE)],
)
def test_refund_status_table(
    adapter: WechatpayAdapter, platform_key: rsa.RSAPrivateKey, status: str, outcome: Outcome
) -> None:
    doc = {"refund_id": "50000000382019052709732678859", "out_refund_no": "pay_x-refund-1", "status": status}
    r = adapter.parse_operation(operation("refund"), signed(platform_key, 200, doc))
    assert (r.outcome, r.code, r.channel_reference) == (outcome, status, "50000000382019052709732678859")
    assert set(codes.REFUND_STATES) == {"SUCCESS", "PROCESSING", "ABNORMAL", "CLOSED"}


def test_refund_and_void_errors(adapter: WechatpayAdapter, platform_key: rsa.RSAPrivateKey) -> None:
    r = adapter.parse_operation(operation("refund"), signed(platform_key, 403, {"code": "NOT_ENOUGH", "message": "x"}))
    assert r.outcome is Outcome.HARD_DECLINE
    r = adapter.parse_operation(operation("refund"), signed(platform_key, 404, {"code": "RESOURCE_NOT_EXISTS", "message": "x"}))
    assert r.outcome is Outcome.HARD_DECLINE
    void = operation("void")
    assert adapter.parse_operation(void, signed(platform_key, 204)).outcome is Outcome.APPROVED
    assert adapter.parse_operation(void, signed(platform_key, 400, {"code": "ORDER_CLOSED", "message": "x"})).outcome is Outcome.APPROVED
    assert adapter.parse_operation(void, signed(platform_key, 403, {"code": "ORDERPAID", "message": "x"})).outcome is Outcome.HARD_DECLINE
    with pytest.raises(OutcomeUnknown):
        adapter.parse_operation(void, signed(platform_key, 500, {"code": "SYSTEM_ERROR", "message": "x"}))
    with pytest.raises(OutcomeUnknown):
        adapter.parse_operation(void, signed(platform_key, 200, {}))


# --------------------------------------------------------------------------- hostile answers


def _hostile(platform_key: rsa.RSAPrivateKey) -> list[tuple[str, WireResponse]]:
    good = signed(platform_key, 200, tx("SUCCESS"))
    return [
        ("non-json", signed(platform_key, 200, body=b"<html>gateway</html>")),
        ("truncated", signed(platform_key, 200, body=good.body[:-7])),
        ("empty", signed(platform_key, 200, body=b"")),
        ("missing-fields", signed(platform_key, 200, {"appid": APPID})),
        ("wrong-types", signed(platform_key, 200, {"code_url": 7, "trade_state": 1, "mchid": 2, "out_trade_no": 3})),
        ("wrong-content-type", signed(platform_key, 200, tx("SUCCESS"), extra={"Content-Type": "text/html"})),
        ("unsigned", WireResponse(status=200, headers={"Content-Type": "application/json"}, body=good.body)),
        ("tampered-body", WireResponse(status=200, headers=good.headers, body=good.body.replace(b"1099", b"1098"))),
        ("bad-signature", signed(platform_key, 200, tx("SUCCESS"), extra={"Wechatpay-Signature": "bm90IGEgc2lnbmF0dXJl"})),
        ("non-base64-signature", signed(platform_key, 200, tx("SUCCESS"), extra={"Wechatpay-Signature": "%%%"})),
        ("wrong-serial", signed(platform_key, 200, tx("SUCCESS"), extra={"Wechatpay-Serial": "DEADBEEF"})),
        ("wrong-sig-type", signed(platform_key, 200, tx("SUCCESS"), extra={"Wechatpay-Signature-Type": "WECHATPAY2-SM2-WITH-SM3"})),
        ("other-timestamp", signed(platform_key, 200, tx("SUCCESS"), extra={"Wechatpay-Timestamp": str(NOW + 1)})),
        ("unexpected-state", signed(platform_key, 200, tx("TELEPORTED"))),
        ("other-merchant", signed(platform_key, 200, tx("SUCCESS", mchid="1900000999"))),
        ("redirect", signed(platform_key, 302, body=b"")),
        ("server-error-html", WireResponse(status=502, headers={"Content-Type": "text/html"}, body=b"<h1>bad gateway</h1>")),
        ("error-non-json", WireResponse(status=400, headers={"Content-Type": "text/plain"}, body=b"nope")),
        ("error-bad-signature", signed(platform_key, 404, {"code": "ORDER_NOT_EXIST", "message": "x"},
                                       extra={"Wechatpay-Signature": "bm90IGEgc2lnbmF0dXJl"})),
    ]


@pytest.mark.parametrize("which", ["authorize", "status", "refund", "void"])
def test_hostile_answers_never_approve_never_crash(
    adapter: WechatpayAdapter, platform_key: rsa.RSAPrivateKey, which: str
) -> None:
    parse: Callable[[WireResponse], ChannelResult] = {
        "authorize": adapter.parse_authorize,
        "status": adapter.parse_status,
        "refund": lambda r: adapter.parse_operation(operation("refund"), r),
        "void": lambda r: adapter.parse_operation(operation("void"), r),
    }[which]
    for name, resp in _hostile(platform_key):
        with pytest.raises(OutcomeUnknown):
            result = parse(resp)
            pytest.fail(f"{which}/{name} gave {result}")  # pragma: no cover - reports the escape


def test_signed_success_is_approved_so_the_hostile_cases_mean_something(
    adapter: WechatpayAdapter, platform_key: rsa.RSAPrivateKey
) -> None:
    assert adapter.parse_status(signed(platform_key, 200, tx("SUCCESS"))).outcome is Outcome.APPROVED
    good = signed(platform_key, 200, tx("SUCCESS"))
    lower = WireResponse(status=200, headers={k.lower(): v for k, v in good.headers.items()}, body=good.body)
    assert adapter.parse_status(lower).outcome is Outcome.APPROVED  # header names are case-insensitive


# --------------------------------------------------------------------------- callbacks


def _notification(
    platform_key: rsa.RSAPrivateKey,
    resource_doc: dict[str, Any],
    *,
    event_type: str = "TRANSACTION.SUCCESS",
    key: bytes = APIV3_KEY.encode(),
    timestamp: int = NOW,
    associated: str = "transaction",
) -> tuple[dict[str, str], bytes]:
    nonce = "fdasflkja484"
    # encrypted the way WeChat does it: AESGCM(key).encrypt(nonce, json, associated_data), base64
    ciphertext = base64.b64encode(
        AESGCM(key).encrypt(nonce.encode(), json.dumps(resource_doc).encode(), associated.encode())
    ).decode()
    body = json.dumps({
        "id": "EV-2018022511223320873", "create_time": "2015-05-20T13:29:35+08:00", "resource_type": "encrypt-resource",
        "event_type": event_type, "summary": "支付成功",
        "resource": {"original_type": "transaction", "algorithm": "AEAD_AES_256_GCM", "ciphertext": ciphertext,
                     "associated_data": associated, "nonce": nonce},
    }, ensure_ascii=False).encode()
    headers = {
        "Wechatpay-Timestamp": str(timestamp), "Wechatpay-Nonce": "cbnonce", "Wechatpay-Serial": PLATFORM_SERIAL,
        "Wechatpay-Signature-Type": "WECHATPAY2-SHA256-RSA2048",
        "Wechatpay-Signature": sdk.rsa_sign(platform_key, f"{timestamp}\ncbnonce\n{body.decode()}\n"),
    }
    return headers, body


def test_callback_success(adapter: WechatpayAdapter, platform_key: rsa.RSAPrivateKey) -> None:
    headers, body = _notification(platform_key, tx("SUCCESS"))
    event, ack = adapter.parse_callback(headers, body)
    assert (event.event_id, event.reference, event.channel_reference, event.kind) == (
        "EV-2018022511223320873", REFERENCE, OUT_NO, "authorization"
    )
    assert event.result.outcome is Outcome.APPROVED and event.result.captured
    assert ack.status == 200 and json.loads(ack.body) == {"code": "SUCCESS", "message": "成功"}
    assert ack == ACK


def test_callback_refund(adapter: WechatpayAdapter, platform_key: rsa.RSAPrivateKey) -> None:
    doc = {"mchid": MCHID, "out_trade_no": OUT_NO, "out_refund_no": "pay_x-refund-1", "refund_id": "5000",
           "refund_status": "SUCCESS", "transaction_id": "42"}
    headers, body = _notification(platform_key, doc, event_type="REFUND.SUCCESS", associated="refund")
    event, _ = adapter.parse_callback(headers, body)
    assert (event.kind, event.channel_reference, event.result.outcome, event.result.channel_reference) == (
        "refund", OUT_NO, Outcome.APPROVED, "5000"
    )


def test_callback_rejections(adapter: WechatpayAdapter, platform_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey) -> None:
    good_headers, good_body = _notification(platform_key, tx("SUCCESS"))
    cases: list[tuple[str, dict[str, str], bytes]] = [
        ("tampered-body", good_headers, good_body.replace(b"EV-2018", b"EV-2019")),
        ("no-signature", {k: v for k, v in good_headers.items() if k != "Wechatpay-Signature"}, good_body),
        ("wrong-serial", {**good_headers, "Wechatpay-Serial": "0000"}, good_body),
        ("other-signer", *_notification(other_key, tx("SUCCESS"))),
        ("too-old", *_notification(platform_key, tx("SUCCESS"), timestamp=NOW - 301)),
        ("from-the-future", *_notification(platform_key, tx("SUCCESS"), timestamp=NOW + 302)),
        ("wrong-apiv3-key", *_notification(platform_key, tx("SUCCESS"), key=b"0" * 32)),
        ("unknown-event", *_notification(platform_key, tx("SUCCESS"), event_type="PROFITSHARING.SUCCESS")),
        ("other-merchant", *_notification(platform_key, tx("SUCCESS", mchid="1900000999"))),
        ("unknown-state", *_notification(platform_key, tx("TELEPORTED"))),
        ("plain-resource", *_notification(platform_key, {"not": "a transaction"})),
    ]
    # a signed body that is not a notification at all
    junk = b"[1, 2, 3]"
    cases.append(("junk", {**good_headers, "Wechatpay-Signature": sdk.rsa_sign(platform_key, f"{NOW}\ncbnonce\n[1, 2, 3]\n")}, junk))
    for name, headers, body in cases:
        with pytest.raises(CallbackRejected):
            adapter.parse_callback(headers, body)
            pytest.fail(f"callback {name} accepted")  # pragma: no cover


def test_callback_tolerance_edge_is_accepted(adapter: WechatpayAdapter, platform_key: rsa.RSAPrivateKey) -> None:
    adapter.parse_callback(*_notification(platform_key, tx("SUCCESS"), timestamp=NOW - 299))


# --------------------------------------------------------------------------- SDK peer checks


def test_sdk_authorization_header_equals_ours(
    adapter: WechatpayAdapter, merchant_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sdk.time, "time", lambda: NOW + 0.75)
    for wr in (adapter.build_authorize(authorize()), adapter.build_status(REFERENCE, None),
               adapter.build_operation(operation("refund"))):
        nonce = wire.parse_authorization(wr.headers["Authorization"])["nonce_str"]  # type: ignore[index]
        theirs = sdk.build_authorization(
            wr.path, wr.method, MCHID, MERCHANT_SERIAL, merchant_key, data=wr.body.decode() or None, nonce_str=nonce
        )
        assert wr.headers["Authorization"] == theirs


def test_sdk_signatures_are_accepted_and_ours_verify_with_the_sdk(
    adapter: WechatpayAdapter, platform_key: rsa.RSAPrivateKey
) -> None:
    # SDK-signed answer -> our verifier (the `signed` helper uses sdk.rsa_sign)
    assert adapter.parse_status(signed(platform_key, 200, tx("NOTPAY"))).outcome is Outcome.REQUIRES_ACTION
    # our signer -> the SDK's rsa_verify
    sig = wire.rsa_sign(platform_key, wire.response_message("1700000000", "n0", "体".encode()))
    assert sdk.rsa_verify("1700000000", "n0", "体", sig, platform_key.public_key())
    assert not sdk.rsa_verify("1700000000", "n1", "体", sig, platform_key.public_key())


def test_aes_interop_both_ways() -> None:
    key = APIV3_KEY.encode()
    plain = json.dumps(tx("SUCCESS"), ensure_ascii=False)
    ours = wire.encrypt_resource(key, "0123456789ab", "transaction", plain.encode())
    assert sdk.aes_decrypt("0123456789ab", ours, "transaction", APIV3_KEY) == plain
    theirs = base64.b64encode(AESGCM(key).encrypt(b"0123456789ab", plain.encode(), b"transaction")).decode()
    assert wire.decrypt_resource(key, "0123456789ab", "transaction", theirs) == plain.encode()
    assert wire.decrypt_resource(key, "0123456789ab", "certificate", theirs) is None  # associated data is bound
    assert wire.decrypt_resource(key, "0123456789ab", "transaction", "!!not base64") is None
    assert wire.decrypt_resource(key, "", "transaction", theirs) is None


def test_sdk_core_accepts_the_fakes_notifications(
    merchant_key: rsa.RSAPrivateKey, platform_key: rsa.RSAPrivateKey
) -> None:
    fake = _fake(merchant_key, platform_key)
    fake.orders["o1"] = _fake_order("o1")
    fake.pay("o1")
    headers, body = fake.notification("o1")
    core = Core(MCHID, MERCHANT_SERIAL, _pem_private(merchant_key), APIV3_KEY,
                public_key=_pem_public(platform_key.public_key()), public_key_id=PLATFORM_SERIAL)
    data = core.callback(headers, body)
    assert data is not None and data["resource"]["out_trade_no"] == "o1" and data["resource"]["trade_state"] == "SUCCESS"
    assert core.callback(headers, body.replace(b"SUCCESS", b"SUCCESZ")) is None  # the SDK sees tampering too


# --------------------------------------------------------------------------- the protocol fake on loopback


def _fake(merchant_key: rsa.RSAPrivateKey, platform_key: rsa.RSAPrivateKey) -> WechatpayFake:
    return WechatpayFake(
        mchid=MCHID, appid=APPID, merchant_public_key=merchant_key.public_key(), merchant_serial_no=MERCHANT_SERIAL,
        platform_private_key=platform_key, platform_serial_no=PLATFORM_SERIAL, apiv3_key=APIV3_KEY.encode(),
    )


def _fake_order(number: str) -> Any:
    from tests.adapters.wechatpay_fake import FakeOrder

    return FakeOrder(out_trade_no=number, appid=APPID, description="d", notify_url=NOTIFY, total=1099, attach=REFERENCE,
                     trade_type="NATIVE", openid=None, request_body={})


@pytest.fixture
async def fake(merchant_key: rsa.RSAPrivateKey, platform_key: rsa.RSAPrivateKey) -> AsyncIterator[WechatpayFake]:
    f = _fake(merchant_key, platform_key)
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
def live(creds: dict[str, str]) -> WechatpayAdapter:
    return WechatpayAdapter(creds)  # the real clock and random nonces: the fake checks nothing else


async def send(base_url: str, wr: WireRequest) -> WireResponse:
    async with aiohttp.ClientSession() as s:
        async with s.request(wr.method, base_url + wr.path, headers=wr.headers, data=wr.body or None) as r:
            return WireResponse(status=r.status, headers=dict(r.headers), body=await r.read())


@pytest.fixture
async def receiver(live: WechatpayAdapter) -> AsyncIterator[tuple[str, list[Any]]]:
    """Our side of the notification: an aiohttp endpoint that answers what parse_callback says."""
    events: list[Any] = []

    async def handle(request: web.Request) -> web.Response:
        try:
            event, ack = live.parse_callback(dict(request.headers), await request.read())
        except CallbackRejected as e:
            events.append(e)
            return web.json_response({"code": "FAIL", "message": "rejected"}, status=401)
        events.append(event)
        return web.Response(status=ack.status, headers=ack.headers, body=ack.body)

    app = web.Application()
    app.router.add_post("/callbacks/wechat", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/callbacks/wechat", events
    await runner.cleanup()


async def test_fake_native_pay_query_callback_refund(
    fake: WechatpayFake, live: WechatpayAdapter, receiver: tuple[str, list[Any]]
) -> None:
    url, events = receiver
    req = authorize(notify_url=url)
    r = live.parse_authorize(await send(fake.base_url, live.build_authorize(req)))
    assert r.outcome is Outcome.REQUIRES_ACTION and r.next_action and r.next_action["type"] == "qr_code"
    assert r.next_action["data"].startswith("weixin://wxpay/bizpayurl?pr=")
    # the same attempt again (a retry) finds the same order
    again = live.parse_authorize(await send(fake.base_url, live.build_authorize(req)))
    assert again.next_action == r.next_action and len(fake.orders) == 1

    before = live.parse_status(await send(fake.base_url, live.build_status(REFERENCE, None)))
    assert before.outcome is Outcome.REQUIRES_ACTION

    fake.pay(OUT_NO)
    st = live.parse_status(await send(fake.base_url, live.build_status(REFERENCE, None)))
    assert (st.outcome, st.captured, st.channel_reference) == (Outcome.APPROVED, True, OUT_NO)

    status, answer = await fake.notify(OUT_NO)
    assert (status, json.loads(answer)) == (200, {"code": "SUCCESS", "message": "成功"})
    assert events[-1].reference == REFERENCE and events[-1].result.outcome is Outcome.APPROVED

    op = operation("refund", channel_reference=st.channel_reference or "")
    refund = live.parse_operation(op, await send(fake.base_url, live.build_operation(op)))
    assert refund.outcome is Outcome.APPROVED and refund.channel_reference
    again_refund = live.parse_operation(op, await send(fake.base_url, live.build_operation(op)))
    assert again_refund.channel_reference == refund.channel_reference  # out_refund_no is idempotent
    assert fake.orders[OUT_NO].refunded == 1099
    after = live.parse_status(await send(fake.base_url, live.build_status(REFERENCE, None)))
    assert (after.outcome, after.code) == (Outcome.APPROVED, "REFUND")
    # paid orders cannot be voided
    void = live.parse_operation(operation("void"), await send(fake.base_url, live.build_operation(operation("void"))))
    assert (void.outcome, void.code) == (Outcome.HARD_DECLINE, "ORDERPAID")


async def test_fake_jsapi(fake: WechatpayFake, live: WechatpayAdapter, merchant_key: rsa.RSAPrivateKey) -> None:
    req = authorize(wallet={"flow": "jsapi", "openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"})
    r = live.parse_authorize(await send(fake.base_url, live.build_authorize(req)))
    assert r.next_action is not None and r.next_action["prepay_id"] == f"wx{OUT_NO}"
    na = r.next_action
    assert sdk.rsa_verify(  # the 4-line paySign string, checked with the SDK verifier (first 2 lines folded)
        f"{na['appId']}\n{na['timeStamp']}", na["nonceStr"], na["package"], na["paySign"], merchant_key.public_key()
    )
    assert fake.orders[OUT_NO].openid == "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"


async def test_fake_close_then_status(fake: WechatpayFake, live: WechatpayAdapter) -> None:
    live.parse_authorize(await send(fake.base_url, live.build_authorize(authorize())))
    op = operation("void")
    assert live.parse_operation(op, await send(fake.base_url, live.build_operation(op))).outcome is Outcome.APPROVED
    st = live.parse_status(await send(fake.base_url, live.build_status(REFERENCE, None)))
    assert (st.outcome, st.code) == (Outcome.HARD_DECLINE, "CLOSED")
    # paying again under the closed order number is refused, and nothing is charged
    again = live.parse_authorize(await send(fake.base_url, live.build_authorize(authorize())))
    assert (again.outcome, again.code) == (Outcome.SOFT_DECLINE, "ORDER_CLOSED")


async def test_fake_unknown_trade_is_not_charged(fake: WechatpayFake, live: WechatpayAdapter) -> None:
    st = live.parse_status(await send(fake.base_url, live.build_status("pay_never_sent-a1", None)))
    assert (st.outcome, st.code) == (Outcome.NOT_CHARGED, "ORDER_NOT_EXIST")


async def test_fake_tampered_response_signature_is_unknown(fake: WechatpayFake, live: WechatpayAdapter) -> None:
    fake.tamper_signatures = True
    with pytest.raises(OutcomeUnknown):
        live.parse_authorize(await send(fake.base_url, live.build_authorize(authorize())))
    assert OUT_NO in fake.orders  # it was processed: exactly why the answer must stay "unknown"
    fake.pay(OUT_NO)
    with pytest.raises(OutcomeUnknown):
        live.parse_status(await send(fake.base_url, live.build_status(REFERENCE, None)))
    fake.tamper_signatures = False
    assert live.parse_status(await send(fake.base_url, live.build_status(REFERENCE, None))).outcome is Outcome.APPROVED


async def test_fake_tampered_callback_is_rejected(
    fake: WechatpayFake, live: WechatpayAdapter, receiver: tuple[str, list[Any]]
) -> None:
    url, events = receiver
    live.parse_authorize(await send(fake.base_url, live.build_authorize(authorize(notify_url=url))))
    fake.pay(OUT_NO)
    status, _ = await fake.notify(OUT_NO, tamper=True)
    assert status == 401 and isinstance(events[-1], CallbackRejected)


async def test_fake_refuses_our_requests_signed_with_another_key(
    fake: WechatpayFake, creds: dict[str, str], other_key: rsa.RSAPrivateKey
) -> None:
    wrong = WechatpayAdapter({**creds, "merchant_private_key": _pem_private(other_key)})
    with pytest.raises(ChannelUnavailable) as info:
        wrong.parse_authorize(await send(fake.base_url, wrong.build_authorize(authorize())))
    assert info.value.code == "SIGN_ERROR" and not fake.orders


async def test_sdk_client_against_the_fake(
    fake: WechatpayFake, merchant_key: rsa.RSAPrivateKey, platform_key: rsa.RSAPrivateKey
) -> None:
    """The SDK as a client: the fake accepts its Authorization and the SDK accepts the fake's signatures."""
    import asyncio

    core = Core(MCHID, MERCHANT_SERIAL, _pem_private(merchant_key), APIV3_KEY,
                public_key=_pem_public(platform_key.public_key()), public_key_id=PLATFORM_SERIAL)
    core._gate_way = fake.base_url
    data = {"appid": APPID, "mchid": MCHID, "description": "sdk", "out_trade_no": "sdk-order-1",
            "notify_url": NOTIFY, "amount": {"total": 1, "currency": "CNY"}}
    code, text = await asyncio.to_thread(core.request, "/v3/pay/transactions/native", _post(), data)
    assert code == 200 and json.loads(text)["code_url"].startswith("weixin://")
    fake.tamper_signatures = True
    with pytest.raises(Exception, match="verify the signature"):
        await asyncio.to_thread(core.request, f"/v3/pay/transactions/out-trade-no/sdk-order-1?mchid={MCHID}")


def _post() -> Any:
    from wechatpayv3.type import RequestType

    return RequestType.POST


# --------------------------------------------------------------------------- config example


def test_config_example_names_every_credential() -> None:
    path = Path(__file__).resolve().parents[2] / "config" / "examples" / "wechatpay.yaml"
    doc = yaml.safe_load(path.read_text())
    channel = next(c for c in doc["channels"] if c["adapter"] == "wechatpay")
    assert set(REQUIRED_CREDENTIALS) <= set(channel["credentials"])
    assert all(str(v).startswith("${") for v in channel["credentials"].values())
    assert channel["methods"] == ["wechatpay"] and channel["currencies"] == ["CNY"]


def test_adapter_imports_only_the_model_and_errors_from_router() -> None:
    root = Path(__file__).resolve().parents[2] / "adapters" / "wechatpay"
    for source in root.glob("*.py"):
        for line in source.read_text().splitlines():
            if line.startswith(("from router", "import router")):
                assert line.split()[1] in ("router.model", "router.errors"), (source.name, line)


async def test_fake_partial_refund_is_refused_for_want_of_the_order_total(fake: WechatpayFake, live: WechatpayAdapter) -> None:
    """Known gap: ChannelOperation has no order total, so a partial refund sends total=refund and WeChat
    (here the fake, which checks amount.total like WeChat) refuses it; nothing is refunded."""
    live.parse_authorize(await send(fake.base_url, live.build_authorize(authorize())))
    fake.pay(OUT_NO)
    op = operation("refund", amount=500)
    r = live.parse_operation(op, await send(fake.base_url, live.build_operation(op)))
    assert (r.outcome, r.code) == (Outcome.SOFT_DECLINE, "PARAM_ERROR") and fake.orders[OUT_NO].refunded == 0
