"""The explicit list of policies a config may name. Adding a policy means adding a line here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policies import breaker, capability, cost, priority, region, rules, success_rate, weighted
from policies.base import NoParams, PolicyEnv, PolicyType, decode_params, validate_params
from router.model import Policy

POLICIES: Mapping[str, PolicyType] = {
    "currency": PolicyType(NoParams, capability.currency),
    "country": PolicyType(NoParams, capability.country),
    "method": PolicyType(NoParams, capability.method),
    "breaker": PolicyType(NoParams, breaker.breaker),
    "priority": PolicyType(priority.Params, priority.build, priority.channel_refs),
    "region": PolicyType(region.Params, region.build),
    "weighted": PolicyType(weighted.Params, weighted.build, weighted.channel_refs),
    "rules": PolicyType(rules.Params, rules.build, rules.channel_refs),
    "success_rate": PolicyType(success_rate.Params, success_rate.build),
    "cost": PolicyType(cost.Params, cost.build),
}


def _validator(ptype: PolicyType) -> Any:
    return lambda raw, channels: validate_params(ptype, raw, channels)


# What router.config.load_config takes to check each step's params.
VALIDATORS = {name: _validator(ptype) for name, ptype in POLICIES.items()}


def warnings(name: str, params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Advice that does not reject a config (unreachable or conflicting rules), paths relative to the step."""
    if name != "rules":
        return []
    return rules.analyze(decode_params(POLICIES[name], params))


def fee_problems(fees: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if fees is None:
        return []
    try:
        cost.decode_fees(fees)
    except (ValueError, TypeError) as e:  # msgspec.ValidationError is a ValueError
        return [("", str(e))]
    return []


def build(name: str, params: Mapping[str, Any], env: PolicyEnv | None = None) -> Policy:
    ptype = POLICIES[name]
    return ptype.build(decode_params(ptype, params), env or PolicyEnv())
