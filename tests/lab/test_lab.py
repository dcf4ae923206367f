"""The routing lab: scenario validation, determinism, oracle dominance, analytic static approval,
outage adaptation, delayed feedback and the CLI's outputs. Small worlds keep this fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from router.errors import ConfigError
from router.lab import report
from router.lab.cli import add_lab_parser, cmd_lab_run, run_lab
from router.lab.scenario import Scenario, load_scenario, load_scenario_file
from router.lab.sim import adaptation_delays, build_world, run_seed, run_strategy

ROOT = Path(__file__).resolve().parents[2]
ADAPTIVE = [{"policy": "currency"}, {"policy": "method"}, {"policy": "region"}, {"policy": "breaker"},
            {"policy": "success_rate", "explore": 0.02}]


def scenario(**over: Any) -> Scenario:
    raw: dict[str, Any] = {
        "name": "t", "transactions": 3000, "seeds": [7],
        "segments": [{"name": "de", "country": "DE", "currency": "EUR", "hard_decline": 0.05}],
        "channels": [
            {"name": "alpha", "approval": {"base": 0.92}},
            {"name": "beta", "approval": {"base": 0.86}},
        ],
        "strategies": [{"name": "adaptive", "chain": ADAPTIVE}],
    }
    raw.update(over)
    return load_scenario(yaml.safe_dump(raw))


def test_lab_package_resolves_inside_the_repo() -> None:
    import router.lab

    assert Path(router.lab.__file__).resolve().is_relative_to(ROOT)


@pytest.mark.parametrize(
    ("patch", "path"),
    [
        ({"channels": [{"name": "a", "approval": {"base": 1.5}}]}, "$.channels[0].approval.base"),
        ({"channels": [{"name": "a", "approval": {"points": [[5, 0.9], [1, 0.8]]}}]}, "$.channels[0].approval"),
        ({"channels": [{"name": "a", "approval": {"base": 0.9}, "segments": {"zz": {"base": 0.9}}}]},
         "$.channels[0].segments.zz"),
        ({"channels": [{"name": "a", "approval": {"base": 0.9}, "fees": {"EUR": {"percent_bp": -1}}}]},
         "$.channels[0].fees[...].percent_bp"),
        ({"strategies": [{"name": "x", "chain": [{"policy": "priority", "order": ["nope"]}]}]},
         "$.strategies[0].chain[0].order[0]"),
        ({"strategies": [{"name": "x", "chain": [{"policy": "nonesuch"}]}]}, "$.strategies[0].chain[0].policy"),
        ({"segments": [{"name": "de", "bin": "42"}]}, "$.segments[0]"),
    ],
)
def test_scenario_errors_carry_paths(patch: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as e:
        scenario(**patch)
    assert path in [p for p, _ in e.value.problems], e.value.problems


def test_shipped_scenarios_load_and_share_one_routing_config() -> None:
    files = sorted((ROOT / "config" / "lab").glob("*.yaml"))
    assert len(files) == 8  # the seven of issue 4 plus degrade-delayed (feedback 1,000 tx late)
    chains = {json.dumps([msgspec.to_builtins(s) for s in load_scenario_file(f).strategies]) for f in files}
    assert len(chains) == 1


def test_same_seed_same_report() -> None:
    sc = scenario(channels=[
        {"name": "alpha", "approval": {"points": [[0, 0.92], [3000, 0.84]]}},
        {"name": "beta", "approval": {"base": 0.88}, "downtime": {"mean_between": 800, "mean_duration": 60}},
    ], change_points=[1000])

    def once() -> list[dict[str, Any]]:
        runs = run_lab([sc])[0]
        return [report.summarize(sc.name, runs), report.series(runs)]

    first, second = once(), once()
    assert first == second
    other = run_lab([msgspec.structs.replace(sc, seeds=[8])])[0]
    assert report.summarize(sc.name, other) != first[0]


def test_oracle_is_never_worse_on_expected_value() -> None:
    sc = scenario(
        segments=[{"name": "de", "country": "DE", "currency": "EUR"},
                  {"name": "us", "country": "US", "currency": "USD", "bin": "411111-411199"}],
        channels=[
            {"name": "alpha", "approval": {"base": 0.9, "periodic": [{"amplitude": 0.05, "period": 1000}]},
             "fees": {"default": {"percent_bp": 300}}},
            {"name": "beta", "approval": {"base": 0.88}, "segments": {"us": {"base": 0.95}},
             "outages": [{"start": 500, "end": 900}], "fees": {"default": {"fixed": 40}}},
        ],
        strategies=[{"name": "adaptive", "chain": ADAPTIVE},
                    {"name": "fixed-beta", "chain": [{"policy": "priority", "order": ["beta"]}]}],
    )
    runs = run_seed(sc, 7)
    oracle = next(r for r in runs if r.strategy == "oracle")
    assert oracle.ev == pytest.approx(oracle.oracle_ev)
    for r in runs:
        assert r.ev <= oracle.ev + 1e-9, r.strategy
    assert min(r.ev for r in runs) < oracle.ev - 1.0  # the check has something to compare


def test_static_strategy_matches_its_analytic_approval() -> None:
    # one channel first, failover to beta at retry_factor: P = (1-h) * (p1 + (1-p1) * p2 * f)
    h, p1, p2, f = 0.05, 0.92, 0.86, 0.6
    sc = scenario(transactions=40_000, static=["alpha", "beta"], retry_factor=f, strategies=[])
    world = build_world(sc, 7)
    res = run_strategy(world, "static", [{"policy": "priority", "order": ["alpha", "beta"]}])
    expected = (1 - h) * (p1 + (1 - p1) * p2 * f)
    assert res.approved / res.n == pytest.approx(expected, abs=0.006)
    assert res.exp_approval == pytest.approx((1 - h) * p1, abs=1e-9)  # first attempt, true probability


def test_failover_after_a_down_channel_is_not_retry_factored() -> None:
    # alpha down all along and its breaker never opening: every payment's first attempt finds it down
    # and fails over to beta, whose issuer sees the card for the first time: P = (1-h) * p2, not × f
    h, p2, f = 0.05, 0.86, 0.6
    sc = scenario(
        transactions=20_000, static=["alpha", "beta"], retry_factor=f, strategies=[],
        breaker={"fail_max": 10**9},
        channels=[{"name": "alpha", "approval": {"base": 0.92}, "outages": [{"start": 0, "end": 20_000}]},
                  {"name": "beta", "approval": {"base": p2}}],
    )
    world = build_world(sc, 7)
    res = run_strategy(world, "static", [{"policy": "priority", "order": ["alpha", "beta"]}])
    assert res.failovers == res.n
    assert res.approved / res.n == pytest.approx((1 - h) * p2, abs=0.01)


def test_outage_adaptive_beats_static_priority() -> None:
    sc = scenario(
        transactions=4000, static="primary",
        channels=[
            {"name": "alpha", "priority": 1, "approval": {"base": 0.92}, "unknown_share": 0.3,
             "outages": [{"start": 1000, "end": 3000}]},
            {"name": "beta", "priority": 2, "approval": {"base": 0.90}},
        ],
    )
    by = {r.strategy: r for r in run_seed(sc, 7)}
    assert by["static"].order == ["alpha", "beta"]
    assert by["adaptive"].ev > by["static"].ev + 0.2 * (by["oracle"].ev - by["static"].ev)
    # the pipeline's breaker gate protects static too (skips), but its plan still leads with alpha
    assert by["adaptive"].adaptation[0] is not None and by["static"].adaptation[0] is None


def test_delayed_feedback_is_not_visible_before_its_reveal() -> None:
    # alpha collapses at tx 1000; with outcomes learnt 1500 tx late nothing can react before ~2500
    chans = [{"name": "alpha", "approval": {"points": [[999, 0.95], [1000, 0.30]]}},
             {"name": "beta", "approval": {"base": 0.85}}]
    chain = [{"policy": "success_rate", "explore": 0.0}]
    now = scenario(channels=chans, strategies=[{"name": "s", "chain": chain}], window=100,
                   change_points=[1000])
    late = msgspec.structs.replace(now, feedback=msgspec.structs.replace(now.feedback, delay_tx=1500))
    first = build_world(now, 7)
    fast = run_strategy(first, "s", chain)
    slow = run_strategy(build_world(late, 7), "s", chain)
    b = fast.bucket
    before = slice(1000 // b + 1, 2400 // b)
    slow_share = sum(slow.series_share["alpha"][before]) / sum(slow.series_count[before])
    fast_share = sum(fast.series_share["alpha"][before]) / sum(fast.series_count[before])
    assert slow_share == 1.0  # stats only knew alpha's good past
    assert fast_share < 0.5
    assert slow.adaptation[0] is not None and slow.adaptation[0] >= 1500
    assert fast.adaptation[0] is not None and fast.adaptation[0] < 1500


def test_warm_up_starts_a_learning_chain_warm_and_leaves_static_and_oracle_alone() -> None:
    # beta is listed first (priority 1) but alpha is better: cold, the chain must find that out during
    # the run; warm, it arrives knowing it
    chans = [{"name": "alpha", "priority": 2, "approval": {"base": 0.95}},
             {"name": "beta", "priority": 1, "approval": {"base": 0.70}}]
    chain = [{"policy": "success_rate", "explore": 0.0, "min_samples": 1.0}]
    cold_sc = scenario(channels=chans, strategies=[{"name": "s", "chain": chain}], transactions=1000)
    warm_sc = msgspec.structs.replace(cold_sc, warmup=800)
    cold = {r.strategy: r for r in run_seed(cold_sc, 7)}
    warm = {r.strategy: r for r in run_seed(warm_sc, 7)}
    for name in ("static", "oracle"):  # they learn nothing: the warm-up changes none of their figures
        assert (cold[name].ev, cold[name].series_share) == (warm[name].ev, warm[name].series_share)
    first = slice(0, 100 // warm["s"].bucket)
    assert sum(warm["s"].series_share["alpha"][first]) == sum(warm["s"].series_count[first])
    assert warm["s"].ev > cold["s"].ev
    # the warm-up stream is its own: its payment ids never collide with the run's
    world = build_world(warm_sc, 7)
    warm_world = build_world(warm_sc, 7, 800, before=0.0)
    assert not {t.ctx.payment_id for t in world.txs} & {t.ctx.payment_id for t in warm_world.txs}


def test_warm_up_is_the_worlds_past_and_its_late_outcomes_arrive_during_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # alpha starts excellent and collapses at tx 10: the warm-up, the 500 payments before tx 0, sees only
    # the excellent (a piecewise curve holds its first value before its first point); beta's periodic
    # term goes on backwards, so the warm-up saw it swing
    chans = [{"name": "alpha", "approval": {"points": [[0, 0.97], [10, 0.20]]}},
             {"name": "beta", "approval": {"base": 0.85, "periodic": [{"amplitude": 0.05, "period": 400}]}}]
    sc = scenario(channels=chans, warmup=500)
    warm_world = build_world(sc, 7, 500, before=0.0)
    assert {round(q[0], 6) for q in warm_world.q} == {0.97}
    curve = build_world(sc, 7).scenario.channels[1].approval
    assert [tx.x for tx in warm_world.txs] == [float(i - 500) for i in range(500)]
    assert [q[1] for q in warm_world.q] == [curve.value(i - 500.0) for i in range(500)]
    assert max(q[1] for q in warm_world.q) - min(q[1] for q in warm_world.q) > 0.09
    assert all(all(up) for up in warm_world.up)
    # on a seconds clock the past ends just before the run's first payment
    timed = msgspec.structs.replace(sc, clock="s")
    run_world = build_world(timed, 7)
    past = build_world(timed, 7, 500, before=run_world.txs[0].x)
    xs = [tx.x for tx in past.txs]
    assert xs == sorted(xs) and run_world.txs[0].x - 0.01 < xs[-1] < run_world.txs[0].x and xs[0] < 0

    # outcomes 300 tx late: the warm-up's last 300 outcomes are learnt during the run, each at its reveal
    from policies.success_rate import SuccessStats

    steps = [{"policy": "success_rate", "explore": 0.0}]
    late = msgspec.structs.replace(sc, feedback=msgspec.structs.replace(sc.feedback, delay_tx=300),
                                   transactions=400, strategies=[{"name": "s", "chain": steps}])
    learnt: list[tuple[str, float]] = []
    original = SuccessStats.record_outcome

    def spy(self: SuccessStats, channel: str, ctx: Any, success: bool, now: float, *a: Any, **k: Any) -> None:
        learnt.append((ctx.payment_id, now))
        original(self, channel, ctx, success, now, *a, **k)

    monkeypatch.setattr(SuccessStats, "record_outcome", spy)
    world = build_world(late, 7)
    world.warm = build_world(late, 7, 500, before=0.0)
    run_strategy(world, "s", steps)
    warm_in_run = [int(pid.rsplit("-", 1)[1]) for pid, now in learnt if "-warmup-" in pid and now >= 0]
    warm_before = [int(pid.rsplit("-", 1)[1]) for pid, now in learnt if "-warmup-" in pid and now < 0]
    assert warm_in_run and warm_before
    assert min(warm_in_run) >= 500 - 300 - 1 and max(warm_before) < 500 - 300 + 1


def test_adaptation_delay_definition() -> None:
    match = bytearray([0] * 50 + [1] * 150)
    assert adaptation_delays(match, [0], 20) == [46]  # a window of 20 starting at d holds d - 30 matches: >= 16 from d = 46
    assert adaptation_delays(bytearray(100), [0], 20) == [None]


def test_loss_by_phase_splits_what_gap_captured_leaves_between_change_points() -> None:
    sc = scenario(
        transactions=4000, static="primary", change_points=[2000],
        channels=[{"name": "alpha", "priority": 1, "approval": {"points": [[1999, 0.95], [2000, 0.70]]}},
                  {"name": "beta", "priority": 2, "approval": {"base": 0.88}}],
    )
    runs = run_seed(sc, 7) + run_seed(sc, 8)
    bounds = report.phase_bounds(build_world(sc, 7).change_index, 4000)
    assert bounds == [0, 2000, 4000]
    assert report.phase_bounds([], 4000) == [0, 1000, 2000, 3000, 4000]
    phases = report.loss_by_phase(runs, bounds)
    summary = report.summarize("t", runs)
    adaptive = phases["adaptive"]
    assert sum(p["pct_of_static_loss"] for p in adaptive) == pytest.approx(
        100 - summary["strategies"]["adaptive"]["gap_captured_pct"])
    # static (alpha first) loses only after the change: its whole loss is in the second phase
    assert [round(p["pct_of_static_loss"], 6) for p in phases["static"]] == [0.0, 100.0]
    assert "oracle" not in phases


def test_cli_writes_report_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    path = tmp_path / "s.yaml"
    path.write_text((ROOT / "config" / "lab" / "outage.yaml").read_text())
    parser = argparse.ArgumentParser()
    add_lab_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["lab", "run", str(path), "--out", str(out), "--transactions", "8000",
                              "--seeds", "1,2", "--jobs", "1", "--plain"])
    assert cmd_lab_run(args) == 0
    data = json.loads((out / "report.json").read_text())
    (entry,) = data["scenarios"]
    assert entry["scenario"] == "outage" and entry["seeds"] == [1, 2]
    assert set(entry["strategies"]) == {"adaptive", "static", "oracle"}
    for name in ("outage-approval.png", "outage-share.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "gap captured" in printed and "loss against the oracle by phase" in printed
    # 8,000 tx: the outage starts at tx 7,000 and outlasts the run, so the phases split there
    phases = entry["loss_by_phase"]["adaptive"]
    assert [(p["from_tx"], p["to_tx"]) for p in phases] == [(0, 7000), (7000, 8000)]
    assert sum(p["pct_of_static_loss"] for p in entry["loss_by_phase"]["static"]) == pytest.approx(100)
    assert (entry["instances"], entry["sync_interval_s"]) == (1, 2.0)
    args = parser.parse_args(["lab", "run", str(path), "--out", str(out), "--instances", "0", "--plain"])
    assert cmd_lab_run(args) == 2
    assert "--instances must be between 1 and 64" in capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsegments: []\nchannels: []\n")
    args = parser.parse_args(["lab", "run", str(bad), "--out", str(out), "--plain"])
    assert cmd_lab_run(args) == 2
    assert "$.segments" in capsys.readouterr().err


def test_scale_out_instances_share_the_traffic_and_sync_their_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """`instances: 3`: each instance routes and learns every third payment with its own statistics, and
    every `sync_interval_s` of virtual time merges the other two's snapshots, as through Redis; so each
    ends reading its peers' counts, its windows at the cluster's event scale."""
    from policies.success_rate import SuccessStats

    nodes: dict[int, SuccessStats] = {}
    learnt: dict[int, int] = {}
    rounds: dict[int, list[int]] = {}
    record, after_merge = SuccessStats.record_outcome, SuccessStats.after_merge

    def spy_record(self: SuccessStats, *args: Any, **kw: Any) -> None:
        nodes[id(self)] = self
        learnt[id(self)] = learnt.get(id(self), 0) + 1
        record(self, *args, **kw)

    def spy_after(self: SuccessStats, live: Any) -> int:
        live = list(live)
        rounds.setdefault(id(self), []).append(len(live))
        return after_merge(self, live)

    monkeypatch.setattr(SuccessStats, "record_outcome", spy_record)
    monkeypatch.setattr(SuccessStats, "after_merge", spy_after)
    one = run_strategy(build_world(scenario(), 7), "adaptive", ADAPTIVE)
    assert len(learnt) == 1 and not rounds  # one instance: nothing to sync
    learnt.clear()
    nodes.clear()
    sc = scenario(instances=3, sync_interval_s=2.0)  # 3,000 payments at 50/s: 60 s of virtual time
    three = run_strategy(build_world(sc, 7), "adaptive", ADAPTIVE)
    assert len(learnt) == 3
    total = sum(learnt.values())
    assert all(abs(k / total - 1 / 3) < 0.02 for k in learnt.values()), learnt
    assert set(rounds) == set(learnt)
    assert all(29 <= len(r) <= 32 and set(r) == {2} for r in rounds.values()), rounds
    for node in nodes.values():
        assert node._remote  # the peers' counts are merged in
        assert node._watch[("alpha", "")].dec.scale == 3.0
    assert three.n == one.n and three.ev != one.ev  # the same payments, learnt apart


def test_scale_out_instances_have_their_own_breakers() -> None:
    """alpha is down for 2,000 payments and nothing else fails: one instance sends alpha its breaker's
    5 failures plus one half-open probe 30 s later; three instances each trip their own breaker, so
    alpha sees three times as many attempts (each a fail-over to beta)."""
    sc = scenario(transactions=4000, static="primary", channels=[
        {"name": "alpha", "priority": 1, "approval": {"base": 1.0}, "outages": [{"start": 1000, "end": 3000}]},
        {"name": "beta", "priority": 2, "approval": {"base": 1.0}},
    ])
    one = {r.strategy: r for r in run_seed(sc, 7)}
    three = {r.strategy: r for r in run_seed(msgspec.structs.replace(sc, instances=3), 7)}
    assert sc.breaker.fail_max == 5 and one["static"].failovers == 6
    assert three["static"].failovers == 3 * one["static"].failovers
