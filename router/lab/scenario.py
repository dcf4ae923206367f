"""Lab scenarios: typed msgspec structs decoded from YAML, validated once with path-precise errors.

A scenario describes a world and the strategies to try in it:

- `clock` says what the x axis of every schedule is: `tx` (transaction index) or `s` (virtual
  seconds since the start; arrivals are Poisson at `arrival_rate` tx/s either way).
- each channel's approval probability is a `Curve` (piecewise-linear `points` or a constant `base`,
  plus `periodic` sine terms), per segment when `segments` overrides it. It is the probability that
  the channel approves a card that is not hard-declined, on a first attempt; a failover attempt after
  a soft decline is multiplied by `retry_factor` (soft declines correlate across channels: the issuer
  is the same); one after a channel that was down or refused the payment is not (no issuer saw it).
- hard declines belong to the transaction (`Segment.hard_decline`): the same for every channel.
- `outages` (windows) and `downtime` (random, exponential gaps and durations) make a channel
  unavailable; a share `unknown_share` of calls to a down channel time out after sending (outcome
  unknown: no failover, not approved), the rest fail to connect (unavailable: fail over).
- `fees` is a fee schedule exactly as a channel config's `fees:` (decoded by policies/cost.py).
- `licence` restricts channels per country/currency; `blocked` refuses countries before routing.
- `feedback` delays what the success statistics learn (approvals and soft declines) by transactions
  or seconds; unavailability is known at once (the connection failed).
- `strategies` are policy chains in the shape of `routing.default`, checked by the policy registry.
- `warmup` transactions are learnt before the scored run, from the world's past: the payments just
  before the run (curves read at their own clock below the start: a piecewise curve holds its first
  value, periodic terms go on backwards; every channel up; the same traffic mix): the learning
  strategies start as a router already in service does (its statistics survive restarts), not from
  nothing. 0: a cold start.

`load_scenario(text)` / `load_scenario_file(path)` raise `router.errors.ConfigError` listing every
problem as (path, message).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from policies import cost
from policies import registry as policy_registry
from policies.success_rate import StatsConfig
from router.errors import ConfigError

Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Positive = Annotated[float, msgspec.Meta(gt=0.0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]
Clock = Literal["tx", "s"]


class Periodic(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    amplitude: float
    period: Positive  # in clock units
    phase: float = 0.0  # fraction of a period


class Curve(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A probability over the clock: `base` or piecewise-linear `points` [[x, p], ...], plus sines.

    Before the first point the first value holds, after the last the last. The sum is clipped to [0, 1].
    """

    base: Probability | None = None
    points: list[tuple[float, Probability]] = msgspec.field(default_factory=list)
    periodic: list[Periodic] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.base is None) == (not self.points):
            raise ValueError("a curve needs exactly one of `base` or `points`")
        xs = [x for x, _ in self.points]
        if any(a >= b for a, b in zip(xs, xs[1:], strict=False)):
            raise ValueError("curve `points` need increasing x")

    def value(self, x: float) -> float:
        if self.base is not None:
            v = self.base
        else:
            pts = self.points
            if x <= pts[0][0]:
                v = pts[0][1]
            elif x >= pts[-1][0]:
                v = pts[-1][1]
            else:
                v = pts[-1][1]
                for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
                    if x < x1:
                        v = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
                        break
        for term in self.periodic:
            v += term.amplitude * math.sin(2.0 * math.pi * (x / term.period + term.phase))
        return 0.0 if v < 0.0 else 1.0 if v > 1.0 else v


