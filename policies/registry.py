"""The explicit list of policies a config may name. Adding a policy means adding a line here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from policies import breaker, capability, priority
from router.model import Policy

POLICIES: Mapping[str, Callable[[Mapping[str, Any]], Policy]] = {
    "currency": capability.currency,
    "country": capability.country,
    "method": capability.method,
    "breaker": breaker.breaker,
    "priority": priority.priority,
}


def build(name: str, params: Mapping[str, Any]) -> Policy:
    return POLICIES[name](params)
