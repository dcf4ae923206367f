"""Cost ranker: order channels by expected value p x (amount - fee).

Fee schedules come from `Candidate.fees` (the channel config's raw mapping), decoded by `decode_fees`:
`{CURRENCY: Schedule, ..., default: Schedule}`. Within a schedule the rate (percent_bp, fixed) is, in
order of precedence: the first amount tier with `amount <= up_to_amount` (null = no upper bound), else
the highest volume tier with `monthly_volume_from <= monthly_volume`, else the schedule's own. Then

    fee = max(min_fee, fixed + round_half_even(amount * percent_bp / 10000))

in minor units, integer arithmetic only: the single rounding rule, applied in `schedule_fee` (which `fee`
calls) and nowhere else.

p is the channel's estimated success rate from `env.state["success_stats"]` when the wiring provides
it, else `default_success`. Monthly volume per channel comes from `env.state["monthly_volume"]` (same
unit as `monthly_volume_from`). Ties go to the lower fee, then the name. A channel with no schedule for
the currency (and no `default`) cannot be priced: it goes after every priced one, by priority then name.
A ranker: the output is a permutation of the input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from policies.base import PolicyEnv
from policies.success_rate import Dimension, SuccessStats, dimension_key, flat_explore
from router.model import Candidate, RouteContext

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class Tier(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    up_to_amount: NonNegative | None  # inclusive; null = no upper bound
    percent_bp: NonNegative = 0
    fixed: NonNegative = 0


class VolumeTier(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    monthly_volume_from: NonNegative
    percent_bp: NonNegative = 0
    fixed: NonNegative = 0


class Schedule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    percent_bp: NonNegative = 0
    fixed: NonNegative = 0
    min_fee: NonNegative = 0
    tiers: list[Tier] = msgspec.field(default_factory=list)
    volume_tiers: list[VolumeTier] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        bounds = [t.up_to_amount for t in self.tiers]
        if None in bounds[:-1]:
            raise ValueError("only the last amount tier may have `up_to_amount: null`")
        finite = [b for b in bounds if b is not None]
        if any(a >= b for a, b in zip(finite, finite[1:], strict=False)):
            raise ValueError("amount tiers must have increasing `up_to_amount`")
        starts = [t.monthly_volume_from for t in self.volume_tiers]
        if any(a >= b for a, b in zip(starts, starts[1:], strict=False)):
            raise ValueError("volume tiers must have increasing `monthly_volume_from`")


Fees = dict[str, Schedule]  # currency (upper case) or "default" -> schedule


def decode_fees(raw: Any) -> Fees:
    """Validate a channel's raw fee config (call at config load; raises msgspec.ValidationError)."""
    fees = msgspec.convert(raw, Fees, str_keys=True)
    return {(k if k == "default" else k.upper()): v for k, v in fees.items()}


