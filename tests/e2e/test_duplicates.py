"""Duplicate defense: idempotency keys, unique order ids, the per-order lock and the fingerprint window."""

from __future__ import annotations

import asyncio

from adapters.sandbox.server import Script
from tests.conftest import payment_body


async def test_fingerprint_window_flags_by_default(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    first = (await pr.pay(merchant_order_id="fp-1")).json()
    second = (await pr.pay(merchant_order_id="fp-2")).json()
    assert first["duplicate_of"] is None and second["duplicate_of"] == first["id"]
    other_amount = (await pr.pay(merchant_order_id="fp-3", amount=1100)).json()
    assert other_amount["duplicate_of"] is None
    assert len(a.channel.charges) == 3  # flag mode charges; the merchant sees the flag


async def test_fingerprint_window_blocks_when_configured(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a}, duplicates={"fingerprint_mode": "block", "fingerprint_window_s": 60})
    first = (await pr.pay(merchant_order_id="fpb-1")).json()
    r = await pr.pay(merchant_order_id="fpb-2")
    assert r.status_code == 409 and r.json()["code"] == "duplicate_payment_suspected"
    assert r.json()["earlier_payment_id"] == first["id"]
    assert len(a.channel.charges) == 1
    # another customer (customer_id) with the same card amount is not this customer's double submission
    ok = await pr.pay(merchant_order_id="fpb-3", customer_id="cus_other")
    assert ok.status_code == 201


async def test_fingerprint_window_off(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a}, duplicates={"fingerprint_mode": "off"})
    await pr.pay(merchant_order_id="fpo-1")
    assert (await pr.pay(merchant_order_id="fpo-2")).json()["duplicate_of"] is None


async def test_100_concurrent_identical_requests_charge_once(sandbox, payroute) -> None:
    a = await sandbox("a", Script(latency_ms=50))
    pr = await payroute({"a": a})
    body = payment_body(merchant_order_id="same-order")
    results = await asyncio.gather(*(
        pr.client.post("/v1/payments", json=body, headers={"Idempotency-Key": "same-key"}) for _ in range(100)
    ))
    assert len(a.channel.charges) == 1
    created = [r for r in results if r.status_code == 201]
    assert created and all(r.content == created[0].content for r in created)
    assert {r.status_code for r in results} <= {201, 409}
    for r in results:
        if r.status_code == 409:
            assert r.json()["code"] in ("idempotency_key_in_use", "order_in_progress", "duplicate_merchant_order_id")
    replay = await pr.client.post("/v1/payments", json=body, headers={"Idempotency-Key": "same-key"})
    assert replay.content == created[0].content and replay.headers["Idempotent-Replayed"] == "true"


async def test_100_concurrent_requests_for_one_order_with_different_keys_charge_once(sandbox, payroute) -> None:
    a = await sandbox("a", Script(latency_ms=50))
    pr = await payroute({"a": a})
    body = payment_body(merchant_order_id="one-order")
    results = await asyncio.gather(*(
        pr.client.post("/v1/payments", json=body, headers={"Idempotency-Key": f"k-{i}"}) for i in range(100)
    ))
    assert len(a.channel.charges) == 1
    ids = {r.json()["id"] for r in results if r.status_code == 201}
    assert len(ids) == 1
    existing = {r.json().get("existing_payment_id") for r in results if r.json().get("code") == "duplicate_merchant_order_id"}
    assert existing <= ids


async def test_a_declined_order_can_be_paid_again_only_when_allowed(sandbox, payroute) -> None:
    a = await sandbox("a")
    declined = {"type": "card", "card": {"number": "4000000000000002", "exp_month": 12, "exp_year": 2034, "cvc": "123"}}
    strict = await payroute({"a": a})
    first = (await strict.pay(merchant_order_id="again-1", payment_method=declined)).json()
    assert first["status"] == "declined"
    r = await strict.pay(merchant_order_id="again-1")
    assert r.status_code == 409 and r.json()["existing_payment_id"] == first["id"]

    lenient = await payroute({"a": a}, duplicates={"allow_retry_after_failure": True})
    first = (await lenient.pay(merchant_order_id="again-2", payment_method=declined)).json()
    second = await lenient.pay(merchant_order_id="again-2")
    assert second.status_code == 201 and second.json()["status"] == "captured" and second.json()["id"] != first["id"]
    third = await lenient.pay(merchant_order_id="again-2")  # the order is paid now: no third payment
    assert third.status_code == 409 and third.json()["existing_payment_id"] == second.json()["id"]
