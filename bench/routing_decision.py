"""Cost of one routing decision: two 5-policy chains vs the 1-policy priority chain, measured in one run.

- "recommended": the chain docs/adaptive-routing.md recommends and config/lab/ runs: currency -> method
  -> region -> breaker -> cost (expected value, per-country success statistics, optimism);
- "rules": region -> breaker -> rules (8 rules, most not matching) -> success_rate (per currency) ->
  cost, the heavier shape of a merchant with hand-written rules.

Both over 10 candidates with fee schedules and warmed success statistics. Each decision uses a fresh
payment id (so sticky draws are really computed) and is what the pipeline runs: `Chain.explain`, the
plan, the removed channels and the trace of each step's output (whose names the pipeline reads when it
builds the payment's record, outside this figure). Prints p50/p99 microseconds per decision for every
chain; the target is p99 <= 50 us for a 5-policy chain (printed, never asserted).
Run: .venv/bin/python bench/routing_decision.py [-n 100000]
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import time

import msgspec

from policies import breaker, capability, cost, priority, region, rules, success_rate
from policies.base import Chain, NoParams, PolicyEnv
from router.model import Candidate, Capabilities, RouteContext

TARGET_P99_US = 50.0
CURRENCIES = ["EUR", "USD", "GBP", "JPY"]
COUNTRIES = ["DE", "US", "GB", "JP", "FR"]
RULES = [
    {"id": "sanctions", "when": {"country": ["KP", "IR", "SY"]}, "then": {"block": True, "block_code": "sanctioned"}},
    {"id": "wallets", "when": {"method": ["alipay", "wechatpay"]}, "then": {"channels": ["ch8", "ch9"]}},
    {"id": "amex", "when": {"card_brand": ["amex"]}, "then": {"channels": ["ch2"], "fallback": "keep"}},
    {"id": "vip", "when": {"metadata": {"tier": "vip"}}, "then": {"channels": ["ch0", "ch1"], "fallback": "keep"}},
    {"id": "huge", "when": {"amount": {"gte": 5_000_000}}, "then": {"channels": ["ch3", "ch4"]}},
    {"id": "debit-bins", "when": {"bin": ["400000-409999", "5555"]}, "then": {"channels": ["ch5"], "fallback": "keep"}},
    {"id": "m-split", "when": {"merchant": ["m-split"], "currency": ["EUR"]},
     "then": {"split": {"ch0": 3, "ch6": 1}, "fallback": "keep"}},
    {"id": "jp", "when": {"country": ["JP"], "amount": {"lt": 100_000}}, "then": {"channels": ["ch7"], "fallback": "keep"}},
]


def candidates() -> tuple[Candidate, ...]:
    out = []
    for i in range(10):
        fees = {
            "default": {"percent_bp": 250 + 10 * i, "fixed": 25, "min_fee": 30},
            "EUR": {"percent_bp": 140 + 5 * i, "fixed": 25,
                    "tiers": [{"up_to_amount": 1000, "percent_bp": 300}, {"up_to_amount": None, "percent_bp": 150 + i}],
                    "volume_tiers": [{"monthly_volume_from": 10_000_000, "percent_bp": 120}]},
        }
        out.append(Candidate(
            name=f"ch{i}", adapter="sandbox", priority=i, weight=1 + i % 3, breaker_open=(i == 9),
            capabilities=Capabilities(methods=frozenset({"card", "alipay"})), fees=fees,
            licensed_countries=None if i % 4 else frozenset(COUNTRIES),
            licensed_currencies=None if i % 5 else frozenset(CURRENCIES),
        ))
    return tuple(out)


def contexts(n: int, rng: random.Random) -> list[RouteContext]:
    return [
        RouteContext(
            payment_id=f"pay_{i:012d}", merchant_id=rng.choice(["m1", "m2", "m-split"]),
            amount=rng.choice([500, 1999, 25_000, 120_000, 7_000_000]), currency=rng.choice(CURRENCIES),
            country=rng.choice(COUNTRIES), method="card", card_bin=rng.choice(["424242", "401288", "555555", "378282"]),
            card_brand=rng.choice(["visa", "mastercard", "amex"]),
            metadata={"tier": "vip"} if rng.random() < 0.05 else {},
        )
        for i in range(n)
    ]


def warmed_stats(rng: random.Random) -> success_rate.SuccessStats:
    stats = success_rate.SuccessStats()
    for ctx in contexts(20_000, rng)[:5000]:
        for i in range(10):
            stats.record_outcome(f"ch{i}", ctx, rng.random() < 0.80 + i / 60, rng.random() * 3600)
    return stats


def measure(chain: Chain, cands: tuple[Candidate, ...], ctxs: list[RouteContext]) -> list[float]:
    run, clock = chain.explain, time.perf_counter_ns
    for ctx in ctxs[:2000]:  # warm up caches (decoded fee schedules) and the interpreter
        run(ctx, cands)
    samples = []
    gc.disable()
    try:
        for ctx in ctxs:
            t0 = clock()
            run(ctx, cands)
            samples.append((clock() - t0) / 1000)
    finally:
        gc.enable()
    return samples


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=100_000, help="decisions per chain")
    args = ap.parse_args()
    rng = random.Random(7)
    cands = candidates()
    env = PolicyEnv({"success_stats": warmed_stats(rng), "monthly_volume": {"ch0": 20_000_000}})
    recommended = Chain("recommended", [
        capability.currency(NoParams(), env),
        capability.method(NoParams(), env),
        region.build(region.Params(), env),
        breaker.breaker(NoParams(), env),
        cost.build(cost.Params(dimension="country", optimism=1.0, key_samples=50), env),
    ])
    with_rules = Chain("rules", [
        region.build(region.Params(), env),
        breaker.breaker(NoParams(), env),
        rules.build(msgspec.convert({"rules": RULES}, rules.Params), env),
        success_rate.build(success_rate.Params(dimension="currency"), env),
        cost.build(cost.Params(), env),
    ])
    one = Chain("one", [priority.build(priority.Params(), env)])
    ctxs = contexts(args.n, rng)
    results = [
        ("1-policy priority chain", measure(one, cands, ctxs)),
        ("5-policy recommended chain", measure(recommended, cands, ctxs)),
        ("5-policy rules chain", measure(with_rules, cands, ctxs)),
    ]
    print(f"python {platform.python_version()} on {platform.machine()}, {args.n} decisions per chain, 10 candidates")
    for label, s in results:
        print(f"{label:>28}: p50 {pct(s, 0.50):7.1f} us   p99 {pct(s, 0.99):7.1f} us   mean {sum(s) / len(s):7.1f} us")
    for label, s in results[1:]:
        p99 = pct(s, 0.99)
        verdict = "within" if p99 <= TARGET_P99_US else "OVER"
        print(f"target: {label} p99 <= {TARGET_P99_US:.0f} us -> {p99:.1f} us, {verdict} target")


if __name__ == "__main__":
    main()
