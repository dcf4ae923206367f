"""One contract suite over every registered adapter (adapters.registry.ADAPTERS) plus the template.

Each adapter gets a factory entry: a configured adapter with valid test credentials (RSA keys generated
once per session, clocks and nonces injected) and one canonical request it supports. The checks are the
rules any adapter must keep, whatever its protocol:
- requests: relative path, bytes body, the channel key (or a value derived from it) on the wire,
  identical bytes when built twice (a retry must be the same request);
- hostile answers: `parse_*` raise only ChannelUnavailable / OutcomeUnknown / IntegrationError and never
  return APPROVED; no exception message (and, for card adapters, no result) carries the PAN or CVC;
- hostile callbacks: `parse_callback` raises CallbackRejected and nothing else, never returns an event.
Golden requests and one row per code live in each adapter's own test file.
Adding an adapter to the registry without a factory entry here fails `test_every_registered_adapter_has_a_factory`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote_plus, urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from adapters.registry import ADAPTERS
from adapters.template.adapter import ExamplePayAdapter
from router.errors import CallbackRejected, ChannelUnavailable, IntegrationError, OutcomeUnknown
from router.model import (
    Capabilities,
    CardSummary,
    ChannelAdapter,
    ChannelAuthorize,
    ChannelOperation,
    ChannelResult,
    Outcome,
    SensitiveCard,
    WireRequest,
    WireResponse,
)

PAN = "4111111111111111"
CVC = "987"
NOW_S = 1_764_000_000  # 2025-11-24T16:00:00Z
NOW_DT = datetime.fromtimestamp(NOW_S, UTC)
# the pipeline's shape: the channel key doubles as the attempt reference (router/pipeline.py)
KEY = "pay_0193f5c2a1b8e6d0c4f2a9b7e3d1-a1"
OTHER_KEY = "pay_0193f5c2a1b8e6d0c4f2a9b7e3d1-a2"
STEERING = (ChannelUnavailable, OutcomeUnknown, IntegrationError)


# --------------------------------------------------------------------------- factories


def _card() -> SensitiveCard:
    summary = CardSummary(bin=PAN[:6], last4=PAN[-4:], brand="visa", exp_month=12, exp_year=2034, fingerprint="fp")
    return SensitiveCard(PAN, CVC, 12, 2034, "Jo Doe", summary)


def _authorize(key: str, **over: object) -> ChannelAuthorize:
    fields: dict[str, object] = {
        "payment_id": "pay_0193f5c2a1b8e6d0c4f2a9b7e3d1", "attempt": 1, "channel_key": key, "reference": key,
        "amount": 1099, "currency": "EUR", "exponent": 2, "country": "NL", "capture": False, "card": _card(),
        "method": "card", "notify_url": "https://payroute.example/callbacks/x", "description": "Order 42",
    }
    fields.update(over)
    return ChannelAuthorize(**fields)  # type: ignore[arg-type]


def _wallet(method: str, flow: str) -> Callable[[str], ChannelAuthorize]:
    return lambda key: _authorize(key, method=method, card=None, wallet={"flow": flow}, currency="CNY", country="CN")


def _pem_private(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _pem_public(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@functools.cache
def _rsa(name: str) -> rsa.RSAPrivateKey:
    """One generated key per role per session (2048 bits, as the channels require)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _sandbox() -> ChannelAdapter:
    from adapters.sandbox.adapter import SandboxAdapter

    return SandboxAdapter({"api_key": "sk_test_sandbox"}, Capabilities())


def _stripe() -> ChannelAdapter:
    from adapters.stripe.adapter import StripeAdapter

    return StripeAdapter({"secret_key": "sk_test_contract", "webhook_secret": "whsec_contract"}, clock=lambda: NOW_S)


def _adyen() -> ChannelAdapter:
    from adapters.adyen.adapter import AdyenAdapter

    return AdyenAdapter({
        "api_key": "AQE_test_api_key_0001", "merchant_account": "PayrouteECOM", "return_url": "https://shop.example/r",
        "hmac_key": "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056",
    })


