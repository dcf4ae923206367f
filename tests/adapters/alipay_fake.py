"""A protocol fake of the Alipay gateway on loopback (aiohttp), for end-to-end adapter tests.

It is written independently of `adapters.alipay.wire` (its own signing code on `cryptography`) so a
shared bug cannot hide: it verifies each request's RSA2 signature with the app public key, keeps
trades by out_trade_no, and answers precreate / pay / query / refund / close with responses signed by
its own "alipay" key, serialized with spaces (as a re-serializing verifier would not reproduce).

Simplifications (see the test module's report): a precreate trade exists at once (real Alipay creates
it only when the buyer scans), no refund query, no cancel, no notify delivery (`notify_form` builds one).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def _sign(key: rsa.RSAPrivateKey, text: str) -> str:
    return base64.b64encode(key.sign(text.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()


@dataclass
class Trade:
    out_trade_no: str
    trade_no: str
    total: Decimal
    status: str = "WAIT_BUYER_PAY"
    refunds: dict[str, Decimal] = field(default_factory=dict)  # out_request_no -> amount

    @property
    def refunded(self) -> Decimal:
        return sum(self.refunds.values(), Decimal("0"))


class AlipayFake:
    def __init__(self, app_id: str, app_public_key: rsa.RSAPublicKey, alipay_private_key: rsa.RSAPrivateKey) -> None:
        self.app_id = app_id
        self.app_public_key = app_public_key
        self.alipay_private_key = alipay_private_key
        self.trades: dict[str, Trade] = {}
        self.requests: list[dict[str, str]] = []
        self.tamper_next = False  # corrupt the next response's signature
        self.pay_script: dict[str, str] = {}  # auth_code -> "wait" | sub_code to fail with
        self._seq = 0

    # ------------------------------------------------------------------ test controls

    def mark_paid(self, out_trade_no: str) -> None:
        self.trades[out_trade_no].status = "TRADE_SUCCESS"

    def notify_form(self, out_trade_no: str, **extra: str) -> bytes:
        t = self.trades[out_trade_no]
        params = {
            "notify_time": "2026-11-25 20:00:00",
            "notify_type": "trade_status_sync",
            "notify_id": f"notify-{t.trade_no}-{len(t.refunds)}",
            "app_id": self.app_id,
            "charset": "utf-8",
            "version": "1.0",
            "trade_no": t.trade_no,
            "out_trade_no": t.out_trade_no,
            "trade_status": t.status,
            "total_amount": f"{t.total:.2f}",
            **extra,
        }
        text = "&".join(f"{k}={params[k]}" for k in sorted(params))
        params["sign"] = _sign(self.alipay_private_key, text)
        params["sign_type"] = "RSA2"
        return urlencode(params).encode()

    # ------------------------------------------------------------------ protocol

    def _answer(self, method: str, payload: dict[str, Any]) -> web.Response:
        inner = json.dumps(payload, ensure_ascii=False)  # ", " and ": " separators on purpose
        sign = _sign(self.alipay_private_key, inner)
        if self.tamper_next:
            self.tamper_next = False
            sign = ("A" if sign[0] != "A" else "B") + sign[1:]
        key = method.replace(".", "_") + "_response"
        body = '{"' + key + '": ' + inner + ', "sign": ' + json.dumps(sign) + "}"
        return web.Response(body=body.encode(), content_type="text/html", charset="utf-8")

    @staticmethod
    def _ok(**fields: Any) -> dict[str, Any]:
        return {"code": "10000", "msg": "Success", **fields}

    @staticmethod
    def _fail(sub_code: str, code: str = "40004", msg: str = "Business Failed") -> dict[str, Any]:
        return {"code": code, "msg": msg, "sub_code": sub_code, "sub_msg": sub_code.lower()}

    async def handle(self, request: web.Request) -> web.Response:
        if not request.content_type == "application/x-www-form-urlencoded":
            return web.Response(status=400, text="form expected")
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.requests.append(form)
        method = form.get("method", "")
        text = "&".join(f"{k}={form[k]}" for k in sorted(form) if k != "sign" and form[k] != "")
        try:
            self.app_public_key.verify(
                base64.b64decode(form.get("sign", "")), text.encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except (InvalidSignature, ValueError):
            return self._answer(method, self._fail("isv.invalid-signature", "40002", "Invalid Arguments"))
        if form.get("app_id") != self.app_id or form.get("sign_type") != "RSA2" or form.get("charset") != "utf-8":
            return self._answer(method, self._fail("isv.invalid-app-id", "40002", "Invalid Arguments"))
        try:
            datetime.strptime(form.get("timestamp", ""), "%Y-%m-%d %H:%M:%S")
            biz = json.loads(form["biz_content"])
        except (KeyError, ValueError):
            return self._answer(method, self._fail("isv.missing-biz-content", "40001", "Missing Required Arguments"))
        handler = {
            "alipay.trade.precreate": self._precreate,
            "alipay.trade.pay": self._pay,
            "alipay.trade.query": self._query,
            "alipay.trade.refund": self._refund,
            "alipay.trade.close": self._close,
        }.get(method)
        if handler is None:
            return self._answer("error", self._fail("isv.invalid-method", "40002", "Invalid Arguments"))
        return self._answer(method, handler(biz))

    def _create(self, biz: dict[str, Any]) -> Trade | dict[str, Any]:
        total = Decimal(biz["total_amount"])
        existing = self.trades.get(biz["out_trade_no"])
        if existing is not None:
            return existing if existing.total == total else self._fail("ACQ.CONTEXT_INCONSISTENT")
        self._seq += 1
        trade = Trade(biz["out_trade_no"], f"2026112522001{self._seq:011d}", total)
        self.trades[trade.out_trade_no] = trade
        return trade

    def _precreate(self, biz: dict[str, Any]) -> dict[str, Any]:
        trade = self._create(biz)
        if isinstance(trade, dict):
            return trade
        return self._ok(out_trade_no=trade.out_trade_no, qr_code=f"https://qr.alipay.com/fake{trade.trade_no[-6:]}")

    def _pay(self, biz: dict[str, Any]) -> dict[str, Any]:
        script = self.pay_script.get(biz.get("auth_code", ""))
        if biz.get("scene") != "bar_code" or not str(biz.get("auth_code", "")).isdigit():
            return self._fail("ACQ.PAYMENT_AUTH_CODE_INVALID")
        if script and script != "wait":
            return self._fail(script)
        trade = self._create(biz)
        if isinstance(trade, dict):
            return trade
        if trade.status == "TRADE_SUCCESS":
            return self._fail("ACQ.TRADE_HAS_SUCCESS")
        common = {"out_trade_no": trade.out_trade_no, "trade_no": trade.trade_no, "total_amount": f"{trade.total:.2f}"}
        if script == "wait":
            return {"code": "10003", "msg": "order success pay inprocess", **common}
        trade.status = "TRADE_SUCCESS"
        return self._ok(**common)

    def _query(self, biz: dict[str, Any]) -> dict[str, Any]:
        trade = self.trades.get(biz.get("out_trade_no", ""))
        if trade is None:
            return self._fail("ACQ.TRADE_NOT_EXIST")
        return self._ok(
            out_trade_no=trade.out_trade_no,
            trade_no=trade.trade_no,
            trade_status=trade.status,
            total_amount=f"{trade.total:.2f}",
        )

    def _refund(self, biz: dict[str, Any]) -> dict[str, Any]:
        trade = self.trades.get(biz.get("out_trade_no", ""))
        if trade is None:
            return self._fail("ACQ.TRADE_NOT_EXIST")
        amount = Decimal(biz["refund_amount"])
        key = biz.get("out_request_no") or trade.out_trade_no
        common = {"out_trade_no": trade.out_trade_no, "trade_no": trade.trade_no}
        if key in trade.refunds:  # a replay: Alipay answers success without moving money again
            if trade.refunds[key] != amount:
                return self._fail("ACQ.DISCORDANT_REPEAT_REQUEST")
            return self._ok(fund_change="N", refund_fee=f"{trade.refunded:.2f}", **common)
        if trade.status == "TRADE_CLOSED":
            return self._fail("ACQ.TRADE_HAS_CLOSE")
        if trade.status != "TRADE_SUCCESS":
            return self._fail("ACQ.TRADE_STATUS_ERROR")
        if amount <= 0 or trade.refunded + amount > trade.total:
            return self._fail("ACQ.REFUND_AMT_NOT_EQUAL_TOTAL")
        trade.refunds[key] = amount
        if trade.refunded == trade.total:
            trade.status = "TRADE_CLOSED"
        return self._ok(fund_change="Y", refund_fee=f"{trade.refunded:.2f}", **common)

    def _close(self, biz: dict[str, Any]) -> dict[str, Any]:
        trade = self.trades.get(biz.get("out_trade_no", ""))
        if trade is None:
            return self._fail("ACQ.TRADE_NOT_EXIST")
        if trade.status != "WAIT_BUYER_PAY":
            return self._fail("ACQ.TRADE_STATUS_ERROR")
        trade.status = "TRADE_CLOSED"
        return self._ok(out_trade_no=trade.out_trade_no, trade_no=trade.trade_no)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/gateway.do", self.handle)
        return app
