"""Config: YAML in, typed and validated structs out, or a `ConfigError` listing every bad path.

Loading is pure: `load_config(text)` interpolates `${VAR}` / `${VAR:-default}` from the environment
(secrets never live in the file), decodes into msgspec Structs (type errors carry their JSON path),
then checks cross-references (routing names known channels, unique names, known adapters and
policies). A config that fails any check is rejected whole; the caller keeps the previous one.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import yaml

from policies.success_rate import StatsConfig
from router.errors import ConfigError
from router.governance.model import GovernanceConfig
from router.governance.model import config_problems as governance_problems
from router.money.settlement import MoneyConfig
from router.webhooks import WebhooksSettings, check_webhooks_settings

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Timeouts(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    connect_ms: int = 1000
    total_ms: int = 8000


class BreakerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    fail_max: int = 5  # consecutive channel-caused failures that open the breaker
    reset_timeout_s: float = 30.0  # how long it stays open before one half-open probe


class RetrySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    attempts: int = 3  # tries per channel for ChannelUnavailable (nothing was sent), including the first
    base_ms: int = 25
    max_ms: int = 400


class ChannelConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    adapter: str
    base_url: str
    credentials: dict[str, str] = msgspec.field(default_factory=dict)
    currencies: list[str] | None = None  # None: whatever the adapter supports
    countries: list[str] | None = None
    methods: list[str] = msgspec.field(default_factory=lambda: ["card"])
    priority: int = 100  # lower goes first in the priority ranker
    weight: int = 1
    timeouts: Timeouts = Timeouts()
    breaker: BreakerSettings = BreakerSettings()
    retry: RetrySettings = RetrySettings()
    max_connections: int = 100
    fees: dict[str, Any] | None = None  # fee schedule per currency (see policies/cost.py), used by the cost ranker
    tls_verify: bool = True  # may be false only for a loopback base_url (a local fake in tests)


# One step of a chain: `{policy: NAME, ...params}`. The params are typed and checked by the policy's
# own Params struct (policies/registry.py); here a step is kept as the mapping the YAML gave.
PolicyStep = dict[str, Any]
# Checks one step's params: (params, known channel names) -> [(path relative to the step, message)].
PolicyValidator = Callable[[Mapping[str, Any], frozenset[str]], list[tuple[str, str]]]


class RoutingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    default: list[PolicyStep] = msgspec.field(
        default_factory=lambda: [
            {"policy": "currency"},
            {"policy": "country"},
            {"policy": "method"},
            {"policy": "breaker"},
            {"policy": "priority"},
        ]
    )
    merchants: dict[str, list[PolicyStep]] = msgspec.field(default_factory=dict)
    # how success_rate/cost learn (half-lives, change and outage detection, staleness); see
    # docs/adaptive-routing.md. Shared by every chain; a reload applies it to what was learned so far.
    stats: StatsConfig = msgspec.field(default_factory=StatsConfig)
    # embedded mode: seconds between saves of the learned statistics beside the database (also saved at
    # shutdown and loaded at start, so a restart does not route blind); 0: never saved
    stats_save_s: float = 60.0


class ApiKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Either `sha256` (hex digest of the key, as stored) or `key` (plaintext, e.g. `${ENV}`; hashed on load)."""

    sha256: str | None = None
    key: str | None = None


class WebhookConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: str
    secret: str


class MerchantConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    name: str | None = None
    api_keys: list[ApiKey] = msgspec.field(default_factory=list)
    webhooks: list[WebhookConfig] = msgspec.field(default_factory=list)


class BlockRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    countries: list[str]
    reason: str = "sanctioned region"


