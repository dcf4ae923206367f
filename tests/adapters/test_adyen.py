"""The Adyen Checkout v71 adapter: golden wire requests, one row per code-table entry, hostile channel
answers, notifications (and their HMAC against the official Adyen SDK), and the whole lifecycle through
a spec-driven fake (tests/adapters/adyen_fake.py) that validates every request against the v71 OpenAPI
document."""

from __future__ import annotations

import copy
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from adapters.adyen import codes, wire
from adapters.adyen.adapter import NO_STATUS_QUERY, AdyenAdapter
from router.errors import CallbackRejected, ChannelUnavailable, IntegrationError, OutcomeUnknown
from router.model import (
    CardSummary,
    ChannelAuthorize,
    ChannelOperation,
    ChannelResult,
    Outcome,
    SensitiveCard,
    WireRequest,
    WireResponse,
)
from tests.adapters.adyen_fake import THREEDS_CARD, AdyenFake, Spec

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from Adyen.util import generate_notification_sig, is_valid_hmac_notification

HMAC_HEX = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"
CREDS = {
    "api_key": "AQE_test_api_key_0001",
    "merchant_account": "PayrouteECOM",
    "hmac_key": HMAC_HEX,
    "return_url": "https://shop.example/return",
}
JSON = {"Content-Type": "application/json"}
CODE_ROWS = sorted(codes.REFUSAL_REASONS.items(), key=lambda kv: int(kv[0]))
PAN = "4111111111111111"


def card(number: str = PAN, holder: str | None = "Jo Doe", cvc: str | None = "737") -> SensitiveCard:
    summary = CardSummary(bin=number[:6], last4=number[-4:], brand="visa", exp_month=3, exp_year=2030, fingerprint="fp")
    return SensitiveCard(number, cvc, 3, 2030, holder, summary)


def authorize(**over: Any) -> ChannelAuthorize:
    fields: dict[str, Any] = {
        "payment_id": "pay_01HZX", "attempt": 1, "channel_key": "ck_pay_01HZX_1", "reference": "ck_pay_01HZX_1",
        "amount": 1099, "currency": "EUR", "exponent": 2, "country": "NL", "capture": False, "card": card(),
    }
    fields.update(over)
    return ChannelAuthorize(**fields)


def operation(kind: str, psp: str = "PSP0000000000001", amount: int = 1099, key: str = "op_pay_01HZX_c1") -> ChannelOperation:
    return ChannelOperation(kind=kind, payment_id="pay_01HZX", channel_reference=psp, channel_key=key, amount=amount,
                            currency="EUR")


def resp(status: int, body: Any, headers: dict[str, str] | None = None) -> WireResponse:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return WireResponse(status=status, headers=JSON if headers is None else headers, body=raw)


@pytest.fixture
def adapter() -> AdyenAdapter:
    return AdyenAdapter(CREDS)


# --------------------------------------------------------------------------- golden requests


def test_golden_authorize_manual_capture(adapter: AdyenAdapter) -> None:
    w = adapter.build_authorize(authorize())
    assert (w.method, w.path) == ("POST", "/v71/payments")
    assert w.headers == {"Content-Type": "application/json", "X-API-Key": "AQE_test_api_key_0001",
                         "Idempotency-Key": "ck_pay_01HZX_1"}
    assert w.body == (
        b'{"merchantAccount":"PayrouteECOM","amount":{"currency":"EUR","value":1099},"reference":"ck_pay_01HZX_1",'
        b'"paymentMethod":{"type":"scheme","number":"4111111111111111","expiryMonth":"03","expiryYear":"2030",'
        b'"cvc":"737","holderName":"Jo Doe"},"returnUrl":"https://shop.example/return","countryCode":"NL",'
        b'"shopperInteraction":"Ecommerce","additionalData":{"manualCapture":"true"}}'
    )


def test_golden_authorize_auto_capture_without_optional_card_fields(adapter: AdyenAdapter) -> None:
    w = adapter.build_authorize(authorize(capture=True, card=card(holder=None, cvc=None), amount=5, currency="JPY",
                                          exponent=0, return_url="https://merchant.example/r"))
    body = orjson.loads(w.body)
    assert body["paymentMethod"] == {"type": "scheme", "number": PAN, "expiryMonth": "03", "expiryYear": "2030"}
    assert body["captureDelayHours"] == 0 and "additionalData" not in body
    assert body["amount"] == {"currency": "JPY", "value": 5}
    assert body["returnUrl"] == "https://merchant.example/r"


