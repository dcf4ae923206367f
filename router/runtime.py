"""One loaded config made live: channels (adapter, transport, breaker, retry budget), policy chains,
API-key index and compliance rules. The pipeline reads a `Runtime` snapshot per payment, so a
future config swap never changes a payment midway.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgspec

from adapters import registry as adapter_registry
from policies import registry as policy_registry
from policies.base import Chain
from router.breaker import STATE_VALUE, ChannelBreaker
from router.config import BlockRule, ChannelConfig, Config, PolicyStep, api_key_index
from router.model import Candidate, Capabilities, ChannelAdapter
from router.transport import ChannelTransport, RetryBudget

KNOWN_ADAPTERS = frozenset(adapter_registry.ADAPTERS)
KNOWN_POLICIES = policy_registry.VALIDATORS


class ChannelRuntime:
    def __init__(self, cfg: ChannelConfig, on_breaker_change: Callable[[str, str], None] | None) -> None:
        self.config = cfg
        self.name = cfg.name
        caps = Capabilities(
            currencies=frozenset(cfg.currencies) if cfg.currencies is not None else None,
            countries=frozenset(cfg.countries) if cfg.countries is not None else None,
            methods=frozenset(cfg.methods),
        )
        self.adapter: ChannelAdapter = adapter_registry.create(cfg.adapter, cfg.credentials, caps)
        self.transport = ChannelTransport(cfg)
        self.breaker = ChannelBreaker(cfg.name, cfg.breaker, on_breaker_change)
        self.budget = RetryBudget()
        self._static = Candidate(
            name=cfg.name, adapter=cfg.adapter, capabilities=self.adapter.capabilities(), priority=cfg.priority,
            weight=cfg.weight,
        )
        self._open = msgspec.structs.replace(self._static, breaker_open=True)

    def candidate(self) -> Candidate:
        return self._static if self.breaker.admits() else self._open


def _chain(name: str, steps: list[PolicyStep]) -> Chain:
    return Chain(name, [policy_registry.build(s["policy"], {k: v for k, v in s.items() if k != "policy"}) for s in steps])


class Runtime:
    def __init__(self, cfg: Config, on_breaker_change: Callable[[str, str], None] | None = None) -> None:
        self.config = cfg
        self.version = cfg.digest
        self.channels: dict[str, ChannelRuntime] = {c.name: ChannelRuntime(c, on_breaker_change) for c in cfg.channels}
        self.default_chain = _chain("default", cfg.routing.default)
        self.merchant_chains = {m: _chain(f"merchant:{m}", steps) for m, steps in cfg.routing.merchants.items()}
        self.api_keys: Mapping[str, str] = api_key_index(cfg)
        self.blocked: dict[str, BlockRule] = {}
        for rule in cfg.compliance.blocked:
            for cc in rule.countries:
                self.blocked.setdefault(cc, rule)
        self.fingerprint_key = cfg.security.fingerprint_key.encode()

    def chain_for(self, merchant_id: str) -> Chain:
        return self.merchant_chains.get(merchant_id, self.default_chain)

    def candidates(self) -> tuple[Candidate, ...]:
        return tuple(ch.candidate() for ch in self.channels.values())

    async def start(self) -> None:
        for ch in self.channels.values():
            await ch.transport.start()

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.transport.close()

    def breaker_states(self) -> dict[str, int]:
        return {name: STATE_VALUE.get(ch.breaker.state, 0) for name, ch in self.channels.items()}
