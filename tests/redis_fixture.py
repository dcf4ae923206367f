"""A private `redis-server` per test session, on a free loopback port, with nothing persisted.

`redis_url` starts it (or skips, or fails under CI, when redis-server is not installed);
`redis_client` gives each test an empty database through `make_redis` and closes it afterwards.
Import both where used: `from tests.redis_fixture import redis_url, redis_client  # noqa: F401`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from redis.asyncio import Redis

from router.idempotency_redis import make_redis

_START_ATTEMPTS = 3
_START_WAIT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_ping(proc: subprocess.Popen[bytes], port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        deadline = time.monotonic() + _START_WAIT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:  # exited: e.g. the port was taken between probe and bind
                return False
            try:
                if client.ping():
                    return True
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
        return False
    finally:
        client.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server not installed (required under CI)")
        pytest.skip("redis-server not installed; apt-get install redis-server")
    for _ in range(_START_ATTEMPTS):
        port = free_port()
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if _wait_for_ping(proc, port):
            try:
                yield f"redis://127.0.0.1:{port}/0"
            finally:
                _stop(proc)
            return
        _stop(proc)
    pytest.fail(f"redis-server did not answer PING after {_START_ATTEMPTS} attempts")


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = make_redis(redis_url)
    await client.flushall()
    yield client
    await client.aclose()
