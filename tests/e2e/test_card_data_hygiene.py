"""Card numbers and CVCs never reach a log line, a metric, the database, an error or an event.

Runs payments with real test PANs through every path (approve, decline, fail-over, timeout, invalid
requests that carry a PAN) with logging at DEBUG, then scans everything payroute produced.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import httpx

from adapters.sandbox.server import Script
from router.logs import setup_logging
from tests.conftest import payment_body

PANS = {
    "4242424242424242": "831",
    "5555555555554444": "620",
    "378282246310005": "7391",  # amex: 4-digit CVC
    "4000000000000002": "593",  # hard decline
    "4000000000009995": "441",  # insufficient funds
    "6011111111111117": "902",
}


def scan(blob: bytes | str, where: str) -> None:
    text = blob.decode("latin-1") if isinstance(blob, bytes) else blob
    for pan, cvc in PANS.items():
        assert pan not in text, f"PAN {pan[:6]}… found in {where}"
        assert f'"{cvc}"' not in text and f"cvc={cvc}" not in text, f"CVC found in {where}"
    assert '"cvc"' not in text.lower() or where == "sandbox request", f"a cvc field found in {where}"


async def test_no_card_data_anywhere(sandbox, payroute, tmp_path: Path) -> None:
    stream = io.StringIO()
    setup_logging("DEBUG", stream)
    try:
        soft = await sandbox("soft", Script(approval_rate=0.0, decline_codes={"issuer_unavailable": 1}))
        ok = await sandbox("ok")
        hang = await sandbox("hang", Script(failure="hang", hang_s=3))
        pr = await payroute({"soft": soft, "ok": ok})
        responses: list[httpx.Response] = []
        for i, (pan, cvc) in enumerate(PANS.items()):
            card = {"number": pan, "exp_month": 12, "exp_year": 2034, "cvc": cvc}
            body = payment_body(merchant_order_id=f"hyg-{i}", payment_method={"type": "card", "card": card})
            responses.append(await pr.client.post("/v1/payments", json=body, headers={"Idempotency-Key": f"hyg-{i}"}))
            # the same key again: the replay must not carry card data either
            responses.append(await pr.client.post("/v1/payments", json=body, headers={"Idempotency-Key": f"hyg-{i}"}))
            # invalid requests that still carry the PAN: expired, bad CVC, unknown field, wrong currency
            for bad in (
                {**card, "exp_year": 2001},
                {**card, "cvc": "12x"},
                {**card, "cvv": cvc},
            ):
                responses.append(await pr.client.post(
                    "/v1/payments", json=payment_body(merchant_order_id=f"bad-{i}", payment_method={"type": "card", "card": bad})
                ))
            responses.append(await pr.client.post(
                "/v1/payments", json=payment_body(merchant_order_id=f"badc-{i}", currency="ZZZ",
                                                  payment_method={"type": "card", "card": card})))
            # a malformed body with the PAN inside
            responses.append(await pr.client.post(
                "/v1/payments", content=f'{{"amount": 1, "card": "{pan}", '.encode(), headers={"Content-Type": "application/json"}
            ))
        # a payment that times out (pending) on a hanging channel, with operations on an approved one
        pr2 = await payroute({"hang": hang}, chan_over={"hang": {"timeouts": {"connect_ms": 100, "total_ms": 200}}})
        responses.append(await pr2.pay(merchant_order_id="hyg-hang"))
        approved = [r.json() for r in responses if r.status_code == 201 and r.json()["status"] == "captured"]
        assert approved, "no payment was approved: the scan would prove little"
        for p in approved[:2]:
            responses.append(await pr.client.post(f"/v1/payments/{p['id']}/refunds", json={"amount": 1}))
            responses.append(await pr.client.get(f"/v1/payments/{p['id']}"))
        assert any(r.status_code == 400 for r in responses)
        assert any(r.status_code == 201 and r.json()["status"] == "declined" for r in responses)

        for r in responses:
            scan(r.content, f"response {r.request.method} {r.request.url.path} {r.status_code}")
            scan(str(dict(r.headers)), "response headers")
        scan((await pr.client.get("/metrics")).text, "metrics")
        for ev_holder in approved:
            for ev in await pr.pipeline.store.outbox_events(ev_holder["id"]):
                scan(ev.payload, "outbox event")
        await pr.client.aclose()
        logs = stream.getvalue()
        assert "pending" in logs or "outcome unknown" in logs  # the logs did capture the run
        scan(logs, "logs")
    finally:
        logging.getLogger().handlers.clear()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            scan(path.read_bytes(), f"file {path.name}")
