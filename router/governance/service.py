"""The maker-checker rules. Every decision is audited, refusals included.

- A maker (operator; security admin for grants and the auto-approval policy) proposes a change to one
  governed object. The request records the object's version and a readable diff; one open request
  per object; it expires after `request_ttl_s` and is then terminated (by the sweeper and on every read).
- `quorum` (>= 2) approvals by distinct reviewers, none of them the maker, in order: the first is the
  initial review, the last the final one. Each approval needs a TOTP code; a (admin, time step) is
  accepted once. Any rejection ends the request; the maker may withdraw it.
- An approval against a stale object version is refused and the request ends `stale`.
- The final approval is a compare-and-set on the request row, so of any number of concurrent final
  approvals exactly one applies. Internal objects (grants, merchants, policy) are written in that
  same transaction; external ones (config, refund, ...) are applied by the one winner.
- Roles: an admin acts only through an active grant (they expire; renewing is governed). With
  `exclusive_roles`, maker roles and the checker role never meet on one admin. Nobody proposes or
  approves a grant to themselves.
- Low-risk changes inside the auto-approval policy apply without review (audited as such); the policy
  itself is only changed through maker-checker and never auto-approved.
- TOTP secrets are stored encrypted (AES-256-GCM under `totp_encryption_key`, bound to the admin id;
  see totp_crypto). Legacy plain secrets are re-encrypted on start and on their next use.
- A request left `applying` longer than `applying_timeout_s` (a crash mid-apply) ends `apply_unknown`
  on start and in the sweeper: audited, counted, never re-applied automatically.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec
import orjson
import pyotp
import yaml
from prometheus_client import CollectorRegistry, Counter, Histogram

from router.errors import ConfigError, FieldError, ProblemError, StoreUnavailable, invalid_request
from router.governance import audit
from router.governance.appliers import Appliers, result_doc
from router.governance.model import (
    CHECKER_ROLES,
    MAKER_ROLES,
    Admin,
    AuditDraft,
    AuditEntry,
    AutoApprovalPolicy,
    ChangeRequest,
    GovernanceConfig,
    Grant,
    Kind,
    MerchantState,
    RequestStatus,
    Review,
    Role,
    SignedHead,
)
from router.governance.store import (
    CodeReplayed,
    Commit,
    GovernanceStore,
    ObjectConflict,
    ObjectWrite,
    OpenRequestExists,
    RequestConflict,
)
from router.governance.totp_crypto import TotpCipher, TotpSecretUnreadable, is_encrypted, parse_key

log = logging.getLogger("payroute.governance")

Clock = Callable[[], datetime]
INTERNAL_KINDS = frozenset({Kind.GRANT, Kind.MERCHANT, Kind.AUTO_APPROVAL_POLICY})
SECURITY_KINDS = frozenset({Kind.GRANT, Kind.AUTO_APPROVAL_POLICY})  # proposed by a security admin
_enc = msgspec.json.Encoder().encode
TIME_TO_APPROVE_BUCKETS = (1, 10, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600)


def new_admin_token() -> str:
    """A fresh admin API token (256 random bits, URL-safe), never starting with "-": the CLI takes it as
    `--token TOKEN`, where a leading "-" would read as an option (1 token in 64 otherwise)."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def utcnow() -> datetime:
    return datetime.now(UTC)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class GovernanceMetrics:
    """The cost of review made visible: how long requests wait, and how they end."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.time_to_approve = Histogram(
            "payroute_governance_time_to_approve_seconds", "From proposal to applied, by kind and path (auto|reviewed)",
            ["kind", "path"], buckets=TIME_TO_APPROVE_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "payroute_governance_requests",
            "Change requests by kind and how they ended",
            ["kind", "outcome"],
            registry=r,
        )
        self.refusals = Counter(
            "payroute_governance_refusals", "Refused governance actions by code", ["code"], registry=r
        )
        self.apply_unknown = Counter(
            "payroute_governance_apply_unknown",
            "Requests found stuck in `applying` past applying_timeout_s (outcome unknown: check by hand)",
            ["kind"],
            registry=r,
        )


# ------------------------------------------------------------------ payloads


class ConfigPayload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    yaml: str


class MerchantPayload(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    action: Literal["onboard", "limits", "suspend", "reinstate"]
    name: str | None = None
    max_amount: int | None = None
    currencies: list[str] | None = None
    reason: str | None = None


class GrantPayload(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    action: Literal["grant", "renew", "revoke"]
    role: Role


class RefundPayload(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    merchant_id: str
    payment_id: str
    amount: int
    currency: str | None = None  # taken from the payment when the app can look it up
    reason: str | None = None


class Plan(msgspec.Struct, frozen=True):
    """What a proposal would change: the object's version now, and the readable diff."""

    object_id: str
    version: str
    diff: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Actor:
    admin: Admin
    source: str | None = None

    @property
    def id(self) -> str:
        return self.admin.id


# ------------------------------------------------------------------ pure policy checks


def weight_decrease_only(old_text: str, new_text: str, max_pct: float) -> bool:
    """True when the new config differs from the old only by lowering channel weights, each by at most
    `max_pct` percent (and at least one is lowered)."""
    if max_pct <= 0:
        return False
    try:
        old, new = yaml.safe_load(old_text), yaml.safe_load(new_text)
    except yaml.YAMLError:
        return False
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return False
    oc, nc = old.get("channels"), new.get("channels")
    if not (isinstance(oc, list) and isinstance(nc, list) and len(oc) == len(nc)):
        return False
    lowered = False
    for o, n in zip(oc, nc, strict=True):
        if not (isinstance(o, dict) and isinstance(n, dict)):
            return False
        ow, nw = o.get("weight", 1), n.get("weight", 1)
        if type(ow) is not int or type(nw) is not int:
            return False
        if nw > ow or nw < 0:
            return False
        if nw < ow:
            if (ow - nw) * 100 > max_pct * ow:
                return False
            lowered = True
    strip = [{k: v for k, v in c.items() if k != "weight"} for c in oc]
    strip_new = [{k: v for k, v in c.items() if k != "weight"} for c in nc]
    rest_old = {k: v for k, v in old.items() if k != "channels"}
    rest_new = {k: v for k, v in new.items() if k != "channels"}
    return lowered and strip == strip_new and rest_old == rest_new


