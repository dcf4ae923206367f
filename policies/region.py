"""Licence filter: keep only channels licensed for the customer's country and the payment currency.

`Candidate.licensed_countries` / `licensed_currencies` come from compliance config; None means the
channel is not restricted on that axis. This is about what a channel may legally process, not what
it technically can (that is `capability.py`). A filter: the output is a subsequence of the input.
"""

from __future__ import annotations

import msgspec

from policies.base import PolicyEnv
from router.model import Candidate, RouteContext


class Params(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


def licensed(candidate: Candidate, country: str, currency: str) -> bool:
    countries, currencies = candidate.licensed_countries, candidate.licensed_currencies
    return (countries is None or country in countries) and (currencies is None or currency in currencies)


class RegionFilter:
    name = "region"

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        country, currency = ctx.country, ctx.currency  # `licensed`, inlined: this runs on every decision
        kept = [
            c for c in candidates
            if (c.licensed_countries is None or country in c.licensed_countries)
            and (c.licensed_currencies is None or currency in c.licensed_currencies)
        ]
        return candidates if len(kept) == len(candidates) else tuple(kept)


def build(params: Params, env: PolicyEnv) -> RegionFilter:
    return RegionFilter()
