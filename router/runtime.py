"""One loaded config made live: channels (adapter, transport, breaker, retry budget), policy chains,
API-key index and compliance rules. The pipeline reads a `Runtime` snapshot per payment, so a
future config swap never changes a payment midway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec

from adapters import registry as adapter_registry
from policies import registry as policy_registry
from policies.base import Chain, PolicyEnv
from policies.success_rate import SuccessStats, dimensions_read
from router.breaker import STATE_VALUE, ChannelBreaker
from router.config import (
    BlockRule,
    ChannelConfig,
    Config,
    PolicyStep,
    admin_token_index,
    api_key_index,
    load_config_file,
)
from router.errors import ConfigError
from router.model import Candidate, Capabilities, ChannelAdapter
from router.money.pricing import PricingBook
from router.money.settlement import pricing_book
from router.transport import ChannelTransport, RetryBudget

KNOWN_ADAPTERS = frozenset(adapter_registry.ADAPTERS)
KNOWN_POLICIES = policy_registry.VALIDATORS


class ChannelRuntime:
    def __init__(
        self,
        cfg: ChannelConfig,
        on_breaker_change: Callable[[str, str], None] | None,
        licences: tuple[frozenset[str] | None, frozenset[str] | None] = (None, None),
    ) -> None:
        self.config = cfg
        self.name = cfg.name
        caps = Capabilities(
            currencies=frozenset(cfg.currencies) if cfg.currencies is not None else None,
            countries=frozenset(cfg.countries) if cfg.countries is not None else None,
            methods=frozenset(cfg.methods),
        )
        self.adapter: ChannelAdapter = adapter_registry.create(cfg.adapter, cfg.credentials, caps)
        self.transport = ChannelTransport(cfg, verify_tls=cfg.tls_verify)
        self.breaker = ChannelBreaker(cfg.name, cfg.breaker, on_breaker_change)
        self.budget = RetryBudget()
        self.licences = licences
        self._static = Candidate(
            name=cfg.name, adapter=cfg.adapter, capabilities=self.adapter.capabilities(), priority=cfg.priority,
            weight=cfg.weight, fees=cfg.fees, licensed_countries=licences[0], licensed_currencies=licences[1],
        )
        self._open = msgspec.structs.replace(self._static, breaker_open=True)

    def candidate(self) -> Candidate:
        return self._static if self.breaker.admits() else self._open


def _params(step: PolicyStep) -> dict[str, object]:
    return {k: v for k, v in step.items() if k != "policy"}


def _chain(name: str, steps: list[PolicyStep], env: PolicyEnv) -> Chain:
    return Chain(name, [policy_registry.build(s["policy"], _params(s), env) for s in steps])


def policy_checks(cfg: Config) -> list[tuple[str, str]]:
    """Config problems only the policies can see (fee schedules); they reject the config."""
    problems = []
    for i, ch in enumerate(cfg.channels):
        problems += [(f"$.channels[{i}].fees{p}", m) for p, m in policy_registry.fee_problems(ch.fees)]
    return problems


def config_warnings(cfg: Config) -> list[tuple[str, str]]:
    """Advice that does not reject a config: unreachable and conflicting routing rules."""
    chains = [("$.routing.default", cfg.routing.default)]
    chains += [(f"$.routing.merchants.{m}", steps) for m, steps in cfg.routing.merchants.items()]
    out = []
    for path, steps in chains:
        for k, step in enumerate(steps):
            out += [(f"{path}[{k}]{p}", m) for p, m in policy_registry.warnings(step["policy"], _params(step))]
    return out


def load(path: str | Path) -> Config:
    """Load and fully check a config file (types, references, policy params, fee schedules)."""
    cfg = load_config_file(path, known_adapters=KNOWN_ADAPTERS, known_policies=KNOWN_POLICIES)
    problems = policy_checks(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _licences(cfg: Config, channel: str) -> tuple[frozenset[str] | None, frozenset[str] | None]:
    lic = cfg.compliance.licences.get(channel)
    if lic is None:
        return None, None
    return (
        frozenset(lic.countries) if lic.countries is not None else None,
        frozenset(lic.currencies) if lic.currencies is not None else None,
    )


class Runtime:
    def __init__(
        self,
        cfg: Config,
        on_breaker_change: Callable[[str, str], None] | None = None,
        previous: Runtime | None = None,
        env: PolicyEnv | None = None,
    ) -> None:
        self.config = cfg
        self.env: PolicyEnv = env or (previous.env if previous else PolicyEnv(
            state={"success_stats": SuccessStats(cfg.routing.stats), "monthly_volume": {}}))
        stats = self.env.state.get("success_stats")
        if isinstance(stats, SuccessStats) and stats.config != cfg.routing.stats:
            stats.reconfigure(cfg.routing.stats)
        self.version = cfg.digest
        self.channels: dict[str, ChannelRuntime] = {}
        for c in cfg.channels:
            old = previous.channels.get(c.name) if previous else None
            licences = _licences(cfg, c.name)
            if old is not None and old.config == c and old.licences == licences:
                self.channels[c.name] = old  # unchanged: keep its breaker state and connection pool
            else:
                self.channels[c.name] = ChannelRuntime(c, on_breaker_change, licences)
        self.default_chain = _chain("default", cfg.routing.default, self.env)
        self.merchant_chains = {m: _chain(f"merchant:{m}", steps, self.env) for m, steps in cfg.routing.merchants.items()}
        if isinstance(stats, SuccessStats):  # learn outcomes only under the keys some chain reads
            stats.dimensions = dimensions_read(
                step for chain in (self.default_chain, *self.merchant_chains.values()) for step in chain.steps)
        self.api_keys: Mapping[str, str] = api_key_index(cfg)
        self.admin_tokens = admin_token_index(cfg)
        self.blocked: dict[str, BlockRule] = {}
        for rule in cfg.compliance.blocked:
            for cc in rule.countries:
                self.blocked.setdefault(cc, rule)
        self.fingerprint_key = cfg.security.fingerprint_key.encode()
        # merchant price lists (money:) and channel fees (channels[].fees), one engine for both
        self.pricing: PricingBook = pricing_book(cfg.money, {c.name: c.fees for c in cfg.channels},
                                                 previous.pricing.activity if previous else None)

    def chain_for(self, merchant_id: str) -> Chain:
        return self.merchant_chains.get(merchant_id, self.default_chain)

    def candidates(self) -> tuple[Candidate, ...]:
        return tuple(ch.candidate() for ch in self.channels.values())

    async def start(self) -> None:
        for ch in self.channels.values():
            if not ch.transport.started:
                await ch.transport.start()

    async def close(self, keep: Runtime | None = None) -> None:
        """Close the channel transports, except those `keep` still uses."""
        kept = {id(ch) for ch in keep.channels.values()} if keep else set()
        for ch in self.channels.values():
            if id(ch) not in kept:
                await ch.transport.close()

    def breaker_states(self) -> dict[str, int]:
        return {name: STATE_VALUE.get(ch.breaker.state, 0) for name, ch in self.channels.items()}


class RuntimeHolder:
    """The live runtime, swapped atomically on reload.

    Each payment takes `current` once and keeps that snapshot to the end, so a reload never changes a
    payment midway. A retired runtime's changed channels are closed only after the longest a payment
    can take (its deadline), so in-flight calls finish on the connections they started with.
    """

    def __init__(self, runtime: Runtime, on_breaker_change: Callable[[str, str], None] | None = None) -> None:
        self.current = runtime  # live policy state (success statistics) carries over every swap
        self._on_breaker_change = on_breaker_change
        self._retiring: dict[asyncio.Task[None], Runtime] = {}

    async def swap(self, cfg: Config) -> Runtime:
        old = self.current
        new = Runtime(cfg, self._on_breaker_change, previous=old)
        await new.start()
        self.current = new  # the atomic part: one reference assignment on the event loop
        grace = old.config.server.payment_deadline_ms / 1000 + 5
        task = asyncio.create_task(self._retire(old, new, grace))
        self._retiring[task] = old
        task.add_done_callback(lambda t: self._retiring.pop(t, None))
        return new

    @staticmethod
    async def _retire(old: Runtime, new: Runtime, grace: float) -> None:
        await asyncio.sleep(grace)
        await old.close(keep=new)

    async def close(self) -> None:
        for task, old in list(self._retiring.items()):
            task.cancel()
            await old.close(keep=self.current)  # shutting down: no grace left to give
        await self.current.close()
