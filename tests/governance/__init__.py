"""Shared helpers for the governance tests: an injected clock, stub appliers, a bootstrapped world."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pyotp
import pytest

from router.governance.appliers import Appliers, ConfigSnapshot, RefundTarget
from router.governance.model import GovernanceConfig, Role
from router.governance.service import Actor, GovernanceService
from router.governance.store import GovernanceStore, PostgresGovernanceStore, SqliteGovernanceStore

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
# the TOTP encryption key the governance tests run with (64 hex characters = 32 bytes)
TOTP_KEY = "5f" * 32

CONFIG_V1 = """\
channels:
  - name: alpha
    adapter: sandbox
    base_url: http://127.0.0.1:9001
    weight: 100
  - name: beta
    adapter: sandbox
    base_url: http://127.0.0.1:9002
    weight: 50
"""


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


@dataclass
class StubAppliers:
    """Stand-ins for the app's appliers that count calls."""

    config_text: str = CONFIG_V1
    config_calls: list[str] = field(default_factory=list)
    refund_calls: list[tuple[str, str, int, str | None]] = field(default_factory=list)
    payment_version: int = 3
    fail_config: bool = False

    @property
    def config_version(self) -> str:
        return hashlib.sha256(self.config_text.encode()).hexdigest()[:12]

    async def current_config(self) -> ConfigSnapshot:
        return ConfigSnapshot(self.config_text, self.config_version)

    async def apply_config(self, text: str) -> str:
        self.config_calls.append(text)
        if self.fail_config:
            from router.errors import ConfigError

            raise ConfigError([("$.channels[0].weight", "must not be negative")])
        self.config_text = text
        return self.config_version

    async def apply_refund(
        self, merchant: str, payment: str, amount: int, reason: str | None
    ) -> dict[str, Any]:
        self.refund_calls.append((merchant, payment, amount, reason))
        self.payment_version += 1
        return {"id": payment, "status": "partially_refunded", "version": self.payment_version}

    async def refund_target(self, merchant: str, payment: str) -> RefundTarget | None:
        if payment == "missing":
            return None
        return RefundTarget(version=self.payment_version, currency="USD", refundable=1_000_000)

    def appliers(self) -> Appliers:
        return Appliers(
            apply_config=self.apply_config,
            current_config=self.current_config,
            apply_refund=self.apply_refund,
            refund_target=self.refund_target,
        )


def make_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> GovernanceStore:
    if backend == "sqlite":
        return SqliteGovernanceStore(tmp_path / "governance.db")
    dsn: str = request.getfixturevalue("fresh_postgres_dsn")
    return PostgresGovernanceStore(dsn)


@dataclass
class World:
    svc: GovernanceService
    clock: Clock
    stub: StubAppliers
    actors: dict[str, Actor]
    tokens: dict[str, str]
    secrets: dict[str, str]

    def code(self, name: str, offset: int = 0) -> str:
        return pyotp.TOTP(self.secrets[name]).at(self.clock(), counter_offset=offset)

    def id(self, name: str) -> str:
        return self.actors[name].id


DEFAULT_ROLES: dict[str, list[Role]] = {
    "sec": [Role.SECURITY_ADMIN],
    "op": [Role.OPERATOR],
    "rev1": [Role.REVIEWER],
    "rev2": [Role.REVIEWER],
    "rev3": [Role.REVIEWER],
    "aud": [Role.AUDITOR],
}


async def build_world(
    store: GovernanceStore,
    cfg: GovernanceConfig | None = None,
    roles: dict[str, list[Role]] | None = None,
    clock: Clock | None = None,
    *,
    encrypt: bool = True,
) -> World:
    """Bootstrapped admins with confirmed TOTP. Secrets are encrypted under TOTP_KEY unless `cfg` names
    another key or `encrypt` is False."""
    clock = clock or Clock()
    stub = StubAppliers()
    cfg = cfg or GovernanceConfig(enabled=True)
    if encrypt and cfg.totp_encryption_key is None:
        cfg = msgspec.structs.replace(cfg, totp_encryption_key=TOTP_KEY)
    svc = GovernanceService(store, cfg, stub.appliers(), clock=clock)
    spec = roles or DEFAULT_ROLES
    created = await svc.bootstrap([(name, r) for name, r in spec.items()])
    actors = {a.name: Actor(a, "127.0.0.1") for a, _ in created}
    tokens = {a.name: t for a, t in created}
    secrets: dict[str, str] = {}
    for name, actor in actors.items():
        secret, _ = await svc.enrol_totp(actor)
        # confirm with the previous step's code, so the current step stays free for the first approval
        await svc.confirm_totp(actor, pyotp.TOTP(secret).at(clock(), counter_offset=-1))
        secrets[name] = secret
        actors[name] = Actor(await store.get_admin(actor.id) or actor.admin, "127.0.0.1")
    return World(svc, clock, stub, actors, tokens, secrets)
