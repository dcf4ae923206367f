"""Merchant webhooks from the durable outbox: dispatcher, Standard Webhooks signer, schedule, per-endpoint
breaker, SSRF guard, and the admin API over dead letters and re-drives.

Contract:
- At least once, never dropped. Every event a payment change committed to the outbox becomes one
  delivery per endpoint of its merchant (`OutboxStore.fan_out_events`). A delivery ends `delivered`
  (2xx) or `dead` (schedule exhausted; re-drivable); paused and disabled endpoints keep theirs pending.
  `webhook-id` is the event id on every (re)delivery, so merchants de-duplicate on it.
- Per-payment order per endpoint: an event is claimed only once the previous event of the same payment
  for that endpoint is delivered or dead (the store's claim enforces it); other payments keep flowing.
- Per-endpoint queues: at most `concurrency_per_endpoint` sends in flight per endpoint, and
  `max_in_flight` overall. A send's slot frees when the receiver has answered; its result is then
  recorded (group-committed with others) while the slot serves the next claim. The delivery stays
  leased, and the next event of its payment blocked, until that record has committed; sends plus
  results waiting to be recorded stay within twice `max_in_flight` (claiming pauses beyond). A claim is a lease
  (`lease_s`): two dispatchers (PostgreSQL, `FOR UPDATE SKIP LOCKED`) never send the same attempt at
  once, and a crashed one's claims come back when it lapses.
- Schedule (per merchant overridable): immediately, then the `schedule_s` delays with full jitter
  (each delay drawn from (0, d] at `jitter: 1.0`); `Retry-After` on 429/503 replaces the drawn delay
  (capped by `retry_after_max_s`); `410 Gone` disables the endpoint at once.
- Breaker per endpoint (state in the store, shared by instances): `breaker_failures` consecutive
  failures pause it (log + `payroute_webhook_endpoint_alerts{kind="paused"}`); while paused one probe per
  `probe_interval_s`; a success re-activates it; failing for `disable_after_s` disables it (error log +
  alert `kind="disabled"`). Operators re-enable through the admin API.
- SSRF: the URL's host is resolved once per attempt; any address that is private, loopback, link-local,
  multicast, reserved or unspecified refuses the attempt unless inside `allow_networks`. The request
  is then sent to the checked address (Host header and TLS SNI keep the name), so a second DNS answer
  cannot redirect it. Redirects are never followed.
- Time comes from the injected `clock` and waits from the injected `sleep`: tests run hours of back-off
  in virtual time. The payload is the outbox payload as the pipeline wrote it (the reduced payment
  object: never card data).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import functools
import hashlib
import hmac
import ipaddress
import logging
import random
import secrets as _secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import msgspec
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from router.errors import ProblemError, StoreUnavailable
from router.store.base import (
    DeliveryClaim,
    DeliveryUpdate,
    OutboxStore,
    WebhookAttemptRow,
    WebhookDeliveryRow,
    WebhookEndpointRow,
)

log = logging.getLogger("payroute.webhooks")

DEFAULT_SCHEDULE_S = (0.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 54000.0)
SNIPPET_BYTES = 512
USER_AGENT = "payroute-webhooks/1"

# --------------------------------------------------------------------------- config


class MerchantWebhookSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    schedule_s: list[float] | None = None  # None: the global schedule


class WebhooksSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `webhooks:` section of the config."""

    enabled: bool = True
    # Delay before each attempt: the first is 0 (immediately), then 1m 5m 10m 30m 1h 2h 6h 15h (~25 h).
    schedule_s: list[float] = msgspec.field(default_factory=lambda: list(DEFAULT_SCHEDULE_S))
    jitter: float = 1.0  # fraction of each delay that is random: 1.0 is full jitter, 0 none
    retry_after_max_s: float = 6 * 3600.0
    connect_timeout_s: float = 5.0
    total_timeout_s: float = 15.0
    breaker_failures: int = 10  # consecutive failures that pause an endpoint
    probe_interval_s: float = 60.0  # one probe per interval while paused
    disable_after_s: float = 5 * 86400.0  # failing this long (no success at all) disables the endpoint
    allow_networks: list[str] = msgspec.field(default_factory=list)  # e.g. ["127.0.0.0/8"] for tests
    concurrency_per_endpoint: int = 8
    max_in_flight: int = 256
    poll_interval_s: float = 1.0  # upper bound on how long new outbox events wait to be seen
    lease_s: float = 60.0  # must exceed total_timeout_s: a claim outlives its send
    fan_out_batch: int = 500
    merchants: dict[str, MerchantWebhookSettings] = msgspec.field(default_factory=dict)

    def schedule_for(self, merchant_id: str) -> Sequence[float]:
        own = self.merchants.get(merchant_id)
        return own.schedule_s if own is not None and own.schedule_s is not None else self.schedule_s


