"""Webhook dispatcher against real loopback receivers (aiohttp), verified with `standardwebhooks`.

Back-off runs in virtual time: the dispatcher's clock is a `VirtualClock` the test moves to the next
due instant, so hours of schedule pass without waiting. Signature timestamps use the wall clock, so the
reference verifier (which checks a 5-minute tolerance) accepts them. No test asserts a duration.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from router.errors import ProblemError
from router.model import CardSummary, OutboxEvent, Payment, PaymentMethod, Status
from router.store.base import DurableStore, WebhookEndpointRow
from router.store.postgres import PostgresStore
from router.store.sqlite import SqliteStore
from router.webhooks import (
    WEBHOOKS,
    Endpoint,
    EndpointRefused,
    SsrfGuard,
    WebhookDispatcher,
    WebhookMetrics,
    WebhooksSettings,
    check_webhooks_settings,
    endpoint_id,
    new_secret,
    next_delay,
    parse_retry_after,
    register_webhook_routes,
    sign,
)

pytest_plugins = ["tests.services"]

LOOPBACK = ["127.0.0.0/8", "::1/128"]
T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
WEBHOOK_TABLES = "webhook_endpoints, webhook_deliveries, webhook_attempts"


# --------------------------------------------------------------------------- helpers


class VirtualClock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        await asyncio.sleep(0)


def wall() -> datetime:
    return datetime.now(UTC)


@dataclass
class Hit:
    event_id: str
    headers: dict[str, str]
    body: bytes
    at: datetime  # virtual time of receipt


Reply = tuple[int, dict[str, str], bytes]


@dataclass
class Receiver:
    url: str
    hits: list[Hit] = field(default_factory=list)
    script: Callable[[Hit], Reply | Awaitable[Reply]] = lambda hit: (200, {}, b"ok")

    def ids(self) -> list[str]:
        return [h.event_id for h in self.hits]


StartReceiver = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def receiver() -> AsyncIterator[StartReceiver]:
    runners: list[web.AppRunner] = []

    async def start(clock: Callable[[], datetime] = wall, path: str = "/hooks") -> Receiver:
        rec = Receiver(url="")

        async def handle(request: web.Request) -> web.Response:
            hit = Hit(request.headers.get("webhook-id", ""), dict(request.headers), await request.read(), clock())
            rec.hits.append(hit)
            reply = rec.script(hit)
            if not isinstance(reply, tuple):
                reply = await reply
            status, headers, body = reply
            return web.Response(status=status, headers=headers, body=body)

        app = web.Application()
        app.router.add_post(path, handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}{path}"
        return rec

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "payroute.db")
    await store.start()
    yield store
    await store.close()


def payment(pid: str, merchant: str = "alpha") -> Payment:
    return Payment(
        id=pid, merchant_id=merchant, merchant_order_id=f"order-{pid}", status=Status.PROCESSING, amount=1099,
        currency="EUR", country="DE", capture=True,
        payment_method=PaymentMethod(type="card", card=CardSummary(
            bin="424242", last4="4242", brand="visa", exp_month=12, exp_year=2030, fingerprint="fp")),
        created_at=T0, updated_at=T0,
    )  # fmt: skip


class Ledger:
    """Writes payments and their outbox events the way the pipeline does (same transaction)."""

    def __init__(self, store: DurableStore) -> None:
        self.store = store
        self.payments: dict[str, Payment] = {}
        self.n = 0

    async def emit(self, pid: str, kind: str, merchant: str = "alpha") -> str:
        self.n += 1
        eid = f"evt_{self.n:05d}_{pid}_{kind}"
        body = orjson.dumps({"id": eid, "type": f"payment.{kind}", "data": {"id": pid, "status": kind}})
        ev = OutboxEvent(id=eid, merchant_id=merchant, payment_id=pid, type=f"payment.{kind}", payload=body,
                         created_at=T0 + timedelta(microseconds=self.n))
        p = self.payments.get(pid)
        if p is None:
            p = payment(pid, merchant)
            await self.store.insert_payment(p, [ev])
        else:
            nxt = msgspec.structs.replace(p, version=p.version + 1, updated_at=p.updated_at + timedelta(seconds=1))
            await self.store.update_payment(nxt, p.version, [ev])
            p = nxt
        self.payments[pid] = p
        return eid


def endpoint(url: str, *secrets: str, merchant: str = "alpha") -> Endpoint:
    return Endpoint(id=endpoint_id(merchant, url), merchant_id=merchant, url=url, secrets=secrets or (SECRET,))


SECRET = new_secret()
FAST = dict(allow_networks=LOOPBACK, connect_timeout_s=2.0, total_timeout_s=5.0, lease_s=30.0)


def dispatcher(
    store: DurableStore, endpoints: list[Endpoint], clock: VirtualClock, *, rng: float | Callable[[], float] = 0.0,
    registry: CollectorRegistry | None = None, owner: str | None = None, **settings: Any,
) -> WebhookDispatcher:
    s = msgspec.convert({**FAST, **settings}, WebhooksSettings)
    assert not check_webhooks_settings(s)
    return WebhookDispatcher(
        store, lambda: endpoints, s, WebhookMetrics(registry or CollectorRegistry()), clock=clock,
        sleep=clock.sleep, rng=rng if callable(rng) else (lambda: rng), timestamp_clock=wall, owner=owner,
    )


async def drive(d: WebhookDispatcher, clock: VirtualClock, done: Callable[[], bool], steps: int = 200) -> None:
    """Run passes, jumping virtual time to the next due instant, until `done()`."""
    for _ in range(steps):
        await d.run_once()
        if done():
            return
        due = await d.store.next_webhook_due(clock.now)
        if due is None:
            return
        clock.now = max(clock.now, due)


def verify(hit: Hit, secret: str = SECRET) -> Any:
    return Webhook(secret).verify(hit.body, hit.headers)


# --------------------------------------------------------------------------- pure parts


def test_signature_is_standard_webhooks_and_each_rotation_secret_verifies_alone() -> None:
    old, new = new_secret(), new_secret()
    body = b'{"id":"evt_1"}'
    ts = int(wall().timestamp())
    header = sign([new, old], "evt_1", ts, body)
    assert header.count("v1,") == 2
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(ts), "webhook-signature": header}
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers) == {"id": "evt_1"}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(body + b" ", headers)


def test_schedule_default_jitter_and_exhaustion() -> None:
    s = WebhooksSettings()
    assert s.schedule_s == [0, 60, 300, 600, 1800, 3600, 7200, 21600, 54000]
    assert next_delay(s.schedule_s, 1, lambda: 0.0, 1.0) == 60
    assert next_delay(s.schedule_s, 2, lambda: 0.5, 1.0) == 150  # full jitter: anywhere in (0, d]
    assert next_delay(s.schedule_s, 8, lambda: 0.999, 0.0) == 54000
    assert next_delay(s.schedule_s, 9, lambda: 0.0, 1.0) is None
    bad = msgspec.convert({"schedule_s": [5, 10], "jitter": 2, "lease_s": 1, "allow_networks": ["nope"]},
                          WebhooksSettings)
    paths = {p for p, _ in check_webhooks_settings(bad)}
    assert {"$.webhooks.schedule_s[0]", "$.webhooks.jitter", "$.webhooks.lease_s",
            "$.webhooks.allow_networks[0]"} <= paths


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("120", T0) == 120
    assert parse_retry_after("Sat, 01 Jun 2024 12:05:00 GMT", T0) == 300
    assert parse_retry_after("soon", T0) is None
    assert parse_retry_after(None, T0) is None


async def test_ssrf_guard_refuses_private_loopback_link_local_unless_allowed() -> None:
    answers = {"internal.example": ["10.1.2.3"], "meta.example": ["169.254.169.254"], "six.example": ["::1"],
               "mixed.example": ["93.184.216.34", "192.168.1.1"], "public.example": ["93.184.216.34"]}

    async def resolver(host: str, port: int) -> list[str]:
        return answers[host]

    guard = SsrfGuard([], resolver)
    for host in ("internal.example", "meta.example", "six.example", "mixed.example"):
        with pytest.raises(EndpointRefused):
            await guard.resolve(f"https://{host}/hook")
    for literal in ("http://127.0.0.1:9/x", "http://[::ffff:127.0.0.1]/x", "http://0.0.0.0/x"):
        with pytest.raises(EndpointRefused):
            await guard.resolve(literal)
    assert await guard.resolve("https://public.example/hook") == ("93.184.216.34", 443)
    assert await SsrfGuard(["10.0.0.0/8"], resolver).resolve("http://internal.example:8080/") == ("10.1.2.3", 8080)


# --------------------------------------------------------------------------- delivery


async def test_delivery_is_signed_recorded_and_verifiable(sqlite_store: SqliteStore, receiver: StartReceiver) -> None:
    rec = await receiver()
    rec.script = lambda hit: (200, {}, b"x" * 2000)
    clock = VirtualClock()
    ledger = Ledger(sqlite_store)
    eid = await ledger.emit("pay_1", "captured")
    d = dispatcher(sqlite_store, [endpoint(rec.url)], clock)
    await d.start(run=False)
    try:
        assert await d.run_once() == 1
    finally:
        await d.aclose()

    assert rec.ids() == [eid]
    assert verify(rec.hits[0])["id"] == eid
    assert rec.hits[0].headers["Content-Type"] == "application/json"
    [delivery] = await sqlite_store.get_webhook_deliveries(eid)
    assert delivery.status == "delivered" and delivery.attempts == 1
    [attempt] = await sqlite_store.webhook_attempts(eid)
    assert attempt.status_code == 200 and attempt.outcome == "delivered"
    assert attempt.response_snippet is not None and len(attempt.response_snippet.encode()) == 512
    # the outbox row records the delivery too
    assert [e.id for e in await sqlite_store.outbox_events("pay_1")] == [eid]


async def test_500s_retry_on_the_schedule_in_virtual_time(sqlite_store: SqliteStore, receiver: StartReceiver) -> None:
    clock = VirtualClock()
    rec = await receiver(clock)
    rec.script = lambda hit: (500, {}, b"boom") if len(rec.hits) <= 4 else (200, {}, b"ok")
    eid = await Ledger(sqlite_store).emit("pay_1", "captured")
    d = dispatcher(sqlite_store, [endpoint(rec.url)], clock, rng=0.0)
    await d.start(run=False)
    try:
        await drive(d, clock, lambda: len(rec.hits) == 5)
    finally:
        await d.aclose()

    gaps = [(b.at - a.at).total_seconds() for a, b in zip(rec.hits, rec.hits[1:], strict=False)]
    assert gaps == [60, 300, 600, 1800]
    assert set(rec.ids()) == {eid}  # the same webhook-id on every retry
    for hit in rec.hits:
        verify(hit)
    attempts = await sqlite_store.webhook_attempts(eid)
    assert [a.status_code for a in attempts] == [500, 500, 500, 500, 200]
    assert [a.response_snippet for a in attempts][:1] == ["boom"]


async def test_full_jitter_draws_inside_each_delay(sqlite_store: SqliteStore, receiver: StartReceiver) -> None:
    clock = VirtualClock()
    rec = await receiver(clock)
    rec.script = lambda hit: (500, {}, b"") if len(rec.hits) <= 2 else (200, {}, b"")
    await Ledger(sqlite_store).emit("pay_1", "captured")
    d = dispatcher(sqlite_store, [endpoint(rec.url)], clock, rng=0.75)
    await d.start(run=False)
    try:
        await drive(d, clock, lambda: len(rec.hits) == 3)
    finally:
        await d.aclose()
    assert [(b.at - a.at).total_seconds() for a, b in zip(rec.hits, rec.hits[1:], strict=False)] == [15, 75]


async def test_retry_after_is_honoured_on_429_and_503(sqlite_store: SqliteStore, receiver: StartReceiver) -> None:
    clock = VirtualClock()
    rec = await receiver(clock)
    replies: list[Reply] = [(429, {"Retry-After": "7"}, b""), (503, {"Retry-After": "900"}, b""), (200, {}, b"")]
    rec.script = lambda hit: replies[len(rec.hits) - 1]
    await Ledger(sqlite_store).emit("pay_1", "captured")
    d = dispatcher(sqlite_store, [endpoint(rec.url)], clock)
    await d.start(run=False)
    try:
        await drive(d, clock, lambda: len(rec.hits) == 3)
    finally:
        await d.aclose()
    assert [(b.at - a.at).total_seconds() for a, b in zip(rec.hits, rec.hits[1:], strict=False)] == [7, 900]


async def test_410_disables_the_endpoint_and_keeps_its_events(sqlite_store: SqliteStore, receiver: StartReceiver) -> None:
    clock = VirtualClock()
    rec = await receiver(clock)
    rec.script = lambda hit: (410, {}, b"gone")
    ledger = Ledger(sqlite_store)
    first = await ledger.emit("pay_1", "captured")
    second = await ledger.emit("pay_2", "captured")
    registry = CollectorRegistry()
    ep = endpoint(rec.url)
    d = dispatcher(sqlite_store, [ep], clock, registry=registry, concurrency_per_endpoint=1)
    await d.start(run=False)
    try:
        await drive(d, clock, lambda: False, steps=5)
        [row] = await sqlite_store.list_webhook_endpoints()
        assert row.state == "disabled" and "410" in (row.disabled_reason or "")
        assert len(rec.hits) == 1  # nothing more is sent to a disabled endpoint
        assert registry.get_sample_value("payroute_webhook_endpoint_alerts_total", {"endpoint": ep.id, "kind": "gone"}) == 1
        pending = await sqlite_store.list_webhook_deliveries(status="pending")
        assert {p.event_id for p in pending} == {first, second}

        rec.script = lambda hit: (200, {}, b"")
        await sqlite_store.set_webhook_endpoint_state(ep.id, "active", clock.now)
        await drive(d, clock, lambda: len(rec.hits) == 3)
    finally:
        await d.aclose()
    assert sorted(rec.ids()[1:]) == sorted([first, second])


async def test_breaker_pauses_then_probes_then_recovers(sqlite_store: SqliteStore, receiver: StartReceiver) -> None:
    clock = VirtualClock()
    rec = await receiver(clock)
    healthy = False
    rec.script = lambda hit: (200, {}, b"") if healthy else (500, {}, b"")
    ledger = Ledger(sqlite_store)
    events = [await ledger.emit(f"pay_{i}", "captured") for i in range(6)]
    registry = CollectorRegistry()
    ep = endpoint(rec.url)
    d = dispatcher(sqlite_store, [ep], clock, registry=registry, breaker_failures=3, probe_interval_s=600,
                   concurrency_per_endpoint=1, schedule_s=[0, 60, 60, 60, 60, 60, 60, 60, 60, 60])
    await d.start(run=False)
    try:
        await drive(d, clock, lambda: len(rec.hits) == 3)
        [row] = await sqlite_store.list_webhook_endpoints()
        assert row.state == "paused"
        assert registry.get_sample_value("payroute_webhook_endpoint_alerts_total", {"endpoint": ep.id, "kind": "paused"}) == 1
        paused_at = clock.now
        await drive(d, clock, lambda: len(rec.hits) == 6)
        probes = [h.at for h in rec.hits[3:]]
        # while paused: one probe per interval, never a storm
        assert all((b - a) >= timedelta(seconds=600) for a, b in zip([paused_at, *probes], probes, strict=False))
        healthy = True
        before = len(rec.hits)
        await drive(d, clock, lambda: len(rec.hits) - before == len(events), steps=50)
        delivered = {x.event_id for x in await sqlite_store.list_webhook_deliveries(status="delivered")}
        assert delivered == set(events)
        [row] = await sqlite_store.list_webhook_endpoints()
        assert row.state == "active" and row.consecutive_failures == 0
    finally:
        await d.aclose()


async def test_total_failure_window_disables_the_endpoint(sqlite_store: SqliteStore, receiver: StartReceiver) -> None:
    clock = VirtualClock()
    rec = await receiver(clock)
    rec.script = lambda hit: (500, {}, b"")
    eid = await Ledger(sqlite_store).emit("pay_1", "captured")
    registry = CollectorRegistry()
    ep = endpoint(rec.url)
    d = dispatcher(sqlite_store, [ep], clock, registry=registry, breaker_failures=2, probe_interval_s=3600,
                   disable_after_s=86400, schedule_s=[0] + [3600] * 40)
    await d.start(run=False)
    try:
        await drive(d, clock, lambda: False, steps=60)
    finally:
        await d.aclose()
    [row] = await sqlite_store.list_webhook_endpoints()
    assert row.state == "disabled"
    assert registry.get_sample_value("payroute_webhook_endpoint_alerts_total", {"endpoint": ep.id, "kind": "disabled"}) == 1
    [delivery] = await sqlite_store.get_webhook_deliveries(eid)
    assert delivery.status == "pending"  # kept, not dropped


async def test_dead_letter_then_redrive_through_the_admin_api(
    sqlite_store: SqliteStore, receiver: StartReceiver
) -> None:
    clock = VirtualClock()
    rec = await receiver(clock)
    rec.script = lambda hit: (500, {}, b"nope")
    eid = await Ledger(sqlite_store).emit("pay_1", "captured")
    d = dispatcher(sqlite_store, [endpoint(rec.url)], clock, schedule_s=[0, 60, 120])
    await d.start(run=False)
    app = web.Application()
    app[WEBHOOKS] = d
    token = "admin-token"

    def auth(request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {token}":
            raise ProblemError(401, "unauthenticated", "An admin token is required")

    @web.middleware
    async def problems(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except ProblemError as p:
            return web.json_response(p.body(), status=p.status)

    app.middlewares.append(problems)
    register_webhook_routes(app.router, auth)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"

    try:
        await drive(d, clock, lambda: False, steps=10)
        assert len(rec.hits) == 3
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}) as c:
            assert (await c.get("/admin/v1/webhooks/events", headers={"Authorization": "Bearer wrong"})).status_code == 401
            dead = (await c.get("/admin/v1/webhooks/events", params={"status": "dead"})).json()["data"]
            assert [x["event_id"] for x in dead] == [eid]
            shown = (await c.get(f"/admin/v1/webhooks/events/{eid}")).json()
            history = shown["deliveries"][0]["attempt_history"]
            assert [a["status_code"] for a in history] == [500, 500, 500]
            assert history[0]["response_snippet"] == "nope" and history[0]["latency_ms"] >= 0
            assert (await c.get("/admin/v1/webhooks/events/evt_missing")).status_code == 404

            rec.script = lambda hit: (200, {}, b"")
            r = await c.post(f"/admin/v1/webhooks/events/{eid}/redrive")
            assert r.json() == {"redriven": 1}
            assert (await c.post(f"/admin/v1/webhooks/events/{eid}/redrive")).status_code == 409
            await drive(d, clock, lambda: len(rec.hits) == 4)
            assert rec.hits[-1].event_id == eid
            verify(rec.hits[-1])
            assert (await c.get(f"/admin/v1/webhooks/events/{eid}")).json()["deliveries"][0]["status"] == "delivered"
            assert (await c.post("/admin/v1/webhooks/events/redrive", json={})).status_code == 400
    finally:
        await runner.cleanup()
        await d.aclose()


async def test_bulk_redrive_by_endpoint_and_time_range(sqlite_store: SqliteStore, receiver: StartReceiver) -> None:
    clock = VirtualClock()
    rec = await receiver(clock)
    rec.script = lambda hit: (500, {}, b"")
    ledger = Ledger(sqlite_store)
    events = [await ledger.emit(f"pay_{i}", "captured") for i in range(4)]
    ep = endpoint(rec.url)
    d = dispatcher(sqlite_store, [ep], clock, schedule_s=[0])
    await d.start(run=False)
    try:
        await drive(d, clock, lambda: False, steps=5)
        assert len(await sqlite_store.list_webhook_deliveries(status="dead")) == 4
        # events were created at T0 + n µs: re-drive only the first two
        n = await sqlite_store.redrive_deliveries(clock.now, endpoint_id=ep.id, since=T0,
                                                  until=T0 + timedelta(microseconds=3))
        assert n == 2
        rec.script = lambda hit: (200, {}, b"")
        await drive(d, clock, lambda: len(rec.hits) == 6)
    finally:
        await d.aclose()
    assert sorted(rec.ids()[4:]) == events[:2]


async def test_per_payment_order_while_other_payments_flow(sqlite_store: SqliteStore, receiver: StartReceiver) -> None:
    clock = VirtualClock()
    rec = await receiver(clock)
    ledger = Ledger(sqlite_store)
    a = [await ledger.emit("pay_a", k) for k in ("authorized", "captured", "refunded")]
    b = [await ledger.emit("pay_b", k) for k in ("authorized", "captured")]
    failures_left = 2

    def script(hit: Hit) -> Reply:
        nonlocal failures_left
        if hit.event_id == a[0] and failures_left:
            failures_left -= 1
            return (500, {}, b"")
        return (200, {}, b"")

    rec.script = script
    d = dispatcher(sqlite_store, [endpoint(rec.url)], clock)
    await d.start(run=False)
    try:
        await d.run_once()
        await d.run_once()  # b's second event follows b's first; a waits behind its failed first event
        assert rec.ids()[:1] == [a[0]] and set(rec.ids()) == {a[0], *b}
        await drive(d, clock, lambda: len(rec.hits) == 7)
    finally:
        await d.aclose()
    assert [e for e in rec.ids() if e in b] == b
    assert [e for e in rec.ids() if e in a] == [a[0], a[0], a[0], a[1], a[2]]


async def test_receiver_down_6h_everything_delivered_after_recovery_on_schedule(
    sqlite_store: SqliteStore, receiver: StartReceiver
) -> None:
    """Receiver answers 503 (no Retry-After) until virtual T0 + 6 h, then 200. Default schedule, full
    jitter from a seeded RNG. The breaker is set out of reach here so every attempt is the schedule's
    (the breaker's pause/probe has its own test above)."""
    clock = VirtualClock()
    rec = await receiver(clock)
    recovery = T0 + timedelta(hours=6)
    replies: dict[int, int] = {}  # id(hit) -> status answered

    def script(hit: Hit) -> Reply:
        status = 503 if hit.at < recovery else 200
        replies[id(hit)] = status
        return (status, {}, b"down" if status == 503 else b"ok")

    rec.script = script
    ledger = Ledger(sqlite_store)
    kinds = ("authorized", "captured", "refunded")
    per_payment: dict[str, list[str]] = {f"pay_{i}": [] for i in range(5)}
    for kind in kinds:  # interleaved across payments, the way concurrent traffic commits them
        for pid, evs in per_payment.items():
            evs.append(await ledger.emit(pid, kind))
    events = [e for evs in per_payment.values() for e in evs]
    schedule = WebhooksSettings().schedule_s
    draws = random.Random(20240601)
    d = dispatcher(sqlite_store, [endpoint(rec.url)], clock, rng=draws.random, breaker_failures=1000)
    await d.start(run=False)
    try:
        await drive(d, clock, lambda: sum(1 for h in rec.hits if replies.get(id(h)) == 200) == len(events),
                    steps=500)
    finally:
        await d.aclose()

    # everything delivered after recovery, exactly once with a 2xx, under its original webhook-id
    ok = [h for h in rec.hits if replies[id(h)] == 200]
    assert sorted(h.event_id for h in ok) == sorted(events)
    assert all(h.at >= recovery for h in ok)
    assert {h.event_id for h in rec.hits} == set(events)  # no id was ever minted anew
    for hit in rec.hits:
        assert verify(hit)["id"] == hit.event_id  # the payload's id is the webhook-id
    rows = {r.event_id: r for r in await sqlite_store.list_webhook_deliveries(limit=1000)}
    assert {e: rows[e].status for e in events} == dict.fromkeys(events, "delivered")

    for pid, evs in per_payment.items():
        # per-payment order at the receiver: no event before the previous one was delivered
        seen = [h.event_id for h in rec.hits if h.event_id in evs]
        assert [e for i, e in enumerate(seen) if i == 0 or seen[i - 1] != e] == evs, pid
        first_ok = {h.event_id: h.at for h in ok if h.event_id in evs}
        assert first_ok[evs[0]] <= first_ok[evs[1]] <= first_ok[evs[2]]

        # the first event carried the outage: its attempts follow the schedule within full jitter
        hits = [h for h in rec.hits if h.event_id == evs[0]]
        assert hits[0].at == T0  # immediately
        assert [replies[id(h)] for h in hits] == [503] * (len(hits) - 1) + [200]
        assert hits[-2].at < recovery <= hits[-1].at  # the first attempt after recovery succeeded
        assert len(hits) <= len(schedule)  # never dead-lettered
        for k, (a, b) in enumerate(zip(hits, hits[1:], strict=False), start=1):
            gap = (b.at - a.at).total_seconds()
            assert 0 < gap <= schedule[k], (pid, k, gap, schedule[k])
        # the store's attempt history is the receiver's view: same instants, statuses and count
        attempts = await sqlite_store.webhook_attempts(evs[0])
        assert [a.started_at for a in attempts] == [h.at for h in hits]
        assert [a.status_code for a in attempts] == [replies[id(h)] for h in hits]
        assert [a.attempt for a in attempts] == list(range(1, len(hits) + 1))
        # the later events were never tried while an earlier one of the payment was pending:
        # one attempt each, at once, when their predecessor had been delivered
        for prev, e in zip(evs, evs[1:], strict=False):
            assert [h.at for h in rec.hits if h.event_id == e] == [first_ok[prev]]
    # the outage was long enough to walk deep into the schedule (6 h spans the 1m..2h steps)
    assert max(sum(1 for h in rec.hits if h.event_id == evs[0]) for evs in per_payment.values()) >= 6


async def test_ssrf_refusal_sends_nothing(sqlite_store: SqliteStore, receiver: StartReceiver) -> None:
    clock = VirtualClock()
    rec = await receiver(clock)
    eid = await Ledger(sqlite_store).emit("pay_1", "captured")
    d = dispatcher(sqlite_store, [endpoint(rec.url)], clock, allow_networks=[])
    await d.start(run=False)
    try:
        await d.run_once()
    finally:
        await d.aclose()
    assert rec.hits == []
    [attempt] = await sqlite_store.webhook_attempts(eid)
    assert attempt.outcome == "refused" and "127.0.0.1" in (attempt.error or "")


async def test_nothing_is_lost_across_a_dispatcher_restart(tmp_path: Path, receiver: StartReceiver) -> None:
    clock = VirtualClock()
    rec = await receiver(clock)
    store = SqliteStore(tmp_path / "restart.db")
    await store.start()
    ledger = Ledger(store)
    events = [await ledger.emit(f"pay_{i}", "captured") for i in range(5)]
    ep = endpoint(rec.url)
    crashed = dispatcher(store, [ep], clock, owner="crashed")
    await crashed.start(run=False)
    # the first dispatcher fans out and claims, then dies before sending anything
    await store.sync_webhook_endpoints([WebhookEndpointRow(id=ep.id, merchant_id="alpha", url=ep.url)], clock.now)
    await store.fan_out_events({"alpha": [ep.id]}, clock.now)
    leased = await store.claim_deliveries(ep.id, clock.now, clock.now + timedelta(seconds=30), "crashed", 3)
    assert len(leased) == 3
    await crashed.aclose()
    await store.close()

    store = SqliteStore(tmp_path / "restart.db")
    await store.start()
    more = await Ledger(store).emit("pay_new", "captured")  # committed while no dispatcher ran
    d = dispatcher(store, [ep], clock, owner="restarted")
    await d.start(run=False)
    try:
        await drive(d, clock, lambda: len(rec.hits) == 6)
    finally:
        await d.aclose()
        await store.close()
    assert sorted(rec.ids()) == sorted([*events, more])


async def test_a_send_frees_its_slot_when_answered_and_results_waiting_to_be_recorded_are_bounded(
    sqlite_store: SqliteStore, receiver: StartReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = await receiver()
    concurrent = peak = 0

    async def answer(hit: Hit) -> Reply:
        nonlocal concurrent, peak
        concurrent += 1
        peak = max(peak, concurrent)
        await asyncio.sleep(0.001)
        concurrent -= 1
        return (200, {}, b"ok")

    rec.script = answer
    ledger = Ledger(sqlite_store)
    firsts = [await ledger.emit(f"pay_{i:02d}", "authorized") for i in range(20)]
    seconds = [await ledger.emit(f"pay_{i:02d}", "captured") for i in range(20)]
    gate, held = asyncio.Event(), 0
    record = sqlite_store.finish_attempt

    async def gated(*args: Any) -> Any:
        nonlocal held
        held += 1
        await gate.wait()
        return await record(*args)

    monkeypatch.setattr(sqlite_store, "finish_attempt", gated)
    ep = endpoint(rec.url)
    s = msgspec.convert({**FAST, "poll_interval_s": 0.02, "concurrency_per_endpoint": 2, "max_in_flight": 6},
                        WebhooksSettings)
    d = WebhookDispatcher(sqlite_store, lambda: [ep], s, owner="one")
    await d.start()
    try:
        for _ in range(500):
            if held >= 12:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # no recording completes: the dispatcher must stop claiming
        assert held == len(rec.hits) == 12  # sends + results waiting <= 2 x max_in_flight
        assert peak <= 2  # answered sends freed their slots, yet never more than 2 at once
        assert set(rec.ids()) <= set(firsts)  # a payment's next event waits for the first's record
        gate.set()
        for _ in range(500):
            if len(await sqlite_store.list_webhook_deliveries(status="delivered", limit=100)) == 40:
                break
            await asyncio.sleep(0.01)
    finally:
        gate.set()
        await d.aclose()
    assert sorted(rec.ids()) == sorted(firsts + seconds)  # each exactly once
    assert peak <= 2
    for first, second in zip(firsts, seconds, strict=True):
        assert rec.ids().index(first) < rec.ids().index(second)


# --------------------------------------------------------------------------- PostgreSQL: two dispatchers


async def _clean_pg(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"TRUNCATE {WEBHOOK_TABLES}")
    finally:
        await conn.close()


async def test_two_dispatchers_on_postgres_never_double_send(
    pg_store: PostgresStore, receiver: StartReceiver
) -> None:
    await _clean_pg(pg_store.dsn)
    rec = await receiver()
    in_flight: dict[str, int] = {}
    overlaps = 0

    async def slow(hit: Hit) -> Reply:
        nonlocal overlaps
        in_flight[hit.event_id] = in_flight.get(hit.event_id, 0) + 1
        if in_flight[hit.event_id] > 1:
            overlaps += 1
        await asyncio.sleep(0.002)
        in_flight[hit.event_id] -= 1
        # every 7th event fails once, so retries race too
        digest = int(hashlib.sha256(hit.event_id.encode()).hexdigest(), 16)
        if digest % 7 == 0 and sum(1 for h in rec.hits if h.event_id == hit.event_id) == 1:
            return (500, {}, b"")
        return (200, {}, b"")

    rec.script = slow
    ledger = Ledger(pg_store)
    events = []
    for i in range(40):
        for kind in ("authorized", "captured"):
            events.append(await ledger.emit(f"pay_{i:03d}", kind))
    ep = endpoint(rec.url)
    second = PostgresStore(pg_store.dsn)
    await second.start()
    dispatchers = []
    for name, store in (("one", pg_store), ("two", second)):
        s = msgspec.convert({**FAST, "schedule_s": [0, 0.05], "poll_interval_s": 0.05, "concurrency_per_endpoint": 4},
                            WebhooksSettings)
        dispatchers.append(WebhookDispatcher(store, lambda: [ep], s, owner=name, rng=lambda: 0.0))
    try:
        for d in dispatchers:
            await d.start()
        for _ in range(600):
            rows = await pg_store.list_webhook_deliveries(status="delivered", limit=1000)
            if len(rows) == len(events):
                break
            await asyncio.sleep(0.02)
    finally:
        for d in dispatchers:
            await d.aclose()
        await second.close()
    delivered = await pg_store.list_webhook_deliveries(status="delivered", limit=1000)
    assert len(delivered) == len(events)
    assert overlaps == 0
    # one receiver hit per recorded attempt: no attempt was ever sent twice
    for eid in events:
        attempts = await pg_store.webhook_attempts(eid)
        hits = [h for h in rec.hits if h.event_id == eid]
        assert len(hits) == len(attempts) and [a.attempt for a in attempts] == list(range(1, len(attempts) + 1))
    # per-payment order held across both instances
    for i in range(40):
        mine = [h.event_id for h in rec.hits if f"_pay_{i:03d}_" in h.event_id]
        assert mine.index(next(e for e in mine if e.endswith("captured"))) > max(
            j for j, e in enumerate(mine) if e.endswith("authorized"))
