"""Governance values: admins, roles, grants, change requests, reviews, audit entries, and the config.

All frozen msgspec Structs; times are aware UTC datetimes. A `ChangeRequest` is the unit of
maker-checker: it names one governed object (`kind`, `object_id`), the object's version when it was
proposed (`base_version`), the proposed `payload` and a readable `diff`. Its `version` is the
optimistic-concurrency counter of the request row itself: every transition is a compare-and-set on it,
which is what makes concurrent approvals apply exactly once.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import msgspec

from router.governance.totp_crypto import parse_key


class Role(enum.StrEnum):
    OPERATOR = "operator"  # maker: proposes changes
    REVIEWER = "reviewer"  # checker: approves or rejects them
    AUDITOR = "auditor"  # read-only: requests and the audit log
    SECURITY_ADMIN = "security_admin"  # manages admins; proposes grants (a maker too)


MAKER_ROLES = frozenset({Role.OPERATOR, Role.SECURITY_ADMIN})
CHECKER_ROLES = frozenset({Role.REVIEWER})


class Kind(enum.StrEnum):
    CONFIG = "config"  # routing and channel config (the whole YAML file, hot-swapped)
    MERCHANT = "merchant"  # onboarding, limits, suspension
    GRANT = "grant"  # grant, renew or revoke a role
    REFUND = "refund"  # a refund at or above the merchant/currency threshold
    WEBHOOK_REDRIVE = "webhook_redrive"
    SECRET_ROTATION = "secret_rotation"
    AUTO_APPROVAL_POLICY = "auto_approval_policy"


class RequestStatus(enum.StrEnum):
    PENDING = "pending"  # collecting reviews
    APPLYING = "applying"  # the final approval won; the applier is running (exactly one caller gets here)
    APPLIED = "applied"
    FAILED = "failed"  # approved, but the applier refused (e.g. the new config did not load)
    REJECTED = "rejected"
    WITHDRAWN = "withdrawn"  # the maker took it back
    EXPIRED = "expired"
    STALE = "stale"  # the object changed under it; it can never apply
    # left `applying` past applying_timeout_s (a crash?): never re-applied; an operator must check
    APPLY_UNKNOWN = "apply_unknown"


OPEN_STATUSES = frozenset({RequestStatus.PENDING, RequestStatus.APPLYING})


class Admin(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    token_sha256: str  # the API token itself is shown once and never stored
    created_at: datetime
    created_by: str | None = None
    # set at enrolment: "v1:" + base64(nonce | AES-256-GCM ciphertext), associated data = `id`
    # (see totp_crypto); a plain base32 value only when no totp_encryption_key is configured (legacy)
    totp_secret: str | None = None
    totp_confirmed: bool = False  # an approval needs a confirmed TOTP
    disabled: bool = False


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    admin_id: str
    role: Role
    granted_at: datetime
    expires_at: datetime
    request_id: str | None  # the change request that granted it (None: bootstrap)
    revoked_at: datetime | None = None

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and self.granted_at <= now < self.expires_at


class Review(msgspec.Struct, frozen=True, kw_only=True):
    reviewer: str
    stage: str  # initial | intermediate | final
    decision: str  # approve | reject
    at: datetime
    comment: str | None = None


class ChangeRequest(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    kind: Kind
    object_id: str
    base_version: str  # the object's version when proposed; an approval against another is refused
    payload: dict[str, Any]
    diff: str
    maker: str
    status: RequestStatus
    created_at: datetime
    expires_at: datetime
    version: int = 1  # the request row's own optimistic-concurrency counter
    quorum: int = 2
    reviews: tuple[Review, ...] = ()
    auto_approved: bool = False
    decided_at: datetime | None = None
    result: dict[str, Any] | None = None  # what the applier returned, or the error
    reason: str | None = None  # why it ended (rejection reason, expiry, stale)

    @property
    def approvals(self) -> tuple[Review, ...]:
        return tuple(r for r in self.reviews if r.decision == "approve")


class AuditDraft(msgspec.Struct, frozen=True, kw_only=True):
    """An audit entry before it is chained (the store assigns seq, prev_hash and hash in the same
    transaction as the change it describes)."""

    at: datetime
    actor: str  # admin id, or "system"
    action: str
    object: str  # kind:object_id, or admin:..., request:...
    outcome: str  # ok | refused | failed
    source: str | None = None  # where from: the client address
    request_id: str | None = None
    before_hash: str | None = None
    after_hash: str | None = None
    detail: dict[str, Any] = msgspec.field(default_factory=dict)


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    at: datetime
    actor: str
    action: str
    object: str
    outcome: str
    source: str | None
    request_id: str | None
    before_hash: str | None
    after_hash: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str


class SignedHead(msgspec.Struct, frozen=True, kw_only=True):
    """An external anchor: HMAC-SHA256(key, "seq:hash:at") over the chain head at one moment."""

    seq: int
    hash: str
    at: datetime
    signature: str


class MerchantState(msgspec.Struct, frozen=True, kw_only=True):
    """A governed merchant record. The router enforces `status` and `limits` (see the report)."""

    id: str
    name: str | None = None
    status: str = "active"  # active | suspended
    max_amount: int | None = None  # per payment, minor units
    currencies: list[str] | None = None  # None: any
    suspended_reason: str | None = None


# ------------------------------------------------------------------ config


class AutoApprovalPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which low-risk changes apply without review. Changing it is itself a governed change that is
    never auto-approved."""

    weight_decrease_max_pct: float = 0.0  # a config change that only lowers channel weights by at most this
    refunds_below_threshold: bool = False  # a proposed refund under the threshold applies at once