class Licence(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    countries: list[str] | None = None  # None: not restricted
    currencies: list[str] | None = None


class ComplianceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    blocked: list[BlockRule] = msgspec.field(default_factory=list)
    licences: dict[str, Licence] = msgspec.field(default_factory=dict)  # channel name -> where it may operate


class StorageConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    mode: str = "embedded"  # embedded | scaleout
    sqlite_path: str = "payroute.db"
    synchronous: str = "FULL"
    redis_url: str | None = None
    postgres_dsn: str | None = None


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 64 * 1024
    max_amount: int = 100_000_000  # minor units, per payment
    payment_deadline_ms: int = 20_000  # the whole attempt plan must finish within this
    shutdown_grace_s: float = 15.0
    log_level: str = "INFO"
    access_log: bool = False
    public_url: str | None = None  # how channels reach us: callbacks go to {public_url}/callbacks/{channel}


class SecurityConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Key for the PAN fingerprint (HMAC-SHA256). Rotate only with a fingerprint migration.
    fingerprint_key: str = "payroute-demo-fingerprint-key"


class SandboxSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    port: int
    api_key: str | None = None
    script: dict[str, Any] = msgspec.field(default_factory=dict)


class JanitorSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True
    interval_s: float = 5.0
    min_age_s: float = 60.0  # must exceed server.payment_deadline_ms: live payments are never touched
    max_age_s: float = 24 * 3600.0
    action_expiry_s: float = 2 * 3600.0
    backoff_max_s: float = 600.0
    page: int = 200


class DuplicatesConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    idempotency_ttl_s: float = 24 * 3600.0  # Idempotency-Key records are kept at least this long, then reaped
    allow_retry_after_failure: bool = False  # a new payment for an order whose payment was declined/failed
    fingerprint_mode: str = "flag"  # off | flag | block: same customer + amount + currency within the window
    fingerprint_window_s: float = 120.0
    order_lock_ttl_ms: int = 30_000  # per-order lock (an optimization; the unique order id is the truth)


class AdminConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Bearer tokens for /admin/v1 (governance with roles and two-person approval comes later).
    tokens: list[ApiKey] = msgspec.field(default_factory=list)


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    version: str = "1"
    admin: AdminConfig = AdminConfig()
    janitor: JanitorSettings = JanitorSettings()
    duplicates: DuplicatesConfig = DuplicatesConfig()
    webhooks: WebhooksSettings = WebhooksSettings()
    governance: GovernanceConfig = GovernanceConfig()
    money: MoneyConfig = MoneyConfig()
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    security: SecurityConfig = SecurityConfig()
    channels: list[ChannelConfig] = msgspec.field(default_factory=list)
    routing: RoutingConfig = RoutingConfig()
    merchants: list[MerchantConfig] = msgspec.field(default_factory=list)
    compliance: ComplianceConfig = ComplianceConfig()
    sandbox: list[SandboxSpec] = msgspec.field(default_factory=list)  # sandbox channels to run in-process

    @property
    def digest(self) -> str:
        """A short content hash: the config version each payment records."""
        return hashlib.sha256(msgspec.json.encode(self)).hexdigest()[:12]

    def channel(self, name: str) -> ChannelConfig:
        for ch in self.channels:
            if ch.name == name:
                return ch
        raise KeyError(name)


def interpolate(text: str, env: Mapping[str, str]) -> tuple[str, list[tuple[str, str]]]:
    missing: list[tuple[str, str]] = []

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        missing.append((f"${{{name}}}", "environment variable is not set"))
        return ""

    return _ENV.sub(sub, text), missing


def _msgspec_path(err: msgspec.ValidationError) -> tuple[str, str]:
    msg = str(err)
    if " - at `" in msg:
        text, _, path = msg.rpartition(" - at `")
        return path.rstrip("`"), text
    return "$", msg


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_config(
    text: str,
    *,
    env: Mapping[str, str] | None = None,
    known_adapters: frozenset[str] = frozenset(),
    known_policies: Mapping[str, PolicyValidator] | None = None,
) -> Config:
    """Parse, interpolate, decode and cross-check. Raises ConfigError with every problem found.

    `${VAR}` is substituted inside string values after parsing: comments are left alone, and a value
    stays a string whatever the variable holds (an all-digit app id does not become a number)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([("$", f"not valid YAML: {e}")]) from None
    if raw is None:
        raw = {}
    missing: list[tuple[str, str]] = []
    environ = os.environ if env is None else env

    def subst(node: Any, path: str) -> Any:
        if isinstance(node, str):
            value, miss = interpolate(node, environ)
            missing.extend((f"{path} ({name})", msg) for name, msg in miss)
            return value
        if isinstance(node, dict):
            return {k: subst(v, f"{path}.{k}") for k, v in node.items()}
        if isinstance(node, list):
            return [subst(v, f"{path}[{i}]") for i, v in enumerate(node)]
        return node

    raw = subst(raw, "$")
    if missing:
        raise ConfigError(missing)
    try:
        cfg = msgspec.convert(raw, Config, str_keys=True)
    except msgspec.ValidationError as e:
        raise ConfigError([_msgspec_path(e)]) from None
    problems = check(cfg, known_adapters=known_adapters, known_policies=known_policies)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config_file(path: str | Path, **kw: Any) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([("$", f"cannot read {path}: {e.strerror}")]) from None
    return load_config(text, **kw)


def check(
    cfg: Config, *, known_adapters: frozenset[str], known_policies: Mapping[str, PolicyValidator] | None
) -> list[tuple[str, str]]:
    """Semantic checks msgspec's types cannot express."""
    from router.validation import currency_exponent  # local: validation imports pycountry/babel

    problems: list[tuple[str, str]] = []
    add = problems.append
    if cfg.storage.mode not in ("embedded", "scaleout"):
        add(("$.storage.mode", "must be 'embedded' or 'scaleout'"))
    if cfg.storage.mode == "scaleout" and not (cfg.storage.redis_url and cfg.storage.postgres_dsn):
        add(("$.storage", "scaleout needs redis_url and postgres_dsn"))
    if cfg.storage.synchronous not in ("FULL", "NORMAL", "EXTRA"):
        add(("$.storage.synchronous", "must be FULL, EXTRA or NORMAL"))
    if not 0 < cfg.server.max_amount:
        add(("$.server.max_amount", "must be positive"))
    if cfg.server.payment_deadline_ms <= 0:
        add(("$.server.payment_deadline_ms", "must be positive"))
    problems += check_webhooks_settings(cfg.webhooks)
    problems += governance_problems(cfg.governance)
    if cfg.duplicates.fingerprint_mode not in ("off", "flag", "block"):
        add(("$.duplicates.fingerprint_mode", "must be off, flag or block"))
    if cfg.duplicates.idempotency_ttl_s < 3600:
        add(("$.duplicates.idempotency_ttl_s", "keep idempotency records at least an hour (24 h recommended)"))
    if cfg.duplicates.order_lock_ttl_ms <= 0 or cfg.duplicates.fingerprint_window_s <= 0:
        add(("$.duplicates", "window and lock TTL must be positive"))
    if cfg.routing.stats_save_s < 0:
        add(("$.routing.stats_save_s", "must be 0 (never) or a positive number of seconds"))
    if cfg.janitor.min_age_s * 1000 <= cfg.server.payment_deadline_ms:
        add(("$.janitor.min_age_s", "must exceed server.payment_deadline_ms, or the janitor could race live payments"))
    names: set[str] = set()
    for i, ch in enumerate(cfg.channels):
        p = f"$.channels[{i}]"
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,39}", ch.name):
            add((f"{p}.name", "must match [a-z0-9][a-z0-9_-]{0,39}"))
        if ch.name in names:
            add((f"{p}.name", f"duplicate channel name {ch.name!r}"))
        names.add(ch.name)
        if known_adapters and ch.adapter not in known_adapters:
            add((f"{p}.adapter", f"unknown adapter {ch.adapter!r}; known: {', '.join(sorted(known_adapters))}"))
        if not re.match(r"^https?://[^/\s]+", ch.base_url):
            add((f"{p}.base_url", "must be an http(s) URL"))
        for j, cur in enumerate(ch.currencies or []):
            if currency_exponent(cur) is None:
                add((f"{p}.currencies[{j}]", f"{cur!r} is not an ISO 4217 currency"))
        for j, cc in enumerate(ch.countries or []):
            if not _is_country(cc):
                add((f"{p}.countries[{j}]", f"{cc!r} is not an ISO 3166-1 alpha-2 country"))
        if not ch.tls_verify and urlsplit(ch.base_url).hostname not in ("127.0.0.1", "localhost", "::1"):
            add((f"{p}.tls_verify", "certificate verification may be turned off only for a loopback base_url"))
        if ch.timeouts.connect_ms <= 0 or ch.timeouts.total_ms <= 0:
            add((f"{p}.timeouts", "timeouts must be positive"))
        if ch.timeouts.connect_ms > ch.timeouts.total_ms:
            add((f"{p}.timeouts.connect_ms", "must not exceed total_ms"))
        if ch.breaker.fail_max < 1:
            add((f"{p}.breaker.fail_max", "must be at least 1"))
        if ch.breaker.reset_timeout_s <= 0:
            add((f"{p}.breaker.reset_timeout_s", "must be positive"))
        if not 1 <= ch.retry.attempts <= 10:
            add((f"{p}.retry.attempts", "must be between 1 and 10"))
        if ch.weight < 0:
            add((f"{p}.weight", "must not be negative"))

    def check_chain(path: str, chain: list[PolicyStep]) -> None:
        if not chain:
            add((path, "a chain needs at least one policy"))
        for k, step in enumerate(chain):
            sp = f"{path}[{k}]"
            name = step.get("policy")
            if not isinstance(name, str):
                add((f"{sp}.policy", "each step needs `policy: NAME`"))
                continue
            if known_policies is None:
                continue
            validator = known_policies.get(name)
            if validator is None:
                add((f"{sp}.policy", f"unknown policy {name!r}; known: {', '.join(sorted(known_policies))}"))
                continue
            params = {key: v for key, v in step.items() if key != "policy"}
            for rel, msg in validator(params, frozenset(names)):
                add((f"{sp}{rel}" if rel.startswith(("[", ".")) else f"{sp}.{rel}", msg))

    check_chain("$.routing.default", cfg.routing.default)
    merchant_ids = {m.id for m in cfg.merchants}
    for mid, chain in cfg.routing.merchants.items():
        if mid not in merchant_ids:
            add((f"$.routing.merchants.{mid}", f"unknown merchant {mid!r}"))
        check_chain(f"$.routing.merchants.{mid}", chain)
    seen_m: set[str] = set()
    seen_keys: set[str] = set()
    for i, m in enumerate(cfg.merchants):
        p = f"$.merchants[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", m.id):
            add((f"{p}.id", "must be 1-64 of [A-Za-z0-9_-]"))
        if m.id in seen_m:
            add((f"{p}.id", f"duplicate merchant id {m.id!r}"))
        seen_m.add(m.id)
        if not m.api_keys:
            add((f"{p}.api_keys", "at least one API key is needed"))
        for k, key in enumerate(m.api_keys):
            kp = f"{p}.api_keys[{k}]"
            if (key.sha256 is None) == (key.key is None):
                add((kp, "give exactly one of sha256 or key"))
                continue
            if key.key is not None and len(key.key) < 16:
                add((f"{kp}.key", "API keys must be at least 16 characters"))
            if key.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", key.sha256):
                add((f"{kp}.sha256", "must be a lowercase hex SHA-256 digest"))
            digest = key.sha256 or hash_api_key(key.key or "")
            if digest in seen_keys:
                add((kp, "the same API key is configured twice"))
            seen_keys.add(digest)
        for k, hook in enumerate(m.webhooks):
            if not hook.url.startswith(("http://", "https://")):
                add((f"{p}.webhooks[{k}].url", "must be an http(s) URL"))
    for ch_name, lic in cfg.compliance.licences.items():
        if ch_name not in names:
            add((f"$.compliance.licences.{ch_name}", f"unknown channel {ch_name!r}"))
        for j, cc in enumerate(lic.countries or []):
            if not _is_country(cc):
                add((f"$.compliance.licences.{ch_name}.countries[{j}]", f"{cc!r} is not an ISO 3166-1 alpha-2 country"))
        for j, cur in enumerate(lic.currencies or []):
            if currency_exponent(cur) is None:
                add((f"$.compliance.licences.{ch_name}.currencies[{j}]", f"{cur!r} is not an ISO 4217 currency"))
    for i, rule in enumerate(cfg.compliance.blocked):
        for j, cc in enumerate(rule.countries):
            if not _is_country(cc):
                add((f"$.compliance.blocked[{i}].countries[{j}]", f"{cc!r} is not an ISO 3166-1 alpha-2 country"))
    return problems


def _is_country(code: str) -> bool:
    import pycountry

    return len(code) == 2 and code.isupper() and pycountry.countries.get(alpha_2=code) is not None


def api_key_index(cfg: Config) -> dict[str, str]:
    """sha256(key) -> merchant id. Plaintext keys from config are hashed here and not kept."""
    index: dict[str, str] = {}
    for m in cfg.merchants:
        for key in m.api_keys:
            index[key.sha256 or hash_api_key(key.key or "")] = m.id
    return index


def admin_token_index(cfg: Config) -> frozenset[str]:
    return frozenset(t.sha256 or hash_api_key(t.key or "") for t in cfg.admin.tokens)


RESTART_ONLY = ("storage", "server.host", "server.port", "security")


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """Settings a running process cannot swap (they need a restart)."""
    changed = []
    if old.storage != new.storage:
        changed.append("storage")
    if (old.server.host, old.server.port) != (new.server.host, new.server.port):
        changed.append("server.host/port")
    if old.security != new.security:
        changed.append("security")
    if old.sandbox != new.sandbox:
        changed.append("sandbox")
    if old.governance != new.governance:
        changed.append("governance")
    return changed