@pytest.mark.parametrize(
    ("kind", "path", "body"),
    [
        ("capture", "/v71/payments/PSP0000000000001/captures",
         b'{"merchantAccount":"PayrouteECOM","reference":"op_pay_01HZX_c1","amount":{"currency":"EUR","value":500}}'),
        ("refund", "/v71/payments/PSP0000000000001/refunds",
         b'{"merchantAccount":"PayrouteECOM","reference":"op_pay_01HZX_c1","amount":{"currency":"EUR","value":500}}'),
        ("void", "/v71/payments/PSP0000000000001/cancels",
         b'{"merchantAccount":"PayrouteECOM","reference":"op_pay_01HZX_c1"}'),
    ],
)
def test_golden_operations(adapter: AdyenAdapter, kind: str, path: str, body: bytes) -> None:
    w = adapter.build_operation(operation(kind, amount=500))
    assert (w.method, w.path, w.body) == ("POST", path, body)
    assert w.headers["Idempotency-Key"] == "op_pay_01HZX_c1" and w.headers["X-API-Key"] == CREDS["api_key"]


def test_operation_path_escapes_the_psp_reference(adapter: AdyenAdapter) -> None:
    assert adapter.build_operation(operation("void", psp="A/B?x")).path == "/v71/payments/A%2FB%3Fx/cancels"


def test_unknown_operation_and_wallets_are_integration_errors(adapter: AdyenAdapter) -> None:
    with pytest.raises(IntegrationError):
        adapter.build_operation(operation("reverse"))
    with pytest.raises(IntegrationError) as e:
        adapter.build_authorize(authorize(method="alipay", card=None, wallet={"flow": "qr"}))
    assert PAN not in str(e.value)


# --------------------------------------------------------------------------- idempotency and references


def test_key_and_reference_come_from_the_attempt_and_are_deterministic(adapter: AdyenAdapter) -> None:
    a, b = adapter.build_authorize(authorize()), adapter.build_authorize(authorize())
    assert a == b  # a retry sends the very same bytes under the same key
    other = adapter.build_authorize(authorize(channel_key="ck_pay_01HZX_2", reference="ref_2"))
    assert other.headers["Idempotency-Key"] == "ck_pay_01HZX_2"
    assert orjson.loads(other.body)["reference"] == "ref_2"


def test_idempotency_key_longer_than_64_is_refused_before_sending(adapter: AdyenAdapter) -> None:
    assert len(adapter.build_authorize(authorize(channel_key="k" * 64)).headers["Idempotency-Key"]) == 64
    with pytest.raises(IntegrationError):
        adapter.build_authorize(authorize(channel_key="k" * 65))
    with pytest.raises(IntegrationError):
        adapter.build_operation(operation("capture", key=""))


def test_credentials_are_checked_at_construction() -> None:
    for missing in CREDS:
        with pytest.raises(ValueError, match=missing):
            AdyenAdapter({k: v for k, v in CREDS.items() if k != missing})
    with pytest.raises(ValueError, match="hex"):
        AdyenAdapter({**CREDS, "hmac_key": "not-hex"})


# --------------------------------------------------------------------------- status: there is none


def test_status_query_is_consistently_unknown(adapter: AdyenAdapter) -> None:
    with pytest.raises(OutcomeUnknown, match=NO_STATUS_QUERY):
        adapter.build_status("ref", "PSP1")
    with pytest.raises(OutcomeUnknown, match=NO_STATUS_QUERY):
        adapter.parse_status(resp(200, {"resultCode": "Authorised", "pspReference": "PSP1"}))
    assert "status" not in adapter.capabilities().operations
    assert {"authorize", "capture", "void", "refund"} <= adapter.capabilities().operations


# --------------------------------------------------------------------------- code table: one row per entry


