"""Filters on what a channel can do: currency, country, payment method.

Each keeps the candidates whose capabilities admit the payment (None in a capability means any).
"""

from __future__ import annotations

from policies.base import NoParams, PolicyEnv
from router.model import Candidate, RouteContext


class CurrencyFilter:
    name = "currency"

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        return tuple(
            c for c in candidates if c.capabilities.currencies is None or ctx.currency in c.capabilities.currencies
        )


class CountryFilter:
    name = "country"

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        return tuple(
            c for c in candidates if c.capabilities.countries is None or ctx.country in c.capabilities.countries
        )


class MethodFilter:
    name = "method"

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        return tuple(c for c in candidates if ctx.method in c.capabilities.methods)


def currency(params: NoParams, env: PolicyEnv) -> CurrencyFilter:
    return CurrencyFilter()


def country(params: NoParams, env: PolicyEnv) -> CountryFilter:
    return CountryFilter()


def method(params: NoParams, env: PolicyEnv) -> MethodFilter:
    return MethodFilter()