def _alipay() -> ChannelAdapter:
    from adapters.alipay.adapter import AlipayAdapter

    creds = {"app_id": "2021000000000001", "app_private_key": _pem_private(_rsa("alipay-app")),
             "alipay_public_key": _pem_public(_rsa("alipay-gateway"))}
    return AlipayAdapter(creds, clock=lambda: NOW_DT)


def _wechatpay() -> ChannelAdapter:
    from adapters.wechatpay.adapter import WechatpayAdapter

    creds = {
        "mchid": "1900000109", "appid": "wxd678efh567hg6787",
        "merchant_serial_no": "5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
        "merchant_private_key": _pem_private(_rsa("wechat-merchant")),
        "platform_public_key": _pem_public(_rsa("wechat-platform")),
        "platform_serial_no": "7132D72A03E93CDDF8C03BBD1F37EEDF",
        "apiv3_key": "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb",
    }
    # a fixed nonce: WeChat wants a fresh one per call in production; determinism is checked with it pinned
    return WechatpayAdapter(creds, clock=lambda: NOW_S, nonce=lambda: "NONCE0001")


def _template() -> ChannelAdapter:
    return ExamplePayAdapter({"api_key": "ep_test_key", "webhook_secret": "ep_whsec"}, clock=lambda: NOW_S)


def _wechat_out_trade_no(key: str) -> list[str]:
    return [key if len(key) <= 32 else hashlib.sha256(key.encode()).hexdigest()[:32]]


@dataclass(frozen=True)
class Factory:
    make: Callable[[], ChannelAdapter]
    authorize: Callable[[str], ChannelAuthorize]  # the canonical request for a channel key
    # what must appear on the wire for a channel key: the key itself, or what the adapter derives from it
    key_markers: Callable[[str], list[str]] = field(default=lambda key: [key])

    @property
    def carries_card(self) -> bool:
        return isinstance(self.authorize(KEY).card, SensitiveCard)


FACTORIES: dict[str, Factory] = {
    "sandbox": Factory(_sandbox, _authorize),
    "stripe": Factory(_stripe, _authorize),
    "adyen": Factory(_adyen, _authorize),
    "alipay": Factory(_alipay, _wallet("alipay", "qr")),
    "wechatpay": Factory(_wechatpay, _wallet("wechatpay", "native"), _wechat_out_trade_no),
    "template": Factory(_template, _authorize),
}
TEMPLATE = {"template": ExamplePayAdapter}
ALL = sorted({*ADAPTERS, *TEMPLATE})


def _factory(name: str) -> Factory:
    if name not in FACTORIES:
        pytest.fail(f"adapter {name!r} is registered but has no factory in tests/adapters/test_contract.py")
    return FACTORIES[name]


@pytest.fixture(params=ALL)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def adapter(name: str) -> ChannelAdapter:
    return _factory(name).make()


def _operations(adapter: ChannelAdapter) -> list[ChannelOperation]:
    kinds = sorted(adapter.capabilities().operations & {"capture", "void", "refund"})
    currency = "CNY" if adapter.capabilities().methods & {"alipay", "wechatpay"} else "EUR"
    return [
        ChannelOperation(kind=k, payment_id="pay_0193", channel_reference="ref_0193f5c2a1b8e6d0", channel_key=f"{KEY}-{k}",
                         amount=1099, currency=currency, exponent=2, payment_amount=1099)
        for k in kinds
    ]


# --------------------------------------------------------------------------- registry coverage


def test_every_registered_adapter_has_a_factory() -> None:
    missing = set(ADAPTERS) - set(FACTORIES)
    assert not missing, f"add a factory entry for {sorted(missing)} in tests/adapters/test_contract.py"
    assert set(FACTORIES) - set(ADAPTERS) <= set(TEMPLATE), "a factory for an adapter that is not registered"


