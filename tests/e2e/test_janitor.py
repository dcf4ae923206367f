"""The janitor settles what a crash or a timeout left in flight, asking the channels, never charging twice."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import msgspec

from adapters.sandbox.server import Script
from router.config import JanitorSettings
from router.janitor import Janitor
from router.model import Payment, PaymentMethod, RoutingDecision, Status
from router.pipeline import new_id
from tests.conftest import wait_for


def later(seconds: float):  # type: ignore[no-untyped-def]
    return lambda: datetime.now(UTC) + timedelta(seconds=seconds)


def janitor(pr, **kw) -> Janitor:  # type: ignore[no-untyped-def]
    now = kw.pop("now", later(120))
    settings = JanitorSettings(**{"min_age_s": 30, "interval_s": 0.01, **kw})
    return Janitor(pr.pipeline, pr.metrics, settings, now=now)


async def test_crash_after_the_request_left_settles_on_the_channel_that_charged(sandbox, payroute) -> None:
    a = await sandbox("a", Script(failure="hang", hang_s=5))
    b = await sandbox("b")
    pr = await payroute({"a": a, "b": b}, chan_over={"a": {"timeouts": {"connect_ms": 500, "total_ms": 4000}}})
    # simulate a crash mid-call: the request reached channel a (which charged), then the process died
    task = asyncio.create_task(pr.pay(merchant_order_id="crash-1"))
    await wait_for(lambda: a.channel.charges, "channel a's charge")
    task.cancel()
    stuck = await pr.pipeline.store.list_by_status([Status.PROCESSING], datetime.now(UTC) + timedelta(seconds=1))
    assert len(stuck) == 1
    a.channel.release_holds()
    moved = await Janitor(pr.pipeline, pr.metrics, JanitorSettings(min_age_s=30), now=later(120)).run_once()
    assert moved == 1
    p = await pr.pipeline.store.get_payment(stuck[0].id)
    assert p is not None and p.status is Status.CAPTURED and p.channel == "a"
    assert p.channel_reference == a.channel.charges[0]["id"]
    assert b.channel.charges == []  # never failed over: a had charged


async def test_crash_before_anything_was_sent_fails_without_charging(sandbox, payroute) -> None:
    a, b = await sandbox("a"), await sandbox("b")
    pr = await payroute({"a": a, "b": b})
    now = datetime.now(UTC)
    p = Payment(
        id=new_id("pay"), merchant_id="alpha", merchant_order_id="crash-2", status=Status.PROCESSING, amount=500,
        currency="USD", country="US", capture=True, payment_method=PaymentMethod(type="card"),
        routing=RoutingDecision(chain="default", config_version="x", candidates=["a", "b"], plan=["a", "b"]),
        created_at=now, updated_at=now,
    )
    await pr.pipeline.store.insert_payment(p)
    assert await Janitor(pr.pipeline, pr.metrics, JanitorSettings(min_age_s=30), now=later(120)).run_once() == 1
    done = await pr.pipeline.store.get_payment(p.id)
    assert done is not None and done.status is Status.FAILED and done.decline.code == "not_charged"
    assert [x.outcome.value for x in done.attempts] == ["not_charged", "not_charged"]
    assert a.channel.charges == [] and b.channel.charges == []  # status queries only: nothing charged


async def test_young_payments_are_left_alone(sandbox, payroute) -> None:
    a = await sandbox("a", Script(failure="error_after"))
    pr = await payroute({"a": a})
    p = (await pr.pay(merchant_order_id="young")).json()
    assert p["status"] == "pending"
    assert await Janitor(pr.pipeline, pr.metrics, JanitorSettings(min_age_s=30)).run_once() == 0
    assert (await pr.pipeline.store.get_payment(p["id"])).status is Status.PENDING


async def test_pending_is_resolved_by_status_query_and_unresolvable_goes_to_manual_review(sandbox, payroute) -> None:
    a = await sandbox("a", Script(failure="error_after"))
    pr = await payroute({"a": a})
    p1 = (await pr.pay(merchant_order_id="pend-1")).json()
    await Janitor(pr.pipeline, pr.metrics, JanitorSettings(min_age_s=30), now=later(120)).run_once()
    assert (await pr.pipeline.store.get_payment(p1["id"])).status is Status.CAPTURED

    p2 = (await pr.pay(merchant_order_id="pend-2")).json()
    await a.set_script(Script(failure="refuse"))  # the channel cannot be asked
    j = Janitor(pr.pipeline, pr.metrics, JanitorSettings(min_age_s=30, max_age_s=3600), now=later(120))
    assert await j.run_once() == 0  # cannot tell yet: unchanged, retried later with back-off
    assert (await pr.pipeline.store.get_payment(p2["id"])).status is Status.PENDING
    old = Janitor(pr.pipeline, pr.metrics, JanitorSettings(min_age_s=30, max_age_s=3600), now=later(7200))
    assert await old.run_once() == 1
    stored = await pr.pipeline.store.get_payment(p2["id"])
    assert stored.status is Status.MANUAL_REVIEW
    assert "payroute_manual_reviews_total 1.0" in (await pr.client.get("/metrics")).text
    # the channel comes back and a late answer still settles it
    await a.set_script(Script())
    settled = await pr.pipeline.recover(stored)
    assert settled.status is Status.CAPTURED and len(a.channel.charges) == 2


async def test_two_janitors_racing_settle_once(sandbox, payroute) -> None:
    a = await sandbox("a", Script(failure="error_after"))
    pr = await payroute({"a": a})
    p = (await pr.pay(merchant_order_id="race")).json()
    js = [Janitor(pr.pipeline, pr.metrics, JanitorSettings(min_age_s=30), now=later(120)) for _ in range(2)]
    await asyncio.gather(*(j.run_once() for j in js))
    events = await pr.pipeline.store.outbox_events(p["id"])
    assert [e.type for e in events] == ["payment.pending", "payment.captured"]
    assert msgspec.json.decode(events[-1].payload)["data"]["status"] == "captured"


# ------------------------------------------------------------------ operations left pending


async def _lose_answers(pr, monkeypatch, *, send: bool):  # type: ignore[no-untyped-def]
    """From now on an operation's answer is lost (after the channel got it when `send`, else before)."""
    from router.errors import OutcomeUnknown

    real_send = pr.pipeline._send

    async def lossy(ch, wire, deadline, parse, on_retry):  # type: ignore[no-untyped-def]
        if send:
            await real_send(ch, wire, deadline, parse, on_retry)
        raise OutcomeUnknown("timeout")

    monkeypatch.setattr(pr.pipeline, "_send", lossy)
    return lambda: monkeypatch.setattr(pr.pipeline, "_send", real_send)


