"""A protocol fake of WeChat Pay API v3 on loopback (aiohttp), for the wechatpay adapter tests.

What it does like WeChat: verifies every request's `WECHATPAY2-SHA256-RSA2048` Authorization with the
merchant public key (401 SIGN_ERROR otherwise), keeps orders by out_trade_no (same parameters -> same
code_url; different -> 403 OUT_TRADE_NO_USED; paid -> 403 ORDERPAID), answers query / close / domestic
refund, signs every answer with the platform key (`Wechatpay-*` headers), and can "pay" an order and
POST the AES-256-GCM encrypted, signed TRANSACTION.SUCCESS notification to the order's notify_url.
What it does not model: certificates download (/v3/certificates), order expiry, partial-payment
coupons (payer_total != total), refund notifications being sent, rate limits, clock skew checks on
requests, and WeChat's exact error messages.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from adapters.wechatpay import wire


@dataclass
class FakeOrder:
    out_trade_no: str
    appid: str
    description: str
    notify_url: str
    total: int
    attach: str | None
    trade_type: str
    openid: str | None
    request_body: dict[str, Any]
    state: str = "NOTPAY"
    transaction_id: str | None = None
    refunded: int = 0
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)


class WechatpayFake:
    def __init__(
        self,
        *,
        mchid: str,
        appid: str,
        merchant_public_key: rsa.RSAPublicKey,
        merchant_serial_no: str,
        platform_private_key: rsa.RSAPrivateKey,
        platform_serial_no: str,
        apiv3_key: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.mchid, self.appid = mchid, appid
        self.merchant_key, self.merchant_serial = merchant_public_key, merchant_serial_no
        self.platform_key, self.platform_serial = platform_private_key, platform_serial_no
        self.apiv3_key = apiv3_key
        self.clock = clock
        self.orders: dict[str, FakeOrder] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request that verified
        self.tamper_signatures = False  # flip one signature byte on every answer
        self.refund_status = "SUCCESS"
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v3/pay/transactions/native", self._prepay)
        app.router.add_post("/v3/pay/transactions/jsapi", self._prepay)
        app.router.add_get("/v3/pay/transactions/out-trade-no/{no}", self._query)
        app.router.add_post("/v3/pay/transactions/out-trade-no/{no}/close", self._close)
        app.router.add_post("/v3/refund/domestic/refunds", self._refund)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ signing

    def signed_headers(self, body: bytes) -> dict[str, str]:
        timestamp, nonce = str(int(self.clock())), secrets.token_hex(16)
        signature = wire.rsa_sign(self.platform_key, wire.response_message(timestamp, nonce, body))
        if self.tamper_signatures:
            raw = bytearray(signature.encode())
            raw[10] = ord("A") if raw[10] != ord("A") else ord("B")
            signature = raw.decode()
        return {
            "Wechatpay-Timestamp": timestamp,
            "Wechatpay-Nonce": nonce,
            "Wechatpay-Serial": self.platform_serial,
            "Wechatpay-Signature": signature,
            "Wechatpay-Signature-Type": wire.SCHEME,
            "Request-ID": secrets.token_hex(8),
        }

    def _answer(self, status: int, doc: dict[str, Any] | None = None) -> web.Response:
        body = orjson.dumps(doc) if doc is not None else b""
        headers = self.signed_headers(body)
        if doc is not None:
            headers["Content-Type"] = "application/json; charset=utf-8"
        return web.Response(status=status, body=body, headers=headers)

    def _error(self, status: int, code: str, message: str) -> web.Response:
        return self._answer(status, {"code": code, "message": message})

    async def _authenticated(self, request: web.Request) -> tuple[bytes, web.Response | None]:
        body = await request.read()
        fields = wire.parse_authorization(request.headers.get("Authorization", ""))
        if (
            fields is None
            or fields.get("mchid") != self.mchid
            or fields.get("serial_no") != self.merchant_serial
            or not {"nonce_str", "timestamp", "signature"} <= fields.keys()
        ):
            return body, self._error(401, "SIGN_ERROR", "Authorization header is malformed")
        message = wire.request_message(request.method, request.raw_path, fields["timestamp"], fields["nonce_str"], body)
        if not wire.rsa_verify(self.merchant_key, message, fields["signature"]):
            return body, self._error(401, "SIGN_ERROR", "signature does not verify")
        self.requests.append((request.method, request.raw_path))
        return body, None

    # ------------------------------------------------------------------ handlers

    async def _prepay(self, request: web.Request) -> web.Response:
        body, denied = await self._authenticated(request)
        if denied:
            return denied
        jsapi = request.path.endswith("/jsapi")
        try:
            doc = orjson.loads(body)
            number, total = doc["out_trade_no"], doc["amount"]["total"]
            ok = (
                isinstance(number, str)
                and 6 <= len(number) <= 32
                and isinstance(total, int)
                and total > 0
                and doc["amount"].get("currency", "CNY") == "CNY"
                and isinstance(doc["description"], str)
                and isinstance(doc["notify_url"], str)
                and (not jsapi or isinstance(doc["payer"]["openid"], str))
            )
        except (orjson.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            return self._error(400, "PARAM_ERROR", "bad parameters")
        if doc.get("mchid") != self.mchid:
            return self._error(400, "MCH_NOT_EXISTS", "unknown mchid")
        if doc.get("appid") != self.appid:
            return self._error(400, "APPID_MCHID_NOT_MATCH", "appid and mchid do not match")
        order = self.orders.get(number)
        if order is not None:
            if order.state in ("SUCCESS", "REFUND"):
                return self._error(403, "ORDERPAID", "order paid")
            if order.state == "CLOSED":
                return self._error(400, "ORDER_CLOSED", "order closed")
            if order.request_body != doc:
                return self._error(403, "OUT_TRADE_NO_USED", "out_trade_no used")
        else:
            order = FakeOrder(
                out_trade_no=number, appid=doc["appid"], description=doc["description"], notify_url=doc["notify_url"],
                total=total, attach=doc.get("attach"), trade_type="JSAPI" if jsapi else "NATIVE",
                openid=doc["payer"]["openid"] if jsapi else None, request_body=doc,
            )
            self.orders[number] = order
        if jsapi:
            return self._answer(200, {"prepay_id": f"wx{number}"})
        return self._answer(200, {"code_url": f"weixin://wxpay/bizpayurl?pr={number[:7]}"})

    def transaction(self, order: FakeOrder) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "appid": order.appid,
            "mchid": self.mchid,
            "out_trade_no": order.out_trade_no,
            "trade_type": order.trade_type,
            "trade_state": order.state,
            "trade_state_desc": {"SUCCESS": "支付成功", "NOTPAY": "未支付", "CLOSED": "已关闭", "REFUND": "转入退款"}.get(
                order.state, order.state
            ),
            "amount": {"total": order.total, "currency": "CNY"},
        }
        if order.attach is not None:
            doc["attach"] = order.attach
        if order.transaction_id:
            doc.update(
                transaction_id=order.transaction_id, bank_type="OTHERS", success_time="2026-11-25T12:00:00+08:00",
                payer={"openid": order.openid or "o-fake-payer"},
            )
            doc["amount"].update(payer_total=order.total, payer_currency="CNY")
        return doc

    async def _query(self, request: web.Request) -> web.Response:
        _, denied = await self._authenticated(request)
        if denied:
            return denied
        if request.query.get("mchid") != self.mchid:
            return self._error(400, "PARAM_ERROR", "mchid missing or wrong")
        order = self.orders.get(request.match_info["no"])
        if order is None:
            return self._error(404, "ORDER_NOT_EXIST", "order does not exist")
        return self._answer(200, self.transaction(order))

    async def _close(self, request: web.Request) -> web.Response:
        body, denied = await self._authenticated(request)
        if denied:
            return denied
        try:
            mchid = orjson.loads(body).get("mchid")
        except (orjson.JSONDecodeError, AttributeError):
            mchid = None
        if mchid != self.mchid:
            return self._error(400, "PARAM_ERROR", "mchid missing or wrong")
        order = self.orders.get(request.match_info["no"])
        if order is None:
            return self._error(404, "ORDER_NOT_EXIST", "order does not exist")
        if order.state in ("SUCCESS", "REFUND"):
            return self._error(403, "ORDERPAID", "order paid")
        order.state = "CLOSED"
        return self._answer(204)

    async def _refund(self, request: web.Request) -> web.Response:
        body, denied = await self._authenticated(request)
        if denied:
            return denied
        try:
            doc = orjson.loads(body)
            number, refund_no = doc["out_trade_no"], doc["out_refund_no"]
            amount, total = doc["amount"]["refund"], doc["amount"]["total"]
            ok = isinstance(amount, int) and isinstance(total, int) and amount > 0 and doc["amount"]["currency"] == "CNY"
        except (orjson.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            return self._error(400, "PARAM_ERROR", "bad parameters")
        order = self.orders.get(number)
        if order is None:
            return self._error(404, "RESOURCE_NOT_EXISTS", "order does not exist")
        if refund_no in order.refunds:  # out_refund_no is the refund's idempotency key
            return self._answer(200, order.refunds[refund_no])
        if order.state not in ("SUCCESS", "REFUND"):
            return self._error(400, "INVALID_REQUEST", "order not paid")
        if total != order.total:
            return self._error(400, "PARAM_ERROR", "amount.total does not match the order")
        if amount > order.total - order.refunded:
            return self._error(400, "INVALID_REQUEST", "refund exceeds the refundable amount")
        order.refunded += amount
        order.state = "REFUND"
        refund = {
            "refund_id": f"50{secrets.randbelow(10**26):026d}",
            "out_refund_no": refund_no,
            "transaction_id": order.transaction_id,
            "out_trade_no": number,
            "channel": "ORIGINAL",
            "status": self.refund_status,
            "amount": {"total": order.total, "refund": amount, "currency": "CNY"},
        }
        order.refunds[refund_no] = refund
        return self._answer(200, refund)

    # ------------------------------------------------------------------ the customer and notifications

    def pay(self, out_trade_no: str) -> FakeOrder:
        order = self.orders[out_trade_no]
        order.state = "SUCCESS"
        order.transaction_id = f"42{secrets.randbelow(10**26):026d}"
        return order

    def notification(self, out_trade_no: str, *, event_id: str | None = None) -> tuple[dict[str, str], bytes]:
        """The headers and body WeChat would POST for the order's current state."""
        order = self.orders[out_trade_no]
        nonce, associated = secrets.token_hex(6), "transaction"
        plaintext = orjson.dumps(self.transaction(order))
        body = orjson.dumps(
            {
                "id": event_id or f"EV-{secrets.token_hex(8)}",
                "create_time": "2026-11-25T12:00:00+08:00",
                "resource_type": "encrypt-resource",
                "event_type": "TRANSACTION.SUCCESS",
                "summary": "支付成功",
                "resource": {
                    "original_type": "transaction",
                    "algorithm": "AEAD_AES_256_GCM",
                    "ciphertext": wire.encrypt_resource(self.apiv3_key, nonce, associated, plaintext),
                    "associated_data": associated,
                    "nonce": nonce,
                },
            }
        )
        headers = self.signed_headers(body)
        headers["Content-Type"] = "application/json"
        return headers, body

    async def notify(self, out_trade_no: str, *, tamper: bool = False) -> tuple[int, bytes]:
        """POST the notification to the order's notify_url; returns the merchant's answer."""
        headers, body = self.notification(out_trade_no)
        if tamper:
            body = body.replace(b"TRANSACTION.SUCCESS", b"TRANSACTION.SUCCESZ")
        async with aiohttp.ClientSession() as session:
            async with session.post(self.orders[out_trade_no].notify_url, data=body, headers=headers) as resp:
                return resp.status, await resp.read()