def text_diff(before: str, after: str, name: str) -> str:
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        f"{name} (current)",
        f"{name} (proposed)",
    )
    return "".join(lines)


def _pretty(value: Any) -> str:
    return (
        orjson.dumps(msgspec.to_builtins(value), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode()
        + "\n"
    )


def _ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------ the service


class GovernanceService:
    def __init__(
        self,
        store: GovernanceStore,
        cfg: GovernanceConfig,
        appliers: Appliers,
        *,
        clock: Clock = utcnow,
        metrics: GovernanceMetrics | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.appliers = appliers
        self.clock = clock
        self.metrics = metrics or GovernanceMetrics()
        self._sleep = sleep
        self._signing_key = cfg.audit_signing_key.encode() if cfg.audit_signing_key else None
        self._totp_cipher = TotpCipher(
            parse_key(cfg.totp_encryption_key) if cfg.totp_encryption_key is not None else None
        )
        # governed merchant records, for the payment path to read without a query per payment;
        # refreshed after every merchant change here and on every sweep (other instances)
        self.merchant_snapshot: dict[str, MerchantState] = {}

    # ------------------------------------------------------------------ helpers

    def _id(self, prefix: str) -> str:
        # time-ordered by the (injectable) clock, then random: lists sort by creation
        return f"{prefix}_{int(self.clock().timestamp() * 1000):011x}{secrets.token_hex(8)}"

    async def _audit(
        self,
        actor: str,
        action: str,
        obj: str,
        outcome: str,
        *,
        source: str | None = None,
        request_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        await self.store.commit(Commit(audit=[AuditDraft(
            at=self.clock(), actor=actor, action=action, object=obj, outcome=outcome, source=source,
            request_id=request_id, detail=detail or {},
        )]))  # fmt: skip

    async def _refuse(
        self, actor: Actor | None, action: str, obj: str, problem: ProblemError, request_id: str | None = None
    ) -> ProblemError:
        """Audit a refusal and hand back the problem to raise."""
        self.metrics.refusals.labels(problem.code).inc()
        await self._audit(
            actor.id if actor else "anonymous",
            action,
            obj,
            "refused",
            source=actor.source if actor else None,
            request_id=request_id,
            detail={"code": problem.code, "detail": problem.detail or problem.title},
        )
        return problem

    def _draft(
        self,
        actor: Actor | str,
        action: str,
        obj: str,
        outcome: str = "ok",
        *,
        request_id: str | None = None,
        before: Any = None,
        after: Any = None,
        detail: dict[str, Any] | None = None,
    ) -> AuditDraft:
        return AuditDraft(
            at=self.clock(), actor=actor if isinstance(actor, str) else actor.id, action=action, object=obj,
            outcome=outcome, source=None if isinstance(actor, str) else actor.source, request_id=request_id,
            before_hash=None if before is None else audit.content_hash(before),
            after_hash=None if after is None else audit.content_hash(after), detail=detail or {},
        )  # fmt: skip

    async def active_roles(self, admin_id: str) -> set[Role]:
        now = self.clock()
        return {g.role for g in await self.store.grants(admin_id) if g.active(now)}

    async def require_role(
        self, actor: Actor, roles: frozenset[Role] | set[Role], action: str, obj: str
    ) -> None:
        if not (await self.active_roles(actor.id)) & set(roles):
            raise await self._refuse(actor, action, obj, ProblemError(
                403, "forbidden", "Your admin account has no active grant for this",
                f"needs one of: {', '.join(sorted(r.value for r in roles))} (grants expire; renewal is a governed change)",
            ))  # fmt: skip

    # ------------------------------------------------------------------ admins, tokens, TOTP

    async def authenticate(self, token: str, source: str | None = None) -> Actor:
        admin = await self.store.admin_by_token(hash_token(token)) if token else None
        if admin is None or admin.disabled:
            raise ProblemError(401, "unauthenticated", "A valid admin token is required")
        return Actor(admin, source)

    async def bootstrap(
        self, admins: list[tuple[str, list[Role]]], source: str | None = None
    ) -> list[tuple[Admin, str]]:
        """Create the first admins and their grants, once, while no admin exists (audited)."""
        problems = []
        for i, (_, roles) in enumerate(admins):
            if self.cfg.exclusive_roles and set(roles) & MAKER_ROLES and set(roles) & CHECKER_ROLES:
                problems.append(
                    FieldError(
                        f"admins[{i}].roles", "roles_exclusive", "maker and checker roles are exclusive"
                    )
                )
        if problems:
            raise invalid_request(problems)
        now = self.clock()
        out, grants = [], []
        for name, roles in admins:
            token = new_admin_token()
            admin = Admin(
                id=self._id("adm"),
                name=name,
                token_sha256=hash_token(token),
                created_at=now,
                created_by="bootstrap",
            )
            out.append((admin, token))
            for role in dict.fromkeys(roles):
                grants.append(
                    Grant(
                        id=self._id("grt"),
                        admin_id=admin.id,
                        role=role,
                        granted_at=now,
                        expires_at=now + timedelta(days=self.cfg.grant_ttl_days),
                        request_id=None,
                    )
                )
        try:
            await self.store.commit(Commit(
                admins=[a for a, _ in out], grants=grants,
                objects=[ObjectWrite("system", "bootstrap", 0, _enc({"at": _ts(now)}))],
                audit=[self._draft("bootstrap", "admin.bootstrap", f"admin:{a.id}", after={"name": a.name, "roles": [
                    g.role.value for g in grants if g.admin_id == a.id]}, detail={"source": source}) for a, _ in out],
            ))  # fmt: skip
        except ObjectConflict:
            await self._audit(
                "bootstrap",
                "admin.bootstrap",
                "system:bootstrap",
                "refused",
                source=source,
                detail={"code": "already_bootstrapped"},
            )
            raise ProblemError(
                409,
                "already_bootstrapped",
                "Governance was bootstrapped already",
                "new admins are created by a security admin; roles are granted through change requests",
            ) from None
        return out

    async def create_admin(self, actor: Actor, name: str) -> tuple[Admin, str]:
        """A new admin with no roles (roles come only through governed grants); the token is shown once."""
        await self.require_role(actor, {Role.SECURITY_ADMIN}, "admin.create", f"admin:{name}")
        token = new_admin_token()
        admin = Admin(
            id=self._id("adm"),
            name=name,
            token_sha256=hash_token(token),
            created_at=self.clock(),
            created_by=actor.id,
        )
        await self.store.commit(
            Commit(
                admins=[admin],
                audit=[self._draft(actor, "admin.create", f"admin:{admin.id}", after={"name": name})],
            )
        )
        return admin, token

    async def rotate_token(self, actor: Actor) -> str:
        token = new_admin_token()
        new = msgspec.structs.replace(actor.admin, token_sha256=hash_token(token))
        await self.store.commit(
            Commit(admins=[new], audit=[self._draft(actor, "admin.token_rotate", f"admin:{actor.id}")])
        )
        return token

    async def start(self) -> None:
        """On start: re-encrypt legacy plain TOTP secrets, and mark requests stuck in `applying`."""
        if not self._totp_cipher.enabled:
            if self.cfg.enabled:
                log.warning(
                    "governance.totp_encryption_key is not set: TOTP secrets are stored in plain text"
                )
        else:
            for admin in await self.store.list_admins():
                await self._reencrypt_legacy(admin)
        await self.recover_stuck_applying()

    async def _reencrypt_legacy(self, admin: Admin) -> Admin:
        """With a key configured, replace a legacy plain secret by its encrypted form (audited)."""
        if not (self._totp_cipher.enabled and admin.totp_secret and not is_encrypted(admin.totp_secret)):
            return admin
        new = msgspec.structs.replace(admin, totp_secret=self._totp_cipher.seal(admin.id, admin.totp_secret))
        await self.store.commit(
            Commit(admins=[new], audit=[self._draft("system", "admin.totp_reencrypt", f"admin:{admin.id}")])
        )
        return new

    async def _verify_totp(
        self, actor: Actor, admin: Admin, code: str | None, action: str
    ) -> tuple[int | None, Admin]:
        """`_totp_step`, with an unreadable stored secret refused (audited) and a legacy one re-encrypted
        (the admin returned is as now stored)."""
        try:
            step = self._totp_step(admin, code)
        except TotpSecretUnreadable as e:
            log.error("governance TOTP secret unreadable", extra={"admin": admin.id, "error": str(e)})
            raise await self._refuse(
                actor,
                action,
                f"admin:{admin.id}",
                ProblemError(
                    500,
                    "totp_secret_unreadable",
                    "The stored TOTP secret cannot be decrypted; check governance.totp_encryption_key",
                    str(e),
                ),
            ) from None
        if step is not None:
            admin = await self._reencrypt_legacy(admin)
        return step, admin

    def _totp_step(self, admin: Admin, code: str | None) -> int | None:
        """The time step `code` is valid for (within the window), or None. Raises TotpSecretUnreadable."""
        if not admin.totp_secret or not code or not code.isdigit():
            return None
        totp = pyotp.TOTP(self._totp_cipher.open(admin.id, admin.totp_secret))
        now = self.clock()
        base = totp.timecode(now)
        for offset in sorted(range(-self.cfg.totp_window, self.cfg.totp_window + 1), key=abs):
            if hmac.compare_digest(totp.at(now, counter_offset=offset), code):
                return base + offset
        return None

    async def enrol_totp(self, actor: Actor, current_code: str | None = None) -> tuple[str, str]:
        """A new TOTP secret (unconfirmed until `confirm_totp`). Replacing a confirmed one needs a current
        code: a stolen API token alone must not be enough to take over the second factor."""
        admin = await self.store.get_admin(actor.id) or actor.admin
        step: int | None = None
        if admin.totp_confirmed:
            step, admin = await self._verify_totp(actor, admin, current_code, "admin.totp_enrol")
            if step is None:
                raise await self._refuse(
                    actor,
                    "admin.totp_enrol",
                    f"admin:{admin.id}",
                    ProblemError(
                        403,
                        "invalid_totp",
                        "Re-enrolment needs a current code from the enrolled authenticator",
                    ),
                )
        secret = pyotp.random_base32()
        new = msgspec.structs.replace(
            admin, totp_secret=self._totp_cipher.seal(admin.id, secret), totp_confirmed=False
        )
        try:
            await self.store.commit(
                Commit(
                    admins=[new],
                    totp_use=(admin.id, step) if step is not None else None,
                    audit=[self._draft(actor, "admin.totp_enrol", f"admin:{admin.id}")],
                )
            )
        except CodeReplayed:
            raise await self._refuse(
                actor,
                "admin.totp_enrol",
                f"admin:{admin.id}",
                ProblemError(403, "totp_reused", "This TOTP code was already used"),
            ) from None
        uri = pyotp.TOTP(secret).provisioning_uri(name=admin.name, issuer_name="payroute")
        return secret, uri

    async def confirm_totp(self, actor: Actor, code: str) -> None:
        admin = await self.store.get_admin(actor.id) or actor.admin
        step, admin = await self._verify_totp(actor, admin, code, "admin.totp_confirm")
        if step is None:
            raise await self._refuse(
                actor,
                "admin.totp_confirm",
                f"admin:{admin.id}",
                ProblemError(403, "invalid_totp", "The TOTP code is not valid"),
            )
        try:
            await self.store.commit(Commit(
                admins=[msgspec.structs.replace(admin, totp_confirmed=True)], totp_use=(admin.id, step),
                audit=[self._draft(actor, "admin.totp_confirm", f"admin:{admin.id}")]))  # fmt: skip
        except CodeReplayed:
            raise await self._refuse(
                actor,
                "admin.totp_confirm",
                f"admin:{admin.id}",
                ProblemError(403, "totp_reused", "This TOTP code was already used"),
            ) from None

    # ------------------------------------------------------------------ policy and thresholds

    async def auto_policy(self) -> tuple[int, AutoApprovalPolicy]:
        stored = await self.store.get_object(Kind.AUTO_APPROVAL_POLICY.value, "auto_approval")
        if stored is None:
            return 0, self.cfg.auto_approval
        return stored.version, msgspec.json.decode(stored.doc, type=AutoApprovalPolicy)

    def refund_threshold(self, merchant_id: str, currency: str) -> int | None:
        """Refunds at or above this need approval; None: every refund in this currency does."""
        t = self.cfg.refund_thresholds
        per = t.merchants.get(merchant_id, {})
        if currency in per:
            return per[currency]
        if currency in t.default:
            return t.default[currency]
        return t.other_currencies

    def refund_needs_approval(self, merchant_id: str, currency: str, amount: int) -> bool:
        if not self.cfg.enabled:
            return False
        threshold = self.refund_threshold(merchant_id, currency)
        return threshold is None or amount >= threshold

    async def refuse_ungoverned(
        self, who: str, operation: str, obj: str, source: str | None = None
    ) -> ProblemError:
        """For the app: an operation that needs approval was attempted directly. Audited; raise the result."""
        self.metrics.refusals.labels("approval_required").inc()
        await self._audit(who, operation, obj, "refused", source=source, detail={"code": "approval_required"})
        return ProblemError(
            403,
            "approval_required",
            "This operation needs maker-checker approval",
            "propose it as a change request under /admin/v1/governance/requests",
        )

    async def merchant(self, merchant_id: str) -> MerchantState | None:
        stored = await self.store.get_object(Kind.MERCHANT.value, merchant_id)
        return None if stored is None else msgspec.json.decode(stored.doc, type=MerchantState)

    async def refresh_merchants(self) -> dict[str, MerchantState]:
        self.merchant_snapshot = {
            mid: msgspec.json.decode(o.doc, type=MerchantState)
            for mid, o in await self.store.list_objects(Kind.MERCHANT.value)
        }
        return self.merchant_snapshot

    def is_suspended(self, merchant_id: str) -> bool:
        m = self.merchant_snapshot.get(merchant_id)
        return m is not None and m.status == "suspended"

    async def suspended_merchants(self) -> frozenset[str]:
        """What the router reads to refuse new payments for suspended merchants."""
        out = set()
        for mid, stored in await self.store.list_objects(Kind.MERCHANT.value):
            if msgspec.json.decode(stored.doc, type=MerchantState).status == "suspended":
                out.add(mid)
        return frozenset(out)

    # ------------------------------------------------------------------ planning (current version + diff)

    def _payload(self, kind: Kind, payload: Any) -> Any:
        types: dict[Kind, type[Any]] = {
            Kind.CONFIG: ConfigPayload, Kind.MERCHANT: MerchantPayload, Kind.GRANT: GrantPayload,
            Kind.REFUND: RefundPayload, Kind.AUTO_APPROVAL_POLICY: AutoApprovalPolicy,
        }  # fmt: skip
        if kind not in types:
            if not isinstance(payload, dict):
                raise invalid_request([FieldError("payload", "invalid_payload", "must be an object")])
            return payload
        try:
            return msgspec.convert(payload, types[kind])
        except msgspec.ValidationError as e:
            msg = str(e)
            path = msg.rpartition(" - at `")[2].rstrip("`") if " - at `" in msg else "$"
            raise invalid_request([FieldError(f"payload{path[1:]}", "invalid_payload", msg)]) from None

    async def _plan(self, actor: Actor | None, kind: Kind, object_id: str | None, raw: Any) -> Plan:
        """Validate a proposal and describe it: which object, its current version, the diff."""
        self.appliers.require(kind.value)
        p = self._payload(kind, raw)
        if isinstance(p, ConfigPayload):
            assert self.appliers.current_config is not None
            snap = await self.appliers.current_config()
            return Plan(
                "runtime", snap.version, text_diff(snap.text, p.yaml, "config.yaml"), {"yaml": p.yaml}
            )
        if isinstance(p, MerchantPayload):
            if not object_id:
                raise invalid_request([FieldError("object_id", "required", "the merchant id")])
            stored = await self.store.get_object(Kind.MERCHANT.value, object_id)
            cur = None if stored is None else msgspec.json.decode(stored.doc, type=MerchantState)
            new = self._merchant_after(object_id, cur, p)
            return Plan(
                object_id,
                str(stored.version if stored else 0),
                text_diff(_pretty(cur) if cur else "", _pretty(new), f"merchant {object_id}"),
                msgspec.to_builtins(p),
            )
        if isinstance(p, GrantPayload):
            if not object_id:
                raise invalid_request([FieldError("object_id", "required", "the admin id the grant is for")])
            if await self.store.get_admin(object_id) is None:
                raise ProblemError(404, "no_such_admin", "No such admin")
            stored = await self.store.get_object(Kind.GRANT.value, object_id)
            roles = sorted(r.value for r in await self.active_roles(object_id))
            verb = {"grant": "+", "renew": "~", "revoke": "-"}[p.action]
            diff = f"admin {object_id} roles now: {', '.join(roles) or '(none)'}\n{verb} {p.role.value} ({p.action}"
            diff += (
                f", expires {_ts(self.clock() + timedelta(days=self.cfg.grant_ttl_days))})\n"
                if p.action != "revoke"
                else ")\n"
            )
            return Plan(object_id, str(stored.version if stored else 0), diff, msgspec.to_builtins(p))
        if isinstance(p, RefundPayload):
            if p.amount <= 0:
                raise invalid_request(
                    [FieldError("payload.amount", "invalid_amount", "a positive integer in minor units")]
                )
            version, currency = "unknown", p.currency
            if self.appliers.refund_target is not None:
                target = await self.appliers.refund_target(p.merchant_id, p.payment_id)
                if target is None:
                    raise ProblemError(404, "no_such_payment", "No such payment for this merchant")
                if p.amount > target.refundable:
                    raise invalid_request(
                        [
                            FieldError(
                                "payload.amount",
                                "amount_exceeds_refundable",
                                f"at most {target.refundable} may be refunded",
                            )
                        ]
                    )
                version, currency = str(target.version), target.currency
            if currency is None:
                raise invalid_request([FieldError("payload.currency", "required", "the payment currency")])
            payload = msgspec.to_builtins(msgspec.structs.replace(p, currency=currency))
            diff = f"refund {p.amount} {currency} (minor units) of payment {p.payment_id}, merchant {p.merchant_id}"
            diff += f"\nreason: {p.reason}\n" if p.reason else "\n"
            return Plan(f"{p.merchant_id}:{p.payment_id}", version, diff, payload)
        if isinstance(p, AutoApprovalPolicy):
            policy_version, policy = await self.auto_policy()
            return Plan(
                "auto_approval",
                str(policy_version),
                text_diff(_pretty(policy), _pretty(p), "auto-approval policy"),
                msgspec.to_builtins(p),
            )
        # webhook re-drive, secret rotation: the applier knows the object; we only describe the request
        oid = object_id or str(p.get("merchant_id") or p.get("secret") or "all")
        return Plan(oid, "n/a", f"{kind.value} {oid}\n" + _pretty(p), dict(p))

    @staticmethod
    def _merchant_after(mid: str, cur: MerchantState | None, p: MerchantPayload) -> MerchantState:
        if p.action == "onboard":
            if cur is not None:
                raise ProblemError(409, "merchant_exists", "This merchant is onboarded already")
            return MerchantState(id=mid, name=p.name, max_amount=p.max_amount, currencies=p.currencies)
        if cur is None:
            raise ProblemError(404, "no_such_merchant", "This merchant is not onboarded")
        if p.action == "limits":
            return msgspec.structs.replace(cur, max_amount=p.max_amount, currencies=p.currencies)
        if p.action == "suspend":
            return msgspec.structs.replace(cur, status="suspended", suspended_reason=p.reason)
        return msgspec.structs.replace(cur, status="active", suspended_reason=None)

    async def _current_version(self, r: ChangeRequest) -> str:
        if r.kind is Kind.CONFIG:
            assert self.appliers.current_config is not None
            return (await self.appliers.current_config()).version
        if r.kind in (Kind.MERCHANT, Kind.GRANT):
            stored = await self.store.get_object(r.kind.value, r.object_id)
            return str(stored.version if stored else 0)
        if r.kind is Kind.AUTO_APPROVAL_POLICY:
            return str((await self.auto_policy())[0])
        if r.kind is Kind.REFUND and self.appliers.refund_target is not None:
            target = await self.appliers.refund_target(r.payload["merchant_id"], r.payload["payment_id"])
            return "gone" if target is None else str(target.version)
        return r.base_version

    async def _separation_problem(self, target: str, role: Role, action: str) -> ProblemError | None:
        if action == "revoke" or not self.cfg.exclusive_roles:
            return None
        held = await self.active_roles(target)
        if (role in CHECKER_ROLES and held & MAKER_ROLES) or (role in MAKER_ROLES and held & CHECKER_ROLES):
            return ProblemError(
                403,
                "roles_exclusive",
                "Maker and checker roles are mutually exclusive",
                f"admin {target} holds {', '.join(sorted(r.value for r in held))}",
            )
        return None

    # ------------------------------------------------------------------ requests

    async def propose(
        self, actor: Actor, kind: str, object_id: str | None, payload: Any, base_version: str | None = None
    ) -> ChangeRequest:
        try:
            k = Kind(kind)
        except ValueError:
            raise invalid_request(
                [FieldError("kind", "unknown_kind", f"one of {', '.join(x.value for x in Kind)}")]
            ) from None
        obj = f"{k.value}:{object_id or '?'}"
        await self.require_role(
            actor, {Role.SECURITY_ADMIN} if k in SECURITY_KINDS else {Role.OPERATOR}, "request.create", obj
        )
        await self.expire_due()
        try:
            plan = await self._plan(actor, k, object_id, payload)
        except ProblemError as p:
            raise await self._refuse(actor, "request.create", obj, p) from None
        obj = f"{k.value}:{plan.object_id}"
        if k is Kind.GRANT:
            if plan.object_id == actor.id:
                raise await self._refuse(
                    actor,
                    "request.create",
                    obj,
                    ProblemError(403, "self_grant", "Nobody can grant anything to themselves"),
                )
            sep = await self._separation_problem(
                plan.object_id, Role(plan.payload["role"]), plan.payload["action"]
            )
            if sep is not None:
                raise await self._refuse(actor, "request.create", obj, sep)
        if base_version is not None and base_version != plan.version:
            raise await self._refuse(
                actor,
                "request.create",
                obj,
                ProblemError(
                    409,
                    "stale_version",
                    "The object changed since you looked at it",
                    f"you proposed against version {base_version}; it is at {plan.version}",
                    extra={"current_version": plan.version},
                ),
            )
        now = self.clock()
        auto = await self._auto_approvable(k, plan)
        req = ChangeRequest(
            id=self._id("chg"), kind=k, object_id=plan.object_id, base_version=plan.version, payload=plan.payload,
            diff=plan.diff, maker=actor.id, status=RequestStatus.PENDING, created_at=now,
            expires_at=now + timedelta(seconds=self.cfg.request_ttl_s), quorum=self.cfg.quorum,
        )  # fmt: skip
        try:
            await self.store.commit(Commit(request=req, audit=[self._draft(
                actor, "request.create", obj, request_id=req.id, after=plan.payload,
                detail={"base_version": plan.version, "auto_approvable": auto})]))  # fmt: skip
        except OpenRequestExists:
            raise await self._refuse(
                actor,
                "request.create",
                obj,
                ProblemError(
                    409,
                    "open_request_exists",
                    "This object already has an open change request",
                    "approve, reject or withdraw it first",
                ),
            ) from None
        self.metrics.requests.labels(k.value, "proposed").inc()
        if not auto:
            return req
        return await self._apply(actor, req, review=None, totp_use=None, auto=True)

    async def _auto_approvable(self, kind: Kind, plan: Plan) -> bool:
        if kind in SECURITY_KINDS:
            return False  # grants and the policy itself always take two people
        _, policy = await self.auto_policy()
        if kind is Kind.CONFIG and self.appliers.current_config is not None:
            snap = await self.appliers.current_config()
            return weight_decrease_only(snap.text, plan.payload["yaml"], policy.weight_decrease_max_pct)
        if kind is Kind.REFUND:
            p = plan.payload
            return policy.refunds_below_threshold and not self.refund_needs_approval(
                p["merchant_id"], p["currency"], p["amount"]
            )
        return False

    async def get(self, actor: Actor, request_id: str) -> ChangeRequest:
        await self.require_role(actor, set(Role), "request.read", f"request:{request_id}")
        await self.expire_due()
        r = await self.store.get_request(request_id)
        if r is None:
            raise ProblemError(404, "no_such_request", "No such change request")
        return r

    async def list_requests(
        self, actor: Actor, status: str | None = None, limit: int = 100
    ) -> list[ChangeRequest]:
        await self.require_role(actor, set(Role), "request.list", "requests")
        await self.expire_due()
        return await self.store.list_requests(status, limit)

    async def approve(
        self, actor: Actor, request_id: str, code: str | None, stage: str | None = None
    ) -> ChangeRequest:
        obj = f"request:{request_id}"
        await self.require_role(actor, CHECKER_ROLES, "request.approve", obj)
        await self.expire_due()
        r = await self.store.get_request(request_id)
        if r is None:
            raise ProblemError(404, "no_such_request", "No such change request")
        obj = f"{r.kind.value}:{r.object_id}"

        async def refuse(status: int, code_: str, title: str, detail: str | None = None) -> ProblemError:
            return await self._refuse(
                actor, "request.approve", obj, ProblemError(status, code_, title, detail), r.id
            )

        if r.status is not RequestStatus.PENDING:
            raise await refuse(409, "request_not_pending", f"The request is {r.status.value}", r.reason)
        if actor.id == r.maker:
            raise await refuse(403, "maker_cannot_review", "The maker of a request cannot review it")
        if any(rv.reviewer == actor.id for rv in r.reviews):
            raise await refuse(
                403, "already_reviewed", "You reviewed this request already; another reviewer must"
            )
        if r.kind is Kind.GRANT and r.object_id == actor.id:
            raise await refuse(403, "self_grant", "Nobody can approve a grant to themselves")
        done = len(r.approvals)
        expected = "initial" if done == 0 else "final" if done == r.quorum - 1 else "intermediate"
        if stage is not None and stage != expected:
            raise await refuse(
                409,
                "review_out_of_order",
                f"This request awaits its {expected} review",
                f"{done} of {r.quorum} approvals given",
            )
        admin = await self.store.get_admin(actor.id) or actor.admin
        if not admin.totp_confirmed:
            raise await refuse(403, "totp_not_enrolled", "Enrol and confirm TOTP before approving")
        step, admin = await self._verify_totp(actor, admin, code, "request.approve")
        if step is None:
            raise await refuse(
                403,
                "invalid_totp",
                "A valid TOTP code is required to approve",
                "missing or wrong code" if code else "send the current code as `totp`",
            )
        if await self._current_version(r) != r.base_version:
            await self._end(r, RequestStatus.STALE, "system", "the object changed after the request was made")
            raise await refuse(
                409,
                "stale_version",
                "The object changed since the request was made; it cannot apply",
                "propose again against the current version",
            )
        review = Review(reviewer=actor.id, stage=expected, decision="approve", at=self.clock())
        if expected != "final":
            new = msgspec.structs.replace(r, reviews=(*r.reviews, review), version=r.version + 1)
            await self._commit_review(
                actor,
                r,
                new,
                step,
                [self._draft(actor, "request.approve", obj, request_id=r.id, detail={"stage": expected})],
            )
            return new
        return await self._apply(actor, r, review=review, totp_use=(actor.id, step))

    async def _commit_review(
        self,
        actor: Actor,
        r: ChangeRequest,
        new: ChangeRequest,
        step: int | None,
        drafts: list[AuditDraft],
        **extra: Any,
    ) -> None:
        obj = f"{r.kind.value}:{r.object_id}"
        try:
            await self.store.commit(
                Commit(
                    request=new,
                    expected_request_version=r.version,
                    totp_use=(actor.id, step) if step is not None else None,
                    audit=drafts,
                    **extra,
                )
            )
        except CodeReplayed:
            raise await self._refuse(
                actor,
                "request.approve",
                obj,
                ProblemError(403, "totp_reused", "This TOTP code was already used; wait for the next one"),
                r.id,
            ) from None
        except RequestConflict:
            raise await self._refuse(
                actor,
                "request.approve",
                obj,
                ProblemError(
                    409,
                    "request_conflict",
                    "Someone else acted on this request at the same moment",
                    "read it again: it may be applied already",
                ),
                r.id,
            ) from None

    async def _apply(
        self,
        actor: Actor,
        r: ChangeRequest,
        *,
        review: Review | None,
        totp_use: tuple[str, int] | None,
        auto: bool = False,
    ) -> ChangeRequest:
        """The final approval (or auto-approval): exactly one caller gets past the compare-and-set."""
        obj = f"{r.kind.value}:{r.object_id}"
        now = self.clock()
        reviews = (*r.reviews, review) if review else r.reviews
        approve_draft = self._draft(
            actor,
            "request.auto_approve" if auto else "request.approve",
            obj,
            request_id=r.id,
            detail={"stage": "auto" if auto else "final"},
        )
        path = "auto" if auto else "reviewed"
        step = totp_use[1] if totp_use else None
        if r.kind in INTERNAL_KINDS:
            try:
                objects, grants, result, before, after = await self._internal_effects(r, now)
            except ProblemError as p:
                await self._end(r, RequestStatus.FAILED, actor.id, p.detail or p.title)
                raise await self._refuse(actor, "request.apply", obj, p, r.id) from None
            new = msgspec.structs.replace(
                r,
                reviews=reviews,
                version=r.version + 1,
                status=RequestStatus.APPLIED,
                decided_at=now,
                result=result,
                auto_approved=auto,
            )
            try:
                await self._commit_review(actor, r, new, step, [approve_draft, self._draft(
                    actor, "request.apply", obj, request_id=r.id, before=before, after=after, detail=result)],
                    objects=objects, grants=grants)  # fmt: skip
            except ObjectConflict:
                await self._end(
                    r, RequestStatus.STALE, "system", "the object changed after the request was made"
                )
                raise await self._refuse(
                    actor,
                    "request.approve",
                    obj,
                    ProblemError(
                        409, "stale_version", "The object changed since the request was made; it cannot apply"
                    ),
                    r.id,
                ) from None
            self._observe(new, path)
            if r.kind is Kind.MERCHANT:
                await self.refresh_merchants()
            return new
        applying = msgspec.structs.replace(
            r,
            reviews=reviews,
            version=r.version + 1,
            status=RequestStatus.APPLYING,
            decided_at=now,
            auto_approved=auto,
        )
        await self._commit_review(actor, r, applying, step, [approve_draft])
        # only the winner of the compare-and-set above gets here: apply exactly once
        try:
            value = await self._apply_external(applying)
        except (ProblemError, ConfigError) as e:
            detail = e.detail or e.title if isinstance(e, ProblemError) else str(e)
            failed = msgspec.structs.replace(
                applying,
                version=applying.version + 1,
                status=RequestStatus.FAILED,
                result={"error": detail},
                reason=detail,
            )
            try:
                await self.store.commit(
                    Commit(
                        request=failed,
                        expected_request_version=applying.version,
                        audit=[
                            self._draft(
                                actor,
                                "request.apply",
                                obj,
                                "failed",
                                request_id=r.id,
                                detail={"error": detail},
                            )
                        ],
                    )
                )
            except RequestConflict:
                return await self._late_outcome(actor, applying, "failed", {"error": detail})
            self.metrics.requests.labels(r.kind.value, "failed").inc()
            return failed
        result = result_doc(value)
        done = msgspec.structs.replace(
            applying, version=applying.version + 1, status=RequestStatus.APPLIED, result=result
        )
        try:
            await self.store.commit(
                Commit(
                    request=done,
                    expected_request_version=applying.version,
                    audit=[
                        self._draft(
                            actor, "request.apply", obj, request_id=r.id, after=r.payload, detail=result
                        )
                    ],
                )
            )
        except RequestConflict:
            return await self._late_outcome(actor, applying, "ok", result)
        self._observe(done, path)
        return done

    async def _late_outcome(
        self, actor: Actor, applying: ChangeRequest, outcome: str, detail: dict[str, Any]
    ) -> ChangeRequest:
        """The applier finished after the request was marked `apply_unknown` (it ran past
        applying_timeout_s): the request stays as it is, but what really happened is audited."""
        obj = f"{applying.kind.value}:{applying.object_id}"
        log.error(
            "governance apply finished after its timeout", extra={"request": applying.id, "outcome": outcome}
        )
        await self._audit(actor.id, "request.apply_late", obj, outcome, source=actor.source,
                          request_id=applying.id, detail=detail)  # fmt: skip
        return await self.store.get_request(applying.id) or applying

    def _observe(self, r: ChangeRequest, path: str) -> None:
        self.metrics.requests.labels(r.kind.value, "applied").inc()
        end = r.decided_at or self.clock()
        self.metrics.time_to_approve.labels(r.kind.value, path).observe(
            max(0.0, (end - r.created_at).total_seconds())
        )

    async def _apply_external(self, r: ChangeRequest) -> Any:
        a, p = self.appliers, r.payload
        if r.kind is Kind.CONFIG:
            assert a.apply_config is not None
            return await a.apply_config(p["yaml"])
        if r.kind is Kind.REFUND:
            assert a.apply_refund is not None
            return await a.apply_refund(p["merchant_id"], p["payment_id"], p["amount"], p.get("reason"))
        if r.kind is Kind.WEBHOOK_REDRIVE:
            assert a.redrive_webhooks is not None
            return dict(await a.redrive_webhooks(p))
        assert r.kind is Kind.SECRET_ROTATION and a.rotate_secret is not None
        return dict(await a.rotate_secret(p))

    async def _internal_effects(
        self, r: ChangeRequest, now: datetime
    ) -> tuple[list[ObjectWrite], list[Grant], dict[str, Any], Any, Any]:
        """The rows the final approval writes: (objects, grants, result, before, after)."""
        base = int(r.base_version)
        if r.kind is Kind.MERCHANT:
            p = msgspec.convert(r.payload, MerchantPayload)
            cur = await self.merchant(r.object_id)
            new = self._merchant_after(r.object_id, cur, p)
            return (
                [ObjectWrite(Kind.MERCHANT.value, r.object_id, base, _enc(new))],
                [],
                msgspec.to_builtins(new),
                cur,
                new,
            )
        if r.kind is Kind.AUTO_APPROVAL_POLICY:
            _, cur_policy = await self.auto_policy()
            policy = msgspec.convert(r.payload, AutoApprovalPolicy)
            return (
                [ObjectWrite(Kind.AUTO_APPROVAL_POLICY.value, "auto_approval", base, _enc(policy))],
                [],
                msgspec.to_builtins(policy),
                cur_policy,
                policy,
            )
        g = msgspec.convert(r.payload, GrantPayload)
        sep = await self._separation_problem(r.object_id, g.role, g.action)
        if sep is not None:
            raise sep
        existing = [
            x for x in await self.store.grants(r.object_id) if x.role is g.role and x.revoked_at is None
        ]
        active = [x for x in existing if x.active(now)]
        grants: list[Grant] = []
        if g.action == "grant" and active:
            raise ProblemError(
                409, "already_granted", f"The admin holds {g.role.value} already; renew it instead"
            )
        if g.action in ("renew", "revoke"):
            if not existing:
                raise ProblemError(409, "not_granted", f"The admin has no {g.role.value} grant to {g.action}")
            grants += [msgspec.structs.replace(x, revoked_at=now) for x in existing]
        if g.action in ("grant", "renew"):
            grants.append(
                Grant(
                    id=self._id("grt"),
                    admin_id=r.object_id,
                    role=g.role,
                    granted_at=now,
                    expires_at=now + timedelta(days=self.cfg.grant_ttl_days),
                    request_id=r.id,
                )
            )
        before = sorted(x.role.value for x in active)
        after_roles = set(before) - {g.role.value} if g.action == "revoke" else set(before) | {g.role.value}
        after = sorted(after_roles)
        result = {"admin_id": r.object_id, "roles": after, "action": g.action, "role": g.role.value}
        if g.action != "revoke":
            result["expires_at"] = _ts(grants[-1].expires_at)
        return (
            [ObjectWrite(Kind.GRANT.value, r.object_id, base, _enc({"roles": after}))],
            grants,
            result,
            before,
            after,
        )

    async def reject(self, actor: Actor, request_id: str, reason: str | None) -> ChangeRequest:
        """A reviewer's rejection ends the request; the maker may withdraw it the same way."""
        obj = f"request:{request_id}"
        await self.expire_due()
        r = await self.store.get_request(request_id)
        if r is None:
            raise ProblemError(404, "no_such_request", "No such change request")
        obj = f"{r.kind.value}:{r.object_id}"
        withdraw = actor.id == r.maker
        if not withdraw:
            await self.require_role(actor, CHECKER_ROLES, "request.reject", obj)
        if r.status is not RequestStatus.PENDING:
            raise await self._refuse(
                actor,
                "request.reject",
                obj,
                ProblemError(409, "request_not_pending", f"The request is {r.status.value}"),
                r.id,
            )
        status = RequestStatus.WITHDRAWN if withdraw else RequestStatus.REJECTED
        review = Review(
            reviewer=actor.id,
            stage="withdrawal" if withdraw else "rejection",
            decision="reject",
            at=self.clock(),
            comment=reason,
        )
        new = msgspec.structs.replace(
            r,
            reviews=(*r.reviews, review),
            version=r.version + 1,
            status=status,
            decided_at=self.clock(),
            reason=reason or status.value,
        )
        await self._commit_review(
            actor,
            r,
            new,
            None,
            [
                self._draft(
                    actor,
                    "request.withdraw" if withdraw else "request.reject",
                    obj,
                    request_id=r.id,
                    detail={"reason": reason},
                )
            ],
        )
        self.metrics.requests.labels(r.kind.value, status.value).inc()
        return new

    async def _end(
        self, r: ChangeRequest, status: RequestStatus, actor: str, reason: str, outcome: str = "ok"
    ) -> bool:
        """Terminate an open request (expiry, stale object, failed apply); losing a race to another end is
        fine (returns False)."""
        new = msgspec.structs.replace(
            r, version=r.version + 1, status=status, decided_at=self.clock(), reason=reason
        )
        try:
            await self.store.commit(Commit(request=new, expected_request_version=r.version, audit=[
                self._draft(actor, f"request.{status.value}", f"{r.kind.value}:{r.object_id}", outcome,
                            request_id=r.id, detail={"reason": reason})]))  # fmt: skip
        except RequestConflict:
            return False
        self.metrics.requests.labels(r.kind.value, status.value).inc()
        return True

    async def recover_stuck_applying(self) -> int:
        """Requests left `applying` longer than applying_timeout_s after their final approval (the process
        crashed, or the applier hung) end `apply_unknown`: audited, counted, logged. They are never
        re-applied automatically: whether the change took effect must be checked by an operator."""
        now = self.clock()
        limit = timedelta(seconds=self.cfg.applying_timeout_s)
        n = 0
        for r in await self.store.list_requests(RequestStatus.APPLYING.value, limit=10_000):
            since = r.decided_at or r.created_at
            if now - since < limit:
                continue
            reason = (
                f"still applying {int((now - since).total_seconds())} s after the final approval "
                f"(applying_timeout_s {self.cfg.applying_timeout_s:g}); the outcome is unknown: check "
                f"{r.kind.value}:{r.object_id} by hand; it is never re-applied automatically"
            )
            if await self._end(r, RequestStatus.APPLY_UNKNOWN, "system", reason, outcome="failed"):
                self.metrics.apply_unknown.labels(r.kind.value).inc()
                log.error("governance request stuck in applying", extra={"request": r.id, "reason": reason})
                n += 1
        return n

    async def expire_due(self) -> int:
        """Terminate every pending request past its expiry; returns how many."""
        now = self.clock()
        n = 0
        for r in await self.store.list_requests(RequestStatus.PENDING.value, limit=10_000):
            if r.expires_at <= now:
                await self._end(r, RequestStatus.EXPIRED, "system", f"not decided by {_ts(r.expires_at)}")
                n += 1
        return n

    # ------------------------------------------------------------------ audit

    async def audit_entries(self, actor: Actor, after_seq: int = 0, limit: int = 100) -> list[AuditEntry]:
        await self.require_role(actor, {Role.AUDITOR, Role.SECURITY_ADMIN}, "audit.read", "audit")
        return [
            audit.decode_entry(row.doc, row.hash) for row in await self.store.audit_rows(after_seq, limit)
        ]

    async def verify(self, actor: Actor | None = None) -> audit.VerifyResult:
        if actor is not None:
            await self.require_role(actor, {Role.AUDITOR, Role.SECURITY_ADMIN}, "audit.verify", "audit")
        return audit.verify_chain(await self.store.audit_rows(), await self.store.heads(), self._signing_key)

    async def sign_head(self) -> SignedHead | None:
        return await self.store.record_head(self._signing_key, self.clock())

    # ------------------------------------------------------------------ background

    async def run_sweeper(self) -> None:
        """Terminate hanging requests and record signed heads, forever (cancel to stop)."""
        since_head = 0.0
        while True:
            try:
                await self.expire_due()
                await self.recover_stuck_applying()
                await self.refresh_merchants()
                since_head += self.cfg.sweep_interval_s
                if since_head >= self.cfg.head_interval_s:
                    since_head = 0.0
                    await self.sign_head()
            except (StoreUnavailable, OSError, RuntimeError) as e:
                # the next round retries; requests also expire on every read, so nothing hangs meanwhile
                log.warning("governance sweep failed", extra={"error": f"{type(e).__name__}: {e}"})
            await self._sleep(self.cfg.sweep_interval_s)
