"""The sandbox channel: a tiny Stripe-like PSP over real HTTP, scripted and deterministic under a seed.

Contract (wire protocol in docs/sandbox-protocol.md):
- Every POST under /v1 needs an `Idempotency-Key`; same key + same body replays the stored response
  (`Idempotent-Replayed: true`), same key + other body is 409. Records are per channel.
- The outcome and latency of a charge depend only on `sha256(f"{seed}:{key}")` and the test cards.
- Failure modes (`Script.failure`, or an active `Outage` which wins) apply to POST /v1/charges only:
  error_before (503, nothing recorded), error_after (charged, then 500), hang (charged, held `hang_s`),
  refuse (no TCP listener: `RunningChannel` closes its socket and re-opens it on the same port).
- The ledger keeps only BIN + last 4 of a card; the PAN and CVC never leave the request handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec
import orjson
from aiohttp import web

log = logging.getLogger(__name__)

FAILURES = frozenset({"none", "refuse", "error_before", "error_after", "hang"})

# Test cards override the script's random outcome, like a real PSP's test mode.
TEST_CARDS: dict[str, str] = {
    "4000000000000002": "do_not_honor",
    "4000000000009995": "insufficient_funds",
    "4000000000000069": "expired_card",
    "4000000000000127": "incorrect_cvc",
    "4000000000000119": "processing_error",
    "4000000000005126": "issuer_unavailable",
}
DEFAULT_DECLINE_CODES: dict[str, float] = {"do_not_honor": 1.0}

Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")


# --------------------------------------------------------------------------- script


def _check_failure(failure: str) -> None:
    if failure not in FAILURES:
        raise ValueError(f"failure must be one of {sorted(FAILURES)}, not {failure!r}")


class Outage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A window (seconds since the channel was created or last re-scripted) with another failure mode."""

    start_s: float
    end_s: float
    failure: str

    def __post_init__(self) -> None:
        _check_failure(self.failure)
        if not 0 <= self.start_s < self.end_s:
            raise ValueError("outage needs 0 <= start_s < end_s")


class Script(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a channel behaves. Everything random is derived from `seed` and the idempotency key."""

    seed: int = 0
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    approval_rate: float = 1.0
    decline_codes: dict[str, float] = {}
    failure: str = "none"
    hang_s: float = 30.0
    outages: list[Outage] = []
    currencies: list[str] | None = None
    # random faults per charge (deterministic per idempotency key): {"error_after": 0.01, "hang": 0.005, ...}
    fault_rates: dict[str, float] = {}

    def __post_init__(self) -> None:
        _check_failure(self.failure)
        for mode, rate in self.fault_rates.items():
            if mode not in ("error_before", "error_after", "hang") or not 0.0 <= rate <= 1.0:
                raise ValueError("fault_rates maps error_before / error_after / hang to a rate in [0, 1]")
        if sum(self.fault_rates.values()) > 1.0:
            raise ValueError("fault_rates must add up to at most 1")
        if not 0.0 <= self.approval_rate <= 1.0:
            raise ValueError("approval_rate must be within [0, 1]")
        if min(self.latency_ms, self.latency_jitter_ms, self.hang_s) < 0:
            raise ValueError("latency_ms, latency_jitter_ms and hang_s must be >= 0")
        if any(w < 0 for w in self.decline_codes.values()) or (
            self.decline_codes and sum(self.decline_codes.values()) <= 0
        ):
            raise ValueError("decline_codes weights must be >= 0 with a positive sum")


class ChannelSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One sandbox channel as the CLI config declares it."""

    name: str
    port: int = 0
    api_key: str | None = None
    script: Script = msgspec.field(default_factory=Script)


# --------------------------------------------------------------------------- wire bodies


class _Card(msgspec.Struct, kw_only=True):
    number: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{12,19}$")]
    exp_month: Annotated[int, msgspec.Meta(ge=1, le=12)]
    exp_year: Annotated[int, msgspec.Meta(ge=2000, le=9999)]
    cvc: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{3,4}$")] | None = None


class _ChargeBody(msgspec.Struct, kw_only=True):
    amount: Annotated[int, msgspec.Meta(gt=0)]
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z]{3}$")]
    reference: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    card: _Card
    capture: bool = True
    country: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z]{2}$")] | None = None
    description: str | None = None


class _AmountBody(msgspec.Struct, kw_only=True):
    amount: Annotated[int, msgspec.Meta(gt=0)] | None = None


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


