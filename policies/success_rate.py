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

import math
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
    fast_half_life_events: float = 100.0  # the recent window a detected change restarts from
    slow_half_life_events: float = 1000.0  # the ranking estimate's memory between changes
    half_life_s: float | None = 3600.0  # None: decay by events only
    # Page-Hinkley change detection on each event's residual (outcome - slow mean): a cumulative
    # deviation beyond `change_threshold` (after a per-event allowance `change_delta`) resets the slow
    # counts to the fast ones, so a shift of a few points re-ranks within hundreds of events, not thousands.
    change_detection: bool = True
    change_delta: float = 0.01
    change_threshold: float = 8.0
    change_min_events: float = 40.0  # slow evidence needed before residuals accumulate
    # Outage detection: a run of consecutive failures that is implausible at the key's rate
    # (probability < outage_p) is an outage, not a decline: those failures are taken back out of the
    # approval counts and the channel is ranked last until `outage_hold_s` after its last failure.
    outage_p: float = 1e-4
    outage_min_run: int = 4
    outage_hold_s: float = 10.0


class Cell(msgspec.Struct, kw_only=True, array_like=True):
    """Discounted counts of one (channel, key): fast and slow successes/failures, last event time."""

    fs: float = 0.0
    ff: float = 0.0
    ss: float = 0.0
    sf: float = 0.0
    t: float | None = None


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    cells: dict[str, dict[str, Cell]]  # channel -> key -> counts