async def test_a_capture_whose_answer_was_lost_is_settled_from_the_channel_once(sandbox, payroute, monkeypatch) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    p = (await pr.pay(merchant_order_id="op-cap", capture=False, amount=1000)).json()
    restore = await _lose_answers(pr, monkeypatch, send=True)
    r = await pr.client.post(f"/v1/payments/{p['id']}/capture", json={"amount": 600})
    assert r.status_code == 202
    restore()
    assert (await janitor(pr, now=later(5)).run_once()) == 0  # younger than min_age_s: a live request's
    assert await janitor(pr).run_once() == 1
    done = await pr.pipeline.store.get_payment(p["id"])
    assert done is not None and done.status is Status.CAPTURED and done.captured_amount == 600
    assert [(o.kind, o.status) for o in done.operations] == [("capture", "succeeded")]
    assert a.channel.charges[0]["captured_amount"] == 600  # replayed by the channel, not captured twice
    events = [e.type for e in await pr.pipeline.store.outbox_events(p["id"])]
    assert events[-1] == "payment.captured"
    assert await janitor(pr).run_once() == 0  # nothing pending any more


async def test_a_refund_lost_before_the_channel_got_it_is_sent_by_the_janitor(sandbox, payroute, monkeypatch) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    p = (await pr.pay(merchant_order_id="op-ref", amount=1000)).json()
    assert (await pr.client.post(f"/v1/payments/{p['id']}/refunds", json={"amount": 100})).status_code == 200
    restore = await _lose_answers(pr, monkeypatch, send=False)
    r = await pr.client.post(f"/v1/payments/{p['id']}/refunds", json={"amount": 250})
    assert r.status_code == 202 and a.channel.charges[0]["refunded_amount"] == 100  # never reached the channel
    blocked = await pr.client.post(f"/v1/payments/{p['id']}/refunds", json={"amount": 1})
    assert blocked.status_code == 409 and blocked.json()["code"] == "operation_pending"
    restore()
    assert await janitor(pr).run_once() == 1
    done = await pr.pipeline.store.get_payment(p["id"])
    assert done is not None and done.status is Status.PARTIALLY_REFUNDED and done.refunded_amount == 350
    assert a.channel.charges[0]["refunded_amount"] == 350
    # the second refund kept its own channel key (-r2): the first one's was not reused
    assert [o.status for o in done.operations] == ["succeeded", "succeeded"]


async def test_an_operation_past_max_age_is_left_for_an_operator(sandbox, payroute, monkeypatch) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    p = (await pr.pay(merchant_order_id="op-old", capture=False)).json()
    await _lose_answers(pr, monkeypatch, send=False)
    assert (await pr.client.post(f"/v1/payments/{p['id']}/capture", json={})).status_code == 202
    before = pr.metrics.manual_reviews._value.get()
    j = janitor(pr, max_age_s=60, now=later(120))
    assert await j.run_once() == 0 and await j.run_once() == 0
    assert pr.metrics.manual_reviews._value.get() == before + 1  # reported once
    stored = await pr.pipeline.store.get_payment(p["id"])
    assert stored is not None and [o.status for o in stored.operations] == ["pending"]
    assert a.channel.charges[0]["status"] == "authorized"  # nothing re-sent past the window