@pytest.mark.parametrize(("code", "entry"), CODE_ROWS)
def test_refusal_code_row(adapter: AdyenAdapter, code: str, entry: tuple[str, Outcome]) -> None:
    text, outcome = entry
    r = adapter.parse_authorize(resp(200, {"resultCode": "Refused", "pspReference": "PSP1", "refusalReason": text,
                                           "refusalReasonCode": code}))
    assert (r.outcome, r.code, r.channel_reference) == (outcome, code, "PSP1")
    assert codes.code_for_reason(text) == code
    assert codes.is_technical(code) == (code in {"4", "9", "19", "21", "39", "42"})
    # technical refusals are exactly the soft ones, except "not supported" (soft, but not a retry)
    assert (outcome is Outcome.SOFT_DECLINE) == (codes.is_technical(code) or code == "10")


def test_unknown_and_missing_refusal_codes_are_hard(adapter: AdyenAdapter) -> None:
    assert codes.classify("999") is Outcome.HARD_DECLINE and codes.classify(None) is Outcome.HARD_DECLINE
    r = adapter.parse_authorize(resp(200, {"resultCode": "Refused", "pspReference": "PSP1"}))
    assert (r.outcome, r.code) == (Outcome.HARD_DECLINE, "refused")
    assert codes.code_for_reason("Refused: 05 Do not honor") == "2" and codes.code_for_reason("") is None


# --------------------------------------------------------------------------- result codes


@pytest.mark.parametrize(
    ("result_code", "outcome"),
    [
        ("Authorised", Outcome.APPROVED),
        ("Cancelled", Outcome.HARD_DECLINE),
        ("Pending", Outcome.PENDING),
        ("Received", Outcome.PENDING),
    ],
)
def test_result_code_rows(adapter: AdyenAdapter, result_code: str, outcome: Outcome) -> None:
    r = adapter.parse_authorize(resp(200, {"resultCode": result_code, "pspReference": "PSP1"}))
    assert (r.outcome, r.channel_reference) == (outcome, "PSP1")
    assert r.captured is False  # Adyen does not echo the capture mode; the pipeline applies the request's


@pytest.mark.parametrize("result_code", ["RedirectShopper", "IdentifyShopper", "ChallengeShopper", "PresentToShopper"])
def test_shopper_actions_require_action(adapter: AdyenAdapter, result_code: str) -> None:
    action = {"type": "threeDS2", "token": "tok", "paymentMethodType": "scheme"}
    r = adapter.parse_authorize(resp(200, {"resultCode": result_code, "pspReference": "PSP1", "action": action}))
    assert r.outcome is Outcome.REQUIRES_ACTION and r.next_action == {"type": "adyen_action", "action": action}
    with pytest.raises(OutcomeUnknown):
        adapter.parse_authorize(resp(200, {"resultCode": result_code, "pspReference": "PSP1"}))


def test_redirect_action_becomes_a_redirect(adapter: AdyenAdapter) -> None:
    action = {"type": "redirect", "url": "https://acs.example/x", "method": "GET"}
    r = adapter.parse_authorize(resp(200, {"resultCode": "RedirectShopper", "pspReference": "P", "action": action}))
    assert r.next_action == {"type": "redirect", "url": "https://acs.example/x", "method": "GET"}


@pytest.mark.parametrize(
    "body",
    [
        {"resultCode": "Error", "pspReference": "PSP1", "refusalReason": "Acquirer Error"},
        {"resultCode": "PartiallyAuthorised", "pspReference": "PSP1"},
        {"resultCode": "Success", "pspReference": "PSP1"},
        {"resultCode": "SomethingNew", "pspReference": "PSP1"},
        {"pspReference": "PSP1"},
        {"resultCode": "Authorised"},  # approved but nothing to capture by
        {"resultCode": "Authorised", "pspReference": 12},
        {"resultCode": ["Authorised"], "pspReference": "PSP1"},
        [],
        {},
    ],
)
def test_ambiguous_200_answers_are_unknown(adapter: AdyenAdapter, body: Any) -> None:
    with pytest.raises(OutcomeUnknown):
        adapter.parse_authorize(resp(200, body))


# --------------------------------------------------------------------------- hostile HTTP answers