def test_factory_builds_the_registered_class(name: str, adapter: ChannelAdapter) -> None:
    expected = {**ADAPTERS, **TEMPLATE}[name]
    assert type(adapter) is expected
    if name in ADAPTERS:
        assert adapter.kind == name, "the registry key and the adapter's kind differ"


def test_capabilities(adapter: ChannelAdapter, name: str) -> None:
    caps = adapter.capabilities()
    assert isinstance(caps, Capabilities)
    assert _factory(name).authorize(KEY).method in caps.methods, "the canonical request's method is not advertised"


# --------------------------------------------------------------------------- request side


def _wire_text(w: WireRequest) -> str:
    raw = w.body.decode("utf-8", "replace")
    return "\n".join([w.path, *w.headers.values(), raw, unquote_plus(raw)])


def _check_wire(w: WireRequest) -> None:
    assert isinstance(w, WireRequest)
    assert isinstance(w.body, bytes)
    assert w.method in ("GET", "POST", "PUT", "PATCH", "DELETE")
    assert w.path.startswith("/") and not w.path.startswith("//"), w.path
    parts = urlsplit(w.path)
    assert not parts.scheme and not parts.netloc, w.path
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in w.headers.items())


def test_build_authorize_is_a_relative_wire_request(adapter: ChannelAdapter, name: str) -> None:
    _check_wire(adapter.build_authorize(_factory(name).authorize(KEY)))


def test_channel_key_is_on_the_wire(adapter: ChannelAdapter, name: str) -> None:
    f = _factory(name)
    text = _wire_text(adapter.build_authorize(f.authorize(KEY)))
    for marker in f.key_markers(KEY):
        assert marker in text, f"{marker!r} (from the channel key) is not in the request"
    # and it steers the request: another attempt's key gives another request
    assert adapter.build_authorize(f.authorize(OTHER_KEY)) != adapter.build_authorize(f.authorize(KEY))


def test_building_twice_gives_identical_bytes(adapter: ChannelAdapter, name: str) -> None:
    f = _factory(name)
    first = adapter.build_authorize(f.authorize(KEY))
    assert adapter.build_authorize(f.authorize(KEY)) == first
    assert f.make().build_authorize(f.authorize(KEY)) == first, "a fresh adapter built different bytes"
    for op in _operations(adapter):
        assert adapter.build_operation(op) == adapter.build_operation(op), op.kind
    if "status" in adapter.capabilities().operations:
        assert adapter.build_status(KEY, None) == adapter.build_status(KEY, None)


def test_operation_and_status_requests_are_relative(adapter: ChannelAdapter) -> None:
    for op in _operations(adapter):
        w = adapter.build_operation(op)
        _check_wire(w)
        if op.kind != "void":  # a void/close is idempotent by nature; captures and refunds move money
            assert op.channel_key in _wire_text(w), f"{op.kind}: the operation's channel key is not on the wire"
    if "status" in adapter.capabilities().operations:
        _check_wire(adapter.build_status(KEY, None))
        _check_wire(adapter.build_status(KEY, "ref_0193f5c2a1b8e6d0"))


def test_card_data_stays_in_the_body(adapter: ChannelAdapter, name: str) -> None:
    f = _factory(name)
    w = adapter.build_authorize(f.authorize(KEY))
    assert PAN not in w.path and all(PAN not in v for v in w.headers.values())
    assert PAN not in repr(f.authorize(KEY).card)


# --------------------------------------------------------------------------- hostile answers

JSON = {"Content-Type": "application/json"}
ECHO = f"invalid card number {PAN} cvc {CVC}"
HUGE = b'{"data":[' + b"{}," * 700_000 + b'{}],"pad":"' + PAN.encode() + b'"}'

