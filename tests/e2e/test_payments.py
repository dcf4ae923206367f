"""The spine end to end: real payroute over loopback HTTP, real sandbox channels, real SQLite."""

from __future__ import annotations

from typing import Any

import httpx

from adapters.sandbox.server import Script
from tests.conftest import GOOD_CARD, payment_body

DECLINE_HARD = "4000000000000002"  # do_not_honor
DECLINE_FUNDS = "4000000000009995"  # insufficient_funds (hard)


def card(number: str) -> dict[str, Any]:
    return {"type": "card", "card": {**GOOD_CARD, "number": number}}


async def test_approved_and_captured(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    r = await pr.pay(merchant_order_id="o-approve")
    assert r.status_code == 201, r.text
    p = r.json()
    assert p["status"] == "captured"
    assert p["channel"] == "a" and p["channel_reference"].startswith("ch_")
    assert p["amount"] == 1099 and p["captured_amount"] == 1099 and p["currency"] == "USD"
    assert [(x["channel"], x["outcome"]) for x in p["attempts"]] == [("a", "approved")]
    assert p["payment_method"]["card"]["bin"] == "424242" and p["payment_method"]["card"]["last4"] == "4242"
    assert p["routing"]["plan"] == ["a"]
    assert len(a.channel.charges) == 1 and a.channel.charges[0]["status"] == "captured"
    got = await pr.client.get(f"/v1/payments/{p['id']}")
    assert got.status_code == 200 and got.json() == p


async def test_authorize_only_then_partial_capture(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    p = (await pr.pay(capture=False, amount=5000, merchant_order_id="o-auth")).json()
    assert p["status"] == "authorized" and p["captured_amount"] == 0
    r = await pr.client.post(f"/v1/payments/{p['id']}/capture", json={"amount": 3000})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "captured" and r.json()["captured_amount"] == 3000
    assert a.channel.charges[0]["captured_amount"] == 3000
    again = await pr.client.post(f"/v1/payments/{p['id']}/capture", json={"amount": 1000})
    assert again.status_code == 409 and again.json()["code"] == "illegal_transition"
    assert again.headers["content-type"].startswith("application/problem+json")


async def test_capture_more_than_authorized_is_refused(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    p = (await pr.pay(capture=False, amount=5000, merchant_order_id="o-over")).json()
    r = await pr.client.post(f"/v1/payments/{p['id']}/capture", json={"amount": 5001})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "amount"
    assert a.channel.charges[0]["status"] == "authorized"


async def test_void_then_nothing_else(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    p = (await pr.pay(capture=False, merchant_order_id="o-void")).json()
    r = await pr.client.post(f"/v1/payments/{p['id']}/void")
    assert r.status_code == 200 and r.json()["status"] == "voided"
    assert a.channel.charges[0]["status"] == "voided"
    for action in ("capture", "void"):
        r = await pr.client.post(f"/v1/payments/{p['id']}/{action}")
        assert r.status_code == 409 and r.json()["current_status"] == "voided"
    r = await pr.client.post(f"/v1/payments/{p['id']}/refunds", json={"amount": 1})
    assert r.status_code == 409


async def test_void_after_capture_is_illegal(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    p = (await pr.pay(merchant_order_id="o-void-cap")).json()
    r = await pr.client.post(f"/v1/payments/{p['id']}/void")
    assert r.status_code == 409 and r.json()["code"] == "illegal_transition"
    assert a.channel.charges[0]["status"] == "captured"


async def test_partial_and_multiple_refunds_never_exceed_captured(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    p = (await pr.pay(amount=1000, merchant_order_id="o-refund")).json()
    url = f"/v1/payments/{p['id']}/refunds"
    r1 = await pr.client.post(url, json={"amount": 400})
    assert r1.status_code == 200 and r1.json()["status"] == "partially_refunded" and r1.json()["refunded_amount"] == 400
    over = await pr.client.post(url, json={"amount": 601})
    assert over.status_code == 400 and over.json()["errors"][0]["code"] == "amount_exceeds_refundable"
    r2 = await pr.client.post(url, json={"amount": 600})
    assert r2.status_code == 200 and r2.json()["status"] == "refunded" and r2.json()["refunded_amount"] == 1000
    r3 = await pr.client.post(url, json={"amount": 1})
    assert r3.status_code == 409
    assert a.channel.charges[0]["refunded_amount"] == 1000
    kinds = [o["kind"] for o in r2.json()["operations"]]
    assert kinds == ["refund", "refund"]


async def test_refund_before_capture_is_illegal(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    p = (await pr.pay(capture=False, merchant_order_id="o-rbc")).json()
    r = await pr.client.post(f"/v1/payments/{p['id']}/refunds", json={"amount": 100})
    assert r.status_code == 409 and r.json()["current_status"] == "authorized"


async def test_hard_decline_does_not_fail_over(sandbox, payroute) -> None:
    a, b = await sandbox("a"), await sandbox("b")
    pr = await payroute({"a": a, "b": b})
    r = await pr.pay(payment_method=card(DECLINE_HARD), merchant_order_id="o-hard")
    p = r.json()
    assert r.status_code == 201 and p["status"] == "declined"
    assert p["decline"] == {"code": "do_not_honor", "message": p["decline"]["message"], "category": "hard", "channel": "a"}
    assert [x["channel"] for x in p["attempts"]] == ["a"]
    assert b.channel.charges == []


async def test_soft_decline_fails_over_and_second_channel_approves(sandbox, payroute) -> None:
    a = await sandbox("a", Script(approval_rate=0.0, decline_codes={"issuer_unavailable": 1}))
    b = await sandbox("b")
    pr = await payroute({"a": a, "b": b})
    p = (await pr.pay(merchant_order_id="o-soft")).json()
    assert p["status"] == "captured" and p["channel"] == "b"
    assert [(x["channel"], x["outcome"], x["code"]) for x in p["attempts"]] == [
        ("a", "soft_decline", "issuer_unavailable"),
        ("b", "approved", "captured"),
    ]
    assert len(a.channel.charges) == 1 and a.channel.charges[0]["status"] == "declined"
    assert len(b.channel.charges) == 1 and b.channel.charges[0]["status"] == "captured"


async def test_every_channel_soft_declines(sandbox, payroute) -> None:
    a = await sandbox("a", Script(approval_rate=0.0, decline_codes={"try_again_later": 1}))
    b = await sandbox("b", Script(approval_rate=0.0, decline_codes={"processing_error": 1}))
    pr = await payroute({"a": a, "b": b})
    p = (await pr.pay(merchant_order_id="o-allsoft")).json()
    assert p["status"] == "declined" and p["decline"]["category"] == "soft"
    assert p["decline"]["code"] == "processing_error" and p["channel"] is None


async def test_timeout_after_sending_goes_pending_and_never_fails_over(sandbox, payroute) -> None:
    a = await sandbox("a", Script(failure="hang", hang_s=5))
    b = await sandbox("b")
    pr = await payroute({"a": a, "b": b}, chan_over={"a": {"timeouts": {"connect_ms": 200, "total_ms": 300}}})
    p = (await pr.pay(merchant_order_id="o-timeout")).json()
    assert p["status"] == "pending"
    assert [(x["channel"], x["outcome"]) for x in p["attempts"]] == [("a", "unknown")]
    assert p["channel"] == "a"
    assert b.channel.charges == []  # never failed over
    assert len(a.channel.charges) == 1  # the hung channel did charge
    # a status query on the same channel, by the attempt's deterministic reference, settles it
    stored = await pr.pipeline.get("alpha", p["id"])
    resolved = await pr.pipeline.resolve_pending(stored)
    assert resolved.status.value == "captured" and resolved.channel_reference == a.channel.charges[0]["id"]
    assert b.channel.charges == []


async def test_5xx_after_accepting_goes_pending(sandbox, payroute) -> None:
    a = await sandbox("a", Script(failure="error_after"))
    b = await sandbox("b")
    pr = await payroute({"a": a, "b": b})
    p = (await pr.pay(merchant_order_id="o-5xx")).json()
    assert p["status"] == "pending" and b.channel.charges == []
    assert p["attempts"][0]["outcome"] == "unknown" and p["attempts"][0]["retries"] == 0


async def test_pending_resolves_to_failed_when_channel_never_charged(sandbox, payroute) -> None:
    a = await sandbox("a", Script(failure="error_after"))
    pr = await payroute({"a": a})
    p = (await pr.pay(merchant_order_id="o-notcharged")).json()
    assert p["status"] == "pending"
    a.channel.reset()  # the channel lost it: its answer to the status query is "no such charge"
    resolved = await pr.pipeline.resolve_pending(await pr.pipeline.get("alpha", p["id"]))
    assert resolved.status.value == "failed" and resolved.decline.code == "not_charged"


async def test_unavailable_before_accepting_is_retried_then_fails_over(sandbox, payroute) -> None:
    a = await sandbox("a", Script(failure="error_before"))
    b = await sandbox("b")
    pr = await payroute({"a": a, "b": b})
    p = (await pr.pay(merchant_order_id="o-unavail")).json()
    assert p["status"] == "captured" and p["channel"] == "b"
    first = p["attempts"][0]
    assert first["outcome"] == "unavailable" and first["retries"] == 1  # retry.attempts = 2
    assert a.channel.charges == []


async def test_breaker_opens_skips_then_half_open_probe_closes(sandbox, payroute) -> None:
    a = await sandbox("a", Script(failure="error_before"))
    b = await sandbox("b")
    pr = await payroute({"a": a, "b": b}, chan_over={"a": {"breaker": {"fail_max": 3, "reset_timeout_s": 0.3}}})
    for i in range(3):
        p = (await pr.pay(merchant_order_id=f"o-br-{i}")).json()
        assert p["attempts"][0]["outcome"] == "unavailable"
    assert pr.runtime.channels["a"].breaker.state == "open"
    p = (await pr.pay(merchant_order_id="o-br-skip")).json()
    assert [x["channel"] for x in p["attempts"]] == ["b"]  # a removed by the breaker filter
    assert p["routing"]["removed"] == {"a": "breaker"}
    metrics = (await pr.client.get("/metrics")).text
    assert 'payroute_breaker_state{channel="a"} 2.0' in metrics
    await a.set_script(Script())  # the channel recovers
    import asyncio

    await asyncio.sleep(0.35)  # past reset_timeout: the next payment is the half-open probe
    p = (await pr.pay(merchant_order_id="o-br-probe")).json()
    assert p["channel"] == "a" and p["status"] == "captured"
    assert pr.runtime.channels["a"].breaker.state == "closed"


async def test_channel_refusing_connections_fails_over(sandbox, payroute) -> None:
    a = await sandbox("a", Script(failure="refuse"))
    b = await sandbox("b")
    pr = await payroute({"a": a, "b": b})
    p = (await pr.pay(merchant_order_id="o-refuse")).json()
    assert p["status"] == "captured" and p["channel"] == "b"
    assert p["attempts"][0]["outcome"] == "unavailable" and p["attempts"][0]["code"] in ("connect", "connect_timeout")


async def test_no_eligible_channel_fails_without_calling_any(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a}, chan_over={"a": {"currencies": ["EUR"]}})
    r = await pr.pay(merchant_order_id="o-noch")
    p = r.json()
    assert r.status_code == 201 and p["status"] == "failed" and p["decline"]["code"] == "no_eligible_channel"
    assert p["routing"]["removed"] == {"a": "currency"}
    assert a.channel.charges == []


async def test_compliance_blocks_before_any_channel(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    r = await pr.pay(country="KP", merchant_order_id="o-kp")
    p = r.json()
    assert r.status_code == 201 and p["status"] == "failed"
    assert p["decline"]["code"] == "compliance_blocked" and p["routing"]["blocked_by"] == "sanctions-kp"
    assert p["attempts"] == [] and a.channel.charges == []


async def test_duplicate_merchant_order_id_is_409_with_existing_id(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    first = (await pr.pay(merchant_order_id="o-dup")).json()
    r = await pr.pay(merchant_order_id="o-dup")
    assert r.status_code == 409 and r.json()["code"] == "duplicate_merchant_order_id"
    assert r.json()["existing_payment_id"] == first["id"]
    assert len(a.channel.charges) == 1


async def test_merchant_isolation(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    p = (await pr.pay(merchant_order_id="o-iso", capture=False)).json()
    for method, path in (("GET", ""), ("POST", "/capture"), ("POST", "/void")):
        r = await pr.other.request(method, f"/v1/payments/{p['id']}{path}")
        assert r.status_code == 404 and r.json()["code"] == "payment_not_found"
    r = await pr.other.post(f"/v1/payments/{p['id']}/refunds", json={"amount": 1})
    assert r.status_code == 404
    assert a.channel.charges[0]["status"] == "authorized"
    # the same merchant order id is fine for another merchant
    r = await pr.other.post("/v1/payments", json=payment_body(merchant_order_id="o-iso"))
    assert r.status_code == 201


async def test_authentication_required(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    async with httpx.AsyncClient(base_url=pr.base_url) as anon:
        r = await anon.post("/v1/payments", json=payment_body())
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
        r = await anon.post("/v1/payments", json=payment_body(), headers={"Authorization": "Bearer sk_wrong_key_123456"})
        assert r.status_code == 401 and r.json()["code"] == "invalid_api_key"
    assert a.channel.charges == []


async def test_idempotent_replay_and_conflicts(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    body = payment_body(merchant_order_id="o-idem")
    h = {"Idempotency-Key": "key-1"}
    r1 = await pr.client.post("/v1/payments", json=body, headers=h)
    r2 = await pr.client.post("/v1/payments", json=body, headers=h)
    assert r1.status_code == r2.status_code == 201
    assert r2.content == r1.content and r2.headers["Idempotent-Replayed"] == "true"
    assert len(a.channel.charges) == 1
    r3 = await pr.client.post("/v1/payments", json={**body, "amount": 1}, headers=h)
    assert r3.status_code == 422 and r3.json()["code"] == "idempotency_key_reused"
    assert len(a.channel.charges) == 1


async def test_health_ready_openapi(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    assert (await pr.client.get("/healthz")).json()["status"] == "ok"
    ready = (await pr.client.get("/readyz")).json()
    assert ready["status"] == "ready" and ready["breakers"] == {"a": 0}
    spec = (await pr.client.get("/openapi.json")).json()
    assert "/v1/payments" in spec["paths"]


async def test_metrics_count_outcomes_and_attempts(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    await pr.pay(merchant_order_id="o-m1")
    await pr.pay(merchant_order_id="o-m2", payment_method=card(DECLINE_FUNDS))
    text = (await pr.client.get("/metrics")).text
    assert 'payroute_payments_total{channel="a",status="captured"} 1.0' in text
    assert 'payroute_payments_total{channel="a",status="declined"} 1.0' in text
    assert 'payroute_attempts_total{channel="a",outcome="approved"} 1.0' in text
    assert 'payroute_http_requests_total{method="POST",route="/v1/payments",status="201"} 2.0' in text
    assert 'payroute_attempt_duration_seconds_count{channel="a"} 2.0' in text


async def test_every_state_change_has_its_outbox_event(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    p = (await pr.pay(merchant_order_id="o-outbox", capture=False)).json()
    await pr.client.post(f"/v1/payments/{p['id']}/capture", json={})
    await pr.client.post(f"/v1/payments/{p['id']}/refunds", json={"amount": 100})
    events = await pr.pipeline.store.outbox_events(p["id"])
    assert [e.type for e in events] == ["payment.authorized", "payment.captured", "payment.partially_refunded"]
    stored = await pr.pipeline.get("alpha", p["id"])
    # processing -> authorized -> capture claimed -> captured -> refund claimed -> partially_refunded: the
    # claims (an operation recorded pending before the channel hears of it) change no status and carry no
    # event, like the processing record before the first channel call
    assert stored.version == 6


# ------------------------------------------------------------------ operations: claimed before the channel call


async def test_capture_with_an_unknown_outcome_is_202_pending_and_blocks_another(sandbox, payroute, monkeypatch) -> None:
    from router.errors import OutcomeUnknown

    a = await sandbox("a")
    pr = await payroute({"a": a})
    p = (await pr.pay(merchant_order_id="o-cap-unknown", capture=False)).json()
    real_send = pr.pipeline._send
    sent: list[str] = []

    async def send_then_lose_the_answer(ch, wire, deadline, parse, on_retry):  # type: ignore[no-untyped-def]
        sent.append(wire.path)
        await real_send(ch, wire, deadline, parse, on_retry)  # the channel captures ...
        raise OutcomeUnknown("timeout")  # ... and its answer is lost

    monkeypatch.setattr(pr.pipeline, "_send", send_then_lose_the_answer)
    r = await pr.client.post(f"/v1/payments/{p['id']}/capture", json={"amount": 500})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "authorized" and body["captured_amount"] == 0
    assert [(o["kind"], o["amount"], o["status"]) for o in body["operations"]] == [("capture", 500, "pending")]
    assert a.channel.charges[0]["captured_amount"] == 500

    for path, payload in (("capture", {"amount": 700}), ("void", {})):
        again = await pr.client.post(f"/v1/payments/{p['id']}/{path}", json=payload)
        assert again.status_code == 409 and again.json()["code"] == "operation_pending", again.text
        assert again.json()["operation_id"] == body["operations"][0]["id"]
    assert len(sent) == 1  # the refused ones never reached the channel
    assert a.channel.charges[0]["captured_amount"] == 500 and a.channel.charges[0]["status"] == "captured"
    stored = await pr.pipeline.get("alpha", p["id"])
    assert [o.status for o in stored.operations] == ["pending"]


async def test_capture_the_channel_never_heard_of_is_failed_and_may_be_retried(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    p = (await pr.pay(merchant_order_id="o-cap-refused", capture=False)).json()
    await a.set_script(Script(failure="refuse"))
    r = await pr.client.post(f"/v1/payments/{p['id']}/capture", json={})
    assert r.status_code == 503 and r.json()["code"] == "channel_unavailable"
    stored = await pr.pipeline.get("alpha", p["id"])
    assert stored.status.value == "authorized"
    assert [(o.kind, o.status, o.code) for o in stored.operations] == [("capture", "failed", "channel_unavailable")]
    await a.set_script(Script())
    r = await pr.client.post(f"/v1/payments/{p['id']}/capture", json={})
    assert r.status_code == 200 and r.json()["status"] == "captured", r.text
    assert [o["status"] for o in r.json()["operations"]] == ["failed", "succeeded"]
    assert a.channel.charges[0]["captured_amount"] == p["amount"]


async def test_refunds_racing_on_one_instance_run_one_after_the_other(sandbox, payroute, monkeypatch) -> None:
    """On one instance a second refund waits for the first (across instances it gets 409 operation_pending,
    tests/e2e/test_scaleout.py): either way the channel is never asked for more than was captured."""
    import asyncio

    a = await sandbox("a")
    pr = await payroute({"a": a})
    p = (await pr.pay(merchant_order_id="o-ref-race", amount=1000)).json()
    real_send = pr.pipeline._send
    at_channel = asyncio.Event()
    release = asyncio.Event()

    async def slow_send(ch, wire, deadline, parse, on_retry):  # type: ignore[no-untyped-def]
        at_channel.set()
        await release.wait()
        return await real_send(ch, wire, deadline, parse, on_retry)

    monkeypatch.setattr(pr.pipeline, "_send", slow_send)
    first = asyncio.create_task(pr.client.post(f"/v1/payments/{p['id']}/refunds", json={"amount": 600}))
    await asyncio.wait_for(at_channel.wait(), 5)  # the first refund is claimed and at the channel
    second = asyncio.create_task(pr.client.post(f"/v1/payments/{p['id']}/refunds", json={"amount": 600}))
    await asyncio.sleep(0.05)
    stored = await pr.pipeline.get("alpha", p["id"])
    assert [(o.amount, o.status) for o in stored.operations] == [(600, "pending")]  # claimed before the call
    release.set()
    one, two = await first, await second
    assert one.status_code == 200 and one.json()["refunded_amount"] == 600
    assert two.status_code == 400 and two.json()["errors"][0]["code"] == "amount_exceeds_refundable", two.text
    assert a.channel.charges[0]["refunded_amount"] == 600