@pytest.mark.parametrize("status", [401, 403, 429])
def test_not_processed_statuses_are_unavailable(adapter: AdyenAdapter, status: int) -> None:
    for body in ({"status": status, "errorCode": "000", "message": "x", "errorType": "security"}, b"", b"<html>"):
        with pytest.raises(ChannelUnavailable):
            adapter.parse_authorize(resp(status, body))
        with pytest.raises(ChannelUnavailable):
            adapter.parse_operation(operation("capture"), resp(status, body))


@pytest.mark.parametrize("status", [409, 500, 502, 503, 504, 302, 201, 204])
def test_maybe_processed_statuses_are_unknown(adapter: AdyenAdapter, status: int) -> None:
    with pytest.raises(OutcomeUnknown):
        adapter.parse_authorize(resp(status, {"status": status, "errorCode": "704", "message": "x"}))


@pytest.mark.parametrize("status", [400, 404, 422])
def test_validation_errors_are_soft_declines_with_adyens_code(adapter: AdyenAdapter, status: int) -> None:
    body = {"status": status, "errorCode": "101", "message": "Invalid card number", "errorType": "validation"}
    r = adapter.parse_authorize(resp(status, body))
    assert (r.outcome, r.code) == (Outcome.SOFT_DECLINE, "101")
    assert "Invalid card number" not in (r.message or "")  # free text may echo card data: not kept
    r = adapter.parse_operation(operation("refund"), resp(status, body))
    assert (r.outcome, r.code) == (Outcome.SOFT_DECLINE, "101")


@pytest.mark.parametrize(
    ("status", "body", "headers"),
    [
        (200, b'{"resultCode":"Authorised","pspReference":"PSP1"', JSON),  # truncated
        (200, b"<html>Bad gateway</html>", JSON),  # not JSON
        (200, b"", JSON),
        (200, b'{"resultCode":"Authorised","pspReference":"PSP1"}', {"Content-Type": "text/html"}),
        (200, b'{"resultCode":"Authorised","pspReference":"PSP1"}', {}),
        (422, b"not json", JSON),
        (422, b'{"errorCode":"101"}', {"Content-Type": "text/plain"}),
    ],
)
def test_unreadable_answers_are_unknown_never_approved(adapter: AdyenAdapter, status: int, body: bytes,
                                                        headers: dict[str, str]) -> None:
    with pytest.raises(OutcomeUnknown):
        adapter.parse_authorize(WireResponse(status=status, headers=headers, body=body))


def test_content_type_is_matched_case_insensitively_with_parameters(adapter: AdyenAdapter) -> None:
    r = adapter.parse_authorize(resp(200, {"resultCode": "Authorised", "pspReference": "P"},
                                     {"content-type": "Application/JSON; charset=utf-8"}))
    assert r.outcome is Outcome.APPROVED


# --------------------------------------------------------------------------- modification answers


def _received(op: ChannelOperation, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"merchantAccount": "PayrouteECOM", "paymentPspReference": op.channel_reference,
                            "pspReference": "MOD0000000000001", "reference": op.channel_key, "status": "received"}
    if op.kind != "void":
        body["amount"] = {"currency": op.currency, "value": op.amount}
    body.update(over)
    return body


@pytest.mark.parametrize("kind", ["capture", "void", "refund"])
def test_received_modification_is_submitted(adapter: AdyenAdapter, kind: str) -> None:
    op = operation(kind)
    r = adapter.parse_operation(op, resp(201, _received(op)))
    assert (r.outcome, r.channel_reference, r.code) == (Outcome.APPROVED, "MOD0000000000001", "received")
    assert r.message and "notification" in r.message


@pytest.mark.parametrize(
    "over",
    [
        {"status": "failed"},
        {"paymentPspReference": "SOMEONE_ELSES_PSP"},
        {"amount": {"currency": "EUR", "value": 1}},
        {"amount": {"currency": "USD", "value": 1099}},
        {"amount": None},
        {"pspReference": None},
    ],
)
def test_odd_modification_acknowledgements_are_unknown(adapter: AdyenAdapter, over: dict[str, Any]) -> None:
    op = operation("capture")
    with pytest.raises(OutcomeUnknown):
        adapter.parse_operation(op, resp(201, _received(op, **over)))
    with pytest.raises(OutcomeUnknown):  # 200 is not how Adyen acknowledges a modification
        adapter.parse_operation(op, resp(200, _received(op)))