# (label, status, headers, body)
HOSTILE: list[tuple[str, int, dict[str, str], bytes]] = [
    ("empty-200", 200, JSON, b""),
    ("empty-201", 201, JSON, b""),
    ("empty-object", 200, JSON, b"{}"),
    ("empty-array", 200, JSON, b"[]"),
    ("null", 200, JSON, b"null"),
    ("truncated", 200, JSON, b'{"id": "x", "status": "auth'),
    ("not-utf8", 200, JSON, b"\xff\xfe\x00{"),
    ("html-200", 200, {"Content-Type": "text/html"}, b"<html><body>OK " + PAN.encode() + b"</body></html>"),
    ("no-headers-200", 200, {}, b"<html>maintenance</html>"),
    # approval-looking bodies of every known shape, but with a content type no PSP answers with
    ("octet-sandbox-shape", 200, {"Content-Type": "application/octet-stream"},
     b'{"id":"ch_1","status":"authorized","amount":1099,"currency":"EUR","reference":"' + KEY.encode() + b'"}'),
    ("plain-stripe-shape", 200, {"Content-Type": "text/plain"},
     b'{"id":"pi_1","object":"payment_intent","status":"succeeded","amount":1099,"currency":"eur"}'),
    ("plain-adyen-shape", 200, {"Content-Type": "text/plain"}, b'{"resultCode":"Authorised","pspReference":"PSP1"}'),
    ("plain-template-shape", 201, {"Content-Type": "text/plain"},
     b'{"id":"p_1","status":"captured","amount":{"value":1099,"currency":"EUR"}}'),
    ("plain-refund-shape", 201, {"Content-Type": "text/plain"},
     b'{"id":"re_1","object":"refund","status":"succeeded","amount":1099,"payment_id":"ref_0193f5c2a1b8e6d0",'
     b'"type":"refund"}'),
    ("500-json", 500, JSON, b'{"error":{"type":"api_error","code":"internal","message":"' + ECHO.encode() + b'"}}'),
    ("500-html", 500, {"Content-Type": "text/html"}, b"<h1>Internal Server Error</h1>"),
    ("503-empty", 503, {}, b""),
    ("503-json", 503, JSON, b'{"error":{"code":"maintenance"}}'),
    ("418", 418, JSON, b'{"error":{"code":"teapot"}}'),
    ("418-empty", 418, {}, b""),
    ("400-echo", 400, JSON, b'{"error":{"type":"invalid_request_error","code":"invalid_number","message":"'
     + ECHO.encode() + b'"},"code":"PARAM_ERROR","message":"' + ECHO.encode() + b'","errorCode":"101",'
     b'"status":400}'),
    ("302", 302, {"Location": "https://login.example"}, b""),
    ("huge-json", 200, JSON, HUGE),
    ("huge-garbage", 200, JSON, b"\x00" * 3_000_000),
]


def _hostile_ids() -> list[str]:
    return [h[0] for h in HOSTILE]


def _parsers(adapter: ChannelAdapter) -> Iterator[tuple[str, Callable[[WireResponse], ChannelResult]]]:
    yield "parse_authorize", adapter.parse_authorize
    yield "parse_status", adapter.parse_status
    for op in _operations(adapter):
        yield f"parse_operation[{op.kind}]", functools.partial(adapter.parse_operation, op)


@pytest.mark.parametrize("hostile", HOSTILE, ids=_hostile_ids())
def test_hostile_answers_never_approve_and_raise_only_steering_errors(
    adapter: ChannelAdapter, hostile: tuple[str, int, dict[str, str], bytes]
) -> None:
    _, status, headers, body = hostile
    resp = WireResponse(status=status, headers=dict(headers), body=body)
    for label, parse in _parsers(adapter):
        try:
            result = parse(resp)
        except STEERING as e:
            assert PAN not in str(e) and CVC not in str(e), f"{label}: card data in {type(e).__name__}: {e}"
            continue
        except Exception as e:  # noqa: BLE001 - the point: anything else is a contract violation
            pytest.fail(f"{label} raised {type(e).__name__}: {e}")
        assert isinstance(result, ChannelResult), label
        assert result.outcome is not Outcome.APPROVED, f"{label} approved a hostile answer: {result}"


