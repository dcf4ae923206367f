"""Priority ranker.

With `order`, channels named there come first in that order, then `fallback` channels, then the rest
by their configured `priority` (lower first, name breaks ties). Without `order`, all by `priority`.
A ranker returns a permutation: nothing is added or dropped here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from policies.base import PolicyEnv
from router.model import Candidate, RouteContext


class Params(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    order: list[str] = msgspec.field(default_factory=list)  # these first, in this order
    fallback: list[str] = msgspec.field(default_factory=list)  # then these


class PriorityRanker:
    name = "priority"

    def __init__(self, order: Sequence[str] = (), fallback: Sequence[str] = ()) -> None:
        rank: dict[str, int] = {}
        for name in [*order, *fallback]:
            rank.setdefault(name, len(rank))
        self._rank = rank

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        big = len(self._rank)
        return tuple(sorted(candidates, key=lambda c: (self._rank.get(c.name, big), c.priority, c.name)))


def build(params: Params, env: PolicyEnv) -> PriorityRanker:
    return PriorityRanker(params.order, params.fallback)


def channel_refs(params: Params) -> Iterable[tuple[str, str]]:
    for field in ("order", "fallback"):
        for i, name in enumerate(getattr(params, field)):
            yield f".{field}[{i}]", name
