"""Elimination: remove channels whose circuit breaker is open (from the snapshot, no I/O)."""

from __future__ import annotations

from policies.base import NoParams, PolicyEnv
from router.model import Candidate, RouteContext


class BreakerFilter:
    name = "breaker"

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        for c in candidates:
            if c.breaker_open:
                return tuple([c for c in candidates if not c.breaker_open])
        return candidates  # the common case: nothing open, nothing to copy


def breaker(params: NoParams, env: PolicyEnv) -> BreakerFilter:
    return BreakerFilter()