class _Watch:
    """Local detector state of one (channel, key), never shared: Page-Hinkley sums and the current
    failure run (with the counts from before it, to take an outage's failures back out)."""

    __slots__ = ("gp", "gn", "run", "k", "backup")

    def __init__(self) -> None:
        self.gp = 0.0
        self.gn = 0.0
        self.run = 0
        self.k = 0
        self.backup: tuple[float, float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


class SuccessStats:
    """In-memory success statistics. Single-threaded (one event loop); policies only read."""

    _SEEN_LIMIT = 4096

    def __init__(self, config: StatsConfig | None = None) -> None:
        self.config = c = config or StatsConfig()
        self._fast = 0.5 ** (1.0 / c.fast_half_life_events)
        self._slow = 0.5 ** (1.0 / c.slow_half_life_events)
        self._log_outage_p = math.log(c.outage_p)
        self._local: dict[tuple[str, str], Cell] = {}
        self._watch: dict[tuple[str, str], _Watch] = {}
        self._peers: dict[str, Snapshot] = {}
        self._remote: dict[tuple[str, str], tuple[float, float]] = {}  # summed slow (s, f) of all peers
        self._seen: dict[str, None] = {}  # recent payment ids with a recorded outcome, oldest first
        self.now = -math.inf  # the latest event time seen: "now" for reads, which take no clock

    def record(self, channel: str, key: str, success: bool, now: float, approval: bool = True) -> None:
        """One outcome. `approval=False`: it only tells whether the channel is up (a fail-over attempt,
        whose card another channel already declined): it moves the outage detector, not the rate."""
        c = self.config
        ck = (channel, key)
        cell = self._local.get(ck)
        if cell is None:
            cell = self._local[ck] = Cell()
            w = self._watch[ck] = _Watch()
        else:
            w = self._watch.get(ck) or self._watch.setdefault(ck, _Watch())
        if now > self.now:
            self.now = now
        if not approval:
            if success:
                w.run = 0
            elif w.run > 0:
                w.run += 1
                if w.run == w.k:
                    cell.fs, cell.ff, cell.ss, cell.sf, w.gp, w.gn = w.backup
                cell.t = now if cell.t is None else max(cell.t, now)
            return
        if success:
            w.run = 0
        else:
            if w.run == 0:  # a failure run starts: remember the counts before it
                n = cell.ss + cell.sf
                p = cell.ss / n if n > 0 else 0.0
                k = c.outage_min_run
                if 0.0 < p < 1.0:
                    k = max(k, min(30, math.ceil(self._log_outage_p / math.log(1.0 - p))))
                w.k = k
                w.backup = (cell.fs, cell.ff, cell.ss, cell.sf, w.gp, w.gn)
            w.run += 1
            if w.run >= w.k:  # an outage: its failures say nothing about approvals
                if w.run == w.k:
                    cell.fs, cell.ff, cell.ss, cell.sf, w.gp, w.gn = w.backup
                cell.t = now if cell.t is None else max(cell.t, now)
                return
        time_decay = 1.0
        if c.half_life_s is not None and cell.t is not None and now > cell.t:
            time_decay = 0.5 ** ((now - cell.t) / c.half_life_s)
        df, ds = self._fast * time_decay, self._slow * time_decay
        hit = 1.0 if success else 0.0
        n_slow = cell.ss + cell.sf
        mean = cell.ss / n_slow if n_slow > 0 else 0.0
        cell.fs = cell.fs * df + hit
        cell.ff = cell.ff * df + (1.0 - hit)
        cell.ss = cell.ss * ds + hit
        cell.sf = cell.sf * ds + (1.0 - hit)
        cell.t = now if cell.t is None else max(cell.t, now)
        if c.change_detection and n_slow >= c.change_min_events:
            w.gp = max(0.0, w.gp + hit - mean - c.change_delta)
            w.gn = max(0.0, w.gn + mean - hit - c.change_delta)
            if w.gp > c.change_threshold or w.gn > c.change_threshold:
                cell.ss, cell.sf = cell.fs, cell.ff
                w.gp = w.gn = 0.0

    def record_outcome(
        self, channel: str, ctx: RouteContext, success: bool, now: float, dimensions: Iterable[Dimension] = DIMENSIONS
    ) -> None:
        """Record one outcome under the channel-wide key and every dimension's key (each key once).

        Only a payment's first recorded outcome moves approval rates: a later one for the same payment id
        (a fail-over attempt, whose card another channel already declined) only feeds outage detection,
        whichever attempts the wiring records."""
        keys = {""} | {dimension_key(d, ctx) for d in dimensions}
        pid = ctx.payment_id
        first = pid not in self._seen
        if first:
            self._seen[pid] = None
            if len(self._seen) > self._SEEN_LIMIT:
                del self._seen[next(iter(self._seen))]
        for key in keys:
            self.record(channel, key, success, now, first)

    def counts(self, channel: str, key: str) -> tuple[float, float]:
        """Discounted (successes, failures) behind the ranking estimate: local plus merged peers."""
        cell = self._local.get((channel, key))
        if not self._remote:  # the common case: no peers merged
            return (0.0, 0.0) if cell is None else (cell.ss, cell.sf)
        rs, rf = self._remote.get((channel, key), (0.0, 0.0))
        if cell is None:
            return rs, rf
        return cell.ss + rs, cell.sf + rf

    def is_down(self, channel: str) -> bool:
        """The channel's latest failures form an outage-like run, the last one under `outage_hold_s` ago."""
        w = self._watch.get((channel, ""))
        if w is None or w.run < w.k or w.run == 0:
            return False
        cell = self._local[(channel, "")]
        return cell.t is not None and self.now - cell.t < self.config.outage_hold_s

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

    def score(self, channel: str, key: str, prior: float, min_samples: float, optimism: float) -> float:
        """What rankers order by: the estimate plus an optimism bonus `optimism * sd` that shrinks as the
        key's evidence n grows (sd = sqrt(p(1-p)/(n+1))), so a little-tried channel gets tried and a
        well-known loser does not; minus 1 while the channel looks down (an outage ranks it last)."""
        s, f = self.counts(channel, "")
        base = (s + prior * min_samples) / (s + f + min_samples) if min_samples > 0 or s + f > 0 else prior
        if key == "":
            p, n = base, s + f
        else:
            s, f = self.counts(channel, key)
            n = s + f
            p = (s + base * min_samples) / (n + min_samples) if n > 0 else base
        if optimism > 0.0:
            p += optimism * math.sqrt(p * (1.0 - p) / (n + 1.0))
        if self._watch and self.is_down(channel):
            p -= 1.0
        return p

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
    # flat share of payments sent to a random other channel first (0: rely on `optimism` alone)
    explore: Annotated[float, msgspec.Meta(ge=0.0, le=0.5)] = 0.0
    # optimism bonus in standard deviations: exploration that shrinks as a key's evidence grows
    optimism: Annotated[float, msgspec.Meta(ge=0.0, le=5.0)] = 0.0
    min_samples: Annotated[float, msgspec.Meta(ge=0.0)] = 20.0  # prior strength in pseudo-events
    prior: Probability = 0.8  # assumed rate for a channel with no data


def flat_explore(ctx: RouteContext, ranked: list[Candidate], share: float, salt: str) -> None:
    """With probability `share` (sticky per payment), move a uniformly drawn non-first channel first."""
    if share > 0 and len(ranked) > 1 and sticky_uniform(ctx.payment_id, salt + ":explore") < share:
        i = 1 + sticky_draw(ctx.payment_id, salt + ":explore-pick", len(ranked) - 1)
        ranked.insert(0, ranked.pop(i))


class SuccessRateRanker:
    name = "success_rate"

    def __init__(
        self, stats: SuccessStats, dimension: Dimension = "none", explore: float = 0.0,
        min_samples: float = 20.0, prior: float = 0.8, optimism: float = 0.0,
    ) -> None:
        self.stats = stats
        self.dimension: Dimension = dimension
        self.explore = explore
        self.min_samples = min_samples
        self.prior = prior
        self.optimism = optimism

    def scores(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> dict[str, float]:
        key = dimension_key(self.dimension, ctx)
        score = self.stats.score
        return {c.name: score(c.name, key, self.prior, self.min_samples, self.optimism) for c in candidates}

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        if len(candidates) < 2:
            return candidates
        score = self.scores(ctx, candidates)
        ranked = sorted(candidates, key=lambda c: (-score[c.name], c.priority, c.name))
        flat_explore(ctx, ranked, self.explore, "success_rate")
        return tuple(ranked)


def stats_from(env: PolicyEnv) -> SuccessStats:
    """The wiring's shared stats; an empty instance (everything at the prior) when there are none."""
    stats = env.state.get("success_stats")
    return stats if isinstance(stats, SuccessStats) else SuccessStats()


def build(params: Params, env: PolicyEnv) -> SuccessRateRanker:
    return SuccessRateRanker(
        stats_from(env), params.dimension, params.explore, params.min_samples, params.prior, params.optimism
    )

