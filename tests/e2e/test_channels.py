"""One endpoint, four real channels: a merchant's payments reach Stripe (localstripe), Adyen (the v71
spec-validating fake), Alipay and WeChat Pay (their protocol fakes) through `POST /v1/payments`, and
the channels' notifications come back through `POST /callbacks/{channel}`.

Every peer is the one the adapter's own tests use, imported from there (launcher, keys, credentials).
payroute listens on a socket bound to 127.0.0.1:0 *before* the config is built, so `server.public_url`
is its real address and the notify_url each wallet channel receives points back at it.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from router.app import PIPELINE, create_app
from tests.adapters.adyen_fake import AdyenFake, Spec
from tests.adapters.alipay_fake import AlipayFake
from tests.adapters.test_adyen import CREDS as ADYEN_CREDS
from tests.adapters.test_adyen import HMAC_HEX
from tests.adapters.test_alipay import APP_ID, Keys
from tests.adapters.test_stripe import SECRET_KEY as STRIPE_KEY
from tests.adapters.test_stripe import localstripe  # noqa: F401  (the module-scoped localstripe subprocess)
from tests.adapters.test_wechatpay import (
    APIV3_KEY,
    APPID,
    MCHID,
    MERCHANT_SERIAL,
    PLATFORM_SERIAL,
    _pem_private,
    _pem_public,
)
from tests.adapters.wechatpay_fake import WechatpayFake
from tests.conftest import API_KEY, GOOD_CARD, make_config, payment_body

FORM = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
DECLINED_BY_LOCALSTRIPE = "4000000000000341"  # attaches, then the charge fails (see test_stripe.py)


def card(number: str = "4242424242424242", **over: Any) -> dict[str, Any]:
    return {"type": "card", "card": {**GOOD_CARD, "number": number, **over}}


def entry(name: str, adapter: str, base_url: str, credentials: dict[str, str], currencies: list[str],
          countries: list[str], methods: list[str], priority: int = 10) -> dict[str, Any]:
    return {"name": name, "adapter": adapter, "base_url": base_url, "credentials": credentials,
            "currencies": currencies, "countries": countries, "methods": methods, "priority": priority,
            "timeouts": {"connect_ms": 1000, "total_ms": 10000}, "retry": {"attempts": 2, "base_ms": 1, "max_ms": 2}}


# --------------------------------------------------------------------------- peers


@dataclass
class Peers:
    stripe: str
    adyen: AdyenFake
    adyen_url: str
    alipay: AlipayFake
    alipay_url: str
    wechat: WechatpayFake
    keys: Keys
    wechat_creds: dict[str, str]

    def entries(self, **priority: int) -> dict[str, dict[str, Any]]:
        p = {"stripe": 10, "adyen": 20, "alipay": 10, "wechatpay": 10, **priority}
        return {
            "stripe": entry("stripe", "stripe", self.stripe, {"secret_key": STRIPE_KEY}, ["USD", "EUR", "CNY"],
                            ["US", "NL", "CN"], ["card"], p["stripe"]),
            "adyen": entry("adyen", "adyen", self.adyen_url, dict(ADYEN_CREDS), ["USD", "EUR", "CNY"],
                           ["US", "NL", "CN"], ["card"], p["adyen"]),
            "alipay": entry("alipay", "alipay", self.alipay_url,
                            {"app_id": APP_ID, "app_private_key": self.keys.app_private_pkcs8,
                             "alipay_public_key": self.keys.alipay_public}, ["CNY"], ["CN"], ["alipay"], p["alipay"]),
            "wechatpay": entry("wechatpay", "wechatpay", self.wechat.base_url, self.wechat_creds, ["CNY"], ["CN"],
                               ["wechatpay"], p["wechatpay"]),
        }


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def wechat_keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:  # (merchant, platform)
    return rsa.generate_private_key(public_exponent=65537, key_size=2048), rsa.generate_private_key(
        public_exponent=65537, key_size=2048)


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def peers(localstripe: str, keys: Keys, wechat_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> AsyncIterator[Peers]:  # noqa: F811
    async with httpx.AsyncClient() as c:  # localstripe starts each test from an empty store
        assert (await c.delete(f"{localstripe}/_config/data")).status_code == 200
    adyen = AdyenFake(spec=Spec(), api_key=ADYEN_CREDS["api_key"], merchant_account=ADYEN_CREDS["merchant_account"],
                      hmac_key_hex=HMAC_HEX)
    adyen_runner, adyen_url = await _serve(adyen.app())
    alipay = AlipayFake(APP_ID, keys.app.public_key(), keys.alipay)
    alipay_runner, alipay_url = await _serve(alipay.app())
    merchant, platform = wechat_keys
    wechat = WechatpayFake(mchid=MCHID, appid=APPID, merchant_public_key=merchant.public_key(),
                           merchant_serial_no=MERCHANT_SERIAL, platform_private_key=platform,
                           platform_serial_no=PLATFORM_SERIAL, apiv3_key=APIV3_KEY.encode())
    await wechat.start()
    creds = {"mchid": MCHID, "appid": APPID, "merchant_serial_no": MERCHANT_SERIAL,
             "merchant_private_key": _pem_private(merchant), "platform_public_key": _pem_public(platform.public_key()),
             "platform_serial_no": PLATFORM_SERIAL, "apiv3_key": APIV3_KEY}
    yield Peers(localstripe, adyen, adyen_url, alipay, alipay_url, wechat, keys, creds)
    await wechat.stop()
    await alipay_runner.cleanup()
    await adyen_runner.cleanup()
    assert adyen.violations == []  # every request payroute sent Adyen was valid against the v71 document


# --------------------------------------------------------------------------- payroute


@dataclass
class Payroute:
    base: str
    client: httpx.AsyncClient
    app: web.Application

    async def pay(self, order: str, **over: Any) -> dict[str, Any]:
        r = await self.client.post("/v1/payments", json=payment_body(merchant_order_id=order, **over))
        assert r.status_code == 201, r.text
        doc: dict[str, Any] = r.json()
        return doc

    async def get(self, pid: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/payments/{pid}")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    async def op(self, pid: str, kind: str, **body: Any) -> dict[str, Any]:
        r = await self.client.post(f"/v1/payments/{pid}/{kind}", json=body)
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc


Start = Callable[..., Awaitable[Payroute]]


@pytest.fixture
async def payroute(tmp_path: Path, peers: Peers) -> AsyncIterator[Start]:
    started: list[tuple[web.AppRunner, httpx.AsyncClient]] = []

    async def start(*names: str, **priority: int) -> Payroute:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))  # the port is known before the config: public_url is payroute itself
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        all_entries = peers.entries(**priority)
        cfg = make_config([all_entries[n] for n in names], tmp_path, server={"public_url": base})
        app = create_app(cfg)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        client = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        started.append((runner, client))
        return Payroute(base, client, app)

    yield start
    for runner, client in reversed(started):
        await client.aclose()
        await runner.cleanup()


# --------------------------------------------------------------------------- Stripe via localstripe


async def test_stripe_capture_authorize_partial_capture_refund_and_decline(payroute: Start, peers: Peers) -> None:
    pr = await payroute("stripe")
    p = await pr.pay("st-1")
    assert (p["status"], p["channel"], p["captured_amount"]) == ("captured", "stripe", 1099)
    assert p["channel_reference"].startswith("pi_")

    auth = await pr.pay("st-2", amount=1000, capture=False)
    assert (auth["status"], auth["channel"]) == ("authorized", "stripe")
    cap = await pr.op(auth["id"], "capture", amount=600)
    assert (cap["status"], cap["captured_amount"]) == ("captured", 600)
    ref = await pr.op(auth["id"], "refunds", amount=200)
    assert (ref["status"], ref["refunded_amount"]) == ("partially_refunded", 200)

    async with httpx.AsyncClient(base_url=peers.stripe, headers={"Authorization": f"Bearer {STRIPE_KEY}"}) as ls:
        first = (await ls.get(f"/v1/payment_intents/{p['channel_reference']}")).json()
        assert (first["amount"], first["currency"], first["status"]) == (1099, "usd", "succeeded")
        pi = (await ls.get(f"/v1/payment_intents/{auth['channel_reference']}")).json()
        assert (pi["amount"], pi["capture_method"], pi["status"]) == (1000, "manual", "succeeded")
        assert pi["metadata"] == {"payroute_reference": f"{auth['id']}-a1"}
        # localstripe models a partial capture as capturing the whole charge and refunding the rest
        # (a refund without payment_intent); our refund is the one that names the intent
        charge = pi["latest_charge"]
        assert (charge["captured"], charge["amount"]) == (True, 1000)
        ours = [r["amount"] for r in charge["refunds"]["data"] if r["payment_intent"] == pi["id"]]
        assert ours == [200]
        assert charge["amount"] - charge["amount_refunded"] == 600 - 200  # what the merchant keeps

    declined = await pr.pay("st-3", payment_method=card(DECLINED_BY_LOCALSTRIPE))
    assert (declined["status"], declined["channel"]) == ("declined", "stripe")
    assert declined["decline"]["code"] == "card_declined"


# --------------------------------------------------------------------------- Adyen via the spec fake


async def test_adyen_card_capture_refund_and_notifications(payroute: Start, peers: Peers) -> None:
    pr = await payroute("adyen")
    fake = peers.adyen
    auto = await pr.pay("ad-1", currency="EUR", country="NL")
    assert (auto["status"], auto["channel"]) == ("captured", "adyen")
    assert fake.payments[auto["channel_reference"]].captured == 1099

    auth = await pr.pay("ad-2", currency="EUR", country="NL", capture=False,
                        payment_method=card(holder_name="Jo Doe"))
    psp = auth["channel_reference"]
    assert (auth["status"], fake.payments[psp].manual, fake.payments[psp].captured) == ("authorized", True, 0)
    assert fake.payments[psp].reference == f"{auth['id']}-a1"
    assert (await pr.op(auth["id"], "capture", amount=700))["status"] == "captured"
    refunded = await pr.op(auth["id"], "refunds", amount=300)
    assert (refunded["status"], refunded["refunded_amount"]) == ("partially_refunded", 300)
    assert (fake.payments[psp].captured, fake.payments[psp].refunded) == (700, 300)

    refused = await pr.pay("ad-3", currency="EUR", country="NL", payment_method=card(holder_name="CVC Declined"))
    assert (refused["status"], refused["channel"]) == ("declined", "adyen")

    # the fake's HMAC-signed notifications (authorisation, capture, refund) are accepted; nothing moves back
    assert len(fake.notifications) == 4
    for note in fake.notifications:
        r = await pr.client.post("/callbacks/adyen", content=orjson.dumps(note), headers={"Content-Type": "application/json"})
        assert (r.status_code, r.content) == (200, b"[accepted]")
    assert (await pr.get(auth["id"]))["status"] == "partially_refunded"
    assert fake.violations == []


# --------------------------------------------------------------------------- Alipay via its fake


async def test_alipay_qr_notify_settles_and_tampered_notify_is_rejected(payroute: Start, peers: Peers) -> None:
    pr = await payroute("alipay")
    gw = peers.alipay
    p = await pr.pay("ali-1", currency="CNY", country="CN", payment_method={"type": "alipay"})
    assert (p["status"], p["channel"]) == ("requires_action", "alipay")
    assert p["next_action"]["type"] == "qr_code" and p["next_action"]["data"].startswith("https://qr.alipay.com/")
    trade_no = f"{p['id']}-a1"
    assert p["channel_reference"] == trade_no and gw.trades[trade_no].total == Decimal("10.99")
    assert gw.requests[-1]["notify_url"] == f"{pr.base}/callbacks/alipay"

    gw.mark_paid(trade_no)
    form = gw.notify_form(trade_no)
    tampered = form.replace(b"total_amount=10.99", b"total_amount=10.98")
    assert tampered != form
    r = await pr.client.post("/callbacks/alipay", content=tampered, headers=FORM)
    assert r.status_code == 401 and r.json()["code"] == "callback_rejected"
    assert (await pr.get(p["id"]))["status"] == "requires_action"

    r = await pr.client.post("/callbacks/alipay", content=form, headers=FORM)
    assert (r.status_code, r.content) == (200, b"success")
    paid = await pr.get(p["id"])
    assert (paid["status"], paid["captured_amount"], paid["next_action"]) == ("captured", 1099, None)

    refunded = await pr.op(p["id"], "refunds", amount=300)
    assert refunded["status"] == "partially_refunded"
    assert gw.trades[trade_no].refunded == Decimal("3.00")


# --------------------------------------------------------------------------- WeChat Pay via its fake


async def test_wechatpay_native_callback_from_the_fake_settles_then_partial_refund(payroute: Start, peers: Peers) -> None:
    pr = await payroute("wechatpay")
    wx = peers.wechat
    p = await pr.pay("wx-1", amount=2500, currency="CNY", country="CN", payment_method={"type": "wechatpay"})
    assert (p["status"], p["channel"]) == ("requires_action", "wechatpay")
    assert p["next_action"]["type"] == "qr_code" and p["next_action"]["data"].startswith("weixin://wxpay/")
    (order,) = wx.orders.values()
    assert (order.attach, order.total, order.trade_type) == (f"{p['id']}-a1", 2500, "NATIVE")
    assert order.notify_url == f"{pr.base}/callbacks/wechatpay"

    wx.pay(order.out_trade_no)
    status, _ = await wx.notify(order.out_trade_no, tamper=True)  # the fake POSTs to payroute's notify_url
    assert status == 401
    assert (await pr.get(p["id"]))["status"] == "requires_action"
    status, body = await wx.notify(order.out_trade_no)
    assert status == 200 and orjson.loads(body)["code"] == "SUCCESS"
    paid = await pr.get(p["id"])
    assert (paid["status"], paid["captured_amount"], paid["channel_reference"]) == ("captured", 2500, order.out_trade_no)

    refunded = await pr.op(p["id"], "refunds", amount=1000)
    assert (refunded["status"], refunded["refunded_amount"]) == ("partially_refunded", 1000)
    assert order.refunded == 1000 and list(order.refunds) == [f"{p['id']}-r1"]


async def test_wechatpay_unpaid_order_is_closed_at_the_channel_when_it_expires(payroute: Start, peers: Peers) -> None:
    pr = await payroute("wechatpay")
    p = await pr.pay("wx-2", currency="CNY", country="CN", payment_method={"type": "wechatpay"})
    (order,) = peers.wechat.orders.values()
    pipeline = pr.app[PIPELINE]
    expired = await pipeline.expire_action(await pipeline.get("alpha", p["id"]))  # what the janitor does
    assert (expired.status.value, expired.decline.code if expired.decline else None) == ("failed", "action_expired")
    assert order.state == "CLOSED"  # the customer can no longer pay an order payroute gave up on


# --------------------------------------------------------------------------- routing across all four


async def test_method_and_currency_filters_pick_the_channel_that_speaks_the_method(payroute: Start) -> None:
    # wallets outrank the card channels and wechatpay outranks alipay: only the filters can route right
    pr = await payroute("stripe", "adyen", "alipay", "wechatpay", wechatpay=1, alipay=2, adyen=5, stripe=10)
    ali = await pr.pay("rt-1", currency="CNY", country="CN", payment_method={"type": "alipay"})
    wx = await pr.pay("rt-2", currency="CNY", country="CN", payment_method={"type": "wechatpay"})
    usd = await pr.pay("rt-3", currency="USD", country="US")
    assert (ali["status"], ali["channel"], ali["routing"]["plan"]) == ("requires_action", "alipay", ["alipay"])
    assert (wx["status"], wx["channel"], wx["routing"]["plan"]) == ("requires_action", "wechatpay", ["wechatpay"])
    assert (usd["status"], usd["channel"], usd["routing"]["plan"]) == ("captured", "adyen", ["adyen", "stripe"])
    for p in (ali, wx, usd):
        assert len(p["attempts"]) == 1  # routed, not failed over
