"""The explicit list of policies a config may name. Adding a policy means adding a line here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policies import breaker, capability, priority
from policies.base import NoParams, PolicyEnv, PolicyType, decode_params, validate_params
from router.model import Policy

POLICIES: Mapping[str, PolicyType] = {
    "currency": PolicyType(NoParams, capability.currency),
    "country": PolicyType(NoParams, capability.country),
    "method": PolicyType(NoParams, capability.method),
    "breaker": PolicyType(NoParams, breaker.breaker),
    "priority": PolicyType(priority.Params, priority.build, priority.channel_refs),
}


def _validator(ptype: PolicyType) -> Any:
    return lambda raw, channels: validate_params(ptype, raw, channels)


# What router.config.load_config takes to check each step's params.
VALIDATORS = {name: _validator(ptype) for name, ptype in POLICIES.items()}


def build(name: str, params: Mapping[str, Any], env: PolicyEnv | None = None) -> Policy:
    ptype = POLICIES[name]
    return ptype.build(decode_params(ptype, params), env or PolicyEnv())