_AT = re.compile(r" - at `\$\.?(.*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def _decode(body: bytes, kind: type[T]) -> T:
    """Decode and validate; msgspec's messages name the path and never echo the value (no PAN leaks)."""
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        path = m.group(1) if (m := _AT.search(msg)) else ""
        if missing := _MISSING.search(msg):
            path = f"{path}.{missing.group(1)}" if path else missing.group(1)
        raise _BadRequest(_AT.sub("", msg), path or None) from None
    except msgspec.DecodeError:
        raise _BadRequest("body is not valid JSON", None) from None


# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class _Charge:
    id: str
    status: str
    amount: int
    currency: str
    reference: str
    bin: str
    last4: str
    decline_code: str | None
    created: int
    captured_amount: int = 0
    refunded_amount: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "charge",
            "status": self.status,
            "amount": self.amount,
            "currency": self.currency,
            "captured_amount": self.captured_amount,
            "refunded_amount": self.refunded_amount,
            "reference": self.reference,
            "card": {"bin": self.bin, "last4": self.last4},
            "decline_code": self.decline_code,
            "created": self.created,
        }


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Record:
    fingerprint: str
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class _Claim:
    key: str
    fingerprint: str


def _error(http_status: int, code: str, message: str, /, **extra: Any) -> _Answer:
    return _Answer(http_status, {"error": {"code": code, "message": message, **extra}})