def round_half_even(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded to the nearest integer, ties to even (denominator > 0)."""
    q, r = divmod(numerator, denominator)
    twice = r + r
    return q + 1 if twice > denominator or (twice == denominator and q & 1) else q


def schedule_for(fees: Mapping[str, Schedule], currency: str) -> Schedule | None:
    found = fees.get(currency.upper())
    return found if found is not None else fees.get("default")


def fee(schedule: Schedule | Mapping[str, Schedule], amount: int, currency: str, monthly_volume: int = 0) -> int:
    """The fee in minor units for one payment. `schedule` is one Schedule or a channel's whole Fees
    (then the currency's entry, else `default`; KeyError when neither exists)."""
    if not isinstance(schedule, Schedule):
        found = schedule_for(schedule, currency)
        if found is None:
            raise KeyError(f"no fee schedule for {currency} and no default")
        schedule = found
    return schedule_fee(schedule, amount, monthly_volume)


def schedule_fee(schedule: Schedule, amount: int, monthly_volume: int = 0) -> int:
    """`fee` for one resolved schedule: the rate by precedence (amount tier, volume tier, the schedule's
    own), then max(min_fee, fixed + round_half_even(amount * percent_bp / 10000)), the only rounding."""
    percent_bp, fixed = schedule.percent_bp, schedule.fixed
    for tier in schedule.tiers:
        if tier.up_to_amount is None or amount <= tier.up_to_amount:
            percent_bp, fixed = tier.percent_bp, tier.fixed
            break
    else:
        for vt in reversed(schedule.volume_tiers) if schedule.volume_tiers else ():
            if vt.monthly_volume_from <= monthly_volume:
                percent_bp, fixed = vt.percent_bp, vt.fixed
                break
    f = fixed + round_half_even(amount * percent_bp, 10_000)
    return f if f > schedule.min_fee else schedule.min_fee


class Params(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    default_success: Probability = 0.9  # p when there are no success stats
    dimension: Dimension = "none"  # the success-stats key to read, as in success_rate
    min_samples: Annotated[float, msgspec.Meta(ge=0.0)] = 20.0
    # pseudo-events of the channel-wide rate in a keyed (dimension) rate; null: `min_samples`
    key_samples: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
    # exploration, as in success_rate: a flat share, and optimism on p that shrinks with evidence
    explore: Annotated[float, msgspec.Meta(ge=0.0, le=0.5)] = 0.0
    optimism: Annotated[float, msgspec.Meta(ge=0.0, le=5.0)] = 0.0


def _miss(_key: int) -> None:
    return None


class CostRanker:
    name = "cost"
    _CACHE_LIMIT = 1024

    def __init__(
        self, stats: SuccessStats | None, monthly_volume: Mapping[str, int], default_success: float = 0.9,
        dimension: Dimension = "none", min_samples: float = 20.0, explore: float = 0.0, optimism: float = 0.0,
        key_samples: float | None = None,
    ) -> None:
        self.stats = stats
        self.monthly_volume = monthly_volume
        self.default_success = default_success
        self.dimension: Dimension = dimension
        self.min_samples = min_samples
        self.explore = explore
        self.optimism = optimism
        self.key_samples = key_samples
        self._decoded: dict[int, tuple[Any, Fees]] = {}  # id(raw) -> (raw, decoded); raw kept alive
        # currency -> id(raw) -> (raw, schedule or None): the decision path's one lookup per candidate
        self._schedules: dict[str, dict[int, tuple[Any, Schedule | None]]] = {}

    def _fees(self, raw: Any) -> Fees | None:
        if raw is None:
            return None
        hit = self._decoded.get(id(raw))
        if hit is not None and hit[0] is raw:
            return hit[1]
        fees = decode_fees(raw)
        if len(self._decoded) >= self._CACHE_LIMIT:
            self._decoded.clear()
        self._decoded[id(raw)] = (raw, fees)
        return fees

    def expected(
        self, ctx: RouteContext, candidate: Candidate, key: str | None = None, optimism: float = 0.0
    ) -> tuple[float, int] | None:
        """(expected value, fee) of sending this payment to the channel; None when it has no price.
        With `optimism` > 0, p is the stats' optimistic score (what the ranking uses), not the mean."""
        fees = self._fees(candidate.fees)
        schedule = schedule_for(fees, ctx.currency) if fees is not None else None
        if schedule is None:
            return None
        f = fee(schedule, ctx.amount, ctx.currency, self.monthly_volume.get(candidate.name, 0))
        if self.stats is None:
            p = self.default_success
        else:
            if key is None:
                key = dimension_key(self.dimension, ctx)
            p = self.stats.score(
                candidate.name, key, self.default_success, self.min_samples, optimism, self.key_samples
            )
        return p * (ctx.amount - f), f

    def _schedule(self, raw: Any, currency: str) -> Schedule | None:
        table = self._schedules.get(currency)
        if table is None:
            if len(self._schedules) >= self._CACHE_LIMIT:
                self._schedules.clear()
            table = self._schedules[currency] = {}
        hit = table.get(id(raw))
        if hit is not None and hit[0] is raw:
            return hit[1]
        fees = self._fees(raw)
        schedule = schedule_for(fees, currency) if fees is not None else None
        if len(table) >= self._CACHE_LIMIT:
            table.clear()
        table[id(raw)] = (raw, schedule)
        return schedule

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        # what `expected` computes, per candidate, with the lookups hoisted out of the loop
        key = dimension_key(self.dimension, ctx)
        unpriced: list[Candidate] = []
        amount, currency = ctx.amount, ctx.currency
        volume = self.monthly_volume.get
        stats = self.stats
        score = stats.score if stats is not None else None
        prior, ms, ks, opt = self.default_success, self.min_samples, self.key_samples, self.optimism
        table = self._schedules.get(currency)
        cached = table.get if table is not None else _miss
        priced: list[tuple[float, int, str, Candidate]] = []
        for c in candidates:
            raw = c.fees
            if raw is None:
                unpriced.append(c)
                continue
            hit = cached(id(raw))  # `_schedule`'s cache hit, inlined
            schedule = hit[1] if hit is not None and hit[0] is raw else self._schedule(raw, currency)
            if schedule is None:
                unpriced.append(c)
                continue
            f = schedule_fee(schedule, amount, volume(c.name, 0) if schedule.volume_tiers else 0)
            p = score(c.name, key, prior, ms, opt, ks) if score is not None else prior
            priced.append((-p * (amount - f), f, c.name, c))
        priced.sort()  # by (-ev, fee, name); names are unique, so candidates themselves are never compared
        ranked = [t[3] for t in priced]
        if unpriced:
            unpriced.sort(key=lambda c: (c.priority, c.name))
            ranked += unpriced
        if self.explore:
            flat_explore(ctx, ranked, self.explore, "cost")
        return tuple(ranked)


def build(params: Params, env: PolicyEnv) -> CostRanker:
    stats = env.state.get("success_stats")
    return CostRanker(
        stats if isinstance(stats, SuccessStats) else None,
        env.state.get("monthly_volume", {}),
        params.default_success,
        params.dimension,
        params.min_samples,
        params.explore,
        params.optimism,
        params.key_samples,
    )
