"""One contract suite over every IdempotencyStore (in-process, embedded SQLite and Redis), then what only
SQLite and only Redis have."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from router.errors import ProblemError
from router.idempotency import Claim, IdempotencyStore, MemoryIdempotencyStore, StoredResponse
from router.idempotency_redis import RedisIdempotencyStore, make_redis
from router.idempotency_sqlite import KeyFilter, SqliteIdempotencyStore, sidecar_path
from router.locks import CoordinationUnavailable
from tests.services import free_port

MakeStore = Callable[..., IdempotencyStore]

# every byte value, a NUL, CRLF, invalid UTF-8 and a body large enough to cross socket buffers
BINARY_BODY = bytes(range(256)) + b"\x00\r\n\xff\xfe" + os.urandom(200_000)
RESPONSE = StoredResponse(201, b'{"id":"pay_1","status":"approved"}', "application/json")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    kind: str
    make: MakeStore
    wait_past: Callable[[float], Awaitable[None]]


@pytest.fixture
async def sqlite_stores() -> AsyncIterator[list[SqliteIdempotencyStore]]:
    made: list[SqliteIdempotencyStore] = []
    yield made
    for store in made:
        await store.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def harness(request: pytest.FixtureRequest, tmp_path: Path, sqlite_stores: list[SqliteIdempotencyStore]) -> Harness:
    if request.param == "sqlite":
        sclock = FakeClock()
        made = sqlite_stores

        def make_sqlite(ttl_s: float = 3600, in_flight_ttl_s: float = 120) -> IdempotencyStore:
            made.append(SqliteIdempotencyStore(tmp_path / "idem.db", ttl_s=ttl_s, clock=sclock,
                                               in_flight_ttl_s=in_flight_ttl_s))
            return made[-1]

        async def advance_sqlite(seconds: float) -> None:
            sclock.now += seconds + 0.001

        return Harness("sqlite", make_sqlite, advance_sqlite)
    if request.param == "memory":
        clock = FakeClock()

        def make_memory(ttl_s: float = 3600, in_flight_ttl_s: float = 120) -> IdempotencyStore:
            return MemoryIdempotencyStore(ttl_s=ttl_s, clock=clock, in_flight_ttl_s=in_flight_ttl_s)

        async def advance(seconds: float) -> None:
            clock.now += seconds + 0.001

        return Harness("memory", make_memory, advance)

    client: Redis = request.getfixturevalue("redis_client")

    def make_redis_store(ttl_s: float = 3600, in_flight_ttl_s: float = 120) -> IdempotencyStore:
        return RedisIdempotencyStore(client, ttl_s=ttl_s, in_flight_ttl_s=in_flight_ttl_s)

    async def sleep_past(seconds: float) -> None:
        # Redis expires by its own clock; waiting well beyond the TTL keeps this about behaviour
        await asyncio.sleep(seconds * 1.5 + 0.05)

    return Harness("redis", make_redis_store, sleep_past)


async def problem(aw: Awaitable[object]) -> ProblemError:
    with pytest.raises(ProblemError) as info:
        await aw
    return info.value


# ------------------------------------------------------------------ contract


async def test_first_claim_has_nothing_to_replay(harness: Harness) -> None:
    store = harness.make()
    assert await store.claim("alpha", "k1", "fp1") == Claim(replay=None)


async def test_replay_returns_the_stored_response_byte_exact(harness: Harness) -> None:
    store = harness.make()
    stored = StoredResponse(502, BINARY_BODY, "application/problem+json; charset=utf-8")
    await store.claim("alpha", "k1", "fp1")
    await store.complete("alpha", "k1", stored)
    first = await store.claim("alpha", "k1", "fp1")
    second = await store.claim("alpha", "k1", "fp1")
    assert first.replay == stored
    assert first.replay is not None and first.replay.body == BINARY_BODY
    assert second.replay == stored


async def test_empty_body_replays_as_empty(harness: Harness) -> None:
    store = harness.make()
    await store.claim("alpha", "k1", "fp1")
    await store.complete("alpha", "k1", StoredResponse(204, b"", "application/json"))
    assert (await store.claim("alpha", "k1", "fp1")).replay == StoredResponse(204, b"", "application/json")


@pytest.mark.parametrize("completed", [False, True], ids=["in_flight", "completed"])
async def test_other_parameters_are_key_reused(harness: Harness, completed: bool) -> None:
    store = harness.make()
    await store.claim("alpha", "k1", "fp1")
    if completed:
        await store.complete("alpha", "k1", RESPONSE)
    p = await problem(store.claim("alpha", "k1", "fp2"))
    assert (p.status, p.code) == (422, "idempotency_key_reused")


async def test_same_request_while_in_flight_is_key_in_use(harness: Harness) -> None:
    store = harness.make()
    await store.claim("alpha", "k1", "fp1")
    p = await problem(store.claim("alpha", "k1", "fp1"))
    assert (p.status, p.code) == (409, "idempotency_key_in_use")


async def test_exactly_one_of_100_concurrent_claims_wins(harness: Harness) -> None:
    store = harness.make()
    results = await asyncio.gather(
        *(store.claim("alpha", "k1", "fp1") for _ in range(100)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, Claim)]
    losers = [r for r in results if isinstance(r, ProblemError)]
    assert winners == [Claim(replay=None)]
    assert len(losers) == 99
    assert {p.code for p in losers} == {"idempotency_key_in_use"}


async def test_keys_are_scoped_per_merchant(harness: Harness) -> None:
    store = harness.make()
    await store.claim("alpha", "k1", "fp1")
    await store.complete("alpha", "k1", RESPONSE)
    assert await store.claim("beta", "k1", "fp-other") == Claim(replay=None)
    # a separator inside the ids must not make two scopes meet
    await store.claim("a:b", "c", "fp1")
    assert await store.claim("a", "b:c", "fp2") == Claim(replay=None)


async def test_release_frees_an_in_flight_key(harness: Harness) -> None:
    store = harness.make()
    await store.claim("alpha", "k1", "fp1")
    await store.release("alpha", "k1")
    assert await store.claim("alpha", "k1", "fp2") == Claim(replay=None)


async def test_release_never_forgets_a_completed_response(harness: Harness) -> None:
    store = harness.make()
    await store.claim("alpha", "k1", "fp1")
    await store.complete("alpha", "k1", RESPONSE)
    await store.release("alpha", "k1")
    assert (await store.claim("alpha", "k1", "fp1")).replay == RESPONSE


async def test_completed_record_expires_after_ttl(harness: Harness) -> None:
    store = harness.make(ttl_s=0.5)
    await store.claim("alpha", "k1", "fp1")
    await store.complete("alpha", "k1", RESPONSE)
    assert (await store.claim("alpha", "k1", "fp1")).replay == RESPONSE
    await harness.wait_past(0.5)
    assert await store.claim("alpha", "k1", "fp2") == Claim(replay=None)


async def test_completed_record_outlives_the_in_flight_ttl(harness: Harness) -> None:
    store = harness.make(ttl_s=3600, in_flight_ttl_s=0.3)
    await store.claim("alpha", "k1", "fp1")
    await store.complete("alpha", "k1", RESPONSE)
    await harness.wait_past(0.3)
    assert (await store.claim("alpha", "k1", "fp1")).replay == RESPONSE


async def test_a_crashed_claim_expires_after_the_in_flight_ttl(harness: Harness) -> None:
    store = harness.make(ttl_s=3600, in_flight_ttl_s=0.3)
    await store.claim("alpha", "k1", "fp1")  # ... and the claimer dies without complete/release
    await harness.wait_past(0.3)
    assert await store.claim("alpha", "k1", "fp1") == Claim(replay=None)


# ------------------------------------------------------------------ embedded SQLite only


def test_the_records_file_sits_next_to_the_payments_database() -> None:
    assert sidecar_path(Path("/var/lib/payroute/payroute.db")) == Path("/var/lib/payroute/payroute-idempotency.db")
    assert sidecar_path(Path("data/pay")) == Path("data/pay-idempotency.db")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=8), st.text(min_size=1, max_size=40)), max_size=300))
def test_key_filter_never_forgets_a_key_it_was_given(keys: list[tuple[str, str]]) -> None:
    f = KeyFilter(ttl_s=3600, capacity=50)  # small generations: many of them
    for i, (m, k) in enumerate(keys):
        f.add(m, k, now=1000.0 + i)
    f.expire(now=1000.0 + len(keys))
    assert all(f.may_contain(m, k) for m, k in keys)


def test_key_filter_false_positives_stay_near_one_percent() -> None:
    f = KeyFilter(ttl_s=3600, capacity=20_000)
    for i in range(20_000):
        f.add("alpha", f"in-{i}", now=1000.0)
    false_positives = sum(f.may_contain("alpha", f"out-{i}") for i in range(20_000))
    assert false_positives < 20_000 * 0.02


def test_key_filter_drops_a_generation_once_its_keys_expired() -> None:
    f = KeyFilter(ttl_s=100, capacity=10)
    for i in range(10):
        f.add("alpha", f"old-{i}", now=0.0)
    f.add("alpha", "new", now=60.0)  # the first generation is full: a second one opens
    assert f.generations == 2
    f.expire(now=100.5)  # the old keys' TTL has passed, not the new one's
    assert f.generations == 1
    assert f.may_contain("alpha", "new")
    assert not any(f.may_contain("alpha", f"old-{i}") for i in range(10))


async def test_sqlite_records_survive_a_restart(tmp_path: Path) -> None:
    first = SqliteIdempotencyStore(tmp_path / "idem.db")
    await first.claim("alpha", "k1", "fp1")
    await first.complete("alpha", "k1", StoredResponse(502, BINARY_BODY, "application/problem+json"))
    await first.close()
    second = SqliteIdempotencyStore(tmp_path / "idem.db")
    try:
        replay = (await second.claim("alpha", "k1", "fp1")).replay
        assert replay == StoredResponse(502, BINARY_BODY, "application/problem+json")
        assert (await problem(second.claim("alpha", "k1", "fp2"))).code == "idempotency_key_reused"
    finally:
        await second.close()


async def test_sqlite_keeps_finished_records_out_of_memory(tmp_path: Path) -> None:
    store = SqliteIdempotencyStore(tmp_path / "idem.db")
    try:
        for i in range(3000):
            await store.claim("alpha", f"k{i}", "fp")
            await store.complete("alpha", f"k{i}", RESPONSE)
        for _ in range(200):  # the writer commits in batches, then the loop drops its copies
            if len(store) == 0:
                break
            await asyncio.sleep(0.01)
        assert len(store) == 0
        assert (await store.claim("alpha", "k2999", "fp")).replay == RESPONSE
        assert (await store.claim("alpha", "k0", "fp")).replay == RESPONSE
    finally:
        await store.close()


async def test_sqlite_replays_a_response_whose_batch_has_not_committed(tmp_path: Path) -> None:
    store = SqliteIdempotencyStore(tmp_path / "idem.db")
    await store.start()
    gate = __import__("threading").Event()
    real_write = store._write

    def slow_write(conn: object, rows: list, reaps: list) -> None:  # type: ignore[type-arg]
        gate.wait(10)
        real_write(conn, rows, reaps)  # type: ignore[arg-type]

    store._write = slow_write  # type: ignore[method-assign]
    try:
        await store.claim("alpha", "k1", "fp1")
        await store.complete("alpha", "k1", RESPONSE)
        assert (await store.claim("alpha", "k1", "fp1")).replay == RESPONSE
        assert (await problem(store.claim("alpha", "k1", "fp2"))).code == "idempotency_key_reused"
    finally:
        gate.set()
        await store.close()
    reopened = SqliteIdempotencyStore(tmp_path / "idem.db")
    try:
        assert (await reopened.claim("alpha", "k1", "fp1")).replay == RESPONSE  # committed on close
    finally:
        await reopened.close()


async def test_a_merchant_named_like_the_writers_own_messages_is_just_a_merchant(tmp_path: Path) -> None:
    store = SqliteIdempotencyStore(tmp_path / "idem.db")
    try:
        for merchant in ("alpha", "reap"):
            await store.claim(merchant, "k1", "fp")
            await store.complete(merchant, "k1", RESPONSE)
        await store.close()
        store = SqliteIdempotencyStore(tmp_path / "idem.db")
        assert (await store.claim("alpha", "k1", "fp")).replay == RESPONSE
        assert (await store.claim("reap", "k1", "fp")).replay == RESPONSE
    finally:
        await store.close()


async def test_sqlite_reaps_expired_records_from_the_file(tmp_path: Path) -> None:
    import sqlite3

    clock = FakeClock()
    store = SqliteIdempotencyStore(tmp_path / "idem.db", ttl_s=3600, clock=clock, reap_every_s=60)
    try:
        for i in range(50):
            await store.claim("alpha", f"old{i}", "fp")
            await store.complete("alpha", f"old{i}", RESPONSE)
        clock.now += 1800
        await store.claim("alpha", "young", "fp")
        await store.complete("alpha", "young", RESPONSE)
        clock.now += 1801  # the old ones are past their TTL, the young one is not
        await store.claim("alpha", "trigger", "fp")  # a claim starts the reaper
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "idem.db") as conn:
        keys = {k for (k,) in conn.execute("SELECT key FROM idempotency_records")}
    assert keys == {"young"}


# ------------------------------------------------------------------ Redis only


async def test_a_stale_claimer_neither_overwrites_nor_releases_the_new_claim(redis_client: Redis) -> None:  # noqa: F811
    # two payroute instances; the first one's request outlives its in-flight TTL
    slow = RedisIdempotencyStore(redis_client, in_flight_ttl_s=0.3)
    other = RedisIdempotencyStore(redis_client, in_flight_ttl_s=60)
    await slow.claim("alpha", "k1", "fp1")
    await asyncio.sleep(0.5)
    assert await other.claim("alpha", "k1", "fp2") == Claim(replay=None)

    await slow.complete("alpha", "k1", RESPONSE)
    await slow.release("alpha", "k1")
    p = await problem(other.claim("alpha", "k1", "fp2"))
    assert p.code == "idempotency_key_in_use"  # not the slow one's response, not freed

    mine = StoredResponse(200, b"other", "application/json")
    await other.complete("alpha", "k1", mine)
    assert (await other.claim("alpha", "k1", "fp2")).replay == mine


async def test_complete_without_a_claim_stores_nothing(redis_client: Redis) -> None:  # noqa: F811
    store = RedisIdempotencyStore(redis_client)
    await store.complete("alpha", "k1", RESPONSE)
    assert await store.claim("alpha", "k1", "fp1") == Claim(replay=None)


async def test_a_second_complete_does_not_replace_the_first(redis_client: Redis) -> None:  # noqa: F811
    store = RedisIdempotencyStore(redis_client)
    await store.claim("alpha", "k1", "fp1")
    await store.complete("alpha", "k1", RESPONSE)
    await store.complete("alpha", "k1", StoredResponse(500, b"late", "application/json"))
    assert (await store.claim("alpha", "k1", "fp1")).replay == RESPONSE


async def test_a_small_pool_waits_instead_of_failing(redis_url: str, redis_client: Redis) -> None:  # noqa: F811
    client = make_redis(redis_url, max_connections=2)  # redis_client only empties the database
    try:
        store = RedisIdempotencyStore(client)
        results = await asyncio.gather(*(store.claim("alpha", f"k{i}", "fp") for i in range(100)))
        assert results == [Claim(replay=None)] * 100
    finally:
        await client.aclose()


async def test_an_exhausted_pool_waits_only_timeout_s(redis_url: str, redis_client: Redis) -> None:  # noqa: F811
    client = make_redis(redis_url, max_connections=1, timeout_s=0.2)
    # a stuck request holds the only connection (redis-py leaves get_connection untyped)
    held = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        store = RedisIdempotencyStore(client)
        async with asyncio.timeout(10):  # a guard against hanging (the default pool waits 20 s)
            with pytest.raises(CoordinationUnavailable, match="No connection available"):
                await store.claim("alpha", "k1", "fp1")
        await client.connection_pool.release(held)
        assert await store.claim("alpha", "k1", "fp1") == Claim(replay=None)
    finally:
        await client.aclose()


async def test_a_decoding_client_is_refused(redis_url: str) -> None:  # noqa: F811
    client: Redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisIdempotencyStore(client)
    finally:
        await client.aclose()


async def test_unreachable_redis_is_coordination_unavailable() -> None:
    client = make_redis(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    try:
        store = RedisIdempotencyStore(client)
        async with asyncio.timeout(30):  # a guard against hanging, not a measurement
            with pytest.raises(CoordinationUnavailable):
                await store.claim("alpha", "k1", "fp1")
    finally:
        await client.aclose()


@pytest.fixture
async def silent_server() -> AsyncIterator[tuple[int, list[int]]]:
    """Accepts connections and never answers: a hung Redis. Yields (port, [connections accepted])."""
    accepted = [0]
    writers: list[asyncio.StreamWriter] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        writers.append(writer)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield port, accepted
    for w in writers:
        w.close()
    server.close()
    await server.wait_closed()


async def test_a_hung_redis_times_out_once_without_retry_storm(silent_server: tuple[int, list[int]]) -> None:
    port, accepted = silent_server
    client = make_redis(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
    try:
        store = RedisIdempotencyStore(client)
        async with asyncio.timeout(30):  # a guard against hanging, not a measurement
            with pytest.raises(CoordinationUnavailable):
                await store.claim("alpha", "k1", "fp1")
        assert accepted[0] == 1
    finally:
        await client.aclose()