def _json(status: int, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> web.Response:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return web.Response(status=status, body=raw, content_type="application/json", headers=headers)


def _unit(digest: bytes, offset: int) -> float:
    """A uniform float in [0, 1) from 8 bytes of a digest."""
    return int.from_bytes(digest[offset : offset + 8], "big") / 2.0**64


def _fingerprint(method: str, path: str, body: bytes) -> str:
    # Hash of the canonical JSON: equal bodies match whatever their key order, and no PAN is stored.
    try:
        canonical = orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        canonical = body
    return hashlib.sha256(f"{method} {path}\n".encode() + canonical).hexdigest()


# --------------------------------------------------------------------------- channel


class SandboxChannel:
    """One fake PSP: its script, ledger and idempotency records. Serve it with `start_channel`."""

    def __init__(
        self,
        name: str,
        script: Script | None = None,
        *,
        api_key: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.name = name
        self.api_key = api_key
        self._clock = clock
        self._sleep = sleep
        self._script = script or Script()
        self._epoch = clock()
        self._charges: dict[str, _Charge] = {}
        self._refunds: list[dict[str, Any]] = []
        self._records: dict[str, _Record] = {}
        self._release = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []
        self._busy: set[object] = set()  # connections with a request in a handler right now

    @property
    def script(self) -> Script:
        return self._script

    def set_script(self, script: Script) -> None:
        """Replace the behaviour now; outage windows count from this moment."""
        self._script = script
        self._epoch = self._clock()
        for listener in list(self._listeners):
            listener()

    def reset(self) -> None:
        """Forget every charge, refund and idempotency record."""
        self._charges.clear()
        self._refunds.clear()
        self._records.clear()

    @property
    def charges(self) -> list[dict[str, Any]]:
        """The ledger, oldest first (copies)."""
        return [c.as_dict() for c in self._charges.values()]

    def current_failure(self) -> str:
        """The failure mode in force now: the first active outage window, else the script's."""
        elapsed = self._clock() - self._epoch
        for outage in self._script.outages:
            if outage.start_s <= elapsed < outage.end_s:
                return outage.failure
        return self._script.failure

    def release_holds(self) -> None:
        """Wake every request held by `hang` or latency (used when the server stops)."""
        self._release.set()
        self._release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/v1/charges", self._create_charge)
        app.router.add_get("/v1/charges", self._list_charges)
        app.router.add_get("/v1/charges/{id}", self._get_charge)
        app.router.add_post("/v1/charges/{id}/capture", self._capture)
        app.router.add_post("/v1/charges/{id}/void", self._void)
        app.router.add_post("/v1/charges/{id}/refunds", self._refund)
        app.router.add_get("/_sandbox/ledger", self._ledger)
        app.router.add_post("/_sandbox/reset", self._reset)
        app.router.add_get("/_sandbox/script", self._get_script)
        app.router.add_put("/_sandbox/script", self._put_script)
        return app

    # ----------------------------------------------------------------- plumbing

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.current_failure() == "refuse":
            # The listener is (about to be) closed; a request on a kept-alive connection gets no answer.
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        if self.api_key is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return _json(401, _error(401, "unauthorized", "missing or invalid API key").body)
        self._busy.add(request.protocol)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            code = exc.reason.lower().replace(" ", "_")
            return _json(exc.status, _error(exc.status, code, exc.reason).body)
        finally:
            self._busy.discard(request.protocol)

    def _claim(self, request: web.Request, body: bytes) -> _Claim | web.Response:
        """The idempotency gate: a claim to proceed with, or the response to send right away."""
        key = request.headers.get("Idempotency-Key", "").strip()
        if not key:
            return _json(400, _error(400, "missing_idempotency_key", "Idempotency-Key header required").body)
        if len(key) > 255:
            return _json(400, _error(400, "invalid_request", "Idempotency-Key too long", param=None).body)
        fingerprint = _fingerprint(request.method, request.path, body)
        record = self._records.get(key)
        if record is None:
            return _Claim(key, fingerprint)
        if record.fingerprint != fingerprint:
            return _json(
                409,
                _error(409, "idempotency_key_reused", "key already used with other parameters").body,
            )
        return _json(record.status, record.body, {"Idempotent-Replayed": "true"})

    def _store(self, claim: _Claim, answer: _Answer) -> bytes:
        raw = orjson.dumps(answer.body)
        self._records[claim.key] = _Record(claim.fingerprint, answer.status, raw)
        return raw

    async def _hold(self, seconds: float) -> None:
        if seconds <= 0:
            return
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        waker = asyncio.ensure_future(self._release.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    def _latency_s(self, script: Script, salt: str) -> float:
        digest = hashlib.sha256(f"{script.seed}:{salt}".encode()).digest()
        jitter = (2.0 * _unit(digest, 16) - 1.0) * script.latency_jitter_ms
        return max(0.0, script.latency_ms + jitter) / 1000.0

    async def _answer(self, script: Script, salt: str, response: web.Response) -> web.Response:
        await self._hold(self._latency_s(script, salt))
        return response

    def _find(self, request: web.Request) -> _Charge | None:
        return self._charges.get(request.match_info["id"])

    # ----------------------------------------------------------------- charges

    @staticmethod
    def sampled_fault(script: Script, key: str) -> str:
        """The random fault drawn for this idempotency key ("none" mostly). Pure, like `decide`."""
        u = _unit(hashlib.sha256(f"{script.seed}:{key}:fault".encode()).digest(), 0)
        for mode, rate in sorted(script.fault_rates.items()):
            if u < rate:
                return mode
            u -= rate
        return "none"

    @staticmethod
    def decide(script: Script, key: str, number: str) -> str | None:
        """The decline code for this charge, or None when approved. Pure: same inputs, same answer."""
        if number in TEST_CARDS:
            return TEST_CARDS[number]
        digest = hashlib.sha256(f"{script.seed}:{key}".encode()).digest()
        if _unit(digest, 0) < script.approval_rate:
            return None
        codes = sorted((c, w) for c, w in (script.decline_codes or DEFAULT_DECLINE_CODES).items() if w > 0)
        target = _unit(digest, 8) * sum(w for _, w in codes)
        for code, weight in codes:
            target -= weight
            if target < 0:
                return code
        return codes[-1][0]

    async def _create_charge(self, request: web.Request) -> web.Response:
        script = self._script
        body = await request.read()
        claim = self._claim(request, body)
        if isinstance(claim, web.Response):
            return await self._answer(script, request.headers.get("Idempotency-Key", ""), claim)
        failure = self.current_failure()
        if failure == "none" and script.fault_rates:
            failure = self.sampled_fault(script, claim.key)
        if failure == "error_before":
            unavailable = _error(
                503, "unavailable", "channel unavailable; nothing was processed", accepted=False
            )
            return await self._answer(script, claim.key, _json(503, unavailable.body))
        try:
            req = _decode(body, _ChargeBody)
        except _BadRequest as exc:
            bad = _error(400, "invalid_request", exc.message, param=exc.param)
            return await self._answer(script, claim.key, _json(400, bad.body))
        currency = req.currency.upper()
        if script.currencies is not None and currency not in {c.upper() for c in script.currencies}:
            unsupported = _error(
                400, "currency_not_supported", f"{currency} is not supported", param="currency"
            )
            return await self._answer(script, claim.key, _json(400, unsupported.body))

        # No await from the idempotency check to here: concurrent duplicates cannot both charge.
        decline = self.decide(script, claim.key, req.card.number)
        status = "declined" if decline else ("captured" if req.capture else "authorized")
        charge = _Charge(
            id=f"ch_{secrets.token_hex(12)}",
            status=status,
            amount=req.amount,
            currency=currency,
            reference=req.reference,
            bin=req.card.number[:6],
            last4=req.card.number[-4:],
            decline_code=decline,
            created=int(time.time()),
            captured_amount=req.amount if status == "captured" else 0,
        )
        del req  # the PAN and CVC go no further than this handler
        self._charges[charge.id] = charge
        raw = self._store(claim, _Answer(200, charge.as_dict()))

        if failure == "error_after":
            internal = _error(
                500, "internal_error", "the charge was processed; query its status", accepted=True
            )
            return await self._answer(script, claim.key, _json(500, internal.body))
        if failure == "hang":
            await self._hold(script.hang_s)
            return _json(200, raw)
        return await self._answer(script, claim.key, _json(200, raw))

    async def _get_charge(self, request: web.Request) -> web.Response:
        charge = self._find(request)
        if charge is None:
            return await self._answer(self._script, request.path, _json(404, _not_found().body))
        return await self._answer(self._script, request.path, _json(200, charge.as_dict()))

    async def _list_charges(self, request: web.Request) -> web.Response:
        reference = request.query.get("reference")
        data = [c.as_dict() for c in self._charges.values() if reference is None or c.reference == reference]
        return await self._answer(self._script, request.path_qs, _json(200, {"data": data}))

    # ----------------------------------------------------------------- operations

    async def _operation(
        self, request: web.Request, apply: Callable[[_Charge, int | None], _Answer]
    ) -> web.Response:
        script = self._script
        body = await request.read()
        claim = self._claim(request, body)
        if isinstance(claim, web.Response):
            return await self._answer(script, request.headers.get("Idempotency-Key", ""), claim)
        try:
            amount = _decode(body, _AmountBody).amount
        except _BadRequest as exc:
            bad = _error(400, "invalid_request", exc.message, param=exc.param)
            return await self._answer(script, claim.key, _json(400, bad.body))
        charge = self._find(request)
        answer = _not_found() if charge is None else apply(charge, amount)
        raw = self._store(claim, answer)
        return await self._answer(script, claim.key, _json(answer.status, raw))

    async def _capture(self, request: web.Request) -> web.Response:
        def apply(charge: _Charge, amount: int | None) -> _Answer:
            if charge.status != "authorized":
                return _invalid_state(charge, "capture")
            if amount is not None and amount > charge.amount:
                return _error(
                    400, "amount_too_large", "capture exceeds the authorized amount", param="amount"
                )
            charge.status = "captured"
            charge.captured_amount = charge.amount if amount is None else amount
            return _Answer(200, charge.as_dict())

        return await self._operation(request, apply)

    async def _void(self, request: web.Request) -> web.Response:
        def apply(charge: _Charge, amount: int | None) -> _Answer:
            if charge.status != "authorized":
                return _invalid_state(charge, "void")
            charge.status = "voided"
            return _Answer(200, charge.as_dict())

        return await self._operation(request, apply)

    async def _refund(self, request: web.Request) -> web.Response:
        def apply(charge: _Charge, amount: int | None) -> _Answer:
            if charge.status != "captured":
                return _invalid_state(charge, "refund")
            remaining = charge.captured_amount - charge.refunded_amount
            amount = remaining if amount is None else amount
            if amount > remaining:
                return _error(
                    400, "amount_too_large", "refunds would exceed the captured amount", param="amount"
                )
            charge.refunded_amount += amount
            if charge.refunded_amount == charge.captured_amount:
                charge.status = "refunded"
            refund = {
                "id": f"re_{secrets.token_hex(12)}",
                "object": "refund",
                "charge": charge.id,
                "amount": amount,
                "status": "succeeded",
                "created": int(time.time()),
            }
            self._refunds.append(refund)
            return _Answer(200, refund)

        return await self._operation(request, apply)

    # ----------------------------------------------------------------- test support

    async def _ledger(self, request: web.Request) -> web.Response:
        charges = list(self._charges.values())
        totals = {
            "count": len(charges),
            "approved": sum(1 for c in charges if c.status != "declined"),
            "captured_amount": sum(c.captured_amount for c in charges),
            "refunded_amount": sum(c.refunded_amount for c in charges),
        }
        doc = {"channel": self.name, "charges": [c.as_dict() for c in charges], "refunds": self._refunds}
        return _json(200, {**doc, "totals": totals})

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json(200, {"channel": self.name, "reset": True})

    async def _get_script(self, request: web.Request) -> web.Response:
        return _json(200, msgspec.to_builtins(self._script))

    async def _put_script(self, request: web.Request) -> web.Response:
        try:
            script = msgspec.json.decode(await request.read(), type=Script)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _json(400, _error(400, "invalid_request", str(exc), param="script").body)
        self.set_script(script)
        return _json(200, msgspec.to_builtins(script))


def _not_found() -> _Answer:
    return _error(404, "not_found", "no such charge")


def _invalid_state(charge: _Charge, action: str) -> _Answer:
    return _error(
        409, "invalid_state", f"cannot {action} a charge that is {charge.status}", status=charge.status
    )


# --------------------------------------------------------------------------- serving


class RunningChannel:
    """A channel listening on loopback. While its failure mode is `refuse` the listening socket is
    closed (a real ECONNREFUSED) and idle keep-alive connections are dropped; it re-opens on the same
    port. Script changes apply at once; outage windows within `poll_s` (or at once via `sync()`)."""

    def __init__(self, channel: SandboxChannel, runner: web.AppRunner, host: str, port: int, poll_s: float):
        self.channel = channel
        self.host = host
        self.port = port
        self._runner = runner
        self._site: web.TCPSite | None = None
        self._poll_s = poll_s
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._site is not None

    async def set_script(self, script: Script) -> None:
        """Replace the script and bring the socket in line before returning."""
        self.channel.set_script(script)
        await self.sync()

    async def sync(self) -> None:
        """Open or close the listening socket to match the failure mode in force now."""
        async with self._lock:
            refuse = self.channel.current_failure() == "refuse"
            if not refuse and self._site is None:
                site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
                await site.start()
                self._site = site
            elif refuse and self._site is not None:
                await self._site.stop()
                self._site = None
                await self._drop_idle_connections()

    async def _drop_idle_connections(self) -> None:
        # Idle keep-alive connections close now, busy ones right after their answer, so pooled
        # clients reconnect and meet the closed port. Wait (bounded) until the idle ones are gone so
        # an in-process client has seen the close before `set_script` returns.
        server = self._runner.server
        if server is None:
            return
        idle = [c for c in server.connections if c not in self.channel._busy]
        for conn in server.connections:
            if conn in self.channel._busy:
                conn.close()
            else:
                conn.force_close()
        for _ in range(100):
            await asyncio.sleep(0.001)
            if not any(c in server.connections for c in idle):
                break
        await asyncio.sleep(0.001)

    def _on_script_change(self) -> None:
        task = asyncio.get_running_loop().create_task(self.sync())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self.sync()
            except OSError as exc:  # e.g. the port was taken meanwhile: keep trying
                log.warning("sandbox %s: cannot re-open port %s: %s", self.channel.name, self.port, exc)

    async def _start(self) -> None:
        self.channel._listeners.append(self._on_script_change)
        # Bind even when starting in refuse mode, so port 0 resolves to a port we can re-open later.
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self._site = site
        self.port = int(self._runner.addresses[-1][1])
        await self.sync()
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.channel._listeners.remove(self._on_script_change)
        for task in [self._poller, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.channel.release_holds()
        self._site = None
        await self._runner.cleanup()


async def start_channel(
    channel: SandboxChannel, host: str = "127.0.0.1", port: int = 0, *, poll_s: float = 0.05
) -> RunningChannel:
    """Serve `channel` on host:port (0 = a free port) and return the running handle."""
    runner = web.AppRunner(channel.app(), shutdown_timeout=5.0)
    await runner.setup()
    running = RunningChannel(channel, runner, host, port, poll_s)
    try:
        await running._start()
    except BaseException:
        await running.stop()
        raise
    return running


async def run_sandbox(specs: list[ChannelSpec], host: str = "127.0.0.1") -> list[RunningChannel]:
    """Start one channel per spec (all or none)."""
    started: list[RunningChannel] = []
    try:
        for spec in specs:
            channel = SandboxChannel(spec.name, spec.script, api_key=spec.api_key)
            started.append(await start_channel(channel, host, spec.port))
    except BaseException:
        for running in reversed(started):
            await running.stop()
        raise
    return started
