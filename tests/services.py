"""Session fixtures for the real services some stores need: PostgreSQL and Redis.

Use them from a test module either with `pytest_plugins = ["tests.services"]` (what
test_store_contract.py does: test parameters then do not shadow imported names, which ruff reports as
F811) or by importing the fixtures by name (`from tests.services import redis_url`). Don't mix the
two in one session: each way defines its own session fixtures (a second database, a second server).

- `postgres_server_dsn` (session): the server at `$PAYROUTE_TEST_PG` (URL form; default
  `postgresql://postgres@127.0.0.1:5432/postgres`), checked reachable.
- `postgres_dsn` (session): a fresh database `payroute_test_<random>` on it, dropped at the end.
- `fresh_postgres_dsn` (function): another fresh, empty database, for tests that watch migrations run.
- `pg_store` (function): a started `PostgresStore` on `postgres_dsn` with every table emptied.
- `redis_url` (session): a private `redis-server` on a free loopback port, no persistence.

A service that is not there skips the tests that need it, except under CI (`$CI` set), where a
missing service must not turn into a green run: there it fails.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from redis.asyncio import Redis

from router.idempotency_redis import make_redis
from router.store.postgres import PostgresStore

T = TypeVar("T")

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_START_HINT = "start it with: pg_ctlcluster --skip-systemctl-redirect 15 main start"
STORE_TABLES = ("payments", "attempts", "operations", "outbox", "webhook_endpoints", "webhook_deliveries",
                "webhook_attempts", "ledger_entries", "settlement_batches", "recon_exceptions")


def unavailable(message: str) -> NoReturn:
    """Skip locally; fail under CI, where a silently skipped suite would pass for a tested one."""
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    # On a thread of its own: a session fixture must not touch (or replace) the test's event loop.
    async def main() -> T:
        return await make()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


async def _admin(server_dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(server_dsn, timeout=5, command_timeout=30)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def create_database(server_dsn: str) -> tuple[str, str]:
    """A new empty database on the server: (name, dsn)."""
    name = f"payroute_test_{secrets.token_hex(6)}"
    run_async(lambda: _admin(server_dsn, f'CREATE DATABASE "{name}"'))
    return name, with_database(server_dsn, name)


def drop_database(server_dsn: str, name: str) -> None:
    # FORCE (PostgreSQL 13+): a store a failed test left open must not keep the database alive.
    run_async(lambda: _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_server_dsn() -> str:
    dsn = os.environ.get("PAYROUTE_TEST_PG", DEFAULT_PG)
    try:
        run_async(lambda: _admin(dsn, "SELECT 1"))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        unavailable(f"PostgreSQL not reachable at {dsn} ({type(exc).__name__}: {exc}); {PG_START_HINT}")
    return dsn


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server_dsn: str) -> Iterator[str]:
    name, dsn = create_database(postgres_server_dsn)
    try:
        yield dsn
    finally:
        drop_database(postgres_server_dsn, name)


@pytest.fixture
def fresh_postgres_dsn(postgres_server_dsn: str) -> Iterator[str]:
    name, dsn = create_database(postgres_server_dsn)
    try:
        yield dsn
    finally:
        drop_database(postgres_server_dsn, name)


@pytest.fixture
async def pg_store(postgres_dsn: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(postgres_dsn)
    await store.start()  # runs the migrations on first use, so the tables exist below
    try:
        await _admin(postgres_dsn, f"TRUNCATE {', '.join(STORE_TABLES)} RESTART IDENTITY")
        yield store
    finally:
        await store.close()


# --------------------------------------------------------------------------- redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(binary: str) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server answering PING on a free port (retried: the port can be taken in between)."""
    problems = []
    for _ in range(5):
        port = free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            if redis_answers_ping(port):
                return proc, port
            time.sleep(0.02)
        stop(proc)
        problems.append(f"port {port}: exit code {proc.returncode}")
    pytest.fail(f"redis-server did not start: {problems}", pytrace=False)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server is not installed; install it with: apt-get install redis-server")
    proc, port = start_redis(binary)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    """A client of the private server, flushed before each test."""
    client = make_redis(redis_url)
    await client.flushall()
    yield client
    await client.aclose()
