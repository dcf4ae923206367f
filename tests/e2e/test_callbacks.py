"""Inbound callbacks: verified by the adapter, applied through the monotonic state machine."""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from adapters.sandbox.adapter import SandboxAdapter
from adapters.sandbox.server import Script
from router.errors import CallbackRejected
from router.model import CallbackEvent, ChannelResult, Outcome, WireResponse


class SignedJsonAdapter(SandboxAdapter):
    """The sandbox adapter plus a toy callback format: {"reference", "outcome"} signed by a header."""

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> tuple[CallbackEvent, WireResponse]:
        if headers.get("X-Signature") != "good":
            raise CallbackRejected("bad signature")
        doc = orjson.loads(body)
        event = CallbackEvent(event_id=doc["id"], reference=doc["reference"], channel_reference=None,
                              result=ChannelResult(outcome=Outcome(doc["outcome"]), code=doc.get("code")),
                              amount=doc.get("amount"), currency=doc.get("currency"))
        return event, WireResponse(status=200, headers={"Content-Type": "text/plain"}, body=b"success")


async def test_callback_settles_pending_once_and_never_moves_back(sandbox, payroute) -> None:
    a = await sandbox("a", Script(failure="error_after"))
    pr = await payroute({"a": a})
    pr.runtime.channels["a"].adapter = SignedJsonAdapter({})
    p = (await pr.pay(merchant_order_id="cb-1")).json()
    assert p["status"] == "pending"
    ref = f"{p['id']}-a1"
    approved = orjson.dumps({"id": "evt-1", "reference": ref, "outcome": "approved"})

    bad = await pr.client.post("/callbacks/a", content=approved, headers={"X-Signature": "forged"})
    assert bad.status_code == 401 and bad.json()["code"] == "callback_rejected"
    assert (await pr.client.get(f"/v1/payments/{p['id']}")).json()["status"] == "pending"

    ok = await pr.client.post("/callbacks/a", content=approved, headers={"X-Signature": "good"})
    assert ok.status_code == 200 and ok.content == b"success"
    after = (await pr.client.get(f"/v1/payments/{p['id']}")).json()
    assert after["status"] == "captured" and after["version"] == 3

    again = await pr.client.post("/callbacks/a", content=approved, headers={"X-Signature": "good"})
    assert again.status_code == 200
    late_decline = orjson.dumps({"id": "evt-0", "reference": ref, "outcome": "hard_decline", "code": "do_not_honor"})
    assert (await pr.client.post("/callbacks/a", content=late_decline, headers={"X-Signature": "good"})).status_code == 200
    final = (await pr.client.get(f"/v1/payments/{p['id']}")).json()
    assert final["status"] == "captured" and final["version"] == 3  # duplicates and late events change nothing
    events = await pr.pipeline.store.outbox_events(p["id"])
    assert [e.type for e in events] == ["payment.pending", "payment.captured"]


async def test_callback_for_unknown_channel_or_payment(sandbox, payroute) -> None:
    a = await sandbox("a")
    pr = await payroute({"a": a})
    pr.runtime.channels["a"].adapter = SignedJsonAdapter({})
    r = await pr.client.post("/callbacks/nope", content=b"{}")
    assert r.status_code == 404
    body = orjson.dumps({"id": "e", "reference": "pay_missing-a1", "outcome": "approved"})
    r = await pr.client.post("/callbacks/a", content=body, headers={"X-Signature": "good"})
    assert r.status_code == 200  # acknowledged so the channel stops retrying; counted as unmatched
    assert 'payroute_callbacks_total{channel="a",result="unmatched"} 1.0' in (await pr.client.get("/metrics")).text


async def test_callbacks_are_stored_deduplicated_and_checked_against_the_record(sandbox, payroute, tmp_path) -> None:
    import sqlite3

    a = await sandbox("a", Script(failure="error_after"))
    pr = await payroute({"a": a})
    pr.runtime.channels["a"].adapter = SignedJsonAdapter({})
    p = (await pr.pay(merchant_order_id="cb-3", amount=1099)).json()
    ref = f"{p['id']}-a1"
    wrong = orjson.dumps({"id": "evt-w", "reference": ref, "outcome": "approved", "amount": 1, "currency": "USD"})
    r = await pr.client.post("/callbacks/a", content=wrong, headers={"X-Signature": "good"})
    assert r.status_code == 200  # acknowledged (the channel must stop), but nothing changed
    assert (await pr.client.get(f"/v1/payments/{p['id']}")).json()["status"] == "pending"
    right = orjson.dumps({"id": "evt-r", "reference": ref, "outcome": "approved", "amount": 1099, "currency": "usd"})
    for _ in range(3):  # the channel redelivers: applied once
        assert (await pr.client.post("/callbacks/a", content=right, headers={"X-Signature": "good"})).status_code == 200
    assert (await pr.client.get(f"/v1/payments/{p['id']}")).json()["status"] == "captured"
    metrics = (await pr.client.get("/metrics")).text
    assert 'payroute_callbacks_total{channel="a",result="mismatch"} 1.0' in metrics
    assert 'payroute_callbacks_total{channel="a",result="applied"} 1.0' in metrics
    assert 'payroute_callbacks_total{channel="a",result="duplicate"} 2.0' in metrics
    assert 'payroute_integration_errors_total{channel="a"} 1.0' in metrics
    db = sqlite3.connect(tmp_path / "payroute.db")
    rows = db.execute("SELECT event_id, outcome, payload FROM channel_callbacks ORDER BY received_at").fetchall()
    db.close()
    assert [(e, o) for e, o, _ in rows] == [("evt-w", "mismatch"), ("evt-r", "applied")]
    assert rows[1][2] == right  # stored as received, before the acknowledgement


class WalletAdapter(SignedJsonAdapter):
    """Every authorization waits for the customer (requires_action); the outcome comes by callback."""

    def parse_authorize(self, resp: WireResponse) -> ChannelResult:
        first = super().parse_authorize(resp)
        return ChannelResult(outcome=Outcome.REQUIRES_ACTION, code="awaiting_customer",
                             channel_reference=first.channel_reference)


async def test_late_wallet_outcomes_teach_the_channels_success_rate(sandbox, payroute) -> None:
    from policies.success_rate import SuccessStats

    a = await sandbox("a")
    pr = await payroute({"a": a})
    pr.runtime.channels["a"].adapter = WalletAdapter({})
    stats = pr.runtime.env.state["success_stats"]
    assert isinstance(stats, SuccessStats)

    async def pay_then_callback(order: str, outcome: str, code: str | None = None) -> dict[str, object]:
        p = (await pr.pay(merchant_order_id=order)).json()
        assert p["status"] == "requires_action"
        assert stats.counts("a", "") == before  # not known yet: nothing learnt, one outcome on its way
        body = orjson.dumps({"id": f"evt-{order}", "reference": f"{p['id']}-a1", "outcome": outcome, "code": code})
        assert (await pr.client.post("/callbacks/a", content=body, headers={"X-Signature": "good"})).status_code == 200
        return p

    before = stats.counts("a", "")
    await pay_then_callback("w-1", "approved")
    s1, f1 = stats.counts("a", "")
    assert s1 > before[0] and f1 == before[1]  # the late approval counts for the channel
    before = (s1, f1)
    await pay_then_callback("w-2", "hard_decline", "do_not_honor")
    assert stats.counts("a", "") == before  # the card's decline: nothing about the channel
    assert not stats._expected  # and nothing is left waiting