# --------------------------------------------------------------------------- notifications


def item(event: str = "AUTHORISATION", success: str = "true", **over: Any) -> dict[str, Any]:
    it: dict[str, Any] = {
        "pspReference": "PSP0000000000001", "merchantAccountCode": "PayrouteECOM",
        "merchantReference": "ck_pay_01HZX_1", "amount": {"value": 1099, "currency": "EUR"}, "eventCode": event,
        "success": success, "eventDate": "2026-01-01T00:00:00+01:00", "reason": "",
    }
    it.update(over)
    return it


def signed_by_sdk(it: dict[str, Any], key: str = HMAC_HEX) -> dict[str, Any]:
    out = copy.deepcopy(it)
    out["additionalData"] = {"hmacSignature": generate_notification_sig(it, key).decode()}
    return out


def signed_by_us(it: dict[str, Any], key: str = HMAC_HEX) -> dict[str, Any]:
    out = copy.deepcopy(it)
    decoded = wire.notification_decoder.decode(orjson.dumps({"notificationItems": [{"NotificationRequestItem": it}]}))
    out["additionalData"] = {"hmacSignature": wire.sign(decoded.notification_items[0].item, bytes.fromhex(key))}
    return out


def envelope(*items: dict[str, Any]) -> bytes:
    return orjson.dumps({"live": "false", "notificationItems": [{"NotificationRequestItem": i} for i in items]})


@pytest.mark.parametrize(
    ("it", "kind", "outcome", "code", "channel_reference"),
    [
        (item(), "authorization", Outcome.APPROVED, "AUTHORISATION", "PSP0000000000001"),
        (item(success="false", reason="CVC Declined"), "authorization", Outcome.HARD_DECLINE, "24", "PSP0000000000001"),
        (item(success="false", reason="Issuer Unavailable"), "authorization", Outcome.SOFT_DECLINE, "9",
         "PSP0000000000001"),
        (item(success="false", reason="Something new"), "authorization", Outcome.HARD_DECLINE, "refused",
         "PSP0000000000001"),
        (item("CAPTURE", pspReference="MOD1", originalReference="PSP0000000000001"), "capture", Outcome.APPROVED,
         "CAPTURE", "PSP0000000000001"),
        (item("CAPTURE", "false", pspReference="MOD1", originalReference="PSP0000000000001"), "capture",
         Outcome.HARD_DECLINE, "CAPTURE", "PSP0000000000001"),
        (item("CAPTURE_FAILED", pspReference="MOD1", originalReference="PSP0000000000001"), "capture",
         Outcome.HARD_DECLINE, "CAPTURE_FAILED", "PSP0000000000001"),
        (item("CANCELLATION", pspReference="MOD2", originalReference="PSP0000000000001"), "void", Outcome.APPROVED,
         "CANCELLATION", "PSP0000000000001"),
        (item("REFUND", pspReference="MOD3", originalReference="PSP0000000000001"), "refund", Outcome.APPROVED,
         "REFUND", "PSP0000000000001"),
        (item("REFUND_FAILED", pspReference="MOD3", originalReference="PSP0000000000001"), "refund",
         Outcome.HARD_DECLINE, "REFUND_FAILED", "PSP0000000000001"),
        (item("REFUNDED_REVERSED", pspReference="MOD3", originalReference="PSP0000000000001"), "refund",
         Outcome.HARD_DECLINE, "REFUNDED_REVERSED", "PSP0000000000001"),
        (item("REPORT_AVAILABLE"), "other", Outcome.PENDING, "REPORT_AVAILABLE", "PSP0000000000001"),
    ],
)
def test_notification_rows(adapter: AdyenAdapter, it: dict[str, Any], kind: str, outcome: Outcome, code: str,
                           channel_reference: str) -> None:
    event, ack = adapter.parse_callback(JSON, envelope(signed_by_sdk(it)))
    assert (event.kind, event.result.outcome, event.result.code) == (kind, outcome, code)
    assert event.channel_reference == event.result.channel_reference == channel_reference
    assert event.reference == "ck_pay_01HZX_1"
    assert event.event_id == f"{it['pspReference']}:{it['eventCode']}:{it['success']}"
    assert (ack.status, ack.body) == (200, b"[accepted]")


