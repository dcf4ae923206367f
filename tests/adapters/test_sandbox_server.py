"""The sandbox channel over real loopback HTTP: protocol, idempotency, determinism, failure modes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

import adapters.sandbox.server as server_module
from adapters.sandbox.server import (
    TEST_CARDS,
    ChannelSpec,
    Outage,
    RunningChannel,
    SandboxChannel,
    Script,
    run_sandbox,
    start_channel,
)
from tests.conftest import wait_for

PAN = "4242424242424242"
CVC = "987"

Serve = Callable[..., Awaitable[RunningChannel]]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    running: list[RunningChannel] = []

    async def _serve(script: Script | None = None, **kwargs: Any) -> RunningChannel:
        rc = await start_channel(SandboxChannel(kwargs.pop("name", "sbx"), script, **kwargs))
        running.append(rc)
        return rc

    yield _serve
    for rc in running:
        await rc.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def charge_body(number: str = PAN, amount: int = 1000, reference: str = "ord-1", **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "amount": amount,
        "currency": "USD",
        "capture": True,
        "reference": reference,
        "card": {"number": number, "exp_month": 12, "exp_year": 2030, "cvc": CVC},
        "country": "US",
        "description": None,
    }
    body.update(kw)
    return body


class Reply(msgspec.Struct):
    status: int
    body: Any
    headers: dict[str, str]
    raw: bytes


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> Reply:
    h = dict(headers or {})
    if key is not None:
        h["Idempotency-Key"] = key
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with http.request(method, url, data=data, headers=h) as resp:
        content = await resp.read()
        assert resp.content_type == "application/json"
        return Reply(resp.status, json.loads(content), dict(resp.headers), content)


async def charge(http: aiohttp.ClientSession, rc: RunningChannel, key: str, **kw: Any) -> Reply:
    return await call(http, "POST", f"{rc.base_url}/v1/charges", charge_body(**kw), key)


async def ledger(http: aiohttp.ClientSession, rc: RunningChannel) -> dict[str, Any]:
    reply = await call(http, "GET", f"{rc.base_url}/_sandbox/ledger")
    assert reply.status == 200
    return dict(reply.body)


async def refused(http: aiohttp.ClientSession, rc: RunningChannel) -> bool:
    try:
        await call(http, "GET", f"{rc.base_url}/_sandbox/ledger")
    except aiohttp.ClientConnectorError:
        return True
    return False


# --------------------------------------------------------------------------- basics


def test_module_resolves_inside_the_repo() -> None:
    repo = Path(__file__).resolve().parents[2]
    assert Path(server_module.__file__).resolve().is_relative_to(repo)


async def test_approved_charge_is_recorded(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve()
    reply = await charge(http, rc, "k1")
    assert reply.status == 200
    ch = reply.body
    assert ch["id"].startswith("ch_") and ch["object"] == "charge"
    assert (ch["status"], ch["captured_amount"], ch["refunded_amount"]) == ("captured", 1000, 0)
    assert ch["card"] == {"bin": "424242", "last4": "4242"} and ch["decline_code"] is None
    assert "Idempotent-Replayed" not in reply.headers
    book = await ledger(http, rc)
    assert book["channel"] == "sbx"
    assert book["totals"] == {"count": 1, "approved": 1, "captured_amount": 1000, "refunded_amount": 0}
    assert book["charges"] == [ch] == rc.channel.charges


async def test_capture_false_only_authorizes(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve()
    reply = await charge(http, rc, "k1", capture=False)
    assert (reply.body["status"], reply.body["captured_amount"]) == ("authorized", 0)


@pytest.mark.parametrize(("number", "code"), sorted(TEST_CARDS.items()))
async def test_test_cards_decline(serve: Serve, http: aiohttp.ClientSession, number: str, code: str) -> None:
    rc = await serve(Script(approval_rate=1.0))
    reply = await charge(http, rc, "k1", number=number)
    assert reply.status == 200
    assert (reply.body["status"], reply.body["decline_code"]) == ("declined", code)
    book = await ledger(http, rc)
    assert book["totals"]["count"] == 1 and book["totals"]["approved"] == 0
    assert book["charges"][0]["status"] == "declined"


async def test_api_key_is_required_when_set(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve(api_key="sk_test")
    url = f"{rc.base_url}/v1/charges"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        reply = await call(http, "POST", url, charge_body(), "k1", headers=headers)
        assert (reply.status, reply.body["error"]["code"]) == (401, "unauthorized")
    ok = await call(http, "POST", url, charge_body(), "k1", headers={"Authorization": "Bearer sk_test"})
    assert ok.status == 200
    assert len(rc.channel.charges) == 1


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"not json", None),
        (b"[1, 2]", None),
        (json.dumps({k: v for k, v in charge_body().items() if k != "reference"}).encode(), "reference"),
        (json.dumps(charge_body(amount=0)).encode(), "amount"),
        (json.dumps({**charge_body(), "amount": "10"}).encode(), "amount"),
        (json.dumps(charge_body(number="4242abcd42424242")).encode(), "card.number"),
        (json.dumps(charge_body(card={"number": PAN})).encode(), "card.exp_month"),
    ],
)
async def test_bad_bodies_are_400_and_charge_nothing(
    serve: Serve, http: aiohttp.ClientSession, raw: bytes, param: str | None
) -> None:
    rc = await serve()
    reply = await call(http, "POST", f"{rc.base_url}/v1/charges", key="k1", raw=raw)
    assert reply.status == 400
    assert reply.body["error"]["code"] == "invalid_request"
    assert reply.body["error"]["param"] == param
    assert PAN not in reply.raw.decode()
    assert rc.channel.charges == []


async def test_missing_idempotency_key(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve()
    reply = await call(http, "POST", f"{rc.base_url}/v1/charges", charge_body())
    assert (reply.status, reply.body["error"]["code"]) == (400, "missing_idempotency_key")
    assert rc.channel.charges == []


async def test_unsupported_currency(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve(Script(currencies=["EUR"]))
    reply = await charge(http, rc, "k1")
    assert (reply.status, reply.body["error"]["code"]) == (400, "currency_not_supported")
    assert rc.channel.charges == []
    assert (await charge(http, rc, "k2", currency="eur")).body["currency"] == "EUR"


async def test_unknown_route_and_method_answer_json(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve()
    missing = await call(http, "GET", f"{rc.base_url}/v2/nothing")
    assert (missing.status, missing.body["error"]["code"]) == (404, "not_found")
    wrong = await call(http, "DELETE", f"{rc.base_url}/v1/charges")
    assert wrong.status == 405 and "error" in wrong.body
    unknown = await call(http, "GET", f"{rc.base_url}/v1/charges/ch_nope")
    assert (unknown.status, unknown.body["error"]["code"]) == (404, "not_found")


# --------------------------------------------------------------------------- idempotency


async def test_same_key_same_body_replays_without_side_effect(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    rc = await serve()
    first = await charge(http, rc, "k1")
    # same JSON with another key order is the same body
    reordered = json.dumps(dict(reversed(list(charge_body().items())))).encode()
    second = await call(http, "POST", f"{rc.base_url}/v1/charges", key="k1", raw=reordered)
    assert second.status == first.status == 200
    assert second.raw == first.raw
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert len(rc.channel.charges) == 1


async def test_concurrent_duplicates_charge_once(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve(Script(latency_ms=20))
    replies = await asyncio.gather(*(charge(http, rc, "k1") for _ in range(5)))
    assert {r.body["id"] for r in replies} == {rc.channel.charges[0]["id"]}
    assert len(rc.channel.charges) == 1


async def test_same_key_other_body_is_409(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve()
    assert (await charge(http, rc, "k1")).status == 200
    reply = await charge(http, rc, "k1", amount=2000)
    assert (reply.status, reply.body["error"]["code"]) == (409, "idempotency_key_reused")
    assert len(rc.channel.charges) == 1


async def test_reset_forgets_charges_and_keys(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve()
    first = await charge(http, rc, "k1")
    assert (await call(http, "POST", f"{rc.base_url}/_sandbox/reset")).status == 200
    assert (await ledger(http, rc))["charges"] == []
    again = await charge(http, rc, "k1")
    assert "Idempotent-Replayed" not in again.headers and again.body["id"] != first.body["id"]


# --------------------------------------------------------------------------- determinism


async def outcomes(http: aiohttp.ClientSession, rc: RunningChannel, keys: list[str]) -> dict[str, str | None]:
    replies = await asyncio.gather(*(charge(http, rc, k, reference=k) for k in keys))
    return {k: r.body["decline_code"] for k, r in zip(keys, replies, strict=True)}


async def test_same_seed_and_key_give_same_outcome(serve: Serve, http: aiohttp.ClientSession) -> None:
    script = Script(seed=7, approval_rate=0.5, decline_codes={"do_not_honor": 1, "insufficient_funds": 1})
    keys = [f"key-{i}" for i in range(60)]
    a = await outcomes(http, await serve(script), keys)
    b = await outcomes(http, await serve(script), list(reversed(keys)))  # other order, concurrent
    assert a == b
    assert set(a.values()) == {None, "do_not_honor", "insufficient_funds"}
    other_seed = await outcomes(http, await serve(Script(seed=8, approval_rate=0.5)), keys)
    assert [v is None for v in other_seed.values()] != [v is None for v in a.values()]


async def test_latency_is_scripted_and_deterministic_per_key(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    delays: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)

    script = Script(seed=3, latency_ms=100, latency_jitter_ms=50)
    for _ in range(2):
        rc = await serve(script, sleep=fake_sleep)
        for key in ("a", "b", "c"):
            await charge(http, rc, key, reference=key)
    assert all(0.05 <= d <= 0.15 for d in delays)
    assert delays[:3] == delays[3:]
    assert len(set(delays[:3])) == 3


# --------------------------------------------------------------------------- failure modes


async def test_error_before_charges_nothing(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve(Script(failure="error_before"))
    reply = await charge(http, rc, "k1")
    assert reply.status == 503
    assert reply.body["error"]["code"] == "unavailable" and reply.body["error"]["accepted"] is False
    assert rc.channel.charges == []
    status = await call(http, "GET", f"{rc.base_url}/v1/charges?reference=ord-1")
    assert status.body == {"data": []}
    await rc.set_script(Script())
    retry = await charge(http, rc, "k1")  # no idempotency record was kept: the retry is new work
    assert retry.status == 200 and "Idempotent-Replayed" not in retry.headers


async def test_error_after_charges_and_retry_replays(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve(Script(failure="error_after"))
    reply = await charge(http, rc, "k1")
    assert reply.status == 500
    assert reply.body["error"]["code"] == "internal_error" and reply.body["error"]["accepted"] is True
    assert len(rc.channel.charges) == 1
    retry = await charge(http, rc, "k1")
    assert retry.status == 200 and retry.headers.get("Idempotent-Replayed") == "true"
    assert retry.body == rc.channel.charges[0]
    assert len(rc.channel.charges) == 1


async def test_hang_times_out_but_charge_is_findable(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve(Script(failure="hang", hang_s=30))
    with pytest.raises(TimeoutError):
        async with http.post(
            f"{rc.base_url}/v1/charges",
            json=charge_body(reference="ord-hang"),
            headers={"Idempotency-Key": "k1"},
            timeout=aiohttp.ClientTimeout(total=0.2),
        ) as resp:
            await resp.read()
    found = await call(http, "GET", f"{rc.base_url}/v1/charges?reference=ord-hang")
    assert found.status == 200 and len(found.body["data"]) == 1
    assert found.body["data"][0]["status"] == "captured"
    by_id = await call(http, "GET", f"{rc.base_url}/v1/charges/{found.body['data'][0]['id']}")
    assert by_id.body == found.body["data"][0]
    retry = await charge(http, rc, "k1", reference="ord-hang")
    assert retry.status == 200 and retry.body == by_id.body


async def test_refuse_closes_the_socket_and_reopens_on_same_port(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    rc = await serve()
    port = rc.port
    assert (await charge(http, rc, "k1")).status == 200  # leaves a kept-alive connection in the pool
    await rc.set_script(Script(failure="refuse"))
    with pytest.raises(aiohttp.ClientConnectorError):
        await charge(http, rc, "k2")
    with pytest.raises(aiohttp.ClientConnectorError):
        await call(http, "GET", f"{rc.base_url}/_sandbox/ledger")
    await rc.set_script(Script())
    assert rc.port == port
    assert (await charge(http, rc, "k3")).status == 200
    assert len((await ledger(http, rc))["charges"]) == 2


async def test_refuse_via_script_endpoint(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve()
    put = await call(http, "PUT", f"{rc.base_url}/_sandbox/script", {"failure": "refuse"})
    assert put.status == 200 and put.body["failure"] == "refuse"
    await wait_for(lambda: refused(http, rc), "the channel refusing connections")
    await rc.set_script(Script())
    assert not await refused(http, rc)


async def test_script_endpoint_validates(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve()
    url = f"{rc.base_url}/_sandbox/script"
    for bad in ({"failure": "explode"}, {"approval_rate": 2}, {"aproval_rate": 0.5}, [1]):
        reply = await call(http, "PUT", url, bad)
        assert (reply.status, reply.body["error"]["code"]) == (400, "invalid_request")
    assert rc.channel.script == Script()
    assert (await call(http, "PUT", url, {"approval_rate": 0.0, "seed": 1})).status == 200
    assert (await charge(http, rc, "k1")).body["status"] == "declined"
    assert (await call(http, "GET", url)).body["approval_rate"] == 0.0


async def test_outage_window_applies_only_within_it(serve: Serve, http: aiohttp.ClientSession) -> None:
    clock = Clock()
    rc = await serve(Script(outages=[Outage(start_s=10, end_s=20, failure="error_before")]), clock=clock)
    assert (await charge(http, rc, "k1", reference="a")).status == 200
    clock.now += 15
    assert (await charge(http, rc, "k2", reference="b")).status == 503
    assert (await call(http, "GET", f"{rc.base_url}/v1/charges?reference=a")).status == 200
    clock.now += 10
    assert (await charge(http, rc, "k3", reference="c")).status == 200
    # a new script restarts the outage clock
    await rc.set_script(rc.channel.script)
    assert (await charge(http, rc, "k4", reference="d")).status == 200
    clock.now += 12
    assert (await charge(http, rc, "k5", reference="e")).status == 503
    assert [c["reference"] for c in rc.channel.charges] == ["a", "c", "d"]


async def test_refuse_outage_window_closes_and_reopens_socket(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    clock = Clock()
    rc = await serve(Script(outages=[Outage(start_s=10, end_s=20, failure="refuse")]), clock=clock)
    port = rc.port
    assert not await refused(http, rc)
    clock.now += 15
    await rc.sync()
    assert await refused(http, rc)
    clock.now += 10
    await wait_for(lambda: _not(refused(http, rc)), "the poller re-opening the channel")
    assert rc.port == port and rc.listening


async def _not(flag: Awaitable[bool]) -> bool:
    return not await flag


# --------------------------------------------------------------------------- capture / void / refund


async def op(
    http: aiohttp.ClientSession, rc: RunningChannel, cid: str, kind: str, key: str, **body: Any
) -> Reply:
    return await call(http, "POST", f"{rc.base_url}/v1/charges/{cid}/{kind}", body, key)


async def test_capture_rules(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve()
    cid = (await charge(http, rc, "a1", capture=False)).body["id"]
    over = await op(http, rc, cid, "capture", "c0", amount=1001)
    assert (over.status, over.body["error"]["code"]) == (400, "amount_too_large")
    partial = await op(http, rc, cid, "capture", "c1", amount=600)
    assert partial.status == 200
    assert (partial.body["status"], partial.body["captured_amount"]) == ("captured", 600)
    twice = await op(http, rc, cid, "capture", "c2", amount=None)
    assert (twice.status, twice.body["error"]["code"]) == (409, "invalid_state")
    replay = await op(http, rc, cid, "capture", "c1", amount=600)
    assert replay.raw == partial.raw and replay.headers.get("Idempotent-Replayed") == "true"

    full_id = (await charge(http, rc, "a2", capture=False, reference="r2")).body["id"]
    full = await op(http, rc, full_id, "capture", "c3", amount=None)
    assert full.body["captured_amount"] == 1000
    declined_id = (await charge(http, rc, "a3", number="4000000000000002", reference="r3")).body["id"]
    assert (await op(http, rc, declined_id, "capture", "c4")).status == 409
    assert (await op(http, rc, "ch_missing", "capture", "c5")).status == 404
    assert (await call(http, "POST", f"{rc.base_url}/v1/charges/{cid}/capture", {})).status == 400  # no key
    assert (await ledger(http, rc))["totals"]["captured_amount"] == 1600


async def test_void_rules(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve()
    cid = (await charge(http, rc, "a1", capture=False)).body["id"]
    voided = await op(http, rc, cid, "void", "v1")
    assert (voided.status, voided.body["status"]) == (200, "voided")
    assert (await op(http, rc, cid, "void", "v2")).status == 409
    assert (await op(http, rc, cid, "capture", "c1")).status == 409
    captured_id = (await charge(http, rc, "a2", reference="r2")).body["id"]
    again = await op(http, rc, captured_id, "void", "v3")
    assert (again.status, again.body["error"]["code"]) == (409, "invalid_state")


async def test_refund_rules(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve()
    auth_id = (await charge(http, rc, "a1", capture=False)).body["id"]
    early = await op(http, rc, auth_id, "refunds", "r0", amount=100)
    assert (early.status, early.body["error"]["code"]) == (409, "invalid_state")

    cid = (await charge(http, rc, "a2", reference="r2")).body["id"]
    first = await op(http, rc, cid, "refunds", "r1", amount=400)
    assert first.status == 200
    assert first.body["id"].startswith("re_")
    assert (first.body["object"], first.body["charge"], first.body["amount"], first.body["status"]) == (
        "refund",
        cid,
        400,
        "succeeded",
    )
    assert (await op(http, rc, cid, "refunds", "r1", amount=400)).raw == first.raw  # replay, no second refund
    partly = (await call(http, "GET", f"{rc.base_url}/v1/charges/{cid}")).body
    assert (partly["status"], partly["refunded_amount"]) == ("captured", 400)
    over = await op(http, rc, cid, "refunds", "r2", amount=601)
    assert (over.status, over.body["error"]["code"]) == (400, "amount_too_large")
    rest = await op(http, rc, cid, "refunds", "r3", amount=600)
    assert rest.status == 200
    done = (await call(http, "GET", f"{rc.base_url}/v1/charges/{cid}")).body
    assert (done["status"], done["refunded_amount"]) == ("refunded", 1000)
    assert (await op(http, rc, cid, "refunds", "r4", amount=1)).status == 409
    reused = await op(http, rc, cid, "capture", "r3")  # same key on another endpoint
    assert (reused.status, reused.body["error"]["code"]) == (409, "idempotency_key_reused")
    assert (await ledger(http, rc))["totals"]["refunded_amount"] == 1000


# --------------------------------------------------------------------------- hygiene and wiring


async def test_card_number_and_cvc_never_stored(serve: Serve, http: aiohttp.ClientSession) -> None:
    rc = await serve(Script(seed=1, approval_rate=0.5))
    seen: list[bytes] = []
    for i in range(6):
        seen.append((await charge(http, rc, f"k{i}", reference=f"o{i}")).raw)
    seen.append((await charge(http, rc, "bad", amount=-1)).raw)
    await rc.set_script(Script(failure="error_after"))
    seen.append((await charge(http, rc, "k-after", reference="o-after")).raw)
    seen.append((await call(http, "GET", f"{rc.base_url}/_sandbox/ledger")).raw)
    dumped = b"\n".join(seen).decode() + json.dumps(rc.channel.charges)
    dumped += repr(vars(rc.channel))  # idempotency records included
    assert len(rc.channel.charges) == 7
    assert PAN not in dumped
    assert '"cvc"' not in dumped and "cvc" not in json.dumps(rc.channel.charges)


async def test_run_sandbox_starts_each_spec(http: aiohttp.ClientSession) -> None:
    specs = msgspec.convert(
        [
            {"name": "alpha", "api_key": "k-alpha"},
            {"name": "beta", "script": {"approval_rate": 0.0}},
        ],
        list[ChannelSpec],
    )
    running = await run_sandbox(specs, "127.0.0.1")
    try:
        alpha, beta = running
        assert alpha.port != beta.port
        denied = await call(http, "GET", f"{alpha.base_url}/_sandbox/ledger")
        assert denied.status == 401
        beta_ledger = await ledger(http, beta)
        assert beta_ledger["channel"] == "beta"
        assert (await charge(http, beta, "k1")).body["status"] == "declined"
    finally:
        for rc in running:
            await rc.stop()


def test_script_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Script(failure="explode")
    with pytest.raises(ValueError):
        Outage(start_s=5, end_s=1, failure="hang")
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"outages": [{"start_s": 0, "end_s": 1, "failure": "boom"}]}, Script)


def test_fault_rates_are_deterministic_and_close_to_their_rates() -> None:
    script = Script(seed=3, fault_rates={"error_after": 0.1, "hang": 0.05})
    draws = [SandboxChannel.sampled_fault(script, f"k{i}") for i in range(20_000)]
    assert draws == [SandboxChannel.sampled_fault(script, f"k{i}") for i in range(20_000)]
    assert abs(draws.count("error_after") / 20_000 - 0.1) < 0.01
    assert abs(draws.count("hang") / 20_000 - 0.05) < 0.01
    with pytest.raises(ValueError):
        Script(fault_rates={"refuse": 0.1})
