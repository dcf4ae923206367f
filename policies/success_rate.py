"""Success-rate ranker over live, in-memory, non-stationary statistics.

`SuccessStats` keeps, per (channel, key), two discounted success/failure counts: a fast one (short
half-life) and a slow one (long half-life) used for ranking. Counts decay by event (each new event on a
key multiplies the old counts by 0.5 ** (1 / half_life_events)) and by time (0.5 ** (dt / half_life_s)
between events). Change detection: when the fast and slow means diverge by more than `change_threshold`
(with enough fast evidence), the slow counts are reset to the fast ones, so a channel that degrades
(or recovers) is re-ranked within tens of events without spending traffic on exploration.

Keys are `dimension_key(dimension, ctx)`: "" for the whole channel, "currency:EUR", "bin6:424242"...
`record_outcome` records one outcome under every dimension at once, so any ranker config can read it.
An estimate is Beta-smoothed: `min_samples` pseudo-counts at the channel-wide rate (itself smoothed
towards `prior`), so a sparse key starts from what the channel does overall.

Contract for callers of `record`/`record_outcome`: only outcomes the channel caused count. Pass
success=True for approved; False for soft declines, unavailable and unknown; do NOT record hard declines
(the card's fault) nor pending / requires-action until they resolve. `counts_for_channel` encodes this.
Delayed feedback needs nothing special: record when the outcome becomes known.

`snapshot()`/`merge()` let instances share counts (e.g. through Redis) later: a peer's snapshot replaces
that peer's previous one, so repeated merges never double count. Policies only read these stats.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Literal

import msgspec

from policies.base import PolicyEnv
from policies.weighted import sticky_draw, sticky_uniform
from router.model import Candidate, Outcome, RouteContext

Dimension = Literal["none", "currency", "country", "bin6", "method", "card_brand"]
DIMENSIONS: tuple[Dimension, ...] = ("none", "currency", "country", "bin6", "method", "card_brand")
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]

# Soft-decline codes that are still the card's fault, not the channel's (a canonical, small set).
CARD_CAUSED_SOFT_CODES = frozenset({"insufficient_funds", "card_velocity_exceeded", "withdrawal_count_limit_exceeded"})


def counts_for_channel(outcome: str, code: str | None) -> bool | None:
    """How one attempt's outcome feeds `SuccessStats`: True/False to record, None to ignore.

    Hard declines are the card's, pending/requires-action are not known yet, skipped was never sent,
    not-charged resolves an unknown that was already counted. Raises ValueError on an unknown outcome.
    """
    o = Outcome(outcome)
    if o is Outcome.APPROVED:
        return True
    if o is Outcome.SOFT_DECLINE:
        return None if code in CARD_CAUSED_SOFT_CODES else False
    if o in (Outcome.UNAVAILABLE, Outcome.UNKNOWN):
        return False
    return None


def dimension_key(dimension: Dimension, ctx: RouteContext) -> str:
    """The stats key of a payment under a dimension; "" (channel-wide) when the payment has no value."""
    if dimension == "none":
        return ""
    value: str | None
    if dimension == "currency":
        value = ctx.currency
    elif dimension == "country":
        value = ctx.country
    elif dimension == "method":
        value = ctx.method
    elif dimension == "card_brand":
        value = ctx.card_brand.lower() if ctx.card_brand else None
    else:
        value = ctx.card_bin[:6] if ctx.card_bin and len(ctx.card_bin) >= 6 else None
    return f"{dimension}:{value}" if value else ""


class StatsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    fast_half_life_events: float = 20.0
    slow_half_life_events: float = 500.0
    half_life_s: float | None = 3600.0  # None: decay by events only
    change_threshold: float = 0.2  # |fast - slow| mean difference that resets slow to fast
    change_min_events: float = 10.0  # fast evidence needed before a divergence counts


class Cell(msgspec.Struct, kw_only=True, array_like=True):
    """Discounted counts of one (channel, key): fast and slow successes/failures, last event time."""

    fs: float = 0.0
    ff: float = 0.0
    ss: float = 0.0
    sf: float = 0.0
    t: float | None = None


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    cells: dict[str, dict[str, Cell]]  # channel -> key -> counts


class SuccessStats:
    """In-memory success statistics. Single-threaded (one event loop); policies only read."""

    def __init__(self, config: StatsConfig | None = None) -> None:
        self.config = c = config or StatsConfig()
        self._fast = 0.5 ** (1.0 / c.fast_half_life_events)
        self._slow = 0.5 ** (1.0 / c.slow_half_life_events)
        self._local: dict[tuple[str, str], Cell] = {}
        self._peers: dict[str, Snapshot] = {}
        self._remote: dict[tuple[str, str], tuple[float, float]] = {}  # summed slow (s, f) of all peers

    def record(self, channel: str, key: str, success: bool, now: float) -> None:
        c = self.config
        cell = self._local.get((channel, key))
        if cell is None:
            cell = self._local[(channel, key)] = Cell()
        time_decay = 1.0
        if c.half_life_s is not None and cell.t is not None and now > cell.t:
            time_decay = 0.5 ** ((now - cell.t) / c.half_life_s)
        df, ds = self._fast * time_decay, self._slow * time_decay
        hit = 1.0 if success else 0.0
        cell.fs = cell.fs * df + hit
        cell.ff = cell.ff * df + (1.0 - hit)
        cell.ss = cell.ss * ds + hit
        cell.sf = cell.sf * ds + (1.0 - hit)
        cell.t = now if cell.t is None else max(cell.t, now)
        n_fast = cell.fs + cell.ff
        if n_fast >= c.change_min_events:
            n_slow = cell.ss + cell.sf
            if abs(cell.fs / n_fast - cell.ss / n_slow) > c.change_threshold:
                cell.ss, cell.sf = cell.fs, cell.ff

    def record_outcome(
        self, channel: str, ctx: RouteContext, success: bool, now: float, dimensions: Iterable[Dimension] = DIMENSIONS
    ) -> None:
        """Record one outcome under the channel-wide key and every dimension's key (each key once)."""
        keys = {""} | {dimension_key(d, ctx) for d in dimensions}
        for key in keys:
            self.record(channel, key, success, now)

    def counts(self, channel: str, key: str) -> tuple[float, float]:
        """Discounted (successes, failures) behind the ranking estimate: local plus merged peers."""
        cell = self._local.get((channel, key))
        if not self._remote:  # the common case: no peers merged
            return (0.0, 0.0) if cell is None else (cell.ss, cell.sf)
        rs, rf = self._remote.get((channel, key), (0.0, 0.0))
        if cell is None:
            return rs, rf
        return cell.ss + rs, cell.sf + rf

    def estimate(self, channel: str, key: str, prior: float, min_samples: float) -> float:
        """Posterior mean success rate: the key's counts plus `min_samples` pseudo-counts at the
        channel-wide rate, which is itself smoothed towards `prior` the same way."""
        s, f = self.counts(channel, "")
        base = (s + prior * min_samples) / (s + f + min_samples) if min_samples > 0 or s + f > 0 else prior
        if key == "":
            return base
        s, f = self.counts(channel, key)
        if s + f == 0:
            return base
        return (s + base * min_samples) / (s + f + min_samples)

    def snapshot(self) -> Snapshot:
        """This instance's own counts (not the peers'), to publish."""
        cells: dict[str, dict[str, Cell]] = {}
        for (channel, key), cell in self._local.items():
            cells.setdefault(channel, {})[key] = Cell(fs=cell.fs, ff=cell.ff, ss=cell.ss, sf=cell.sf, t=cell.t)
        return Snapshot(cells=cells)

    def merge(self, source: str, snapshot: Snapshot) -> None:
        """Take a peer's published counts into the estimates, replacing that peer's previous ones."""
        self._peers[source] = snapshot
        remote: dict[tuple[str, str], tuple[float, float]] = {}
        for snap in self._peers.values():
            for channel, by_key in snap.cells.items():
                for key, cell in by_key.items():
                    s, f = remote.get((channel, key), (0.0, 0.0))
                    remote[(channel, key)] = (s + cell.ss, f + cell.sf)
        self._remote = remote