class RefundThresholds(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Refunds at or above these amounts (minor units) need approval. `merchants` overrides `default`."""

    default: dict[str, int] = msgspec.field(default_factory=dict)  # currency -> amount
    merchants: dict[str, dict[str, int]] = msgspec.field(
        default_factory=dict
    )  # merchant -> currency -> amount
    other_currencies: int | None = None  # a currency listed nowhere: this, or None = always needs approval


class GovernanceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = False
    quorum: int = 2  # approvals needed: the first is the initial review, the last the final one
    request_ttl_s: float = 24 * 3600.0  # a request not decided by then is terminated
    grant_ttl_days: float = 90.0  # role grants lapse; renewing is a governed change
    exclusive_roles: bool = True  # an admin holding a maker role cannot hold a checker role
    sweep_interval_s: float = 60.0  # how often hanging requests are terminated (reads do it too)
    # a request still `applying` this long after its final approval (the applier crashed or hung) is
    # moved to `apply_unknown` on start and by the sweeper: audited, counted, never re-applied
    applying_timeout_s: float = 600.0
    totp_window: int = 1  # accept codes this many 30 s steps either side
    refund_thresholds: RefundThresholds = RefundThresholds()
    auto_approval: AutoApprovalPolicy = AutoApprovalPolicy()  # the initial policy; later changes are governed
    # AES-256-GCM key for TOTP secrets at rest: 32 bytes as 64 hex chars or base64 (use ${ENV}).
    # None: secrets are stored in plain text (a warning at start); see config_problems
    totp_encryption_key: str | None = None
    audit_signing_key: str | None = None  # HMAC key for signed heads (use ${ENV}); None: heads unsigned
    head_interval_s: float = 3600.0  # how often a signed head is recorded
    sqlite_path: str | None = None  # embedded mode: default is <storage.sqlite_path>.governance.db
    postgres_dsn: str | None = None  # scale-out mode: default is storage.postgres_dsn


def config_problems(cfg: GovernanceConfig) -> list[tuple[str, str]]:
    """Checks msgspec types cannot express, as (path, message) like `router.config.check`."""
    problems: list[tuple[str, str]] = []
    p = "$.governance"
    if cfg.quorum < 2:
        problems.append((f"{p}.quorum", "must be at least 2 (initial and final review)"))
    if cfg.request_ttl_s <= 0:
        problems.append((f"{p}.request_ttl_s", "must be positive"))
    if cfg.grant_ttl_days <= 0:
        problems.append((f"{p}.grant_ttl_days", "must be positive"))
    if cfg.sweep_interval_s <= 0 or cfg.head_interval_s <= 0:
        problems.append((p, "sweep_interval_s and head_interval_s must be positive"))
    if cfg.applying_timeout_s <= 0:
        problems.append((f"{p}.applying_timeout_s", "must be positive"))
    if cfg.enabled and cfg.totp_encryption_key is None:
        problems.append((f"{p}.totp_encryption_key",
                         "governance.totp_encryption_key is required (TOTP secrets are encrypted at rest)"))
    if cfg.totp_encryption_key is not None:
        try:
            parse_key(cfg.totp_encryption_key)
        except ValueError as e:
            problems.append((f"{p}.totp_encryption_key", str(e)))
    if not 0 <= cfg.totp_window <= 2:
        problems.append((f"{p}.totp_window", "must be 0, 1 or 2"))
    if not 0 <= cfg.auto_approval.weight_decrease_max_pct <= 100:
        problems.append((f"{p}.auto_approval.weight_decrease_max_pct", "must be between 0 and 100"))
    for cur, amount in cfg.refund_thresholds.default.items():
        if amount <= 0:
            problems.append((f"{p}.refund_thresholds.default.{cur}", "must be positive"))
    for mid, per in cfg.refund_thresholds.merchants.items():
        for cur, amount in per.items():
            if amount <= 0:
                problems.append((f"{p}.refund_thresholds.merchants.{mid}.{cur}", "must be positive"))
    return problems
