"""Success-rate ranker over live, in-memory, non-stationary statistics.

`SuccessStats` keeps, per (channel, key), two discounted success/failure counts: a fast one (short
half-life) and a slow one (long half-life) behind the ranking estimate. Counts decay by event (each new
event on a key multiplies the old counts by 0.5 ** (1 / half_life_events)) and by time (0.5 ** (dt /
half_life_s) between events). What rankers read, per key:

- the rate now: a discounted least-squares line through the slow window's outcomes over their ages,
  read at age 0, its slope shrunk to 0 unless significant (`trend`), so a steady rate reads as the
  plain discounted mean and a real drift is followed without the mean's lag of about one half-life;
- a mixture of windows (by default): plain discounted means over 300 to 10,000 events beside the trend
  line, averaged by how well each predicted the key's latest outcomes (Bayesian model averaging), so a
  steady key reads its long windows and a step of a few points re-ranks within hundreds of events;
- change detection (optional, off by default: Page-Hinkley on each event's residual against the slow
  mean, one detector per channel): an alarm restarts the slow window of the channel and all its keys
  from their fast windows;
- outage detection: a failure run implausible at the key's rate is an outage, not declines: its
  failures are taken back out and the channel ranks last until `outage_hold_s` after the last one;
- staleness: a (channel, key)'s evidence also halves every `stale_half_life_events` events of the key
  on other channels, so a channel left alone is trusted less and its optimism bonus grows until it is
  tried again (what gets a key out of an early, unlucky lock-in on the wrong channel);
- pending outcomes (`expect`): under delayed feedback, outcomes on their way count as evidence in the
  optimism bonus, so a little-known channel is not sent a whole delay's worth of payments blind.

Keys are `dimension_key(dimension, ctx)`: "" for the whole channel, "currency:EUR", "bin6:424242"...
`record_outcome` records one outcome under every dimension in `SuccessStats.dimensions` at once: all of
them unless the wiring narrows it to those its chains read (`dimensions_read`), each key costing a
little on every outcome.
An estimate is shrunk hierarchically: the channel-wide rate towards `prior` with `min_samples`
pseudo-events. A key's rate (`key_model`, default "offset") is the channel's level now plus the key's
offset from it: the level, one per channel and dimension, learns all its keys' outcomes with each key's
offset taken out (a drift of the whole channel is followed with all its traffic, not each key's share;
a change of the traffic mix between keys does not move it); the offset is a slow discounted mean of the
key's outcomes minus the level, shrunk towards 0 with `key_samples` pseudo-events, so a sparse key reads
as the channel and a well-known one keeps its own difference. "shrink" (the model before 2026-12-03,
and what keys read while peers are merged): the key's own estimate shrunk towards the channel-wide rate
with `key_samples` pseudo-events.

Contract for callers of `record`/`record_outcome`: only outcomes the channel caused count. Pass
success=True for approved; False for soft declines, unavailable and unknown; do NOT record hard declines
(the card's fault) nor pending / requires-action until they resolve. `counts_for_channel` encodes this.
Delayed feedback: record when the outcome becomes known; optionally `expect` it when the attempt is
made (and `settle` it if it will never count), which only tempers exploration.

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
    # Staleness: a (channel, key)'s evidence also halves every `stale_half_life_events` events of the
    # same key on other channels (at read time too), so a channel left alone for a while is trusted
    # less: its rate is pulled towards the channel-wide one and its optimism bonus grows until it is
    # tried again. This re-exploration is what gets a key out of an early unlucky lock-in.
    stale_half_life_events: float | None = 5000.0
    # Page-Hinkley change detection on each event's residual (outcome - slow mean): a cumulative
    # deviation beyond `change_threshold` (after a per-event allowance `change_delta`) resets the slow
    # counts to the fast ones, so a shift of a few points re-ranks within hundreds of events, not thousands.
    # Off by default: with the mixture below, the short windows follow a step within a few hundred
    # events without the detector's false alarms (each restarted a channel from its last ~100 events).
    change_detection: bool = False
    change_delta: float = 0.01
    change_threshold: float = 8.0
    change_min_events: float = 40.0  # slow evidence needed before residuals accumulate
    # "channel": one detector per channel (its channel-wide counts); an alarm restarts every key of the
    # channel. "key": one detector per (channel, key). Every detector raises false alarms at its own
    # rate, and a restart after a false alarm costs (it restarts from an unluckily bad recent window).
    change_scope: Literal["channel", "key"] = "channel"
    # Outage detection: a run of consecutive failures that is implausible at the key's rate
    # (probability < outage_p) is an outage, not a decline: those failures are taken back out of the
    # approval counts and the channel is ranked last until `outage_hold_s` after its last failure.
    outage_p: float = 1e-4
    outage_min_run: int = 4
    outage_hold_s: float = 10.0
    # Trend following: rank by a discounted least-squares line's value now instead of the lagging mean.
    trend: bool = True
    trend_min_t2: float = 4.0  # k: a slope with t^2 <= k reads as flat; above, it is shrunk by k / t^2
    # Delayed feedback: a channel's rate is read that many events ahead along its channel-wide trend
    # line's (shrunk) slope as it has outcomes on their way (`expect`), at most `trend_ahead_max_events`
    # and at most the mean age of the line's outcomes (no further ahead than its evidence reaches back):
    # the outcomes that would show a drift are late, the line says where it has gone meanwhile.
    trend_ahead: bool = True
    trend_ahead_max_events: Annotated[float, msgspec.Meta(ge=0.0)] = 1000.0
    # Mixture of windows: besides the trend line, plain discounted means with these half-lives (events);
    # the rate read is their average weighted by how well each predicted the key's recent outcomes
    # (Bayesian model averaging: weights ~ exp(discounted log-likelihood, half-life
    # `mixture_evidence_half_life` events)), its evidence n the same average of their counts. So a
    # steady key reads its long windows (precise), a changing one its short ones (quick). Empty: off,
    # the trend line alone.
    mixture_half_lives: tuple[Annotated[float, msgspec.Meta(gt=0.0)], ...] = (300.0, 1000.0, 3000.0, 10000.0)
    mixture_evidence_half_life: Annotated[float, msgspec.Meta(gt=0.0)] = 500.0
    # How a keyed rate (a dimension's key, e.g. "country:FR") is read. "offset": the channel's level now
    # plus the key's offset from it. The level (one per channel and dimension) learns every key's
    # outcomes with that key's offset taken out, through the same windows as the mixture (or the slow
    # half-life without one), so a drift of the whole channel is followed with all its traffic instead
    # of each key's share of it; the offset is a slow discounted mean (`offset_half_life_events` of the
    # key's events) of the key's outcomes minus the level, shrunk towards 0 by `key_samples`, so a key's
    # own difference (a local acquirer) stays. "shrink": the key's own estimate, shrunk towards the
    # channel-wide one by `key_samples` (the model before 2026-12-03). With peers merged (scale-out),
    # their counts (which carry no levels) are pooled into the level and the offset: `_level_read`.
    key_model: Literal["offset", "shrink"] = "offset"
    offset_half_life_events: Annotated[float, msgspec.Meta(gt=0.0)] = 3000.0
    offset_samples: Annotated[float, msgspec.Meta(ge=0.0)] = 50.0  # the offset's shrinkage while the level learns


class Cell(msgspec.Struct, kw_only=True, array_like=True):
    """Discounted counts of one (channel, key): fast and slow successes/failures, last event time."""

    fs: float = 0.0
    ff: float = 0.0
    ss: float = 0.0
    sf: float = 0.0
    t: float | None = None
    e: int = 0  # approval events recorded (peers' counts of it give each key's event scale: `after_merge`)


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    cells: dict[str, dict[str, Cell]]  # channel -> key -> counts
    # `key_model: offset` state, for peers (empty from a build before it, or under "shrink"):
    levels: dict[str, dict[str, tuple[float, float]]] = {}  # channel -> dimension -> the level's (p, evidence)
    offsets: dict[str, dict[str, tuple[float, float]]] = {}  # channel -> key -> the offset's (r, n)


class _Watch:
    """Local state of one (channel, key), never shared: Page-Hinkley sums, the current failure run (with
    the state from before it, to take an outage's failures back out), the age moments of the slow
    counts (a1 = sum w*age, a2 = sum w*age^2, y1 = sum w*age*success, ages in the key's own events) and
    the trend-following prediction derived from them at the last event."""

    __slots__ = ("cell", "gp", "gn", "run", "k", "backup", "a1", "a2", "y1", "p", "seen", "n", "pt", "mx", "ll",
                 "backup_mix", "off", "dec", "slope")

    def __init__(self, cell: Cell, dec: _Decays) -> None:
        self.cell = cell
        self.dec = dec  # the per-event decays at this key's event scale
        self.gp = 0.0
        self.gn = 0.0
        self.run = 0
        self.k = 0
        self.backup: tuple[float, ...] = ()
        self.a1 = 0.0
        self.a2 = 0.0
        self.y1 = 0.0
        self.p = -1.0  # < 0: no prediction yet (fall back to the slow mean)
        self.seen = 0  # the key's event count (over all channels) at this cell's last event
        self.n = 0.0  # the evidence behind `p` (the slow counts' total; the mixture's weighted one)
        self.pt = -1.0  # the trend line's own prediction (== p without a mixture)
        self.slope = 0.0  # the trend line's shrunk change of the rate per event of age (negative: rising)
        self.mx: list[float] = []  # mixture windows' counts: [s0, f0, s1, f1, ...]
        self.ll: list[float] = []  # discounted log-likelihood of each expert: windows, then the trend line
        self.backup_mix: tuple[list[float], list[float]] = ([], [])  # mx and ll before a failure run
        self.off: _Offset | None = None  # the key's offset from its channel's level (`key_model: offset`)


class _Decays:
    """Per-event decay factors at one event scale: how many events of the whole cluster one event of this
    instance stands for (1 alone; about N for a key whose traffic N instances share, see `after_merge`),
    so that every window spans the same payments in scale-out as on one instance."""

    __slots__ = ("scale", "fast", "slow", "stale", "mix", "ev", "level", "offset")

    def __init__(self, c: StatsConfig, scale: float) -> None:
        self.scale = scale
        self.fast = 0.5 ** (scale / c.fast_half_life_events)
        self.slow = 0.5 ** (scale / c.slow_half_life_events)
        self.stale = 0.5 ** (scale / c.stale_half_life_events) if c.stale_half_life_events else 1.0
        self.mix = tuple(0.5 ** (scale / h) for h in c.mixture_half_lives)
        self.ev = 0.5 ** (scale / c.mixture_evidence_half_life)
        self.level = self.mix or (self.slow,)  # the levels' windows (`key_model: offset`)
        self.offset = 0.5 ** (scale / c.offset_half_life_events)


class _Level:
    """A channel's level under one dimension (`StatsConfig.key_model` "offset"): discounted windows of
    the outcomes of all its keys, each with its key's offset taken out (so hits are fractional), read as
    their average weighted by each window's discounted predictive log-likelihood, as the mixture is."""

    __slots__ = ("s", "n", "ll", "p", "w")

    def __init__(self, windows: int) -> None:
        self.s = [0.0] * windows
        self.n = [0.0] * windows
        self.ll = [0.0] * windows
        self.p = -1.0  # < 0: nothing learnt yet
        self.w = 0.0  # the evidence behind p (the windows' counts, weighted as p is)


class _Offset:
    """A key's offset from its channel's level: discounted sums of (outcome - level) and of events."""

    __slots__ = ("level", "r", "n")

    def __init__(self, level: _Level) -> None:
        self.level = level
        self.r = 0.0
        self.n = 0.0


class SuccessStats:
    """In-memory success statistics. Single-threaded (one event loop); policies only read."""

    _SEEN_LIMIT = 4096
    _RATE_MEMORY = 0.7  # per sync round, in the event scale's sums (`after_merge`)
    _EXPECTED_LIMIT = 100_000

    def __init__(self, config: StatsConfig | None = None) -> None:
        self.reconfigure(config or StatsConfig())
        self._local: dict[tuple[str, str], Cell] = {}
        self._watch: dict[tuple[str, str], _Watch] = {}
        self._keys: dict[str, list[str]] = {}  # channel -> its keys other than ""
        self._key_events: dict[str, int] = {}  # key -> events recorded under it, over all channels
        self._peers: dict[str, Snapshot] = {}
        self._peer_events: dict[str, dict[tuple[str, str], int]] = {}  # peer -> its keys' `e` at the last round
        # (channel, key) -> (own new events, peers' new events, both discounted over rounds; own `e` then)
        self._event_rates: dict[tuple[str, str], tuple[float, float, int]] = {}
        self._remote: dict[tuple[str, str], tuple[float, float]] = {}  # summed slow (s, f) of all peers
        # the peers' levels and offsets, summed as `_level_read` pools them (see `merge`)
        self._remote_levels: dict[tuple[str, str], tuple[float, float]] = {}  # (channel, dim) -> (sum p*w, sum w)
        self._remote_offsets: dict[tuple[str, str], tuple[float, float]] = {}  # (channel, key) -> (sum r+n*p, sum n)
        self._expected: dict[str, tuple[str, tuple[str, ...]]] = {}  # payment id -> (channel, keys)
        self._pending: dict[tuple[str, str], int] = {}  # (channel, key) -> expected outcomes
        self._seen: dict[str, None] = {}  # recent payment ids with a recorded outcome, oldest first
        self.now = -math.inf  # the latest event time seen: "now" for reads, which take no clock
        # what record_outcome/expect key outcomes by when not told: every dimension, or what chains read
        self.dimensions: tuple[Dimension, ...] = DIMENSIONS
        self._levels: dict[tuple[str, str], _Level] = {}  # (channel, dimension) -> its level ("offset")
        # per channel, failures not yet given to the levels: a run that turns out an outage never is
        self._held: dict[str, list[tuple[str, ...]]] = {}

    def reconfigure(self, config: StatsConfig) -> None:
        """Use `config` from now on (a config reload); what was learned is kept and read with it."""
        self.config = c = config
        self._log_outage_p = math.log(c.outage_p)
        self._trend_min_t2 = c.trend_min_t2  # k in the slope shrinkage (see `_predict`)
        self._ahead_max = c.trend_ahead_max_events if c.trend and c.trend_ahead else 0.0  # 0: read at age 0
        self._n_mix = len(c.mixture_half_lives)  # 0: no mixture, the trend line alone
        self._offsets_on = c.key_model == "offset"
        one = _Decays(c, 1.0)
        before: _Decays | None = getattr(self, "_dec1", None)
        if before is not None and before.level != one.level:  # other windows: the levels start again
            self._levels.clear()
            self._held.clear()
            for w in self._watch.values():
                w.off = None
        self._dec1: _Decays = one
        self._decs: dict[float, _Decays] = {1.0: one}  # by event scale
        self._offset_samples = c.offset_samples
        for w in getattr(self, "_watch", {}).values():
            w.dec = self._decays(w.dec.scale)

    def _decays(self, scale: float) -> _Decays:
        dec = self._decs.get(scale)
        if dec is None:
            dec = self._decs[scale] = _Decays(self.config, scale)
        return dec

    def record(self, channel: str, key: str, success: bool, now: float, approval: bool = True) -> None:
        """One outcome. `approval=False`: it only tells whether the channel is up (a fail-over attempt,
        whose card another channel already declined): it moves the outage detector, not the rate."""
        c = self.config
        ck = (channel, key)
        cell = self._local.get(ck)
        if cell is None:
            cell = self._local[ck] = Cell()
            if key:
                self._keys.setdefault(channel, []).append(key)
            w = self._watch[ck] = _Watch(cell, self._dec1)
        else:
            w = self._watch.get(ck) or self._watch.setdefault(ck, _Watch(cell, self._dec1))
        if now > self.now:
            self.now = now
        if not approval:
            if success:
                w.run = 0
            elif w.run > 0:
                w.run += 1
                if w.run == w.k:
                    self._restore(cell, w)
                cell.t = now if cell.t is None else max(cell.t, now)
            return
        if success:
            w.run = 0
        else:
            if w.run == 0:  # a failure run starts: remember the state before it
                n = cell.ss + cell.sf
                p = cell.ss / n if n > 0 else 0.0
                k = c.outage_min_run
                if 0.0 < p < 1.0:
                    k = max(k, min(30, math.ceil(self._log_outage_p / math.log(1.0 - p))))
                w.k = k
                w.backup = (cell.fs, cell.ff, cell.ss, cell.sf, w.gp, w.gn, w.a1, w.a2, w.y1, w.p, w.n, w.pt, w.slope)
                w.backup_mix = (list(w.mx), list(w.ll))
            w.run += 1
            if w.run >= w.k:  # an outage: its failures say nothing about approvals
                if w.run == w.k:
                    self._restore(cell, w)
                cell.t = now if cell.t is None else max(cell.t, now)
                return
        time_decay = 1.0
        if c.half_life_s is not None and cell.t is not None and now > cell.t:
            time_decay = 0.5 ** ((now - cell.t) / c.half_life_s)
        k_events = self._key_events.get(key, 0) + 1
        self._key_events[key] = k_events
        cell.e += 1
        dec = w.dec
        if w.seen and k_events - 1 > w.seen and dec.stale < 1.0:
            time_decay *= dec.stale ** (k_events - 1 - w.seen)
        w.seen = k_events
        df, ds = dec.fast * time_decay, dec.slow * time_decay
        hit = 1.0 if success else 0.0
        n_slow = cell.ss + cell.sf
        mean = cell.ss / n_slow if n_slow > 0 else 0.0
        if self._n_mix:
            self._mix_learn(w, hit, time_decay, mean if n_slow > 0 else 0.5)
        # every earlier event gets one event older: shift the age moments, then decay
        a1 = w.a1
        w.a2 = (w.a2 + 2.0 * a1 + n_slow) * ds
        w.a1 = (a1 + n_slow) * ds
        w.y1 = (w.y1 + cell.ss) * ds
        cell.fs = cell.fs * df + hit
        cell.ff = cell.ff * df + (1.0 - hit)
        cell.ss = cell.ss * ds + hit
        cell.sf = cell.sf * ds + (1.0 - hit)
        cell.t = now if cell.t is None else max(cell.t, now)
        if c.change_detection and n_slow >= c.change_min_events and (key == "" or c.change_scope == "key"):
            w.gp = max(0.0, w.gp + hit - mean - c.change_delta)
            w.gn = max(0.0, w.gn + mean - hit - c.change_delta)
            if w.gp > c.change_threshold or w.gn > c.change_threshold:
                self._restart(cell, w)
                if c.change_scope == "channel":
                    for other in self._keys.get(channel, ()):
                        self._restart(self._local[(channel, other)], self._watch[(channel, other)])
        self._refresh(cell, w)

    def _mix_learn(self, w: _Watch, hit: float, time_decay: float, prior: float) -> None:
        """Score each expert's prediction of this outcome (made before it), then add it to the windows."""
        if len(w.mx) != 2 * self._n_mix:  # new, or the windows were reconfigured: start them empty
            self._mix_start(w, 0.0, 0.0)
        mx, ll = w.mx, w.ll
        ev = w.dec.ev
        log = math.log
        for i, d in enumerate(w.dec.mix):
            s, f = mx[2 * i], mx[2 * i + 1]
            p = (s + 2.0 * prior) / (s + f + 2.0)
            p = 1e-4 if p < 1e-4 else 0.9999 if p > 0.9999 else p
            ll[i] = ll[i] * ev + log(p if hit else 1.0 - p)
            d *= time_decay
            mx[2 * i] = s * d + hit
            mx[2 * i + 1] = f * d + 1.0 - hit
        p = w.pt if w.pt >= 0.0 else prior
        p = 1e-4 if p < 1e-4 else 0.9999 if p > 0.9999 else p
        ll[-1] = ll[-1] * ev + log(p if hit else 1.0 - p)

    def _mix_start(self, w: _Watch, s: float, f: float) -> None:
        """Start the mixture of one key from (s, f) counts, each window capped at its own full size
        (1 / (1 - decay) events), every expert's log-likelihood at 0."""
        n = s + f
        w.mx = []
        for d in w.dec.mix:
            scale = min(1.0, 1.0 / (1.0 - d) / n) if n > 0.0 else 0.0
            w.mx += (s * scale, f * scale)
        w.ll = [0.0] * (self._n_mix + 1)

    def _refresh(self, cell: Cell, w: _Watch) -> None:
        """Recompute what rankers read of one key: `p` (trend line, or the mixture) and its evidence `n`.
        Every window holds events whenever the slow counts do (they all learn the same events)."""
        w.pt = self._predict(cell.ss, cell.sf, w)
        n_slow = cell.ss + cell.sf
        if not self._n_mix or len(w.mx) != 2 * self._n_mix or n_slow <= 0.0:
            w.p, w.n = w.pt, n_slow
            return
        mx, ll = w.mx, w.ll
        top = max(ll)
        exp = math.exp
        total = pw = nw = 0.0
        for i in range(len(ll) - 1):
            wt = exp(ll[i] - top)
            s = mx[2 * i]
            n = s + mx[2 * i + 1]
            total += wt
            pw += wt * s / n
            nw += wt * n
        wt = exp(ll[-1] - top)
        total += wt
        pw += wt * w.pt
        nw += wt * n_slow
        w.p = pw / total
        w.n = nw / total

    def _restore(self, cell: Cell, w: _Watch) -> None:
        cell.fs, cell.ff, cell.ss, cell.sf, w.gp, w.gn, w.a1, w.a2, w.y1, w.p, w.n, w.pt, w.slope = w.backup
        w.mx, w.ll = w.backup_mix  # copies taken when the run started, and only restored once per run

    def _restart(self, cell: Cell, w: _Watch) -> None:
        """A detected change: the slow state restarts from the fast window, with no trend (its ages are
        those of a full fast window: mean mu/(1-mu), variance mu/(1-mu)^2)."""
        mu = w.dec.fast
        age = mu / (1.0 - mu)
        cell.ss, cell.sf = cell.fs, cell.ff
        n = cell.ss + cell.sf
        w.a1 = n * age
        w.a2 = n * (age * age + age / (1.0 - mu))
        w.y1 = cell.ss * age
        w.gp = w.gn = 0.0
        self._refresh(cell, w)

    def _predict(self, s: float, f: float, w: _Watch) -> float:
        """The trend-following estimate now: a weighted least-squares line through the discounted
        outcomes over their ages, read at age 0. Its slope is shrunk towards 0 by its own noise
        (slope * max(0, 1 - k / t^2), t its t-statistic, k = `trend_min_t2`, positive-part James-Stein),
        so a flat rate reads as the plain discounted mean and a real drift is followed without the
        mean's lag of about one half-life."""
        n = s + f
        w.slope = 0.0
        if n <= 0.0:
            return -1.0
        mean = s / n
        if not self.config.trend:
            return mean
        abar = w.a1 / n
        saa = w.a2 - w.a1 * abar
        if saa <= 1e-9:
            return mean
        d = (w.y1 - abar * s) / saa  # change of the rate per event of age (negative: rising)
        m = 0.01 if mean < 0.01 else 0.99 if mean > 0.99 else mean
        k_var_d = self._trend_min_t2 * m * (1.0 - m) / saa  # k * the slope's variance
        dd = d * d
        if dd <= k_var_d:  # t^2 <= k: flat
            return mean
        w.slope = d * (1.0 - k_var_d / dd)
        p = mean - w.slope * abar
        return 0.0 if p < 0.0 else 1.0 if p > 1.0 else p

    def record_outcome(
        self, channel: str, ctx: RouteContext, success: bool, now: float, dimensions: Iterable[Dimension] | None = None
    ) -> None:
        """Record one outcome under the channel-wide key and each dimension's key (each key once;
        `dimensions` None: `self.dimensions`).

        Only a payment's first recorded outcome moves approval rates: a later one for the same payment id
        (a fail-over attempt, whose card another channel already declined) only feeds outage detection,
        whichever attempts the wiring records."""
        keys = {""} | {dimension_key(d, ctx) for d in (self.dimensions if dimensions is None else dimensions)}
        pid = ctx.payment_id
        first = pid not in self._seen
        if first:
            self._seen[pid] = None
            if len(self._seen) > self._SEEN_LIMIT:
                del self._seen[next(iter(self._seen))]
        if self._expected:
            self.settle(ctx)
        for key in keys:
            self.record(channel, key, success, now, first)
        if first and self._offsets_on and len(keys) > 1:
            self._learn_levels(channel, tuple(k for k in keys if k), success)

    def _learn_levels(self, channel: str, keys: tuple[str, ...], success: bool) -> None:
        """Key offsets and channel levels learn one first outcome. A failure waits until the channel's
        failure run ends (a success) or turns out an outage (its failures say nothing about approvals,
        as in `record`); at most 30 wait, the longest run an outage needs."""
        held = self._held.setdefault(channel, [])
        if not success:
            w = self._watch[(channel, "")]
            if w.run >= w.k:
                held.clear()
                return
            held.append(keys)
            if len(held) > 30:
                self._learn_offsets(channel, held.pop(0), 0.0)
            return
        for failed in held:
            self._learn_offsets(channel, failed, 0.0)
        held.clear()
        self._learn_offsets(channel, keys, 1.0)

    def _learn_offsets(self, channel: str, keys: tuple[str, ...], hit: float) -> None:
        """Each key's offset learns the outcome against its level's prediction, then the level learns the
        outcome with the key's offset (as it stood, shrunk by `offset_samples`) taken out."""
        dec = self._watch[(channel, "")].dec  # a level learns at its channel's event scale
        ms = dec.level
        ev = dec.ev
        log = math.log
        for key in keys:
            wk = self._watch[(channel, key)]
            off = wk.off
            if off is None:
                dim = key.partition(":")[0]
                level = self._levels.get((channel, dim))
                if level is None:
                    level = self._levels[(channel, dim)] = _Level(len(ms))
                off = wk.off = _Offset(level)
            level = off.level
            if level.p >= 0.0:
                lp = level.p
            else:
                w = self._watch[(channel, "")]
                lp = w.p if w.p >= 0.0 else 0.5
            shift = off.r / (off.n + self._offset_samples)
            od = wk.dec.offset
            off.r = off.r * od + hit - lp
            off.n = off.n * od + 1.0
            y = hit - shift  # the outcome with the key's own difference taken out
            s, n, ll = level.s, level.n, level.ll
            for i, d in enumerate(ms):
                p = (s[i] + 2.0 * lp) / (n[i] + 2.0)
                p = 1e-4 if p < 1e-4 else 0.9999 if p > 0.9999 else p
                ll[i] = ll[i] * ev + y * log(p) + (1.0 - y) * log(1.0 - p)
                s[i] = s[i] * d + y
                n[i] = n[i] * d + 1.0
            top = max(ll)
            total = pw = nw = 0.0
            for i in range(len(ms)):
                wt = math.exp(ll[i] - top)
                total += wt
                pw += wt * s[i] / n[i]
                nw += wt * n[i]
            level.p = pw / total
            level.w = nw / total

    def expect(self, channel: str, ctx: RouteContext, dimensions: Iterable[Dimension] | None = None) -> None:
        """An outcome of this payment at this channel will be learnt later (delayed feedback: pending
        wallet payments, late webhooks). Until `record_outcome` (or `settle`) for the payment, it counts
        as evidence on its way in the optimism bonus, so a little-known channel is not sent a whole
        delay's worth of traffic before its first outcome arrives."""
        pid = ctx.payment_id
        if pid in self._expected:
            return
        keys = tuple({""} | {dimension_key(d, ctx) for d in (self.dimensions if dimensions is None else dimensions)})
        self._expected[pid] = (channel, keys)
        pending = self._pending
        for key in keys:
            pending[(channel, key)] = pending.get((channel, key), 0) + 1
        if len(self._expected) > self._EXPECTED_LIMIT:  # never settled: stop counting the oldest
            self.settle_id(next(iter(self._expected)))

    def settle(self, ctx: RouteContext) -> None:
        """The payment's expected outcome arrived or will not count (e.g. a hard decline)."""
        self.settle_id(ctx.payment_id)

    def settle_id(self, payment_id: str) -> None:
        found = self._expected.pop(payment_id, None)
        if found is not None:
            channel, keys = found
            pending = self._pending
            for key in keys:
                left = pending[(channel, key)] - 1
                if left:
                    pending[(channel, key)] = left
                else:
                    del pending[(channel, key)]

    def counts(self, channel: str, key: str) -> tuple[float, float]:
        """Discounted (successes, failures) behind the ranking estimate: local plus merged peers."""
        cell = self._local.get((channel, key))
        if not self._remote:  # the common case: no peers merged
            return (0.0, 0.0) if cell is None else (cell.ss, cell.sf)
        rs, rf = self._remote.get((channel, key), (0.0, 0.0))
        if cell is None:
            return rs, rf
        return cell.ss + rs, cell.sf + rf

    def rate(self, channel: str, key: str) -> tuple[float, float, float]:
        """(current rate, evidence n, n discounted for staleness) of one key: the local trend-following
        prediction pooled with the merged peers' discounted counts by weight; zeros without any data."""
        w = self._watch.get((channel, key))
        if w is None:
            n_local = p_local = n_fresh = 0.0
        else:
            cell = w.cell
            n_local = n_fresh = w.n
            p_local = w.p if w.p >= 0.0 else (cell.ss / n_local if n_local > 0 else 0.0)
            if w.seen:
                stale = self._key_events[key] - w.seen
                if stale > 0:
                    n_fresh *= w.dec.stale ** stale
        if self._remote:
            rs, rf = self._remote.get((channel, key), (0.0, 0.0))
            n = n_local + rs + rf
            return ((p_local * n_local + rs) / n if n > 0 else 0.0), n, n_fresh + rs + rf
        return p_local, n_local, n_fresh

    def is_down(self, channel: str) -> bool:
        """The channel's latest failures form an outage-like run, the last one under `outage_hold_s` ago."""
        w = self._watch.get((channel, ""))
        if w is None or w.run < w.k or w.run == 0:
            return False
        cell = self._local[(channel, "")]
        return cell.t is not None and self.now - cell.t < self.config.outage_hold_s

    def estimate(
        self, channel: str, key: str, prior: float, min_samples: float, key_samples: float | None = None
    ) -> float:
        """Success rate now: the channel-wide rate smoothed towards `prior` with `min_samples`
        pseudo-events; for a key, its own rate shrunk towards that channel-wide rate with `key_samples`
        pseudo-events (default `min_samples`): a sparse key reads as the channel, a well-known one as itself."""
        return self._estimate(channel, key, prior, min_samples, key_samples)[0]

    def _estimate(
        self, channel: str, key: str, prior: float, min_samples: float, key_samples: float | None
    ) -> tuple[float, float]:
        """(estimate, the staleness-discounted evidence behind it)."""
        p, n, n_fresh = self.rate(channel, "")
        base = (p * n + prior * min_samples) / (n + min_samples) if n > 0 else prior
        if key == "":
            return self._read_ahead(channel, base), n_fresh
        p, n, n_fresh = self.rate(channel, key)
        if n > 0.0:
            m = min_samples if key_samples is None else key_samples
            p = (p * n_fresh + base * m) / (n_fresh + m)
        else:
            p = base
        if self._offsets_on:
            p = self._level_read(channel, key, prior, min_samples, key_samples, p)
        return self._read_ahead(channel, p), n_fresh

    def _read_ahead(self, channel: str, p: float) -> float:
        """`p` read ahead along the channel's trend line over its outcomes on their way (`trend_ahead`):
        as many events as it has pending, at most `trend_ahead_max_events` and at most the mean age of
        the line's outcomes (as `_predict` reads it), within [0, 1]."""
        if not (self._ahead_max and self._pending):
            return p
        ahead = self._pending.get((channel, ""), 0)
        w = self._watch.get((channel, "")) if ahead else None
        if w is None or not w.slope:
            return p
        reach = min(self._ahead_max, w.a1 / (w.cell.ss + w.cell.sf))
        p -= w.slope * (ahead if ahead < reach else reach)
        return 0.0 if p < 0.0 else 1.0 if p > 1.0 else p

    def _level_read(
        self, channel: str, key: str, prior: float, min_samples: float, key_samples: float | None, otherwise: float
    ) -> float:
        """A key's rate under `key_model: offset`: its channel's level (shrunk towards `prior` by
        `min_samples`) plus the key's offset (shrunk towards 0 by `key_samples`, default `min_samples`),
        within [0, 1]; `otherwise` (the "shrink" reading) while neither this instance nor a peer knows
        the channel there yet.

        With peers merged (scale-out) the level is every instance's level averaged by its evidence, and
        the offset every instance's offset re-measured against that common level: instance i's key reads
        lp_i + r_i / n_i, so it contributes r_i + n_i * (lp_i - level) over n_i events. Instances with
        different traffic mixes (one gets all of FR) then still read each key as the instances that see it."""
        w = self._watch.get((channel, key))
        off = w.off if w is not None else None
        dim = key.partition(":")[0]
        level = off.level if off is not None else self._levels.get((channel, dim))
        lp, lw = (level.p, level.w) if level is not None and level.p >= 0.0 else (0.0, 0.0)
        r, n = (off.r, off.n) if off is not None and lw > 0.0 else (0.0, 0.0)
        if self._remote:
            ps, ws = self._remote_levels.get((channel, dim), (0.0, 0.0))
            if ws > 0.0:
                rq, rn = self._remote_offsets.get((channel, key), (0.0, 0.0))
                own = r + n * lp  # this instance's key: r + n * lp_local, as the peers' are summed
                lp = (lp * lw + ps) / (lw + ws)
                lw += ws
                n += rn
                r = own + rq - n * lp
        if lw <= 0.0:
            return otherwise
        p = (lp * lw + prior * min_samples) / (lw + min_samples)
        if n > 0.0:
            p += r / (n + (min_samples if key_samples is None else key_samples))
        return 0.0 if p < 0.0 else 1.0 if p > 1.0 else p

    def score(
        self, channel: str, key: str, prior: float, min_samples: float, optimism: float,
        key_samples: float | None = None,
    ) -> float:
        """What rankers order by: the estimate plus an optimism bonus `optimism * sd` that shrinks as the
        key's evidence n grows (sd = sqrt(p(1-p)/(n+1)), n discounted for staleness, plus the expected
        outcomes on their way), so a little-tried channel gets tried, a well-known loser does not, and
        one left alone for long is tried again; minus 1 while the channel looks down (an outage ranks it
        last). The hot path of every decision: `_estimate` and `is_down` inlined for local-only stats."""
        if self._remote:
            p, n = self._estimate(channel, key, prior, min_samples, key_samples)
            down = self.is_down(channel)
        else:  # (w.p >= 0 whenever the cell has evidence: `_predict` only returns -1 for n == 0)
            watch = self._watch
            w = watch.get((channel, ""))
            down = False
            if w is not None and w.run and w.run >= w.k and w.cell.t is not None:
                down = self.now - w.cell.t < self.config.outage_hold_s
            level = wk = None
            if key:
                wk = watch.get((channel, key))
                if self._offsets_on:  # `_level_read`, inlined
                    off = wk.off if wk is not None else None
                    level = off.level if off is not None else self._levels.get((channel, key.partition(":")[0]))
                    if level is not None and level.p >= 0.0:
                        p = (level.p * level.w + prior * min_samples) / (level.w + min_samples)
                        if off is not None:
                            p += off.r / (off.n + (min_samples if key_samples is None else key_samples))
                        p = 0.0 if p < 0.0 else 1.0 if p > 1.0 else p
                    else:
                        level = None
            if level is None:  # the channel-wide estimate: the answer, or what a key's rate shrinks towards
                if w is None:
                    p = prior
                    n = 0.0
                else:
                    n = w.n
                    p = (w.p * n + prior * min_samples) / (n + min_samples) if n > 0.0 else prior
            if not key:
                if w is not None and w.seen:
                    stale = self._key_events[""] - w.seen
                    if stale > 0:
                        n *= w.dec.stale ** stale
            elif wk is None:
                n = 0.0
            else:
                n = wk.n
                if n > 0.0:
                    if wk.seen:
                        stale = self._key_events[key] - wk.seen
                        if stale > 0:
                            n *= wk.dec.stale ** stale
                    if level is None:
                        m = min_samples if key_samples is None else key_samples
                        p = (wk.p * n + p * m) / (n + m)
            if self._pending and w is not None and w.slope:
                p = self._read_ahead(channel, p)
        if optimism > 0.0:
            if self._pending:
                n += self._pending.get((channel, key), 0)
            p += optimism * math.sqrt(p * (1.0 - p) / (n + 1.0))
        return p - 1.0 if down else p

    def snapshot(self) -> Snapshot:
        """This instance's own counts (not the peers'), to publish."""
        cells: dict[str, dict[str, Cell]] = {}
        for (channel, key), cell in self._local.items():
            cells.setdefault(channel, {})[key] = Cell(fs=cell.fs, ff=cell.ff, ss=cell.ss, sf=cell.sf, t=cell.t, e=cell.e)
        levels: dict[str, dict[str, tuple[float, float]]] = {}
        offsets: dict[str, dict[str, tuple[float, float]]] = {}
        if self._offsets_on:
            for (channel, dim), level in self._levels.items():
                if level.p >= 0.0:
                    levels.setdefault(channel, {})[dim] = (level.p, level.w)
            for (channel, key), w in self._watch.items():
                if w.off is not None and w.off.level.p >= 0.0:
                    offsets.setdefault(channel, {})[key] = (w.off.r, w.off.n)
        return Snapshot(cells=cells, levels=levels, offsets=offsets)

    def restore(self, snapshot: Snapshot) -> int:
        """Start from counts saved earlier (`snapshot()` of a previous run: a restart), as if each key had
        just restarted from them: no trend, no detector or outage state, no staleness. Only keys this
        instance has not learned anything about yet are taken. Returns how many were restored."""
        restored = 0
        for channel, by_key in snapshot.cells.items():
            for key, saved in by_key.items():
                ck = (channel, key)
                if ck in self._local:
                    continue
                cell = self._local[ck] = Cell(fs=saved.fs, ff=saved.ff, ss=saved.ss, sf=saved.sf, t=saved.t)
                if key:
                    self._keys.setdefault(channel, []).append(key)
                w = self._watch[ck] = _Watch(cell, self._dec1)
                # the slow window's age moments as a restart leaves them, so the trend starts flat
                n = cell.ss + cell.sf
                mu = self._dec1.slow
                age = mu / (1.0 - mu)
                w.a1 = n * age
                w.a2 = n * (age * age + age / (1.0 - mu))
                w.y1 = cell.ss * age
                if self._n_mix:
                    self._mix_start(w, cell.ss, cell.sf)
                self._refresh(cell, w)
                if cell.t is not None and cell.t > self.now:
                    self.now = cell.t
                restored += 1
        if self._offsets_on:
            self._restore_offsets(snapshot)
        return restored

    def _restore_offsets(self, snapshot: Snapshot) -> None:
        """Levels and offsets as a restart leaves them: a channel's level under each dimension starts
        from the level the snapshot saved (p, evidence), or, from a snapshot without levels, from its
        channel-wide counts, each window holding that rate over at most its size; a key's offset is the
        saved one, or its saved rate minus the level's, with the key's evidence capped at the offset
        window. (Only keys restored just now: a key that learnt here first keeps its own.)"""
        cap = 1.0 / (1.0 - self._dec1.offset)
        for channel, by_key in snapshot.cells.items():
            wide = self._local.get((channel, ""))
            if wide is None or wide.ss + wide.sf <= 0.0:
                continue
            n_wide = wide.ss + wide.sf
            saved_levels = snapshot.levels.get(channel, {})
            saved_offsets = snapshot.offsets.get(channel, {})
            for key in by_key:
                cell = self._local.get((channel, key))
                if not key or cell is None or cell.ss + cell.sf <= 0.0:
                    continue
                wk = self._watch[(channel, key)]
                if wk.off is not None:
                    continue
                dim = key.partition(":")[0]
                level = self._levels.get((channel, dim))
                if level is None:
                    p_level, n_level = saved_levels.get(dim, (wide.ss / n_wide, n_wide))
                    level = self._levels[(channel, dim)] = _Level(len(self._dec1.level))
                    for i, d in enumerate(self._dec1.level):
                        n = min(n_level, 1.0 / (1.0 - d))
                        level.s[i], level.n[i] = p_level * n, n
                    level.p, level.w = p_level, sum(level.n) / len(level.n)
                off = wk.off = _Offset(level)
                if key in saved_offsets:
                    off.r, off.n = saved_offsets[key]
                else:
                    n_key = cell.ss + cell.sf
                    off.n = min(n_key, cap)
                    off.r = (cell.ss / n_key - level.p) * off.n

    def merge(self, source: str, snapshot: Snapshot) -> None:
        """Take a peer's published counts into the estimates, replacing that peer's previous ones.

        Its levels and offsets are summed as `_level_read` pools them: per (channel, dimension) the sum of
        p * evidence and of evidence; per key the sum of r + n * (its level's p) and of n. A peer that
        published none (a build before them, or `key_model: shrink`) stands in with what its counts
        imply: its channel-wide rate as its level, its key's counts against that rate as the offset."""
        self._peers[source] = snapshot
        self._pool()

    def after_merge(self, live: Iterable[str]) -> int:
        """End of a sync round (every live peer's snapshot merged): forget the peers not in `live` (their
        snapshots expired: the instance is gone), so a dead instance's last counts, which nothing decays
        any more, stop pulling the estimates; then update each key's event scale. Returns how many
        peers were forgotten.

        Each instance's windows count its own events; with N instances sharing a key's traffic they
        would span N times the payments and follow a drift N times slower than one instance does. So
        each (channel, key) decays per event at its scale: (its events + its peers' events) / its events
        since the last rounds (a discounted sum over rounds, each counting one round's new events, so a
        peer's first snapshot adds nothing), between 1 and 64, rounded to a quarter."""
        gone = self._peers.keys() - set(live)
        for source in gone:
            del self._peers[source]
            self._peer_events.pop(source, None)
        if gone:
            self._pool()
        theirs: dict[tuple[str, str], float] = {}
        for source, snap in self._peers.items():
            last = self._peer_events.setdefault(source, {})
            for channel, by_key in snap.cells.items():
                for key, cell in by_key.items():
                    ck = (channel, key)
                    before = last.get(ck)
                    if before is not None and cell.e > before:
                        theirs[ck] = theirs.get(ck, 0.0) + cell.e - before
                    last[ck] = cell.e
        rates = self._event_rates
        for ck, cell in self._local.items():
            mine, peers, before = rates.get(ck, (0.0, 0.0, cell.e))
            mine = mine * self._RATE_MEMORY + cell.e - before
            peers = peers * self._RATE_MEMORY + theirs.get(ck, 0.0)
            rates[ck] = (mine, peers, cell.e)
            if mine > 0.0:
                scale = min(64.0, round(4.0 * (mine + peers) / mine) / 4.0)
                w = self._watch[ck]
                if scale != w.dec.scale:
                    w.dec = self._decays(scale)
        return len(gone)

    def _pool(self) -> None:
        """Sum the peers' snapshots into what reads use (`_remote`, `_remote_levels`, `_remote_offsets`)."""
        remote: dict[tuple[str, str], tuple[float, float]] = {}
        levels: dict[tuple[str, str], tuple[float, float]] = {}
        offsets: dict[tuple[str, str], tuple[float, float]] = {}
        for snap in self._peers.values():
            for channel, by_key in snap.cells.items():
                for key, cell in by_key.items():
                    s, f = remote.get((channel, key), (0.0, 0.0))
                    remote[(channel, key)] = (s + cell.ss, f + cell.sf)
                by_dim = snap.levels.get(channel) or {}
                by_off = snap.offsets.get(channel, {}) if by_dim else _implied_offsets(by_key, by_dim)
                for dim, (p, w) in by_dim.items():
                    ps, ws = levels.get((channel, dim), (0.0, 0.0))
                    levels[(channel, dim)] = (ps + p * w, ws + w)
                for key, (r, n) in by_off.items():
                    lp = by_dim.get(key.partition(":")[0], (0.0, 0.0))[0]
                    q, m = offsets.get((channel, key), (0.0, 0.0))
                    offsets[(channel, key)] = (q + r + n * lp, m + n)
        self._remote = remote
        self._remote_levels = levels
        self._remote_offsets = offsets


def _implied_offsets(
    by_key: dict[str, Cell], levels: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """One channel of a snapshot without levels (a build before them, `key_model: shrink`, or no level
    learnt there yet): the channel-wide rate and evidence stand in as the level of each dimension it
    has keys under (filled into `levels`), and each key's offset is what its counts imply: successes
    minus that rate's expectation, over its events."""
    wide = by_key.get("")
    out: dict[str, tuple[float, float]] = {}
    if wide is None or wide.ss + wide.sf <= 0.0:
        return out
    p_wide = wide.ss / (wide.ss + wide.sf)
    for key, cell in by_key.items():
        if key:
            levels[key.partition(":")[0]] = (p_wide, wide.ss + wide.sf)
            n = cell.ss + cell.sf
            out[key] = (cell.ss - p_wide * n, n)
    return out


class Params(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    dimension: Dimension = "none"
    # flat share of payments sent to a random other channel first (0: rely on `optimism` alone)
    explore: Annotated[float, msgspec.Meta(ge=0.0, le=0.5)] = 0.0
    # optimism bonus in standard deviations: exploration that shrinks as a key's evidence grows
    optimism: Annotated[float, msgspec.Meta(ge=0.0, le=5.0)] = 0.0
    min_samples: Annotated[float, msgspec.Meta(ge=0.0)] = 20.0  # prior strength in pseudo-events
    # pseudo-events of the channel-wide rate in a keyed (dimension) rate; null: `min_samples`
    key_samples: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
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
        min_samples: float = 20.0, prior: float = 0.8, optimism: float = 0.0, key_samples: float | None = None,
    ) -> None:
        self.stats = stats
        self.dimension: Dimension = dimension
        self.explore = explore
        self.min_samples = min_samples
        self.prior = prior
        self.optimism = optimism
        self.key_samples = key_samples

    def scores(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> dict[str, float]:
        key = dimension_key(self.dimension, ctx)
        score = self.stats.score
        ms, ks, prior, opt = self.min_samples, self.key_samples, self.prior, self.optimism
        return {c.name: score(c.name, key, prior, ms, opt, ks) for c in candidates}

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        if len(candidates) < 2:
            return candidates
        key = dimension_key(self.dimension, ctx)
        score = self.stats.score
        ms, ks, prior, opt = self.min_samples, self.key_samples, self.prior, self.optimism
        keyed = [(-score(c.name, key, prior, ms, opt, ks), c.priority, c.name, c) for c in candidates]
        keyed.sort()  # names are unique, so candidates themselves are never compared
        ranked = [t[3] for t in keyed]
        if self.explore:
            flat_explore(ctx, ranked, self.explore, "success_rate")
        return tuple(ranked)


def dimensions_read(policies: Iterable[object]) -> tuple[Dimension, ...]:
    """The dimensions these built policies key success statistics by (their `dimension`), in the order of
    DIMENSIONS; "none" (the channel-wide key) always, which every estimate and outage detection read."""
    used = {"none"} | {d for p in policies if (d := getattr(p, "dimension", None)) in DIMENSIONS}
    return tuple(d for d in DIMENSIONS if d in used)


def stats_from(env: PolicyEnv) -> SuccessStats:
    """The wiring's shared stats; an empty instance (everything at the prior) when there are none."""
    stats = env.state.get("success_stats")
    return stats if isinstance(stats, SuccessStats) else SuccessStats()


def build(params: Params, env: PolicyEnv) -> SuccessRateRanker:
    return SuccessRateRanker(
        stats_from(env), params.dimension, params.explore, params.min_samples, params.prior, params.optimism,
        params.key_samples,
    )