def _tampered(**over: Any) -> bytes:
    good = signed_by_sdk(item())
    good.update(over)
    return envelope(good)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        (JSON, _tampered(amount={"value": 109900, "currency": "EUR"})),
        (JSON, _tampered(success="false")),
        (JSON, _tampered(merchantReference="someone-else")),
        (JSON, _tampered(additionalData={"hmacSignature": ""})),
        (JSON, _tampered(additionalData={})),
        (JSON, _tampered(additionalData={"hmacSignature": "ÿÿ"})),
        (JSON, envelope(item())),  # unsigned
        (JSON, envelope(signed_by_sdk(item(), key="00" * 32))),  # another key
        (JSON, envelope(signed_by_sdk(item()), item(eventCode="CAPTURE"))),  # second item unsigned
        (JSON, envelope(signed_by_sdk(item()), signed_by_sdk(item("CAPTURE")))),  # batches are not handled
        (JSON, envelope()),
        (JSON, envelope(signed_by_sdk(item()))[:-7]),  # truncated
        (JSON, b"[accepted]"),
        (JSON, b""),
        (JSON, orjson.dumps({"notificationItems": [{"NotificationRequestItem": {"pspReference": "P"}}]})),
        ({"Content-Type": "application/x-www-form-urlencoded"}, envelope(signed_by_sdk(item()))),
    ],
)
def test_bad_notifications_are_rejected(adapter: AdyenAdapter, headers: dict[str, str], body: bytes) -> None:
    with pytest.raises(CallbackRejected):
        adapter.parse_callback(headers, body)


# --------------------------------------------------------------------------- peer: the official Adyen SDK HMAC


@pytest.mark.parametrize(
    "it",
    [
        item(),
        item("REFUND", "false", pspReference="MOD3", originalReference="PSP0000000000001", reason="Insufficient balance"),
        item(amount={"value": 0, "currency": "JPY"}, merchantReference="ref:with:colons"),
        item(merchantReference="référence-ünïcode"),
    ],
)
def test_hmac_agrees_with_the_adyen_sdk_both_ways(adapter: AdyenAdapter, it: dict[str, Any]) -> None:
    ours, theirs = signed_by_us(it), signed_by_sdk(it)
    assert ours["additionalData"] == theirs["additionalData"]
    assert is_valid_hmac_notification({"notificationItems": [{"NotificationRequestItem": ours}]}, HMAC_HEX)
    adapter.parse_callback(JSON, envelope(theirs))
    # and they agree on what does not verify
    bad = dict(ours, eventCode="CANCELLATION")
    assert not is_valid_hmac_notification({"notificationItems": [{"NotificationRequestItem": bad}]}, HMAC_HEX)
    with pytest.raises(CallbackRejected):
        adapter.parse_callback(JSON, envelope(bad))


# --------------------------------------------------------------------------- config example


def test_config_example_loads_and_builds_the_adapter() -> None:
    from router.config import load_config
    from router.runtime import KNOWN_ADAPTERS, KNOWN_POLICIES

    env = {k: "x" * 24 for k in ("PAYROUTE_FINGERPRINT_KEY", "ADYEN_API_KEY", "ADYEN_MERCHANT_ACCOUNT", "SHOP_EU_API_KEY")}
    env["ADYEN_HMAC_KEY"] = HMAC_HEX
    text = (Path(__file__).parents[2] / "config/examples/adyen.yaml").read_text()
    cfg = load_config(text, env=env, known_adapters=KNOWN_ADAPTERS | {"adyen"}, known_policies=KNOWN_POLICIES)
    (chan,) = [c for c in cfg.channels if c.adapter == "adyen"]
    assert chan.base_url == "https://checkout-test.adyen.com" and "NO" in (chan.countries or [])
    AdyenAdapter(chan.credentials)


# --------------------------------------------------------------------------- peer: the spec-driven fake


