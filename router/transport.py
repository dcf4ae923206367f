"""The one place that sends bytes to channels, and the one boundary where client errors are mapped.

One aiohttp `ClientSession` per channel (its own connection pool and timeouts). The mapping keeps
"nothing was sent" apart from "it may have been processed":
- connect-phase failures (refused, DNS, connect timeout) -> `ChannelUnavailable`;
- anything after bytes may have left (read timeout, disconnect, total timeout) -> `OutcomeUnknown`.
Retries happen only for `ChannelUnavailable`, through tenacity, with full jitter, bounded tries, the
payment's deadline and a per-channel retry budget; the sleep is injectable so tests never wait.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
import tenacity

from router.config import ChannelConfig
from router.errors import ChannelUnavailable, OutcomeUnknown
from router.model import WireRequest, WireResponse

T = TypeVar("T")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class ChannelTransport:
    def __init__(self, channel: ChannelConfig, *, verify_tls: bool = True) -> None:
        self.channel = channel.name
        self.base_url = channel.base_url.rstrip("/")
        host = urlsplit(self.base_url).hostname or ""
        if not verify_tls and host not in LOOPBACK_HOSTS:
            raise ValueError("TLS verification may be turned off only for loopback URLs")
        self._ssl: ssl.SSLContext | bool = True if verify_tls else False
        self._connect_s = channel.timeouts.connect_ms / 1000
        self._total_s = channel.timeouts.total_ms / 1000
        self._limit = channel.max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._limit, ssl=self._ssl, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._total_s, sock_connect=self._connect_s),
            skip_auto_headers=("User-Agent",),
            headers={"User-Agent": "payroute/0.1"},
        )

    @property
    def started(self) -> bool:
        return self._session is not None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, req: WireRequest, *, timeout_s: float | None = None) -> WireResponse:
        session = self._session
        if session is None:
            raise ChannelUnavailable("transport not started", code="not_started")
        if timeout_s is not None and timeout_s <= 0:
            raise ChannelUnavailable("payment deadline reached before sending", code="deadline")
        total = self._total_s if timeout_s is None else min(self._total_s, timeout_s)
        try:
            async with session.request(
                req.method,
                self.base_url + req.path,
                data=req.body or None,
                headers=req.headers,
                timeout=aiohttp.ClientTimeout(total=total, sock_connect=min(self._connect_s, total)),
            ) as resp:
                body = await resp.read()
                return WireResponse(status=resp.status, headers=dict(resp.headers), body=body)
        except aiohttp.ClientConnectorError as e:
            raise ChannelUnavailable(f"connect failed: {e.os_error.__class__.__name__}", code="connect") from None
        except aiohttp.ConnectionTimeoutError:
            raise ChannelUnavailable("connect timeout", code="connect_timeout") from None
        except TimeoutError:
            raise OutcomeUnknown("timed out after sending", code="timeout") from None
        except aiohttp.ClientError as e:
            # the request may have reached the channel: never assume it did not
            raise OutcomeUnknown(f"transport error after connect: {e.__class__.__name__}", code="transport") from None


class RetryBudget:
    """Retries may add at most `ratio` of the channel's request volume (plus a small floor)."""

    def __init__(self, ratio: float = 0.2, floor: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self.floor = floor
        self._tokens = floor
        self._clock = clock

    def on_request(self) -> None:
        self._tokens = min(self.floor * 10, self._tokens + self.ratio)

    def try_spend(self) -> bool:
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


async def with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    base_s: float,
    max_s: float,
    deadline: float,
    budget: RetryBudget,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_retry: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call `call`, retrying only ChannelUnavailable, within tries, deadline and budget."""
    budget.on_request()
    # fast path: the first try runs bare (no tenacity machinery per request); only a ChannelUnavailable
    # enters tenacity, which sees that failure as its attempt 1, so the retry policy is unchanged
    try:
        return await call()
    except ChannelUnavailable as e:
        first: list[ChannelUnavailable] = [e]

    async def replay_then_call() -> T:
        if first:
            raise first.pop()
        return await call()

    def may_retry(state: tenacity.RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if not isinstance(exc, ChannelUnavailable):
            return False
        if state.attempt_number >= attempts or clock() >= deadline:
            return False
        if not budget.try_spend():
            return False
        if on_retry:
            on_retry()
        return True

    retrying = tenacity.AsyncRetrying(
        retry=may_retry,
        wait=tenacity.wait_random_exponential(multiplier=base_s, max=max_s),
        sleep=sleep,
        reraise=True,
    )
    return await retrying(replay_then_call)
