"""Weighted split ranker, sticky per payment.

The first channel is drawn with probability proportional to its weight (`Candidate.weight`, or
`weights[name]` from params when given there), using a draw derived from `sha256(salt, payment_id)`
alone: the same payment always gets the same order, on every retry and every instance. The other
channels with a positive weight follow in their input order as fallbacks; zero-weight channels go
last, also in input order. A ranker: the output is a permutation of the input.

`sticky_draw` and `sticky_order` are shared with the rules (`split`) and success-rate (exploration)
policies; each caller uses its own salt so their draws are independent of one another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated

import msgspec

from policies.base import PolicyEnv
from router.model import Candidate, RouteContext

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class Params(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    weights: dict[str, NonNegative] = msgspec.field(default_factory=dict)  # override Candidate.weight


def sticky_draw(payment_id: str, salt: str, total: int) -> int:
    """A deterministic integer in [0, total), uniform over payment ids (total > 0)."""
    digest = hashlib.sha256(f"{salt}\x00{payment_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") * total) >> 64


def sticky_uniform(payment_id: str, salt: str) -> float:
    """A deterministic float in [0, 1), uniform over payment ids."""
    return sticky_draw(payment_id, salt, 1 << 53) / (1 << 53)


def sticky_order(
    payment_id: str, salt: str, candidates: tuple[Candidate, ...], weight_of: Callable[[Candidate], int]
) -> tuple[Candidate, ...]:
    """The chosen channel first, then the other positive-weight ones, then the zero-weight ones."""
    weights = [max(weight_of(c), 0) for c in candidates]
    total = sum(weights)
    if total == 0:
        return candidates
    point = sticky_draw(payment_id, salt, total)
    chosen = len(candidates) - 1
    for i, w in enumerate(weights):
        if point < w:
            chosen = i
            break
        point -= w
    first = candidates[chosen]
    rest = tuple(c for i, c in enumerate(candidates) if i != chosen and weights[i] > 0)
    zero = tuple(c for i, c in enumerate(candidates) if weights[i] == 0)
    return (first, *rest, *zero)


class WeightedRanker:
    name = "weighted"

    def __init__(self, weights: Mapping[str, int] | None = None) -> None:
        overrides = dict(weights or {})
        self._weight_of: Callable[[Candidate], int] = lambda c: overrides.get(c.name, c.weight)

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        return sticky_order(ctx.payment_id, self.name, candidates, self._weight_of)


def build(params: Params, env: PolicyEnv) -> WeightedRanker:
    return WeightedRanker(params.weights)


def channel_refs(params: Params) -> Iterable[tuple[str, str]]:
    for name in params.weights:
        yield f".weights.{name}", name
