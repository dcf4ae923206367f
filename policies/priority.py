"""Priority ranker.

With `order`, channels named there come first in that order, then `fallback` channels, then the rest
by their configured `priority` (lower first, name breaks ties). Without `order`, all by `priority`.
A ranker returns a permutation: nothing is added or dropped here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.model import Candidate, RouteContext


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


def priority(params: Mapping[str, Any]) -> PriorityRanker:
    return PriorityRanker(params.get("order") or (), params.get("fallback") or ())
