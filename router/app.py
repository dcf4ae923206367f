"""The HTTP app: routes, authentication, problem+json errors, idempotency, metrics and wiring.

Everything opened at start-up (store, channel sessions, in-process sandbox channels) is opened in a
`cleanup_ctx`, so it is closed in reverse order and only if it was opened. Handlers are never
cancelled when a client goes away (aiohttp's default): a payment that started finishes and is
recorded. Every error a client sees is `application/problem+json` with a machine-readable `code`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import msgspec
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis

from policies.success_rate import SuccessStats
from router import __version__
from router import openapi as openapi_doc
from router.config import Config, restart_only_changes
from router.duplicates import FingerprintWindow, MemoryFingerprintWindow
from router.errors import (
    CallbackRejected,
    ConfigError,
    CoordinationUnavailable,
    FieldError,
    ProblemError,
    StoreUnavailable,
    invalid_request,
)
from router.faults import crash_point
from router.governance.service import GovernanceService
from router.idempotency import IdempotencyStore, MemoryIdempotencyStore, StoredResponse
from router.idempotency_sqlite import SqliteIdempotencyStore
from router.janitor import Janitor
from router.locks import MemoryOrderLocks, OrderLocks, coordination_errors
from router.logs import request_id
from router.metrics import Metrics
from router.model import Payment
from router.pipeline import Pipeline, new_id, payment_body
from router.runtime import Runtime, RuntimeHolder
from router.runtime import load as load_runtime_config
from router.store.base import DurableStore, PaymentStore
from router.validation import Limits, validate_payment
from router.webhooks import (
    WEBHOOKS,
    WebhookDispatcher,
    dispatcher_ctx,
    endpoints_from_merchants,
    register_webhook_routes,
)

log = logging.getLogger("payroute.app")

PROBLEM = "application/problem+json"
RUNTIME = web.AppKey("runtime", RuntimeHolder)
STORE = web.AppKey("store", PaymentStore)
PIPELINE = web.AppKey("pipeline", Pipeline)
METRICS = web.AppKey("metrics", Metrics)
IDEMPOTENCY = web.AppKey("idempotency", IdempotencyStore)
STATE = web.AppKey("state", dict)


_IDEMPOTENCY_KEY_MAX = 255


def problem_response(p: ProblemError, instance: str | None = None) -> web.Response:
    return web.Response(status=p.status, body=orjson.dumps(p.body(instance)), content_type=PROBLEM)


def json_response(doc: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


def payment_response(p: Payment, status: int = 200) -> web.Response:
    # the bytes the payment's outbox event already embeds: encoded once per payment
    return web.Response(status=status, body=payment_body(p), content_type="application/json")


# ------------------------------------------------------------------ middleware


@web.middleware
async def edge(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    rid = request.headers.get("X-Request-Id", "")
    if not (0 < len(rid) <= 64 and rid.isprintable()):
        rid = new_id("req")
    token = request_id.set(rid)
    metrics = request.app[METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    t0 = time.perf_counter()
    try:
        try:
            resp = await handler(request)
        except ProblemError as p:
            resp = problem_response(p, request.path)
        except web.HTTPException as e:
            resp = problem_response(_http_problem(e), request.path)
            if "Allow" in e.headers:  # a 405 names the methods the resource has (RFC 9110 15.5.6)
                resp.headers["Allow"] = e.headers["Allow"]
        except (StoreUnavailable, CoordinationUnavailable) as e:
            # fail closed. A retry with the same Idempotency-Key and merchant_order_id is always safe: the
            # unique order id and the deterministic channel keys stop a second charge.
            log.error("dependency unavailable", extra={"error": type(e).__name__, "route": route})
            resp = problem_response(ProblemError(
                503, "service_unavailable", "A payroute dependency is unavailable; retry later",
                f"{type(e).__name__}: retrying with the same Idempotency-Key and merchant_order_id is safe",
                extra={"retryable": True}), request.path)
        except Exception:
            log.exception("unhandled error", extra={"route": route})
            resp = problem_response(ProblemError(500, "internal_error", "payroute failed to process the request"), request.path)
        resp.headers["X-Request-Id"] = rid
        metrics.child(metrics.http_requests, request.method, route, str(resp.status)).inc()
        metrics.child(metrics.http_latency, route).observe(time.perf_counter() - t0)
        return resp
    finally:
        request_id.reset(token)


def _http_problem(e: web.HTTPException) -> ProblemError:
    if e.status == 404:
        return ProblemError(404, "not_found", "No such route", "see /openapi.json for the API")
    if e.status == 405:
        allowed = e.headers.get("Allow", "")
        return ProblemError(405, "method_not_allowed", "Method not allowed", f"allowed: {allowed}" if allowed else None)
    if e.status == 413:
        return ProblemError(413, "body_too_large", "The request body is too large")
    return ProblemError(e.status, "http_error", e.reason)


# ------------------------------------------------------------------ request helpers


def authenticate(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise ProblemError(401, "unauthenticated", "An API key is required", "send Authorization: Bearer <API key>")
    merchant = request.app[RUNTIME].current.api_keys.get(hashlib.sha256(key.strip().encode()).hexdigest())
    if merchant is None:
        raise ProblemError(401, "invalid_api_key", "The API key is not valid")
    return merchant


async def read_json(request: web.Request, *, optional: bool = False) -> Any:
    raw = await request.read()
    if not raw.strip():
        if optional:
            return {}
        raise ProblemError(400, "empty_body", "The request body is empty", "send a JSON object")
    ctype = request.content_type
    if ctype != "application/json":
        raise ProblemError(415, "unsupported_media_type", "Content-Type must be application/json", f"got {ctype or 'none'}")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ProblemError(400, "malformed_json", "The body is not valid JSON", f"at position {e.pos}") from None


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 0 < len(key) <= _IDEMPOTENCY_KEY_MAX or not key.isprintable() or not key.isascii():
        raise invalid_request([FieldError("Idempotency-Key", "invalid_idempotency_key", "1-255 printable ASCII characters")])
    return key


async def idempotent(
    request: web.Request, merchant: str, params: Any, run: Callable[[], Awaitable[web.Response]]
) -> web.Response:
    """Run `run` once per (merchant, Idempotency-Key); replay its response to every later request."""
    key = idempotency_key(request)
    if key is None:
        return await run()
    rt = request.app[RUNTIME].current
    store = request.app[IDEMPOTENCY]
    # keyed: the parameters include card data, so a plain hash would be brute-forceable
    material = request.method.encode() + b" " + request.path.encode() + b"\n" + orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
    # hmac.new, not hmac.digest: hmac.digest releases the GIL, and taking it back from the SQLite threads
    # costs the loop up to a switch interval (5 ms) per call under load
    fingerprint = hmac.new(rt.fingerprint_key, material, hashlib.sha256).hexdigest()
    claim = await store.claim(merchant, key, fingerprint)
    crash_point("after_claim")
    if claim.replay is not None:
        request.app[METRICS].idempotent_replays.inc()
        r = claim.replay
        return web.Response(status=r.status, body=r.body, content_type=r.content_type, headers={"Idempotent-Replayed": "true"})
    try:
        try:
            resp = await run()
        except ProblemError as p:
            resp = problem_response(p, request.path)
        except (asyncio.CancelledError, StoreUnavailable, CoordinationUnavailable):
            raise
        except Exception:
            log.exception("unhandled error", extra={"route": request.path})
            resp = problem_response(ProblemError(500, "internal_error", "payroute failed to process the request"), request.path)
    except BaseException:
        await store.release(merchant, key)
        raise
    assert isinstance(resp.body, bytes)
    # a compact copy: orjson's output keeps its whole growth buffer (8 KiB for a 1.4 KiB payment), and
    # the record lives as long as the key (24 h), so the copy cuts the store's memory about 5x
    await store.complete(merchant, key, StoredResponse(resp.status, bytes(memoryview(resp.body)), resp.content_type))
    return resp


def _amount_param(body: Any, *, required: bool) -> int | None:
    if not isinstance(body, dict):
        raise invalid_request([FieldError("", "invalid_body", "the body must be a JSON object")])
    errors: list[FieldError] = []
    for k in body:
        if k not in ("amount", "reason"):
            errors.append(FieldError(str(k), "unknown_field", "not a known field"))
    amount = body.get("amount")
    if amount is None and required:
        errors.append(FieldError("amount", "required", "amount is required"))
    elif amount is not None and (type(amount) is not int or amount <= 0):
        errors.append(FieldError("amount", "invalid_amount", "a positive integer in minor units"))
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 200):
        errors.append(FieldError("reason", "invalid_reason", "a string of at most 200 characters"))
    if errors:
        raise invalid_request(errors)
    return amount


# ------------------------------------------------------------------ handlers


async def create_payment(request: web.Request) -> web.Response:
    merchant = authenticate(request)
    body = await read_json(request)
    rt = request.app[RUNTIME].current
    limits = Limits(max_amount=rt.config.server.max_amount)
    gov = _governance(request.app)
    state = gov.merchant_snapshot.get(merchant) if gov is not None else None
    if state is not None:
        if state.status == "suspended":
            raise ProblemError(403, "merchant_suspended", "This merchant is suspended", state.suspended_reason)
        if state.max_amount is not None:
            limits = Limits(max_amount=min(limits.max_amount, state.max_amount))
    req, card = validate_payment(
        body, merchant_id=merchant, fingerprint_key=rt.fingerprint_key, limits=limits, today=datetime.now(UTC).date()
    )
    if state is not None and state.currencies is not None and req.currency not in state.currencies:
        raise ProblemError(403, "currency_not_allowed", "This merchant may not take payments in this currency",
                           errors=[FieldError("currency", "not_allowed", f"allowed: {', '.join(state.currencies)}")])
    pipeline = request.app[PIPELINE]

    async def run() -> web.Response:
        # shielded: shutdown or a lost client must not cut a payment between channel call and record
        payment = await asyncio.shield(pipeline.create_payment(req, card, request.headers.get("Idempotency-Key")))
        return payment_response(payment, 201)

    return await idempotent(request, merchant, body, run)


async def get_payment(request: web.Request) -> web.Response:
    merchant = authenticate(request)
    payment = await request.app[PIPELINE].get(merchant, request.match_info["id"])
    return payment_response(payment)


def _operation_handler(kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        merchant = authenticate(request)
        pid = request.match_info["id"]
        body = await read_json(request, optional=kind != "refund")
        amount = _amount_param(body, required=False)
        pipeline = request.app[PIPELINE]

        gov = _governance(request.app)
        if kind == "refund" and gov is not None:
            p = await pipeline.get(merchant, pid)
            spent = sum(o.amount for o in p.operations if o.kind == "refund" and o.status in ("succeeded", "pending"))
            wanted = amount if amount is not None else p.captured_amount - spent
            if gov.refund_needs_approval(merchant, p.currency, wanted):
                raise await gov.refuse_ungoverned(f"merchant:{merchant}", "refund", f"refund:{merchant}:{pid}",
                                                  request.remote)

        async def run() -> web.Response:
            payment: Payment
            if kind == "capture":
                payment = await asyncio.shield(pipeline.capture(merchant, pid, amount))
            elif kind == "void":
                payment = await asyncio.shield(pipeline.void(merchant, pid))
            else:
                payment = await asyncio.shield(pipeline.refund(merchant, pid, amount, body.get("reason")))
            # 202: the channel has not told the outcome; the operation is recorded pending
            pending = bool(payment.operations) and payment.operations[-1].status == "pending"
            return payment_response(payment, 202 if pending else 200)

        return await idempotent(request, merchant, body, run)

    return handler


async def channel_callback(request: web.Request) -> web.Response:
    """Inbound channel notification: verify (the adapter), apply monotonically, acknowledge as the channel expects."""
    name = request.match_info["channel"]
    ch = request.app[RUNTIME].current.channels.get(name)
    if ch is None:
        raise ProblemError(404, "unknown_channel", "No such channel")
    body = await request.read()
    try:
        event, ack = ch.adapter.parse_callback(dict(request.headers), body)
    except CallbackRejected as e:
        request.app[METRICS].callbacks.labels(name, "rejected").inc()
        log.warning("channel callback rejected", extra={"channel": name, "reason": str(e)})
        raise ProblemError(401, "callback_rejected", "The notification did not verify") from None
    _payment, outcome = await asyncio.shield(request.app[PIPELINE].apply_callback(name, event, body))
    request.app[METRICS].callbacks.labels(name, outcome).inc()
    return web.Response(status=ack.status, body=ack.body, headers=ack.headers)


def authenticate_admin(request: web.Request) -> None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    tokens = request.app[RUNTIME].current.admin_tokens
    if scheme.lower() != "bearer" or hashlib.sha256(token.strip().encode()).hexdigest() not in tokens:
        raise ProblemError(401, "unauthenticated", "An admin token is required")


async def reload_config(app: web.Application) -> dict[str, object]:
    """Load the config file again and swap it in atomically; on any problem keep the running config."""
    path = app[STATE].get("config_path")
    if path is None:
        raise ProblemError(409, "no_config_file", "payroute was started without --config: nothing to reload")
    holder = app[RUNTIME]
    old = holder.current
    try:
        cfg = load_runtime_config(path)
    except ConfigError as e:
        log.warning("config reload rejected", extra={"problems": [f"{p}: {m}" for p, m in e.problems]})
        raise ProblemError(
            422, "config_rejected", "The new config was rejected; the running config is unchanged",
            extra={"problems": [{"path": p, "message": m} for p, m in e.problems], "config_version": old.version},
        ) from None
    overrides = app[STATE].get("server_overrides") or {}
    if overrides:  # --host/--port given at start stay in force
        cfg = msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, **overrides))
    restart = restart_only_changes(old.config, cfg)
    if restart:
        raise ProblemError(
            422, "config_needs_restart", "These settings change only with a restart; the running config is unchanged",
            extra={"problems": [{"path": f"$.{p}", "message": "needs a restart"} for p in restart],
                   "config_version": old.version},
        )
    new = await holder.swap(cfg)
    log.warning("config reloaded", extra={"previous": old.version, "config_version": new.version})
    return {"config_version": new.version, "previous_version": old.version}


async def admin_reload(request: web.Request) -> web.Response:
    authenticate_admin(request)
    if request.app[RUNTIME].current.config.governance.enabled:
        # under maker-checker a config change is a governed change request, never a direct reload
        raise ProblemError(403, "approval_required", "Config changes need two-person approval",
                           "propose it: POST /admin/v1/governance/requests (kind config)")
    return json_response(await reload_config(request.app))


async def admin_config(request: web.Request) -> web.Response:
    authenticate_admin(request)
    rt = request.app[RUNTIME].current
    return json_response({"config_version": rt.version, "channels": list(rt.channels), "breakers": rt.breaker_states()})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    if request.app[STATE].get("stopping"):
        raise ProblemError(503, "shutting_down", "payroute is shutting down")
    degraded = {}
    for name, check in (("store", request.app[STORE].ping), ("coordination", request.app[COORDINATION].ping)):
        try:
            await check()
        except Exception as e:  # noqa: BLE001 - readiness reports any dependency failure as not ready
            degraded[name] = type(e).__name__
    if degraded:
        raise ProblemError(503, "degraded", "A dependency is not reachable; state changes are refused",
                           extra={"dependencies": degraded})
    rt = request.app[RUNTIME].current
    return json_response({"status": "ready", "config_version": rt.version, "breakers": rt.breaker_states()})


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    for name, state in request.app[RUNTIME].current.breaker_states().items():
        m.breaker_state.labels(name).set(state)
    resp = web.Response(body=generate_latest(m.registry))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_doc.document())


# ------------------------------------------------------------------ wiring


def build_store(cfg: Config) -> PaymentStore:
    if cfg.storage.mode == "scaleout":
        from router.store.postgres import PostgresStore

        assert cfg.storage.postgres_dsn is not None  # config.check guarantees it
        return PostgresStore(cfg.storage.postgres_dsn)
    from router.store.sqlite import SqliteStore

    return SqliteStore(Path(cfg.storage.sqlite_path), synchronous=cfg.storage.synchronous)


class Coordination:
    """Idempotency records, order locks and the fingerprint window: in process, or in Redis (scale-out).

    Embedded mode keeps finished idempotency records in a SQLite file beside the payments database
    (in-flight claims stay in process), so memory stays flat however many keys a day brings; with a
    store that is not SQLite (tests) they stay in process."""

    def __init__(self, cfg: Config, store: PaymentStore | None = None) -> None:
        self.redis: Redis | None = None
        if cfg.storage.mode == "scaleout":
            from router.duplicates import RedisFingerprintWindow
            from router.idempotency_redis import RedisIdempotencyStore, make_redis
            from router.locks import RedisOrderLocks

            assert cfg.storage.redis_url is not None
            self.redis = make_redis(cfg.storage.redis_url)
            self.idempotency: IdempotencyStore = RedisIdempotencyStore(self.redis, ttl_s=cfg.duplicates.idempotency_ttl_s)
            self.locks: OrderLocks = RedisOrderLocks(self.redis)
            self.window: FingerprintWindow = RedisFingerprintWindow(self.redis)
        else:
            from router.store.sqlite import SqliteStore

            if isinstance(store, SqliteStore):
                from router.idempotency_sqlite import sidecar_path

                self.idempotency = SqliteIdempotencyStore(sidecar_path(store.path), ttl_s=cfg.duplicates.idempotency_ttl_s)
            else:
                self.idempotency = MemoryIdempotencyStore(ttl_s=cfg.duplicates.idempotency_ttl_s)
            self.locks = MemoryOrderLocks()
            self.window = MemoryFingerprintWindow()

    async def ping(self) -> None:
        if self.redis is not None:
            with coordination_errors("ping"):
                await self.redis.ping()

    async def start(self) -> None:
        if isinstance(self.idempotency, SqliteIdempotencyStore):
            await self.idempotency.start()

    async def close(self) -> None:
        if isinstance(self.idempotency, SqliteIdempotencyStore):
            await self.idempotency.close()
        if self.redis is not None:
            await self.redis.aclose()


COORDINATION = web.AppKey("coordination", Coordination)


def _wire_governance(app: web.Application, cfg: Config, store: PaymentStore, m: Metrics) -> None:
    """Maker-checker: governed config changes, refunds above thresholds, grants, merchants, re-drives."""
    from router.governance.api import (
        GOVERNANCE,
        GovernanceHolder,
        default_store,
        governance_ctx,
        register_governance_routes,
    )
    from router.governance.appliers import Appliers, ConfigSnapshot, RefundTarget

    gov = GovernanceHolder(bootstrap_auth=authenticate_admin)
    app[GOVERNANCE] = gov
    if not cfg.governance.enabled:
        return

    async def current_config() -> ConfigSnapshot:
        path = app[STATE].get("config_path")
        text = await asyncio.to_thread(Path(path).read_text) if path else ""
        return ConfigSnapshot(text, app[RUNTIME].current.version)

    async def apply_config(text: str) -> str:
        new_cfg = await asyncio.to_thread(_check_config_text, text)
        overrides = app[STATE].get("server_overrides") or {}
        if overrides:
            new_cfg = msgspec.structs.replace(new_cfg, server=msgspec.structs.replace(new_cfg.server, **overrides))
        restart = restart_only_changes(app[RUNTIME].current.config, new_cfg)
        if restart:
            raise ProblemError(422, "config_needs_restart", "These settings change only with a restart",
                               extra={"problems": [{"path": f"$.{p}", "message": "needs a restart"} for p in restart]})
        path = app[STATE].get("config_path")
        old_text = await asyncio.to_thread(Path(path).read_text) if path else None
        if path:
            await asyncio.to_thread(_write_atomically, Path(path), text)
        try:
            new = await app[RUNTIME].swap(new_cfg)
        except BaseException:
            if path and old_text is not None:
                await asyncio.to_thread(_write_atomically, Path(path), old_text)
            raise
        return new.version

    async def refund_target(mid: str, pid: str) -> RefundTarget | None:
        p = await store.get_payment(pid)
        if p is None or p.merchant_id != mid:
            return None
        spent = sum(o.amount for o in p.operations if o.kind == "refund" and o.status in ("succeeded", "pending"))
        return RefundTarget(p.version, p.currency, p.captured_amount - spent)

    appliers = Appliers(apply_config=apply_config, current_config=current_config,
                        apply_refund=app[PIPELINE].refund, refund_target=refund_target)
    register_governance_routes(app.router)
    app.cleanup_ctx.append(governance_ctx(gov, cfg.governance, lambda: default_store(
        cfg.governance, mode=cfg.storage.mode, sqlite_path=cfg.storage.sqlite_path,
        postgres_dsn=cfg.storage.postgres_dsn), appliers, registry=m.registry))


def _check_config_text(text: str) -> Config:
    from router.config import load_config
    from router.errors import ConfigError
    from router.runtime import KNOWN_ADAPTERS, KNOWN_POLICIES, policy_checks

    cfg = load_config(text, known_adapters=KNOWN_ADAPTERS, known_policies=KNOWN_POLICIES)
    problems = policy_checks(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _write_atomically(path: Path, text: str) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _governance(app: web.Application) -> GovernanceService | None:
    """The governance service when maker-checker is on and running, else None."""
    if not app[RUNTIME].current.config.governance.enabled:
        return None  # before the import: this runs on every payment
    from router.governance.api import GOVERNANCE

    holder = app.get(GOVERNANCE)
    return holder.service if holder is not None else None


ACTIVITY_REFRESH_S = 300.0


async def refresh_activity(app: web.Application, cfg: Config) -> None:
    """Rolling 30-day volumes from the ledger, for volume-tiered fees (ledger postings and the cost ranker)."""
    from datetime import timedelta

    from router.money.store import MoneyStore

    money = (MoneyStore.postgres(cfg.storage.postgres_dsn) if cfg.storage.mode == "scaleout" and cfg.storage.postgres_dsn
             else MoneyStore.sqlite(cfg.storage.sqlite_path))
    activity = await money.monthly_activity(datetime.now(UTC) - timedelta(days=30))
    app[STATE]["activity"] = activity
    rt = app[RUNTIME].current
    rt.pricing.activity = dict(activity)
    # the cost ranker reads one volume per channel: the channel's captured volume summed over currencies
    # (minor units; tiers are meant for one main currency per channel)
    volumes: dict[str, int] = {}
    for (owner, _currency), act in activity.items():
        if owner.startswith("channel:"):
            volumes[owner.removeprefix("channel:")] = volumes.get(owner.removeprefix("channel:"), 0) + act.volume
    monthly = rt.env.state.get("monthly_volume")
    if isinstance(monthly, dict):
        monthly.clear()
        monthly.update(volumes)


async def _refresh_activity_forever(app: web.Application, cfg: Config) -> None:
    while True:
        try:
            await refresh_activity(app, cfg)
        except Exception:  # noqa: BLE001 - a failed refresh keeps the previous figures; logged, retried
            log.exception("pricing activity refresh failed")
        await asyncio.sleep(ACTIVITY_REFRESH_S)


async def _reload_logged(app: web.Application) -> None:
    try:
        await reload_config(app)
    except ProblemError:
        pass  # already logged; the running config stays


def create_app(
    cfg: Config,
    *,
    config_path: str | None = None,
    server_overrides: dict[str, Any] | None = None,
    store: PaymentStore | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> web.Application:
    app = web.Application(client_max_size=cfg.server.max_body_bytes, middlewares=[edge])
    m = Metrics()
    app[METRICS] = m
    app[STATE] = {}

    def on_breaker(channel: str, state: str) -> None:
        log.warning("breaker state changed", extra={"channel": channel, "state": state})

    app[RUNTIME] = RuntimeHolder(Runtime(cfg, on_breaker), on_breaker)
    the_store = store or build_store(cfg)
    app[STORE] = the_store
    coordination = Coordination(cfg, the_store)
    app[COORDINATION] = coordination
    app[IDEMPOTENCY] = coordination.idempotency
    app[PIPELINE] = Pipeline(lambda: app[RUNTIME].current, the_store, m, locks=coordination.locks,
                             window=coordination.window, sleep=sleep)

    async def sandbox_ctx(app: web.Application) -> AsyncIterator[None]:
        running = []
        if cfg.sandbox:
            from adapters.sandbox.server import ChannelSpec, run_sandbox

            specs = [msgspec.convert(msgspec.structs.asdict(s), ChannelSpec) for s in cfg.sandbox]
            running = await run_sandbox(specs, "127.0.0.1")
        yield
        for r in running:
            await r.stop()

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        await the_store.start()
        await coordination.start()
        yield
        await the_store.close()
        await coordination.close()

    async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
        await app[RUNTIME].current.start()
        yield
        await app[RUNTIME].close()

    async def stats_ctx(app: web.Application) -> AsyncIterator[None]:
        """Embedded mode: load the statistics saved by the previous run before the first payment, save
        them periodically and at shutdown (router/stats_store.py)."""
        from router.store.sqlite import SqliteStore

        stats = app[RUNTIME].current.env.state.get("success_stats")
        if not isinstance(the_store, SqliteStore) or not isinstance(stats, SuccessStats):
            yield
            return
        from router.stats_store import StatsFile, stats_path

        saved = StatsFile(stats_path(the_store.path), stats)
        restored = await asyncio.to_thread(saved.load)
        if restored:
            log.info("routing statistics restored", extra={"keys": restored, "path": str(saved.path)})
        task = asyncio.create_task(saved.save_forever(lambda: app[RUNTIME].current.config.routing.stats_save_s))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if app[RUNTIME].current.config.routing.stats_save_s > 0:
            try:
                await saved.save()
            except OSError as e:
                log.warning("routing statistics not saved at shutdown", extra={"error": str(e)})

    async def janitor_ctx(app: web.Application) -> AsyncIterator[None]:
        tasks = []
        if cfg.janitor.enabled:
            tasks.append(asyncio.create_task(Janitor(app[PIPELINE], m, cfg.janitor).run_forever()))
        tasks.append(asyncio.create_task(_refresh_activity_forever(app, cfg)))
        stats = app[RUNTIME].current.env.state.get("success_stats")
        if coordination.redis is not None and stats is not None:
            from router.stats_sync import StatsSync

            tasks.append(asyncio.create_task(StatsSync(coordination.redis, stats).run_forever()))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def on_shutdown(app: web.Application) -> None:
        app[STATE]["stopping"] = True

    async def on_startup(app: web.Application) -> None:
        if config_path is None:
            return
        import signal

        def on_sighup() -> None:
            if app[RUNTIME].current.config.governance.enabled:
                log.warning("SIGHUP ignored: config changes go through maker-checker approval")
                return
            task = asyncio.get_running_loop().create_task(_reload_logged(app))
            app[STATE].setdefault("tasks", set()).add(task)
            task.add_done_callback(app[STATE]["tasks"].discard)

        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests): the endpoint still works
            pass

    app[STATE]["config_path"] = config_path
    app[STATE]["server_overrides"] = server_overrides
    app.on_startup.append(on_startup)

    app[WEBHOOKS] = WebhookDispatcher(
        cast(DurableStore, the_store), lambda: endpoints_from_merchants(app[RUNTIME].current.config.merchants),
        cfg.webhooks, m.webhooks,
    )
    app.cleanup_ctx.extend([sandbox_ctx, store_ctx, runtime_ctx, stats_ctx, janitor_ctx, dispatcher_ctx()])
    _wire_governance(app, cfg, the_store, m)
    app.on_shutdown.append(on_shutdown)

    r = app.router
    r.add_post("/v1/payments", create_payment)
    r.add_get("/v1/payments/{id}", get_payment)
    r.add_post("/v1/payments/{id}/capture", _operation_handler("capture"))
    r.add_post("/v1/payments/{id}/void", _operation_handler("void"))
    r.add_post("/v1/payments/{id}/refunds", _operation_handler("refund"))
    r.add_post("/callbacks/{channel}", channel_callback)
    register_webhook_routes(r, authenticate_admin)
    r.add_post("/admin/v1/config/reload", admin_reload)
    r.add_get("/admin/v1/config", admin_config)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", openapi)
    return app