@pytest.mark.parametrize("hostile", HOSTILE, ids=_hostile_ids())
def test_card_adapters_never_echo_card_data_in_results(
    adapter: ChannelAdapter, name: str, hostile: tuple[str, int, dict[str, str], bytes]
) -> None:
    if not _factory(name).carries_card:
        pytest.skip("no card is sent on this channel")
    _, status, headers, body = hostile
    resp = WireResponse(status=status, headers=dict(headers), body=body)
    for label, parse in _parsers(adapter):
        try:
            result = parse(resp)
        except STEERING:
            continue
        shown = repr(result)
        assert PAN not in shown and CVC not in shown, f"{label} echoes card data in {result}"


# --------------------------------------------------------------------------- hostile callbacks

GARBAGE_BODIES: list[bytes] = [
    b"", b"{}", b"[]", b"null", b'{"id": "evt_1", "type": "payment.upd', b"<html>hi</html>", b"\xff\xfe\x00",
    b"a=1&b=2&sign=Zm9v&sign_type=RSA2", b"=&=&&%zz", b"x" * 2_000_000,
    # plausible but unsigned events of every known shape
    b'{"id":"evt_1","type":"payment_intent.succeeded","data":{"object":{"id":"pi_1","status":"succeeded",'
    b'"amount":1099,"currency":"eur"}}}',
    b'{"live":"false","notificationItems":[{"NotificationRequestItem":{"pspReference":"PSP1",'
    b'"merchantAccountCode":"PayrouteECOM","merchantReference":"r","amount":{"value":1099,"currency":"EUR"},'
    b'"eventCode":"AUTHORISATION","success":"true"}}]}',
    b"app_id=2021000000000001&notify_id=n1&out_trade_no=r&trade_status=TRADE_SUCCESS&sign_type=RSA2&sign=Zm9v",
    b'{"id":"n1","event_type":"TRANSACTION.SUCCESS","resource_type":"encrypt-resource","resource":{'
    b'"algorithm":"AEAD_AES_256_GCM","ciphertext":"Zm9v","nonce":"n","associated_data":"transaction"}}',
    b'{"id":"evt_1","type":"payment.updated","data":{"id":"p_1","status":"captured",'
    b'"amount":{"value":1099,"currency":"EUR"}}}',
]
GARBAGE_HEADERS: list[dict[str, str]] = [
    {},
    {"Content-Type": "application/json"},
    {"Content-Type": "application/x-www-form-urlencoded"},
    {"Content-Type": "application/json", "Stripe-Signature": f"t={NOW_S},v1=" + "0" * 64},
    {"Content-Type": "application/json", "ExamplePay-Signature": f"t={NOW_S},v1=" + "0" * 64},
    {"Content-Type": "application/json", "ExamplePay-Signature": "t=abc,v1=zz,garbage"},
    {"Content-Type": "application/json", "Wechatpay-Signature": "Zm9v", "Wechatpay-Timestamp": str(NOW_S),
     "Wechatpay-Nonce": "n", "Wechatpay-Serial": "7132D72A03E93CDDF8C03BBD1F37EEDF"},
]


@pytest.mark.parametrize("headers", GARBAGE_HEADERS, ids=[f"h{i}" for i in range(len(GARBAGE_HEADERS))])
def test_garbage_callbacks_are_rejected(adapter: ChannelAdapter, headers: dict[str, str]) -> None:
    for body in GARBAGE_BODIES:
        try:
            event = adapter.parse_callback(dict(headers), body)
        except CallbackRejected as e:
            assert PAN not in str(e)
            continue
        except Exception as e:  # noqa: BLE001 - anything but CallbackRejected is a contract violation
            pytest.fail(f"parse_callback raised {type(e).__name__} on {body[:60]!r}: {e}")
        pytest.fail(f"parse_callback accepted garbage {body[:60]!r}: {event}")
