"""The lab simulator: one seeded world per (scenario, seed), every strategy run over the same world.

A world is the transaction stream (arrival times, segment, amount, BIN, whether the card is
hard-declined) plus, per transaction and channel, the true approval probability, whether the channel
is up, and the random draws that decide outcomes and latencies. Every strategy sees the same world
(common random numbers), so differences between strategies are differences in routing, not in luck.

Strategies:
- a chain (`Scenario.strategies`): built by `policies.registry.build` and run by `policies.base.Chain`,
  as production does, over `Candidate`s whose `breaker_open` reflects a simulated breaker (opens after
  `fail_max` consecutive unavailable/unknown, half-open probe after `reset_timeout_s`); a live
  `SuccessStats` learns from outcomes through `counts_for_channel` / `record_outcome`, as the pipeline;
  with delayed feedback, `SuccessStats.expect` marks each outcome on its way (the pending count).
- `static`: capability and licence filters, then one fixed priority order, no breaker filter (the
  pipeline's breaker gate still skips an open channel at attempt time, for every strategy): by default the
  order with the best expected value in hindsight over this world (`static: hindsight`), or the
  configured priority order (`static: primary`), or an explicit order.
- `oracle`: each payment to the eligible, up channel with the highest true expected value at that moment.

Attempts follow production: approve or hard decline stops; soft decline, unavailable and an open
breaker (skipped) fail over; unknown (a timeout after sending) stops, not approved.

Warm-up (`Scenario.warmup`): before the scored run, a chain routes and learns from a second, separately
seeded stream of that many transactions: the world's past, the payments just before the run's first, its
curves read at their own clock below the run's start (a piecewise curve holds its first value before its
first point; periodic terms go on backwards) and every channel up (no outages or downtimes); only first attempts are learnt, through the same delayed-feedback queue (so under
delayed feedback the last warm-up outcomes arrive during the run). Static and the oracle learn nothing.

Expected value of a decision (what regret and "gap captured" use) is that of its first attempt:
(1 - hard_decline) * up * p * (amount - fee). Nothing here reads the wall clock or sleeps.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from policies import cost
from policies import registry as policy_registry
from policies.base import Chain, PolicyEnv
from policies.success_rate import SuccessStats, counts_for_channel, dimensions_read
from router.lab.scenario import Scenario, Segment
from router.model import Candidate, Capabilities, RouteContext

Z99 = 2.3263478740408408  # standard normal 99th percentile
MATCH_SHARE = 0.8  # adaptation: share of a window whose first choice must match the oracle's best


@dataclass(frozen=True)
class Tx:
    index: int
    t: float  # virtual seconds
    x: float  # clock coordinate (index or seconds)
    segment: int
    amount: int
    hard: bool
    blocked: str | None
    ctx: RouteContext


@dataclass
class World:
    scenario: Scenario
    seed: int
    txs: list[Tx]
    names: list[str]
    q: list[list[float]]  # [tx][channel] approval probability of a good card, first attempt
    up: list[list[bool]]
    eligible: list[list[bool]]  # licence and capability
    fee0: list[list[int]]  # fee at monthly volume 0
    u: list[list[float]]  # outcome draws
    u_unknown: list[list[float]]
    latency_ms: list[list[float]]
    volume_tiered: list[bool]
    fees: list[cost.Fees | None]
    change_index: list[int]  # tx indexes of change points
    warm: World | None = None  # the warm-up stream (`Scenario.warmup`), learnt before this one


def _amount(rng: random.Random, a: Any) -> int:
    v = a.median * math.exp(a.sigma * rng.gauss(0.0, 1.0)) if a.sigma > 0 else float(a.median)
    v = max(float(a.min), v)
    if a.max is not None:
        v = min(float(a.max), v)
    return max(1, round(v))


def _down_windows(sc: Scenario, seed: int, ci: int, horizon: float) -> list[tuple[float, float]]:
    ch = sc.channels[ci]
    wins = [(w.start, w.end) for w in ch.outages]
    if ch.downtime is not None:
        rng = random.Random(f"{sc.name}:{seed}:downtime:{ch.name}")
        x = rng.expovariate(1.0 / ch.downtime.mean_between)
        while x < horizon:
            d = rng.expovariate(1.0 / ch.downtime.mean_duration)
            wins.append((x, x + d))
            x += d + rng.expovariate(1.0 / ch.downtime.mean_between)
    return sorted(wins)


def _is_down(wins: list[tuple[float, float]], x: float) -> bool:
    return any(s <= x < e for s, e in wins)


def build_world(sc: Scenario, seed: int, transactions: int | None = None, before: float | None = None) -> World:
    """The seeded world of one run. With `before` (the run's starting clock), the warm-up stream
    instead: its own seed and payment ids, the payments just before that clock (its last one 1 tx, or
    1 ms, before it), no outages or downtimes."""
    n = transactions or sc.transactions
    rng = random.Random(f"{sc.name}:{seed}" if before is None else f"{sc.name}:{seed}:warmup")
    id_prefix = f"{sc.name}-{seed}-" if before is None else f"{sc.name}-{seed}-warmup-"
    names = [c.name for c in sc.channels]
    nc = len(names)
    cum: list[float] = list(itertools.accumulate(s.weight for s in sc.segments))
    blocked = {cc: rule.id for rule in sc.blocked for cc in reversed(rule.countries)}
    seg_bins = [s.bin_range() for s in sc.segments]
    fees = [cost.decode_fees(c.fees) if c.fees is not None else None for c in sc.channels]
    tiered = [f is not None and any(s.volume_tiers for s in f.values()) for f in fees]
    lat = [
        (math.log(c.latency.p50_ms), (math.log(c.latency.p99_ms) - math.log(c.latency.p50_ms)) / Z99)
        for c in sc.channels
    ]
    curves = [[c.segments.get(s.name, c.approval) for s in sc.segments] for c in sc.channels]
    eligible_seg = [[_eligible(c, s) for c in sc.channels] for s in sc.segments]
    txs: list[Tx] = []
    q: list[list[float]] = []
    fee0: list[list[int]] = []
    u: list[list[float]] = []
    uu: list[list[float]] = []
    lms: list[list[float]] = []
    t = 0.0
    # the warm-up on a seconds clock needs its last arrival first: its arrivals get their own stream
    arrivals = random.Random(f"{sc.name}:{seed}:warmup-arrivals") if before is not None and sc.clock == "s" else rng
    ahead = list(itertools.accumulate(arrivals.expovariate(sc.arrival_rate) for _ in range(n))) if arrivals is not rng else []
    for i in range(n):
        t = ahead[i] if ahead else t + rng.expovariate(sc.arrival_rate)
        if before is None:
            x = float(i) if sc.clock == "tx" else t
        else:  # the warm-up: the past, its clock shifted as `_warm_up` shifts it
            x = before - (n - i) if sc.clock == "tx" else before + (t - ahead[-1]) - 1e-3
        si = bisect_right(cum, rng.random() * cum[-1])
        si = min(si, len(sc.segments) - 1)
        seg = sc.segments[si]
        amount = _amount(rng, seg.amount or sc.amount)
        hard = rng.random() < seg.hard_decline
        width, lo, hi = seg_bins[si]
        card_bin = str(rng.randint(lo, hi)).zfill(width)
        ctx = RouteContext(
            payment_id=f"{id_prefix}{i}", merchant_id="lab", amount=amount, currency=seg.currency,
            country=seg.country, method=seg.method, card_bin=card_bin, card_brand=seg.card_brand,
        )
        txs.append(Tx(i, t, x, si, amount, hard, blocked.get(seg.country), ctx))
        q.append([curves[c][si].value(x) for c in range(nc)])
        row_fee = []
        for c in range(nc):
            f = fees[c]
            row_fee.append(cost.fee(f, amount, seg.currency, 0) if f is not None else 0)
        fee0.append(row_fee)
        u.append([rng.random() for _ in range(nc)])
        uu.append([rng.random() for _ in range(nc)])
        lms.append([math.exp(mu + sigma * rng.gauss(0.0, 1.0)) for mu, sigma in lat])
    horizon = float(n) if sc.clock == "tx" else t
    downs = [_down_windows(sc, seed, c, horizon + 1.0) if before is None else [] for c in range(nc)]
    up = [[not _is_down(downs[c], tx.x) for c in range(nc)] for tx in txs]
    eligible = [eligible_seg[tx.segment] for tx in txs]
    cps = sorted({*sc.change_points, *(e for ch in sc.channels for w in ch.outages for e in (w.start, w.end))})
    xs = [tx.x for tx in txs]
    change_index = sorted({bisect_right(xs, cp - 1e-12) for cp in cps if 0 < cp} - {len(txs)})
    return World(sc, seed, txs, names, q, up, eligible, fee0, u, uu, lms, tiered, fees, change_index)


def _eligible(ch: Any, seg: Segment) -> bool:
    lic = ch.licence
    if lic is not None:
        if lic.countries is not None and seg.country not in lic.countries:
            return False
        if lic.currencies is not None and seg.currency not in lic.currencies:
            return False
    if ch.currencies is not None and seg.currency not in ch.currencies:
        return False
    return seg.method in ch.methods


def candidates(sc: Scenario) -> list[Candidate]:
    out = []
    for c in sc.channels:
        lic = c.licence
        out.append(Candidate(
            name=c.name, adapter="lab", priority=c.priority, fees=c.fees,
            capabilities=Capabilities(
                currencies=frozenset(c.currencies) if c.currencies is not None else None,
                methods=frozenset(c.methods),
            ),
            licensed_countries=frozenset(lic.countries) if lic and lic.countries is not None else None,
            licensed_currencies=frozenset(lic.currencies) if lic and lic.currencies is not None else None,
        ))
    return out


# --------------------------------------------------------------------------- results


@dataclass
class RunResult:
    strategy: str
    seed: int
    n: int  # routable payments (not refused by a compliance block)
    blocked: int
    approved: int
    exp_approval: float  # mean first-attempt approval probability of the chosen channel
    oracle_exp_approval: float  # the same for the best channel at each moment (this run's state)
    ev: float  # mean first-attempt expected value per payment, minor units
    oracle_ev: float
    fee_total: int  # over approved payments
    failovers: int
    unknown: int  # payments left pending (timed out after sending)
    violations: int  # attempts at a channel not licensed/capable for the payment
    latency_p50: float
    latency_p99: float
    adaptation: list[int | None]  # per change point: tx until the rolling choice matches the oracle
    order: list[str] = field(default_factory=list)  # static: the order used
    bucket: int = 1
    series_approved: list[int] = field(default_factory=list)
    series_count: list[int] = field(default_factory=list)
    series_exp: list[float] = field(default_factory=list)  # sum of expected approval per bucket
    series_ev_lost: list[float] = field(default_factory=list)  # sum of (oracle EV - this EV) per bucket
    series_share: dict[str, list[int]] = field(default_factory=dict)  # first choice per bucket


Planner = Callable[[int, Tx, tuple[Candidate, ...], list[float]], Sequence[Candidate]]


def hindsight_order(world: World) -> list[str]:
    """The static order with the best total first-attempt expected value over the world.

    Only the first eligible channel of an order decides a payment's first attempt, so totals are
    summed per eligibility pattern; ties go to the order closest to "by total value".
    """
    nc = len(world.names)
    by_mask: dict[tuple[bool, ...], list[float]] = {}
    totals = [0.0] * nc
    for tx in world.txs:
        if tx.blocked:
            continue
        i = tx.index
        seg = world.scenario.segments[tx.segment]
        mask = tuple(world.eligible[i])
        sums = by_mask.setdefault(mask, [0.0] * nc)
        for c in range(nc):
            v = (1.0 - seg.hard_decline) * world.up[i][c] * world.q[i][c] * (tx.amount - world.fee0[i][c])
            sums[c] += v
            totals[c] += v
    base = sorted(range(nc), key=lambda c: (-totals[c], c))
    best: tuple[int, ...] = tuple(base)
    best_score = -math.inf
    perms = itertools.permutations(base) if nc <= 7 else iter([tuple(base)])
    for perm in perms:
        score = 0.0
        for mask, sums in by_mask.items():
            for c in perm:
                if mask[c]:
                    score += sums[c]
                    break
        if score > best_score + 1e-9:
            best, best_score = perm, score
    return [world.names[c] for c in best]


def static_order(world: World) -> list[str]:
    sc = world.scenario
    if isinstance(sc.static, list):
        listed = list(sc.static)
        return listed + [n for n in world.names if n not in listed]
    if sc.static == "primary":
        return [c.name for c in sorted(sc.channels, key=lambda c: c.priority)]
    return hindsight_order(world)


STATIC_FILTERS: list[dict[str, Any]] = [{"policy": "currency"}, {"policy": "method"}, {"policy": "region"}]


def run_strategy(world: World, name: str, chain_steps: list[dict[str, Any]] | None, buckets: int = 200) -> RunResult:
    """Run one strategy over the world. `chain_steps` None means the oracle."""
    sc = world.scenario
    names = world.names
    nc = len(names)
    index = {n: c for c, n in enumerate(names)}
    learn_all = sc.learn_from == "all_attempts"
    volume: dict[str, int] = {}
    # one routing state per payroute instance (scale-out: `instances`), each its own statistics and chain
    nodes = [SuccessStats(sc.stats) for _ in range(sc.instances)]
    chains: list[Chain] = []
    for node in nodes:
        env = PolicyEnv(state={"success_stats": node, "monthly_volume": volume})
        if chain_steps is not None:
            chains.append(Chain(name, [
                policy_registry.build(s["policy"], {k: v for k, v in s.items() if k != "policy"}, env)
                for s in chain_steps]))
            node.dimensions = dimensions_read(chains[-1].steps)  # as the pipeline's wiring does
    sync = _Sync(nodes, sc.sync_interval_s)
    closed = candidates(sc)
    opened = [msgspec.structs.replace(c, breaker_open=True) for c in closed]
    fail_max, reset_s = sc.breaker.fail_max, sc.breaker.reset_timeout_s
    # per instance, its breakers (memory storage per instance, as in production): fails, tripped, open until
    breakers: list[tuple[list[int], list[bool], list[float]]] = [
        ([0] * nc, [False] * nc, [-math.inf] * nc) for _ in nodes]
    delay_tx, delay_s = sc.feedback.delay_tx, sc.feedback.delay_s
    pending: list[tuple[float, int, int, str, RouteContext, bool]] = []  # (reveal, seq, node, channel, ctx, ok)
    seq = itertools.count()
    retry_factor = sc.retry_factor
    seg_hard = [s.hard_decline for s in sc.segments]

    n_tx = len(world.txs)
    bucket = max(1, n_tx // buckets)
    nb = (n_tx + bucket - 1) // bucket
    s_app = [0] * nb
    s_cnt = [0] * nb
    s_exp = [0.0] * nb
    s_lost = [0.0] * nb
    s_share = {n: [0] * nb for n in names}
    match = bytearray(n_tx)
    latencies: list[float] = []
    n = blocked = approved = failovers = unknown = violations = fee_total = 0
    exp_sum = oexp_sum = ev_sum = oev_sum = 0.0

    if chains and world.warm is not None:
        _warm_up(world.warm, chains, closed, nodes, sync, pending, seq, index, delay_tx, delay_s)

    for tx in world.txs:
        i = tx.index
        if tx.blocked is not None:
            blocked += 1
            match[i] = 1
            continue
        n += 1
        t = tx.t
        if sync.due(t):
            sync.run(t)
        if pending:
            key = float(i) if delay_tx else t
            while pending and pending[0][0] <= key:
                _, _, j, ch_name, pctx, ok = heapq.heappop(pending)
                nodes[j].record_outcome(ch_name, pctx, ok, t)
        node_i = i % len(nodes)  # the load balancer: round-robin over the instances
        stats = nodes[node_i]
        fails, tripped, open_until = breakers[node_i]
        q, up, elig = world.q[i], world.up[i], world.eligible[i]
        h = seg_hard[tx.segment]
        amount = tx.amount
        # true expected values at this moment (fees at this run's own monthly volume)
        evs = [0.0] * nc
        pays = [0.0] * nc
        for c in range(nc):
            if not elig[c]:
                evs[c] = -math.inf
                continue
            f = world.fee0[i][c]
            if world.volume_tiered[c]:
                fs = world.fees[c]
                assert fs is not None
                f = cost.fee(fs, amount, tx.ctx.currency, volume.get(names[c], 0))
            p = (1.0 - h) * q[c] if up[c] else 0.0
            pays[c] = p
            evs[c] = p * (amount - f)
        best = max(range(nc), key=lambda c: (evs[c], -c))
        if not chains:
            plan: Sequence[Candidate] = [closed[c] for c in sorted(
                (c for c in range(nc) if elig[c] and up[c]), key=lambda c: (-evs[c], c))]
        else:
            cands = tuple(opened[c] if t < open_until[c] else closed[c] for c in range(nc))
            plan = chains[node_i].run(tx.ctx, cands)[0]
        oev_sum += max(evs[best], 0.0)
        s_lost[i // bucket] += max(evs[best], 0.0)
        oexp_sum += pays[best] if evs[best] > -math.inf else 0.0
        b = i // bucket
        s_cnt[b] += 1
        if plan:
            first = index[plan[0].name]
            ev_first = evs[first] if evs[first] > -math.inf else 0.0
            ev_sum += ev_first
            s_lost[b] -= ev_first
            exp_sum += pays[first]
            s_exp[b] += pays[first]
            s_share[names[first]][b] += 1
            if ev_first >= evs[best] - 1e-9 * max(1.0, abs(evs[best])):
                match[i] = 1
        elif evs[best] <= 0.0:
            match[i] = 1
        # attempts, as the pipeline makes them
        lat = 0.0
        attempts = 0
        declined = False  # a soft decline so far: only then is a fail-over's approval retry_factor'd
        for cand in plan:
            c = index[cand.name]
            if t < open_until[c]:  # breaker gate: skipped, nothing sent
                continue
            attempts += 1
            if not elig[c]:
                violations += 1
                continue
            if not up[c]:
                lat += sc.channels[c].timeout_ms
                is_unknown = world.u_unknown[i][c] < sc.channels[c].unknown_share
                fails[c] += 1
                if tripped[c] or fails[c] >= fail_max:
                    tripped[c] = True
                    open_until[c] = t + reset_s
                verdict = counts_for_channel("unknown" if is_unknown else "unavailable", None)
                if chains and verdict is not None:
                    stats.record_outcome(cand.name, tx.ctx, verdict, t)
                if is_unknown:
                    unknown += 1
                    break
                continue
            fails[c] = 0
            tripped[c] = False
            lat += world.latency_ms[i][c]
            if tx.hard:
                break  # the card's fault: counts_for_channel("hard_decline") is None, nothing recorded
            p = q[c] * retry_factor if declined else q[c]
            ok = world.u[i][c] < p
            declined = declined or not ok
            verdict = counts_for_channel("approved" if ok else "soft_decline", None if ok else "do_not_honor")
            if chains and verdict is not None and (learn_all or attempts == 1):
                if delay_tx or delay_s:
                    reveal = float(i + delay_tx) if delay_tx else t + delay_s
                    heapq.heappush(pending, (reveal, next(seq), node_i, cand.name, tx.ctx, verdict))
                    stats.expect(cand.name, tx.ctx)  # the router knows what it sent and awaits
                else:
                    stats.record_outcome(cand.name, tx.ctx, verdict, t)
            if ok:
                approved += 1
                s_app[b] += 1
                fs = world.fees[c]
                f = cost.fee(fs, amount, tx.ctx.currency, volume.get(cand.name, 0)) if fs is not None else 0
                fee_total += f
                volume[cand.name] = volume.get(cand.name, 0) + amount
                break
        failovers += max(0, attempts - 1)
        latencies.append(lat)

    latencies.sort()
    return RunResult(
        strategy=name, seed=world.seed, n=n, blocked=blocked, approved=approved,
        exp_approval=exp_sum / max(n, 1), oracle_exp_approval=oexp_sum / max(n, 1),
        ev=ev_sum / max(n, 1), oracle_ev=oev_sum / max(n, 1), fee_total=fee_total, failovers=failovers,
        unknown=unknown, violations=violations,
        latency_p50=_quantile(latencies, 0.50), latency_p99=_quantile(latencies, 0.99),
        adaptation=adaptation_delays(match, world.change_index, sc.window),
        bucket=bucket, series_approved=s_app, series_count=s_cnt, series_exp=s_exp, series_share=s_share,
        series_ev_lost=s_lost,
    )


class _Sync:
    """Scale-out's statistics sync (router/stats_sync.py) in virtual time: every `interval_s` each
    instance publishes a snapshot and merges every other one's, then ends the round (`after_merge`).
    Nothing to do for one instance."""

    def __init__(self, nodes: list[SuccessStats], interval_s: float) -> None:
        self.nodes = nodes
        self.interval_s = interval_s
        self.next = -math.inf if len(nodes) > 1 else math.inf

    def due(self, t: float) -> bool:
        return t >= self.next

    def run(self, t: float) -> None:
        snaps = [node.snapshot() for node in self.nodes]
        names = [f"instance-{j}" for j in range(len(self.nodes))]
        for j, node in enumerate(self.nodes):
            for o, snap in enumerate(snaps):
                if o != j:
                    node.merge(names[o], snap)
            node.after_merge(name for o, name in enumerate(names) if o != j)
        self.next = t + self.interval_s


def _warm_up(
    warm: World, chains: list[Chain], closed: list[Candidate], nodes: list[SuccessStats], sync: _Sync,
    pending: list[tuple[float, int, int, str, RouteContext, bool]], seq: Iterator[int], index: dict[str, int],
    delay_tx: int, delay_s: float,
) -> None:
    """Route and learn the warm-up stream (first attempts only, every channel up). Its clock ends just
    before the run's first transaction: transaction indexes and times are shifted below 0, so delayed
    outcomes still on their way arrive during the run."""
    cands = tuple(closed)
    n = len(warm.txs)
    t_shift = warm.txs[-1].t if warm.txs else 0.0
    for tx in warm.txs:
        if tx.blocked is not None:
            continue
        i = tx.index - n  # -n .. -1
        t = tx.t - t_shift - 1e-3
        if sync.due(t):
            sync.run(t)
        if pending:
            key = float(i) if delay_tx else t
            while pending and pending[0][0] <= key:
                _, _, j, ch_name, pctx, ok = heapq.heappop(pending)
                nodes[j].record_outcome(ch_name, pctx, ok, t)
        j = i % len(nodes)
        plan = chains[j].run(tx.ctx, cands)[0]
        if not plan or tx.hard:
            continue  # nothing sent, or the card's own decline: nothing to learn
        c = index[plan[0].name]
        if not warm.eligible[tx.index][c]:
            continue
        ok = warm.u[tx.index][c] < warm.q[tx.index][c]
        verdict = counts_for_channel("approved" if ok else "soft_decline", None if ok else "do_not_honor")
        if verdict is None:
            continue
        if delay_tx or delay_s:
            reveal = float(i + delay_tx) if delay_tx else t + delay_s
            heapq.heappush(pending, (reveal, next(seq), j, plan[0].name, tx.ctx, verdict))
            nodes[j].expect(plan[0].name, tx.ctx)
        else:
            nodes[j].record_outcome(plan[0].name, tx.ctx, verdict, t)


def _quantile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, math.ceil(p * len(sorted_values)) - 1))
    return sorted_values[k]


def adaptation_delays(match: bytes | bytearray, change_index: list[int], window: int) -> list[int | None]:
    """Per change point: how many transactions after it until the first window of `window`
    transactions (all after the change point) in which the first choice matches the oracle's best
    channel at least 80 % of the time. None: not before the next change point (or the end)."""
    out: list[int | None] = []
    bounds = [*change_index, len(match)]
    need = MATCH_SHARE * window
    for k, start in enumerate(change_index):
        end = bounds[k + 1]
        if end - start < window:
            out.append(None)
            continue
        acc = sum(match[start:start + window])
        found: int | None = 0 if acc >= need else None
        d = 0
        while found is None and start + d + window < end:
            acc += match[start + d + window] - match[start + d]
            d += 1
            if acc >= need:
                found = d
        out.append(found)
    return out


@dataclass(frozen=True)
class StrategySpec:
    name: str
    chain: list[dict[str, Any]] | None  # None: oracle; static is resolved per world


def strategy_specs(sc: Scenario) -> list[StrategySpec]:
    return [*(StrategySpec(s.name, list(s.chain)) for s in sc.strategies), StrategySpec("static", []),
            StrategySpec("oracle", None)]


def run_seed(sc: Scenario, seed: int, transactions: int | None = None) -> list[RunResult]:
    """Every strategy of the scenario over one seeded world."""
    world = build_world(sc, seed, transactions)
    if sc.warmup:
        world.warm = build_world(sc, seed, sc.warmup, before=world.txs[0].x if sc.clock == "s" else 0.0)
    results = []
    for spec in strategy_specs(sc):
        if spec.name == "static":
            order = static_order(world)
            res = run_strategy(world, "static", [*STATIC_FILTERS, {"policy": "priority", "order": order}])
            res.order = order
        else:
            res = run_strategy(world, spec.name, spec.chain)
        results.append(res)
    return results