Send = Callable[[WireRequest], Awaitable[WireResponse]]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[AdyenFake, Send]]:
    f = AdyenFake(spec=Spec(), api_key=CREDS["api_key"], merchant_account=CREDS["merchant_account"],
                  hmac_key_hex=HMAC_HEX)
    runner = web.AppRunner(f.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with aiohttp.ClientSession() as session:

        async def send(w: WireRequest) -> WireResponse:
            async with session.request(w.method, base + w.path, headers=w.headers, data=w.body) as r:
                return WireResponse(status=r.status, headers=dict(r.headers), body=await r.read())

        yield f, send
    await runner.cleanup()
    # any request the adapter built that the v71 schema rejects (or any off-spec fake answer) fails here
    assert f.violations == []


async def _authorize(adapter: AdyenAdapter, send: Send, **over: Any) -> ChannelResult:
    return adapter.parse_authorize(await send(adapter.build_authorize(authorize(**over))))


async def _op(adapter: AdyenAdapter, send: Send, kind: str, psp: str, amount: int, key: str) -> ChannelResult:
    op = operation(kind, psp=psp, amount=amount, key=key)
    return adapter.parse_operation(op, await send(adapter.build_operation(op)))


def _callbacks(adapter: AdyenAdapter, f: AdyenFake) -> list[tuple[str, Outcome, int]]:
    out = []
    for note in f.notifications:
        event, ack = adapter.parse_callback(JSON, orjson.dumps(note))
        assert ack.body == b"[accepted]"
        out.append((event.kind, event.result.outcome, note["notificationItems"][0]["NotificationRequestItem"]["amount"]["value"]))
    return out


async def test_fake_rejects_what_the_spec_rejects(fake: tuple[AdyenFake, Send]) -> None:
    f, send = fake
    good = AdyenAdapter(CREDS).build_authorize(authorize())
    body = orjson.loads(good.body)
    body["paymentMethod"]["expiryMonth"] = 3  # an int where v71 wants a string
    r = await send(WireRequest(method="POST", path=good.path, headers=good.headers, body=orjson.dumps(body)))
    assert r.status == 422 and any("expiryMonth" in v for v in f.violations)
    body = orjson.loads(good.body)
    del body["returnUrl"]
    r = await send(WireRequest(method="POST", path=good.path, headers=good.headers, body=orjson.dumps(body)))
    assert r.status == 422 and any("returnUrl" in v for v in f.violations)
    r = await send(WireRequest(method="POST", path=good.path, headers={**good.headers, "Idempotency-Key": "k" * 65},
                               body=good.body))
    assert r.status == 422
    f.violations.clear()  # these were deliberate


async def test_lifecycle_auto_capture_then_refunds(adapter: AdyenAdapter, fake: tuple[AdyenFake, Send]) -> None:
    f, send = fake
    r = await _authorize(adapter, send, capture=True)
    assert r.outcome is Outcome.APPROVED and r.channel_reference
    psp = r.channel_reference
    assert f.payments[psp].captured == 1099 and not f.payments[psp].manual
    assert f.payments[psp].reference == "ck_pay_01HZX_1"
    assert (await _op(adapter, send, "refund", psp, 600, "rf1")).outcome is Outcome.APPROVED
    assert (await _op(adapter, send, "refund", psp, 499, "rf2")).outcome is Outcome.APPROVED
    over = await _op(adapter, send, "refund", psp, 1, "rf3")
    assert (over.outcome, over.code) == (Outcome.SOFT_DECLINE, "137")
    assert f.payments[psp].refunded == 1099
    assert _callbacks(adapter, f) == [("authorization", Outcome.APPROVED, 1099), ("refund", Outcome.APPROVED, 600),
                                      ("refund", Outcome.APPROVED, 499)]


async def test_lifecycle_manual_partial_capture_refund(adapter: AdyenAdapter, fake: tuple[AdyenFake, Send]) -> None:
    f, send = fake
    r = await _authorize(adapter, send, capture=False)
    assert r.outcome is Outcome.APPROVED and r.channel_reference
    psp = r.channel_reference
    assert f.payments[psp].manual and f.payments[psp].captured == 0
    cap = await _op(adapter, send, "capture", psp, 700, "cap1")
    assert cap.outcome is Outcome.APPROVED and cap.channel_reference != psp  # the capture's own pspReference
    assert (await _op(adapter, send, "capture", psp, 400, "cap2")).outcome is Outcome.SOFT_DECLINE  # > remaining
    assert (await _op(adapter, send, "refund", psp, 700, "rf1")).outcome is Outcome.APPROVED
    assert (f.payments[psp].captured, f.payments[psp].refunded) == (700, 700)
    assert [k for k, _, _ in _callbacks(adapter, f)] == ["authorization", "capture", "refund"]


async def test_lifecycle_cancel(adapter: AdyenAdapter, fake: tuple[AdyenFake, Send]) -> None:
    f, send = fake
    r = await _authorize(adapter, send)
    assert r.channel_reference
    assert (await _op(adapter, send, "void", r.channel_reference, 0, "vd1")).outcome is Outcome.APPROVED
    assert f.payments[r.channel_reference].cancelled
    assert (await _op(adapter, send, "capture", r.channel_reference, 100, "cap1")).outcome is Outcome.SOFT_DECLINE
    # a cancel of a captured payment is "received" too; the notification says it failed
    r2 = await _authorize(adapter, send, capture=True, channel_key="ck2", reference="ck2")
    assert r2.channel_reference
    assert (await _op(adapter, send, "void", r2.channel_reference, 0, "vd2")).outcome is Outcome.APPROVED
    assert _callbacks(adapter, f)[-1] == ("void", Outcome.HARD_DECLINE, 1099)


async def test_operation_on_unknown_payment_is_a_soft_decline(adapter: AdyenAdapter, fake: tuple[AdyenFake, Send]) -> None:
    _, send = fake
    r = await _op(adapter, send, "capture", "NOSUCHPSP0000000", 100, "cap1")
    assert (r.outcome, r.code) == (Outcome.SOFT_DECLINE, "167")


@pytest.mark.parametrize(("code", "entry"), CODE_ROWS)
async def test_refusals_through_the_fake(adapter: AdyenAdapter, fake: tuple[AdyenFake, Send], code: str,
                                         entry: tuple[str, Outcome]) -> None:
    f, send = fake
    r = await _authorize(adapter, send, card=card(holder=entry[0]))
    assert (r.outcome, r.code) == (entry[1], code)
    assert f.payments == {}


async def test_pending_error_and_redirect_through_the_fake(adapter: AdyenAdapter, fake: tuple[AdyenFake, Send]) -> None:
    _, send = fake
    assert (await _authorize(adapter, send, card=card(holder="PENDING"), channel_key="k1")).outcome is Outcome.PENDING
    with pytest.raises(OutcomeUnknown):
        await _authorize(adapter, send, card=card(holder="ERROR"), channel_key="k2")
    r = await _authorize(adapter, send, card=card(number=THREEDS_CARD), channel_key="k3")
    assert r.outcome is Outcome.REQUIRES_ACTION and r.next_action and r.next_action["type"] == "redirect"


async def test_channel_failures_through_the_fake(fake: tuple[AdyenFake, Send]) -> None:
    _, send = fake
    adapter = AdyenAdapter(CREDS)
    with pytest.raises(OutcomeUnknown):
        await _authorize(adapter, send, amount=50000, channel_key="k500")
    with pytest.raises(ChannelUnavailable):
        await _authorize(adapter, send, amount=429, channel_key="k429")
    with pytest.raises(ChannelUnavailable):
        await _authorize(AdyenAdapter({**CREDS, "api_key": "wrong"}), send, channel_key="k401")
    with pytest.raises(ChannelUnavailable):
        await _authorize(AdyenAdapter({**CREDS, "merchant_account": "Other"}), send, channel_key="k403")


async def test_idempotent_replay_and_conflict(adapter: AdyenAdapter, fake: tuple[AdyenFake, Send]) -> None:
    f, send = fake
    first = await _authorize(adapter, send)
    again = await _authorize(adapter, send)  # a retry after a timeout: same key, same bytes
    assert first == again and len(f.payments) == 1
    with pytest.raises(OutcomeUnknown):  # same key, different body: Adyen's 409 / 704
        await _authorize(adapter, send, amount=2000)
    assert len(f.payments) == 1
