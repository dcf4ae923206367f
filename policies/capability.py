"""Filters on what a channel can do: currency, country, payment method.

Each keeps the candidates whose capabilities admit the payment (None in a capability means any).
When every candidate is kept, the input tuple itself is returned (the chain then skips re-tracing it).
"""

from __future__ import annotations

from policies.base import NoParams, PolicyEnv
from router.model import Candidate, RouteContext


class CurrencyFilter:
    name = "currency"

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        currency = ctx.currency
        kept = [c for c in candidates if c.capabilities.currencies is None or currency in c.capabilities.currencies]
        return candidates if len(kept) == len(candidates) else tuple(kept)


class CountryFilter:
    name = "country"

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        country = ctx.country
        kept = [c for c in candidates if c.capabilities.countries is None or country in c.capabilities.countries]
        return candidates if len(kept) == len(candidates) else tuple(kept)


class MethodFilter:
    name = "method"

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        method = ctx.method
        kept = [c for c in candidates if method in c.capabilities.methods]
        return candidates if len(kept) == len(candidates) else tuple(kept)


def currency(params: NoParams, env: PolicyEnv) -> CurrencyFilter:
    return CurrencyFilter()


def country(params: NoParams, env: PolicyEnv) -> CountryFilter:
    return CountryFilter()


def method(params: NoParams, env: PolicyEnv) -> MethodFilter:
    return MethodFilter()