class Params(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    dimension: Dimension = "none"
    explore: Annotated[float, msgspec.Meta(ge=0.0, le=0.5)] = 0.02
    min_samples: Annotated[float, msgspec.Meta(ge=0.0)] = 20.0  # prior strength in pseudo-events
    prior: Probability = 0.8  # assumed rate for a channel with no data


class SuccessRateRanker:
    name = "success_rate"

    def __init__(
        self, stats: SuccessStats, dimension: Dimension = "none", explore: float = 0.02,
        min_samples: float = 20.0, prior: float = 0.8,
    ) -> None:
        self.stats = stats
        self.dimension: Dimension = dimension
        self.explore = explore
        self.min_samples = min_samples
        self.prior = prior

    def scores(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> dict[str, float]:
        key = dimension_key(self.dimension, ctx)
        est = self.stats.estimate
        return {c.name: est(c.name, key, self.prior, self.min_samples) for c in candidates}

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        if len(candidates) < 2:
            return candidates
        score = self.scores(ctx, candidates)
        ranked = sorted(candidates, key=lambda c: (-score[c.name], c.priority, c.name))
        if self.explore > 0 and sticky_uniform(ctx.payment_id, "success_rate:explore") < self.explore:
            i = 1 + sticky_draw(ctx.payment_id, "success_rate:explore-pick", len(ranked) - 1)
            ranked.insert(0, ranked.pop(i))
        return tuple(ranked)


def stats_from(env: PolicyEnv) -> SuccessStats:
    """The wiring's shared stats; an empty instance (everything at the prior) when there are none."""
    stats = env.state.get("success_stats")
    return stats if isinstance(stats, SuccessStats) else SuccessStats()


def build(params: Params, env: PolicyEnv) -> SuccessRateRanker:
    return SuccessRateRanker(stats_from(env), params.dimension, params.explore, params.min_samples, params.prior)