class Window(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    start: float
    end: float

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ValueError("a window needs `end` after `start`")


class Downtime(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    mean_between: Positive  # mean clock units between the starts of random downtimes (exponential)
    mean_duration: Positive  # mean length (exponential)


class Latency(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    p50_ms: Positive = 300.0
    p99_ms: Positive = 1200.0

    def __post_init__(self) -> None:
        if self.p99_ms < self.p50_ms:
            raise ValueError("`p99_ms` must not be below `p50_ms`")


class Licence(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    countries: list[str] | None = None  # None: not restricted
    currencies: list[str] | None = None


class Channel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    approval: Curve
    segments: dict[str, Curve] = msgspec.field(default_factory=dict)  # segment name -> curve override
    outages: list[Window] = msgspec.field(default_factory=list)
    downtime: Downtime | None = None
    unknown_share: Probability = 0.0  # of calls to a down channel: timed out after sending
    latency: Latency = Latency()
    timeout_ms: Positive = 1000.0  # what a call to a down channel costs
    fees: dict[str, Any] | None = None
    licence: Licence | None = None
    currencies: list[str] | None = None  # technical capability; None: any
    methods: list[str] = msgspec.field(default_factory=lambda: ["card"])
    priority: int = 100


class Amount(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Lognormal amount in minor units: `median` and `sigma` (0: fixed), clipped to [min, max]."""

    median: Annotated[int, msgspec.Meta(gt=0)] = 5000
    sigma: NonNegative = 0.0
    min: Annotated[int, msgspec.Meta(gt=0)] = 1
    max: int | None = None


class Segment(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    weight: Positive = 1.0
    method: str = "card"
    currency: str = "EUR"
    country: str = "DE"
    bin: str = "424242"  # a BIN or a same-length range "400000-400099"; drawn uniformly
    card_brand: str | None = "visa"
    hard_decline: Probability = 0.05  # the card's fault: the same for every channel
    amount: Amount | None = None  # default: the scenario's

    def bin_range(self) -> tuple[int, int, int]:
        lo, sep, hi = self.bin.partition("-")
        hi = hi if sep else lo
        return len(lo), int(lo), int(hi)

    def __post_init__(self) -> None:
        lo, sep, hi = self.bin.partition("-")
        hi = hi if sep else lo
        if not (lo.isdigit() and hi.isdigit() and len(lo) == len(hi) and len(lo) >= 6 and int(lo) <= int(hi)):
            raise ValueError("`bin` must be a BIN of 6+ digits or a same-length range like 400000-400099")


class Feedback(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    delay_tx: Annotated[int, msgspec.Meta(ge=0)] = 0
    delay_s: NonNegative = 0.0


class BreakerModel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    fail_max: Annotated[int, msgspec.Meta(ge=1)] = 5  # consecutive unavailable/unknown that open it
    reset_timeout_s: Positive = 30.0  # virtual seconds open before one half-open probe


class BlockRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    countries: list[str]


class Strategy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    chain: list[dict[str, Any]]  # steps as in `routing.default`: {policy: NAME, ...params}


class Scenario(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    segments: Annotated[list[Segment], msgspec.Meta(min_length=1)]
    channels: Annotated[list[Channel], msgspec.Meta(min_length=1)]
    description: str = ""
    clock: Clock = "tx"
    transactions: Annotated[int, msgspec.Meta(ge=1)] = 20_000
    arrival_rate: Positive = 50.0  # tx per virtual second
    # six by default: a scenario's gap-captured figure moves by 10-20 points between sets of three seeds
    seeds: Annotated[list[int], msgspec.Meta(min_length=1)] = msgspec.field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    retry_factor: Probability = 0.6  # approval multiplier on a failover attempt after a soft decline
    amount: Amount = Amount()
    blocked: list[BlockRule] = msgspec.field(default_factory=list)
    feedback: Feedback = Feedback()
    breaker: BreakerModel = BreakerModel()
    change_points: list[float] = msgspec.field(default_factory=list)  # clock units; outage edges are added
    static: Literal["hindsight", "primary"] | list[str] = "hindsight"
    strategies: list[Strategy] = msgspec.field(default_factory=list)
    window: Annotated[int, msgspec.Meta(ge=10)] = 200  # tx per rolling window (adaptation delay, plots)
    warmup: Annotated[int, msgspec.Meta(ge=0)] = 0  # tx learnt before the scored run (0: cold start)
    # How the wiring feeds SuccessStats. Defaults are production's (router/pipeline.py): `StatsConfig()`,
    # approvals and soft declines of first attempts only (a fail-over attempt carries a card another
    # channel just soft-declined, which would bias the fallback channels down), and unavailable/unknown
    # outcomes of every attempt. `all_attempts` records every outcome, for comparison.
    stats: StatsConfig = StatsConfig()
    learn_from: Literal["all_attempts", "first_attempts"] = "first_attempts"
    # Scale-out: payroute instances behind a round-robin load balancer, each with its own routing
    # statistics and chain, exchanging snapshots every `sync_interval_s` of virtual time as they do
    # through Redis (router/stats_sync.py, every 2 s). Each instance has its own breakers (so each
    # trips on its own failures, as in production); monthly fee volumes are shared (one per channel).
    instances: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    sync_interval_s: Positive = 2.0


def _msgspec_problem(err: msgspec.ValidationError) -> tuple[str, str]:
    msg = str(err)
    if " - at `" in msg:
        text, _, path = msg.rpartition(" - at `")
        return path.rstrip("`"), text
    return "$", msg


def check(sc: Scenario) -> list[tuple[str, str]]:
    """Cross-field checks the types cannot express, as (path, message)."""
    problems: list[tuple[str, str]] = []
    add = problems.append
    seg_names: set[str] = set()
    for i, seg in enumerate(sc.segments):
        if seg.name in seg_names:
            add((f"$.segments[{i}].name", f"duplicate segment {seg.name!r}"))
        seg_names.add(seg.name)
    names: set[str] = set()
    for i, ch in enumerate(sc.channels):
        p = f"$.channels[{i}]"
        if ch.name in names:
            add((f"{p}.name", f"duplicate channel {ch.name!r}"))
        names.add(ch.name)
        for seg_name in ch.segments:
            if seg_name not in seg_names:
                add((f"{p}.segments.{seg_name}", f"unknown segment {seg_name!r}"))
        if ch.fees is not None:
            try:
                fees = cost.decode_fees(ch.fees)
            except msgspec.ValidationError as e:
                where, text = _msgspec_problem(e)
                add((f"{p}.fees{where[1:] if where.startswith('$') else ''}", text))
                continue
            except (ValueError, TypeError) as e:
                add((f"{p}.fees", str(e)))
                continue
            for j, seg in enumerate(sc.segments):
                if cost.schedule_for(fees, seg.currency) is None:
                    add((f"{p}.fees", f"no schedule for {seg.currency} (segments[{j}]) and no `default`"))
    if sc.feedback.delay_tx and sc.feedback.delay_s:
        add(("$.feedback", "give `delay_tx` or `delay_s`, not both"))
    if isinstance(sc.static, list):
        for j, name in enumerate(sc.static):
            if name not in names:
                add((f"$.static[{j}]", f"unknown channel {name!r}"))
    strat_names: set[str] = set()
    for i, st in enumerate(sc.strategies):
        sp = f"$.strategies[{i}]"
        if st.name in strat_names or st.name in ("static", "oracle"):
            add((f"{sp}.name", f"duplicate or reserved strategy name {st.name!r}"))
        strat_names.add(st.name)
        if not st.chain:
            add((f"{sp}.chain", "a chain needs at least one policy"))
        for k, step in enumerate(st.chain):
            pname = step.get("policy")
            if not isinstance(pname, str):
                add((f"{sp}.chain[{k}].policy", "each step needs `policy: NAME`"))
                continue
            validator = policy_registry.VALIDATORS.get(pname)
            if validator is None:
                known = ", ".join(sorted(policy_registry.VALIDATORS))
                add((f"{sp}.chain[{k}].policy", f"unknown policy {pname!r}; known: {known}"))
                continue
            params = {key: v for key, v in step.items() if key != "policy"}
            for rel, msg in validator(params, frozenset(names)):
                add((f"{sp}.chain[{k}]{rel}" if rel.startswith(("[", ".")) else f"{sp}.chain[{k}].{rel}", msg))
    return problems


def load_scenario(text: str) -> Scenario:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([("$", f"not valid YAML: {e}")]) from None
    try:
        sc = msgspec.convert(raw if raw is not None else {}, Scenario, str_keys=True)
    except msgspec.ValidationError as e:
        raise ConfigError([_msgspec_problem(e)]) from None
    problems = check(sc)
    if problems:
        raise ConfigError(problems)
    return sc


def load_scenario_file(path: str | Path) -> Scenario:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([("$", f"cannot read {path}: {e.strerror}")]) from None
    return load_scenario(text)
