"""HTTP handlers for `/admin/v1/governance/...`, their route registration and the start-up context.

Authentication is `Authorization: Bearer <admin API token>`; tokens are stored as SHA-256 only and
shown once (at creation or rotation). Every error is a `ProblemError`, which the app's `edge`
middleware turns into `application/problem+json`. The one exception to per-admin tokens is
`POST /bootstrap`, allowed once while no admin exists and authenticated by the injected check (the
config's legacy admin tokens).

Wiring (see `register_governance_routes` and `governance_ctx`): the app keeps a `GovernanceHolder`
under `GOVERNANCE`; the cleanup context opens the store, fills the holder, runs the sweeper that
terminates hanging requests and signs heads, and undoes all of it in reverse on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from router.errors import FieldError, ProblemError, invalid_request
from router.governance.appliers import Appliers
from router.governance.model import Admin, ChangeRequest, GovernanceConfig, Role
from router.governance.service import Actor, Clock, GovernanceMetrics, GovernanceService, utcnow
from router.governance.store import GovernanceStore, PostgresGovernanceStore, SqliteGovernanceStore

PREFIX = "/admin/v1/governance"


class GovernanceHolder:
    """Filled by `governance_ctx` at start-up (the app's state must not change once it runs)."""

    def __init__(self, bootstrap_auth: Callable[[web.Request], None] | None = None) -> None:
        self.service: GovernanceService | None = None
        self.bootstrap_auth = bootstrap_auth


GOVERNANCE = web.AppKey("governance", GovernanceHolder)


def _service(request: web.Request) -> GovernanceService:
    svc = request.app[GOVERNANCE].service
    if svc is None:
        raise ProblemError(503, "governance_unavailable", "Governance is not running")
    return svc


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


async def _body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if optional:
            return {}
        raise ProblemError(400, "empty_body", "The request body is empty", "send a JSON object")
    if request.content_type != "application/json":
        raise ProblemError(415, "unsupported_media_type", "Content-Type must be application/json")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ProblemError(
            400, "malformed_json", "The body is not valid JSON", f"at position {e.pos}"
        ) from None
    if not isinstance(doc, dict):
        raise invalid_request([FieldError("", "invalid_body", "the body must be a JSON object")])
    return doc


def _str_field(body: dict[str, Any], name: str, *, required: bool = False, max_len: int = 500) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise invalid_request([FieldError(name, "required", f"{name} is required")])
        return None
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise invalid_request([FieldError(name, "invalid", f"a string of 1-{max_len} characters")])
    return value


def _source(request: web.Request) -> str | None:
    return request.remote


async def _actor(request: web.Request) -> Actor:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ProblemError(
            401, "unauthenticated", "An admin token is required", "send Authorization: Bearer <admin token>"
        )
    return await _service(request).authenticate(token.strip(), _source(request))


def admin_json(a: Admin) -> dict[str, Any]:
    # never the TOTP secret nor the token hash
    return {
        "id": a.id,
        "name": a.name,
        "created_at": a.created_at.isoformat(),
        "created_by": a.created_by,
        "totp_enrolled": a.totp_confirmed,
        "disabled": a.disabled,
    }


def request_json(r: ChangeRequest, *, full: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.to_builtins(r)
    done = len(r.approvals)
    doc["approvals"] = done
    if r.status.value == "pending":
        doc["next_review"] = "initial" if done == 0 else "final" if done == r.quorum - 1 else "intermediate"
    if not full:
        doc.pop("diff")
        doc.pop("payload")
    return doc


# ------------------------------------------------------------------ handlers


async def bootstrap(request: web.Request) -> web.Response:
    holder = request.app[GOVERNANCE]
    if holder.bootstrap_auth is None:
        raise ProblemError(404, "not_found", "Bootstrap is not enabled")
    holder.bootstrap_auth(request)
    body = await _body(request)
    admins = body.get("admins")
    if not isinstance(admins, list) or not admins:
        raise invalid_request([FieldError("admins", "required", "a non-empty list of {name, roles}")])
    specs: list[tuple[str, list[Role]]] = []
    for i, a in enumerate(admins):
        try:
            name = a["name"]
            roles = [Role(r) for r in a.get("roles", [])]
        except (TypeError, KeyError, ValueError):
            raise invalid_request(
                [
                    FieldError(
                        f"admins[{i}]",
                        "invalid_admin",
                        "{name, roles: [operator|reviewer|auditor|security_admin]}",
                    )
                ]
            ) from None
        if not isinstance(name, str) or not name:
            raise invalid_request([FieldError(f"admins[{i}].name", "invalid", "a non-empty string")])
        specs.append((name, roles))
    created = await _service(request).bootstrap(specs, _source(request))
    return _json({"admins": [{**admin_json(a), "token": t} for a, t in created]}, 201)


async def list_admins(request: web.Request) -> web.Response:
    actor = await _actor(request)
    svc = _service(request)
    await svc.require_role(actor, set(Role), "admin.list", "admins")
    admins = await svc.store.list_admins()
    return _json(
        {
            "admins": [
                {**admin_json(a), "roles": sorted(r.value for r in await svc.active_roles(a.id))}
                for a in admins
            ]
        }
    )


async def create_admin(request: web.Request) -> web.Response:
    actor = await _actor(request)
    name = _str_field(await _body(request), "name", required=True, max_len=100)
    assert name is not None
    admin, token = await _service(request).create_admin(actor, name)
    return _json({**admin_json(admin), "token": token}, 201)


async def me(request: web.Request) -> web.Response:
    actor = await _actor(request)
    svc = _service(request)
    grants = [msgspec.to_builtins(g) for g in await svc.store.grants(actor.id)]
    return _json(
        {
            **admin_json(actor.admin),
            "roles": sorted(r.value for r in await svc.active_roles(actor.id)),
            "grants": grants,
        }
    )


async def rotate_token(request: web.Request) -> web.Response:
    actor = await _actor(request)
    return _json({"token": await _service(request).rotate_token(actor)})


async def enrol_totp(request: web.Request) -> web.Response:
    actor = await _actor(request)
    body = await _body(request, optional=True)
    secret, uri = await _service(request).enrol_totp(actor, _str_field(body, "totp", max_len=10))
    return _json({"secret": secret, "otpauth_uri": uri, "confirmed": False}, 201)


async def confirm_totp(request: web.Request) -> web.Response:
    actor = await _actor(request)
    code = _str_field(await _body(request), "totp", required=True, max_len=10)
    assert code is not None
    await _service(request).confirm_totp(actor, code)
    return _json({"confirmed": True})


async def list_grants(request: web.Request) -> web.Response:
    actor = await _actor(request)
    svc = _service(request)
    await svc.require_role(actor, {Role.SECURITY_ADMIN, Role.AUDITOR, Role.REVIEWER}, "grant.list", "grants")
    now = svc.clock()
    return _json(
        {"grants": [{**msgspec.to_builtins(g), "active": g.active(now)} for g in await svc.store.grants()]}
    )


async def create_request(request: web.Request) -> web.Response:
    actor = await _actor(request)
    body = await _body(request)
    unknown = [k for k in body if k not in ("kind", "object_id", "payload", "base_version")]
    if unknown:
        raise invalid_request([FieldError(k, "unknown_field", "not a known field") for k in unknown])
    kind = _str_field(body, "kind", required=True, max_len=40)
    assert kind is not None
    r = await _service(request).propose(
        actor,
        kind,
        _str_field(body, "object_id", max_len=200),
        body.get("payload"),
        _str_field(body, "base_version", max_len=100),
    )
    return _json(request_json(r), 201 if r.status.value == "pending" else 200)


async def list_requests(request: web.Request) -> web.Response:
    actor = await _actor(request)
    status = request.query.get("status")
    try:
        limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
    except ValueError:
        raise invalid_request([FieldError("limit", "invalid", "an integer")]) from None
    rows = await _service(request).list_requests(actor, status, limit)
    return _json({"requests": [request_json(r, full=False) for r in rows]})


async def show_request(request: web.Request) -> web.Response:
    actor = await _actor(request)
    return _json(request_json(await _service(request).get(actor, request.match_info["id"])))


async def approve_request(request: web.Request) -> web.Response:
    actor = await _actor(request)
    body = await _body(request, optional=True)
    r = await _service(request).approve(
        actor,
        request.match_info["id"],
        _str_field(body, "totp", max_len=10),
        _str_field(body, "stage", max_len=20),
    )
    return _json(request_json(r))


async def reject_request(request: web.Request) -> web.Response:
    actor = await _actor(request)
    body = await _body(request, optional=True)
    r = await _service(request).reject(
        actor, request.match_info["id"], _str_field(body, "reason", max_len=500)
    )
    return _json(request_json(r))


async def read_audit(request: web.Request) -> web.Response:
    actor = await _actor(request)
    try:
        after = int(request.query.get("after", "0"))
        limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
    except ValueError:
        raise invalid_request([FieldError("after", "invalid", "integers")]) from None
    entries = await _service(request).audit_entries(actor, after, limit)
    return _json({"entries": [msgspec.to_builtins(e) for e in entries]})


async def verify_audit(request: web.Request) -> web.Response:
    actor = await _actor(request)
    result = await _service(request).verify(actor)
    return _json(msgspec.to_builtins(result), 200 if result.ok else 409)


async def audit_heads(request: web.Request) -> web.Response:
    """Export the signed heads (external anchors); POST signs the current head now."""
    actor = await _actor(request)
    svc = _service(request)
    await svc.require_role(actor, {Role.AUDITOR, Role.SECURITY_ADMIN}, "audit.heads", "audit")
    if request.method == "POST":
        head = await svc.sign_head()
        return _json(msgspec.to_builtins(head), 201)
    return _json({"heads": [msgspec.to_builtins(h) for h in await svc.store.heads()]})


async def list_merchants(request: web.Request) -> web.Response:
    actor = await _actor(request)
    svc = _service(request)
    await svc.require_role(actor, set(Role), "merchant.list", "merchants")
    from router.governance.model import MerchantState

    rows = await svc.store.list_objects("merchant")
    return _json(
        {
            "merchants": [
                {**msgspec.to_builtins(msgspec.json.decode(o.doc, type=MerchantState)), "version": o.version}
                for _, o in rows
            ]
        }
    )


def register_governance_routes(router: web.UrlDispatcher, prefix: str = PREFIX) -> None:
    r = router
    r.add_post(f"{prefix}/bootstrap", bootstrap)
    r.add_get(f"{prefix}/admins", list_admins)
    r.add_post(f"{prefix}/admins", create_admin)
    r.add_get(f"{prefix}/me", me)
    r.add_post(f"{prefix}/me/token", rotate_token)
    r.add_post(f"{prefix}/me/totp", enrol_totp)
    r.add_post(f"{prefix}/me/totp/confirm", confirm_totp)
    r.add_get(f"{prefix}/grants", list_grants)
    r.add_get(f"{prefix}/requests", list_requests)
    r.add_post(f"{prefix}/requests", create_request)
    r.add_get(f"{prefix}/requests/{{id}}", show_request)
    r.add_post(f"{prefix}/requests/{{id}}/approve", approve_request)
    r.add_post(f"{prefix}/requests/{{id}}/reject", reject_request)
    r.add_get(f"{prefix}/audit", read_audit)
    r.add_get(f"{prefix}/audit/verify", verify_audit)
    r.add_get(f"{prefix}/audit/heads", audit_heads)
    r.add_post(f"{prefix}/audit/heads", audit_heads)
    r.add_get(f"{prefix}/merchants", list_merchants)


# ------------------------------------------------------------------ start-up


def default_store(
    cfg: GovernanceConfig, *, mode: str, sqlite_path: str, postgres_dsn: str | None
) -> GovernanceStore:
    """The store the payment storage mode implies, unless governance names its own."""
    if mode == "scaleout":
        dsn = cfg.postgres_dsn or postgres_dsn
        if not dsn:
            raise ValueError("governance in scale-out mode needs a PostgreSQL DSN")
        return PostgresGovernanceStore(dsn)
    return SqliteGovernanceStore(Path(cfg.sqlite_path or f"{sqlite_path}.governance.db"))


def governance_ctx(
    holder: GovernanceHolder,
    cfg: GovernanceConfig,
    store_factory: Callable[[], GovernanceStore],
    appliers: Appliers,
    *,
    registry: CollectorRegistry | None = None,
    clock: Clock = utcnow,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    sweeper: bool = True,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A `cleanup_ctx` entry: open the store, serve, then stop the sweeper and close the store."""
    metrics = GovernanceMetrics(registry)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        store = store_factory()
        await store.start()
        holder.service = GovernanceService(store, cfg, appliers, clock=clock, metrics=metrics, sleep=sleep)
        await holder.service.start()
        await holder.service.refresh_merchants()
        task = asyncio.create_task(holder.service.run_sweeper()) if sweeper else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            holder.service = None
            await store.close()

    return ctx