def check_webhooks_settings(s: WebhooksSettings, path: str = "$.webhooks") -> list[tuple[str, str]]:
    """Semantic checks for `config.check` (msgspec has checked the types)."""
    problems: list[tuple[str, str]] = []
    schedules = [(f"{path}.schedule_s", s.schedule_s)] + [
        (f"{path}.merchants.{m}.schedule_s", ms.schedule_s) for m, ms in s.merchants.items() if ms.schedule_s is not None
    ]
    for where, sched in schedules:
        if not sched:
            problems.append((where, "needs at least one attempt"))
        elif sched[0] != 0:
            problems.append((f"{where}[0]", "the first attempt is immediate: must be 0"))
        elif any(d < 0 for d in sched):
            problems.append((where, "delays must not be negative"))
    if not 0 <= s.jitter <= 1:
        problems.append((f"{path}.jitter", "must be between 0 and 1"))
    if s.connect_timeout_s <= 0 or s.total_timeout_s <= 0 or s.connect_timeout_s > s.total_timeout_s:
        problems.append((f"{path}.connect_timeout_s", "timeouts must be positive, connect <= total"))
    if s.lease_s <= s.total_timeout_s:
        problems.append((f"{path}.lease_s", "must exceed total_timeout_s, or a send could outlive its lease"))
    for name in ("breaker_failures", "concurrency_per_endpoint", "max_in_flight", "fan_out_batch"):
        if getattr(s, name) < 1:
            problems.append((f"{path}.{name}", "must be at least 1"))
    for name in ("probe_interval_s", "disable_after_s", "poll_interval_s", "retry_after_max_s"):
        if getattr(s, name) <= 0:
            problems.append((f"{path}.{name}", "must be positive"))
    for i, net in enumerate(s.allow_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            problems.append((f"{path}.allow_networks[{i}]", f"{net!r} is not a CIDR network"))
    return problems


# --------------------------------------------------------------------------- endpoints and signing


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # stable: derived from merchant and URL, so it survives restarts and reloads
    merchant_id: str
    url: str
    secrets: tuple[str, ...]  # whsec_...; two during a rotation: every delivery is signed with both


def endpoint_id(merchant_id: str, url: str) -> str:
    return "we_" + hashlib.sha256(f"{merchant_id}\n{url}".encode()).hexdigest()[:24]


def endpoints_from_merchants(merchants: Iterable[Any]) -> list[Endpoint]:
    """From `Config.merchants` (each with `.id` and `.webhooks: [{url, secret}]`). `secret` may hold
    two secrets separated by whitespace during a rotation (new first, old second); a `previous_secret`
    field, if the config has one, is appended."""
    out = []
    for m in merchants:
        for hook in m.webhooks:
            keys = [*str(hook.secret).split()]
            previous = getattr(hook, "previous_secret", None)
            if previous:
                keys.append(str(previous))
            out.append(Endpoint(id=endpoint_id(m.id, hook.url), merchant_id=m.id, url=hook.url, secrets=tuple(keys)))
    return out


@functools.lru_cache(maxsize=1024)  # secrets come from config: bounded; decoded once, not per delivery
def _secret_bytes(secret: str) -> bytes:
    raw = secret.removeprefix("whsec_")
    return base64.b64decode(raw + "=" * (-len(raw) % 4))


def new_secret() -> str:
    return "whsec_" + base64.b64encode(_secrets.token_bytes(32)).decode()


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,<base64 HMAC-SHA256(id.timestamp.body)>` per secret, space-separated."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(_secret_bytes(s), content, hashlib.sha256).digest()).decode()
        for s in secrets
    )


def signed_headers(endpoint: Endpoint, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(endpoint.secrets, msg_id, timestamp, body),
    }


# --------------------------------------------------------------------------- SSRF guard


class EndpointRefused(Exception):
    """The endpoint URL may not be called (SSRF guard or a malformed URL). Nothing was sent."""


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class SsrfGuard:
    def __init__(self, allow_networks: Sequence[str], resolver: Resolver = system_resolver) -> None:
        self._allow = [ipaddress.ip_network(n, strict=False) for n in allow_networks]
        self._resolver = resolver
        # URL -> its checked (address, port) when the host is an IP literal: no DNS answer can change
        # that verdict, so it is worked out once. Names are resolved and checked on every attempt.
        self._literal: dict[str, tuple[str, int]] = {}

    def permitted(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if any(addr in net for net in self._allow):
            return True
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return self.permitted(addr.ipv4_mapped)
        return not (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast
                    or addr.is_reserved or addr.is_unspecified)  # fmt: skip

    async def resolve(self, url: str) -> tuple[str, int]:
        """The address to connect to (the first one), if every address the name has is permitted."""
        known = self._literal.get(url)
        if known is not None:
            return known
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EndpointRefused(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        literal = True
        try:
            addrs = [ipaddress.ip_address(parts.hostname)]
        except ValueError:
            literal = False
            try:
                addrs = [ipaddress.ip_address(a.split("%", 1)[0]) for a in await self._resolver(parts.hostname, port)]
            except OSError as e:
                raise EndpointRefused(f"cannot resolve {parts.hostname}: {e}") from None
        if not addrs:
            raise EndpointRefused(f"{parts.hostname} has no address")
        bad = [str(a) for a in addrs if not self.permitted(a)]
        if bad:
            raise EndpointRefused(f"{parts.hostname} resolves to a non-public address ({', '.join(bad)})")
        checked = str(addrs[0]), port
        if literal and len(self._literal) < 4096:  # bounded: endpoint URLs come from config
            self._literal[url] = checked
        return checked


def pinned_url(url: str, address: str) -> str:
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------- schedule and breaker


class SendResult(msgspec.Struct, frozen=True, kw_only=True):
    outcome: str  # delivered | failed | throttled | gone | timeout | unreachable | refused
    status_code: int | None = None
    error: str | None = None
    snippet: str | None = None
    retry_after_s: float | None = None


def next_delay(schedule: Sequence[float], attempts_done: int, rng: Callable[[], float], jitter: float) -> float | None:
    """Delay after the `attempts_done`-th failed attempt of a round, or None: the schedule is exhausted."""
    if attempts_done >= len(schedule):
        return None
    d = schedule[attempts_done]
    return d * (1.0 - jitter * rng())  # rng in [0, 1): full jitter draws from (0, d]


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def delivery_update(
    result: SendResult, round_attempts: int, schedule: Sequence[float], settings: WebhooksSettings,
    now: datetime, rng: Callable[[], float],
) -> DeliveryUpdate:
    if result.outcome == "delivered":
        return DeliveryUpdate(status="delivered", next_attempt_at=now)
    if result.outcome == "gone":
        # the endpoint is disabled; the event waits for it (or a re-drive elsewhere), at the same place
        return DeliveryUpdate(status="pending", next_attempt_at=now)
    delay = next_delay(schedule, round_attempts + 1, rng, settings.jitter)
    if delay is None:
        return DeliveryUpdate(status="dead", next_attempt_at=now)
    if result.retry_after_s is not None:
        delay = min(result.retry_after_s, settings.retry_after_max_s)
    return DeliveryUpdate(status="pending", next_attempt_at=now + timedelta(seconds=delay))


def decide_endpoint(
    ep: WebhookEndpointRow, *, outcome: str, started_at: datetime, now: datetime, settings: WebhooksSettings
) -> WebhookEndpointRow:
    """The breaker: the endpoint as it must be after an attempt with this outcome."""
    if ep.state == "disabled":
        return ep
    if outcome == "delivered":
        return msgspec.structs.replace(ep, state="active", consecutive_failures=0, failing_since=None,
                                       paused_until=None, disabled_reason=None)
    if outcome == "gone":
        return msgspec.structs.replace(ep, state="disabled", disabled_reason="the endpoint answered 410 Gone")
    failures = ep.consecutive_failures + 1
    since = ep.failing_since or started_at
    ep = msgspec.structs.replace(ep, consecutive_failures=failures, failing_since=since)
    if now - since >= timedelta(seconds=settings.disable_after_s):
        hours = (now - since).total_seconds() / 3600
        return msgspec.structs.replace(ep, state="disabled", disabled_reason=f"no successful delivery for {hours:.0f} h")
    if failures >= settings.breaker_failures:
        if ep.state == "paused":  # a failed probe: claim_probe already set the next probe time
            return ep
        return msgspec.structs.replace(ep, state="paused", paused_until=now + timedelta(seconds=settings.probe_interval_s))
    return ep


# --------------------------------------------------------------------------- metrics


class WebhookMetrics:
    """Webhook metrics on the app's registry. Endpoint ids come from config, so labels stay bounded."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.attempts = Counter("payroute_webhook_attempts", "Webhook delivery attempts by outcome",
                                ["endpoint", "outcome"], registry=r)
        self.latency = Histogram("payroute_webhook_attempt_duration_seconds", "Webhook attempt latency", ["endpoint"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30), registry=r)
        self.dead_letters = Counter("payroute_webhook_dead_letters", "Deliveries that exhausted their schedule",
                                    ["endpoint"], registry=r)
        self.endpoint_state = Gauge("payroute_webhook_endpoint_state",
                                    "Endpoint state: 0 active, 1 paused, 2 disabled", ["endpoint"], registry=r)
        self.alerts = Counter("payroute_webhook_endpoint_alerts",
                              "Endpoint breaker events (alert on any increase): paused, disabled, gone",
                              ["endpoint", "kind"], registry=r)
        self.fanned_out = Counter("payroute_webhook_events_fanned_out", "Outbox events turned into deliveries",
                                  registry=r)
        self.redrives = Counter("payroute_webhook_redrives", "Dead letters re-driven by an operator", registry=r)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Counter | Gauge | Histogram, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: the hot path does not take the metric's lock."""
        key = (id(metric), labels)  # the metrics live as long as this object
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


_STATE_VALUE = {"active": 0, "paused": 1, "disabled": 2}


# --------------------------------------------------------------------------- dispatcher


Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class WebhookDispatcher:
    def __init__(
        self,
        store: OutboxStore,
        endpoints: Callable[[], Sequence[Endpoint]],
        settings: WebhooksSettings,
        metrics: WebhookMetrics | None = None,
        *,
        clock: Clock = _utcnow,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        resolver: Resolver = system_resolver,
        timestamp_clock: Clock | None = None,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self._endpoints = endpoints
        self._metrics = metrics or WebhookMetrics(CollectorRegistry())
        self._sleep = sleep
        self._rng = rng
        self._timestamp_clock = timestamp_clock or clock
        self._guard = SsrfGuard(settings.allow_networks, resolver)
        self.owner = owner or f"wd_{_secrets.token_hex(6)}"
        self._client: aiohttp.ClientSession | None = None
        self._in_flight: dict[str, set[asyncio.Task[None]]] = {}  # sends, per endpoint
        self._recording: set[asyncio.Task[None]] = set()  # answered, result not yet committed
        self._slot_freed = asyncio.Event()  # a send was answered since the last pass began
        self._full = False  # the last pass left claimable work for lack of slots
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._synced: frozenset[tuple[str, str, str]] = frozenset()
        # (url, checked address) -> (pinned URL, Host header, TLS SNI arguments): parsed once, not per send
        self._targets: dict[tuple[str, str], tuple[str, str, dict[str, Any]]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, run: bool = True) -> None:
        """Open the HTTP client; with `run`, start the dispatch loop in the background."""
        s = self.settings
        # aiohttp, not httpx: at a few dozen sends in flight httpx's pool tops out near 300-1,500 requests/s
        # on one core, aiohttp near 10,000 (bench/webhook_dispatch.py prints both).
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=s.max_in_flight, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=s.total_timeout_s, sock_connect=s.connect_timeout_s),
            trust_env=False, auto_decompress=False,
        )
        if run and s.enabled:
            self._runner = asyncio.create_task(self.run_forever(), name="payroute-webhooks")

    async def aclose(self) -> None:
        """Stop claiming, let sends in flight finish and record (bounded by the total timeout), close."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        tasks = self._all_in_flight()
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.total_timeout_s + 5)
        if self._client is not None:
            await self._client.close()
            self._client = None

    def wake(self) -> None:
        """New events or a re-drive: look now instead of at the next poll."""
        self._wake.set()

    def _all_in_flight(self) -> set[asyncio.Task[None]]:
        """Every delivery task: sending, or recording its result."""
        return set().union(self._recording, *self._in_flight.values())

    def _sends_in_flight(self) -> int:
        return sum(len(tasks) for tasks in self._in_flight.values())

    # ------------------------------------------------------------------ the loop

    async def run_once(self) -> int:
        """One pass: sync endpoints, fan out, claim what is due, send it, wait for those sends.
        Returns how many attempts were made (tests step virtual time with it)."""
        started = await self._tick()
        if started:
            await asyncio.gather(*started)
        return len(started)

    async def run_forever(self) -> None:
        while True:
            try:
                started = await self._tick()
            except StoreUnavailable as e:
                log.error("webhook dispatcher: store unavailable", extra={"error": str(e)})
                started = []
            if started:
                continue  # more may be claimable right away (up to the concurrency limits)
            await self._idle()

    async def _idle(self) -> None:
        s = self.settings
        now = self.clock()
        in_flight = self._all_in_flight()
        if self._full and in_flight:
            # Work is waiting for slots: a send answered wakes us, so skip the look at the schedule
            # (a scan of every pending delivery); a retry falling due meanwhile waits at most a poll.
            due = None
        else:
            try:
                due = await self.store.next_webhook_due(now)
            except StoreUnavailable:
                due = None
        wait = s.poll_interval_s if due is None else (due - now).total_seconds()
        # never spin: a due delivery we cannot take (endpoint full, leased elsewhere) is re-looked at shortly
        wait = min(max(wait, 0.05), s.poll_interval_s)
        self._wake.clear()
        waiters: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(self._sleep(wait)), asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self._slot_freed.wait()),
        }
        waiters |= in_flight
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            if w not in in_flight and not w.done():
                w.cancel()

    async def _tick(self) -> list[asyncio.Task[None]]:
        s = self.settings
        self._slot_freed.clear()  # set again by any send answered from here on: the next pass looks
        self._full = False
        now = self.clock()
        endpoints = {e.id: e for e in self._endpoints()}
        synced = frozenset((e.id, e.merchant_id, e.url) for e in endpoints.values())
        if synced != self._synced:
            await self.store.sync_webhook_endpoints(
                [WebhookEndpointRow(id=e.id, merchant_id=e.merchant_id, url=e.url) for e in endpoints.values()], now
            )
            self._synced = synced
        by_merchant: dict[str, list[str]] = {}
        for e in endpoints.values():
            by_merchant.setdefault(e.merchant_id, []).append(e.id)
        async def fan_out() -> None:
            while True:
                n = await self.store.fan_out_events(by_merchant, now, s.fan_out_batch)
                self._metrics.fanned_out.inc(n)
                if n < s.fan_out_batch:
                    return

        # Independent: the fan-out (the outbox writer) and the endpoint states (a reader) go at once.
        _, listed = await asyncio.gather(fan_out(), self.store.list_webhook_endpoints())
        rows = {r.id: r for r in listed}
        lease_until = now + timedelta(seconds=s.lease_s)
        refill = max(1, s.concurrency_per_endpoint // 4)
        # max_in_flight is shared: reserve each endpoint's share before its claim goes out. Sends are
        # bounded by it, and sends plus answered results not yet recorded by twice it.
        sends = self._sends_in_flight()
        budget = min(s.max_in_flight - sends, 2 * s.max_in_flight - sends - len(self._recording))
        planned: list[tuple[Endpoint, set[asyncio.Task[None]], Awaitable[list[DeliveryClaim]]]] = []
        for ep in endpoints.values():
            row = rows.get(ep.id)
            if row is None:
                continue
            self._metrics.child(self._metrics.endpoint_state, ep.id).set(_STATE_VALUE.get(row.state, 0))
            mine = self._in_flight.setdefault(ep.id, set())
            free = min(s.concurrency_per_endpoint - len(mine), budget)
            if free <= 0 or (mine and free < refill):
                # each claim is a store transaction: with sends in flight, wait until a quarter of the
                # slots are free and claim them together, not one by one (a send answered re-runs the tick)
                self._full = self._full or row.state == "active"
                continue
            if row.state == "active":
                budget -= free
                planned.append((ep, mine, self._claim(ep, now, lease_until, free)))
            elif row.state == "paused" and not mine and (row.paused_until is None or row.paused_until <= now):
                budget -= 1
                planned.append((ep, mine, self._probe(ep, now, lease_until)))
        # One round trip for every endpoint's claim: they share the store's next group commit.
        claimed = await asyncio.gather(*(claim for _, _, claim in planned))
        started: list[asyncio.Task[None]] = []
        for (ep, mine, _), claims in zip(planned, claimed, strict=True):
            for claim in claims:
                task = asyncio.create_task(self._deliver(ep, claim))
                mine.add(task)
                task.add_done_callback(partial(_forget, mine, self._recording))
                started.append(task)
        return started

    async def _claim(self, ep: Endpoint, now: datetime, lease_until: datetime, free: int) -> list[DeliveryClaim]:
        claims = await self.store.claim_deliveries(ep.id, now, lease_until, self.owner, free)
        if len(claims) == free:
            self._full = True  # there may be more: a slot freeing up must bring us back
        return claims

    async def _probe(self, ep: Endpoint, now: datetime, lease_until: datetime) -> list[DeliveryClaim]:
        next_probe = now + timedelta(seconds=self.settings.probe_interval_s)
        probe = await self.store.claim_probe(ep.id, now, next_probe, lease_until, self.owner)
        if probe is None:
            return []
        log.info("probing paused webhook endpoint", extra={"endpoint": ep.id})
        return [probe]

    # ------------------------------------------------------------------ one attempt

    async def _deliver(self, ep: Endpoint, claim: DeliveryClaim) -> None:
        started_at = self.clock()
        t0 = time.perf_counter()
        result = await self.send(ep, claim.event_id, claim.payload)
        latency_ms = (time.perf_counter() - t0) * 1000
        self._answered(ep.id)
        now = self.clock()
        s = self.settings
        update = delivery_update(result, claim.round_attempts, s.schedule_for(claim.merchant_id), s, now, self._rng)
        attempt = WebhookAttemptRow(
            event_id=claim.event_id, endpoint_id=ep.id, attempt=claim.attempts + 1, started_at=started_at,
            latency_ms=latency_ms, outcome=result.outcome, status_code=result.status_code, error=result.error,
            response_snippet=result.snippet,
        )
        self._metrics.child(self._metrics.attempts, ep.id, result.outcome).inc()
        self._metrics.child(self._metrics.latency, ep.id).observe(latency_ms / 1000)
        decide = partial(decide_endpoint, outcome=result.outcome, started_at=started_at, now=now, settings=s)
        try:
            changed = await self.store.finish_attempt(claim, attempt, update, decide, now)
        except StoreUnavailable as e:
            # the lease lapses and the event is sent again: at least once, same webhook-id
            log.error("webhook attempt not recorded", extra={"event_id": claim.event_id, "error": str(e)})
            return
        if changed is None:
            log.warning("webhook lease lost before the attempt was recorded",
                        extra={"event_id": claim.event_id, "endpoint": ep.id})
            return
        if update.status == "dead":
            self._metrics.dead_letters.labels(ep.id).inc()
            log.warning("webhook dead-lettered", extra={"event_id": claim.event_id, "endpoint": ep.id,
                                                        "attempts": attempt.attempt})
        before, after = changed
        self._metrics.child(self._metrics.endpoint_state, ep.id).set(_STATE_VALUE.get(after.state, 0))
        if before.state != after.state:
            if after.state == "paused":
                self._metrics.alerts.labels(ep.id, "paused").inc()
                log.error("webhook endpoint paused by its breaker", extra={
                    "endpoint": ep.id, "merchant_id": ep.merchant_id, "failures": after.consecutive_failures})
            elif after.state == "disabled":
                kind = "gone" if result.outcome == "gone" else "disabled"
                self._metrics.alerts.labels(ep.id, kind).inc()
                log.error("webhook endpoint disabled", extra={
                    "endpoint": ep.id, "merchant_id": ep.merchant_id, "reason": after.disabled_reason})
            elif after.state == "active":
                log.warning("webhook endpoint recovered", extra={"endpoint": ep.id})

    def _answered(self, endpoint: str) -> None:
        # The send is over: free its slot for the next claim while the result is recorded.
        task = asyncio.current_task()
        mine = self._in_flight.get(endpoint)
        if task is not None and mine is not None and task in mine:
            mine.discard(task)
            self._recording.add(task)
            self._slot_freed.set()

    async def send(self, ep: Endpoint, event_id: str, body: bytes) -> SendResult:
        """One signed POST. Failures are values; nothing here raises for the receiver's behaviour."""
        assert self._client is not None, "start() the dispatcher first"
        try:
            address, _port = await self._guard.resolve(ep.url)
        except EndpointRefused as e:
            log.error("webhook endpoint refused by the SSRF guard", extra={"endpoint": ep.id, "reason": str(e)})
            return SendResult(outcome="refused", error=str(e)[:SNIPPET_BYTES])
        target = self._targets.get((ep.url, address))
        if target is None:
            parts = urlsplit(ep.url)
            # TLS: SNI and certificate check against the name, while the socket goes to the checked address
            sni: dict[str, Any] = {"server_hostname": parts.hostname} if parts.scheme == "https" else {}
            target = pinned_url(ep.url, address), parts.netloc.rsplit("@", 1)[-1], sni
            if len(self._targets) >= 4096:  # a name whose addresses keep changing: start over
                self._targets.clear()
            self._targets[(ep.url, address)] = target
        url, host, sni = target
        timestamp = int(self._timestamp_clock().timestamp())
        headers = signed_headers(ep, event_id, timestamp, body)
        headers["host"] = host
        try:
            async with asyncio.timeout(self.settings.total_timeout_s):
                async with self._client.post(url, data=body, headers=headers, allow_redirects=False, **sni) as resp:
                    snippet = await _read_snippet(resp)
                    code = resp.status
                    retry_after_header = resp.headers.get("retry-after")
        except aiohttp.ConnectionTimeoutError as e:
            return SendResult(outcome="unreachable", error=type(e).__name__)
        except TimeoutError as e:  # the total timeout, or a read timeout
            return SendResult(outcome="timeout", error=type(e).__name__)
        except aiohttp.ClientConnectorError as e:
            return SendResult(outcome="unreachable", error=f"ConnectError: {e}"[:SNIPPET_BYTES])
        except aiohttp.ClientError as e:
            return SendResult(outcome="failed", error=f"{type(e).__name__}: {e}"[:SNIPPET_BYTES])
        if 200 <= code < 300:
            return SendResult(outcome="delivered", status_code=code, snippet=snippet)
        if code == 410:
            return SendResult(outcome="gone", status_code=code, snippet=snippet)
        if code in (429, 503):
            retry_after = parse_retry_after(retry_after_header, self.clock())
            return SendResult(outcome="throttled", status_code=code, snippet=snippet, retry_after_s=retry_after)
        return SendResult(outcome="failed", status_code=code, snippet=snippet)


def _forget(sending: set[asyncio.Task[None]], recording: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
    sending.discard(task)
    recording.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("webhook delivery task failed", exc_info=task.exception())


async def _read_snippet(resp: aiohttp.ClientResponse) -> str:
    buf = await resp.content.read(SNIPPET_BYTES)
    while buf and len(buf) < SNIPPET_BYTES and not resp.content.at_eof():
        chunk = await resp.content.read(SNIPPET_BYTES - len(buf))
        if not chunk:
            break
        buf += chunk
    # "ignore" drops a character cut in half: the stored text stays within the byte bound
    return buf[:SNIPPET_BYTES].decode("utf-8", errors="ignore")


# --------------------------------------------------------------------------- aiohttp wiring


WEBHOOKS = web.AppKey("webhooks", WebhookDispatcher)


def dispatcher_ctx(key: web.AppKey[WebhookDispatcher] = WEBHOOKS) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup_ctx entry: start the dispatcher stored at `app[key]` (after the store), stop it first."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        dispatcher = app[key]
        await dispatcher.start()
        yield
        await dispatcher.aclose()

    return ctx


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


def _time_param(value: str | None, name: str) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise ProblemError(400, "invalid_parameter", f"{name} must be an ISO-8601 time", f"got {value!r}") from None
    if dt.tzinfo is None:
        raise ProblemError(400, "invalid_parameter", f"{name} needs a UTC offset", f"got {value!r}")
    return dt


def delivery_doc(d: WebhookDeliveryRow) -> dict[str, Any]:
    return msgspec.to_builtins(d)  # type: ignore[no-any-return]


def _attempt_doc(a: WebhookAttemptRow) -> dict[str, Any]:
    return msgspec.to_builtins(a)  # type: ignore[no-any-return]


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProblemError(400, "malformed_json", "The body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ProblemError(400, "invalid_body", "The body must be a JSON object")
    return body


def register_webhook_routes(
    router: web.UrlDispatcher, authenticate_admin: Callable[[web.Request], None],
    key: web.AppKey[WebhookDispatcher] = WEBHOOKS,
) -> None:
    """The admin API over deliveries, dead letters, re-drives and endpoints (all behind the admin token)."""

    async def list_events(request: web.Request) -> web.Response:
        authenticate_admin(request)
        q = request.query
        status = q.get("status")
        if status is not None and status not in ("pending", "delivered", "dead"):
            raise ProblemError(400, "invalid_parameter", "status must be pending, delivered or dead")
        try:
            limit = int(q.get("limit", "100"))
        except ValueError:
            limit = -1
        if not 1 <= limit <= 1000:
            raise ProblemError(400, "invalid_parameter", "limit must be 1..1000")
        rows = await request.app[key].store.list_webhook_deliveries(
            status=status, endpoint_id=q.get("endpoint_id"), merchant_id=q.get("merchant_id"),
            since=_time_param(q.get("since"), "since"), until=_time_param(q.get("until"), "until"), limit=limit,
        )
        return _json({"data": [delivery_doc(d) for d in rows]})

    async def show_event(request: web.Request) -> web.Response:
        authenticate_admin(request)
        store = request.app[key].store
        eid = request.match_info["id"]
        deliveries = await store.get_webhook_deliveries(eid)
        if not deliveries:
            raise ProblemError(404, "event_not_found", "No deliveries for this event", f"no event {eid!r}")
        attempts = await store.webhook_attempts(eid)
        docs = []
        for d in deliveries:
            doc = delivery_doc(d)
            doc["attempt_history"] = [_attempt_doc(a) for a in attempts if a.endpoint_id == d.endpoint_id]
            docs.append(doc)
        return _json({"event_id": eid, "deliveries": docs})

    async def redrive_one(request: web.Request) -> web.Response:
        authenticate_admin(request)
        dispatcher = request.app[key]
        eid = request.match_info["id"]
        body = await _body(request)
        if not await dispatcher.store.get_webhook_deliveries(eid):
            raise ProblemError(404, "event_not_found", "No deliveries for this event", f"no event {eid!r}")
        n = await dispatcher.store.redrive_deliveries(dispatcher.clock(), event_id=eid,
                                                      endpoint_id=body.get("endpoint_id"))
        if n == 0:
            raise ProblemError(409, "not_dead", "The event has no dead-lettered delivery to re-drive")
        dispatcher._metrics.redrives.inc(n)
        dispatcher.wake()
        log.warning("webhook re-driven", extra={"event_id": eid, "deliveries": n})
        return _json({"redriven": n})

    async def redrive_bulk(request: web.Request) -> web.Response:
        authenticate_admin(request)
        dispatcher = request.app[key]
        body = await _body(request)
        endpoint = body.get("endpoint_id")
        since = _time_param(body.get("since"), "since")
        until = _time_param(body.get("until"), "until")
        if endpoint is None and since is None and until is None:
            raise ProblemError(400, "filter_required", "Give endpoint_id and/or since/until",
                               "a bulk re-drive needs a filter, so that it is never everything by accident")
        n = await dispatcher.store.redrive_deliveries(dispatcher.clock(), endpoint_id=endpoint, since=since, until=until)
        dispatcher._metrics.redrives.inc(n)
        dispatcher.wake()
        log.warning("webhooks re-driven in bulk", extra={"endpoint": endpoint, "deliveries": n})
        return _json({"redriven": n})

    async def list_endpoints(request: web.Request) -> web.Response:
        authenticate_admin(request)
        rows = await request.app[key].store.list_webhook_endpoints()
        return _json({"data": [msgspec.to_builtins(r) for r in rows]})

    def set_state(state: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            authenticate_admin(request)
            dispatcher = request.app[key]
            ep = await dispatcher.store.set_webhook_endpoint_state(
                request.match_info["id"], state, dispatcher.clock(), "operator" if state == "disabled" else None
            )
            if ep is None:
                raise ProblemError(404, "endpoint_not_found", "No such webhook endpoint")
            dispatcher.wake()
            log.warning("webhook endpoint state set by an operator", extra={"endpoint": ep.id, "state": state})
            return _json(msgspec.to_builtins(ep))

        return handler

    router.add_get("/admin/v1/webhooks/events", list_events)
    router.add_post("/admin/v1/webhooks/events/redrive", redrive_bulk)
    router.add_get("/admin/v1/webhooks/events/{id}", show_event)
    router.add_post("/admin/v1/webhooks/events/{id}/redrive", redrive_one)
    router.add_get("/admin/v1/webhooks/endpoints", list_endpoints)
    router.add_post("/admin/v1/webhooks/endpoints/{id}/enable", set_state("active"))
    router.add_post("/admin/v1/webhooks/endpoints/{id}/disable", set_state("disabled"))


__all__ = [
    "DEFAULT_SCHEDULE_S", "WEBHOOKS", "Endpoint", "EndpointRefused", "MerchantWebhookSettings", "SendResult",
    "SsrfGuard", "WebhookDispatcher", "WebhookMetrics", "WebhooksSettings", "check_webhooks_settings",
    "decide_endpoint", "delivery_update", "dispatcher_ctx", "endpoint_id", "endpoints_from_merchants",
    "new_secret", "next_delay", "parse_retry_after", "register_webhook_routes", "sign", "signed_headers",
]
