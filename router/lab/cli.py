"""`payroute lab`: run scenarios in virtual time, or replay recorded payments against a config.

    payroute lab run SCENARIO.yaml [...] [--out DIR] [--seeds 1,2,3] [--transactions N] [--jobs N]
    payroute lab replay --db PATH --config FILE [--limit N]

`run` prints one table for all scenarios given, writes `report.json` and two PNGs per scenario into
`--out` (default `lab-out/`) and shows progress on stderr. Work is split per (scenario, seed) over
`--jobs` processes; results do not depend on how it is split. `replay` reads the `payments` table of a
SQLite record, re-routes each payment through the config's chain (no channel is called; success
statistics start empty, so stats-based rankers see their priors) and counts first-channel changes.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from router.errors import ConfigError
from router.lab import report
from router.lab.scenario import Scenario, load_scenario_file
from router.lab.sim import RunResult, build_world, run_seed


def _job(args: tuple[Scenario, int, int | None]) -> list[RunResult]:
    sc, seed, transactions = args
    return run_seed(sc, seed, transactions)


def run_lab(
    scenarios: Sequence[Scenario], transactions: int | None = None, jobs: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[list[RunResult]]:
    """Every strategy of every scenario over its seeds; one list of runs per scenario, in a fixed order."""
    tasks = [(sc, seed, transactions) for sc in scenarios for seed in sc.seeds]
    done = 0
    results: list[list[RunResult]] = []
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            for res in ex.map(_job, tasks):
                results.append(res)
                done += 1
                if on_progress:
                    on_progress(done, len(tasks))
    else:
        for task in tasks:
            results.append(_job(task))
            done += 1
            if on_progress:
                on_progress(done, len(tasks))
    out: list[list[RunResult]] = []
    k = 0
    for sc in scenarios:
        runs: list[RunResult] = []
        for _ in sc.seeds:
            runs.extend(results[k])
            k += 1
        out.append(runs)
    return out


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("seeds are integers separated by commas, e.g. 1,2,3") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def add_lab_parser(subparsers: Any) -> None:
    lab = subparsers.add_parser("lab", help="routing lab: simulate strategies in virtual time")
    lsub = lab.add_subparsers(dest="lab_command", required=True)
    run = lsub.add_parser("run", help="run scenarios", description=(
        "Simulate each scenario's strategies beside static priority and a hindsight oracle over seeds, "
        "in virtual time. Prints a table and each strategy's loss against the oracle by phase (between "
        "change points); writes report.json and PNG plots into --out."))
    run.add_argument("scenarios", nargs="+", metavar="SCENARIO.yaml")
    run.add_argument("--out", default="lab-out", help="output directory (default lab-out/)")
    run.add_argument("--seeds", type=_seeds, help="override the scenarios' seeds, e.g. 1,2,3")
    run.add_argument("--transactions", type=int, help="override the number of transactions per run")
    run.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    run.add_argument("--warmup", type=int, help="override: transactions learnt before the scored run (0: cold start)")
    run.add_argument("--feedback-delay-tx", type=int, help="override: outcomes learnt N transactions late")
    run.add_argument("--learn-from", choices=["all_attempts", "first_attempts"],
                     help="override what SuccessStats records (production's wiring: first_attempts, the default)")
    run.add_argument("--instances", type=int,
                     help="override: payroute instances sharing the traffic round-robin, each learning on its "
                          "own and syncing its statistics every sync_interval_s (scale-out; default 1)")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    run.add_argument("--plain", action="store_true", help="plain-text table and progress (no rich)")
    run.set_defaults(func=cmd_lab_run)
    rp = lsub.add_parser("replay", help="re-route recorded payments against a config (no channel called)")
    rp.add_argument("--db", required=True, help="SQLite file of the durable record (table payments)")
    rp.add_argument("--config", required=True, help="candidate payroute config (YAML)")
    rp.add_argument("--limit", type=int, help="at most this many payments (newest first)")
    rp.set_defaults(func=cmd_lab_replay)


def _progress(plain: bool) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    if not plain and sys.stderr.isatty():
        try:
            from rich.progress import Progress
        except ImportError:
            pass
        else:
            prog = Progress(transient=True)
            prog.start()
            task = prog.add_task("lab runs", total=None)

            def update(done: int, total: int) -> None:
                prog.update(task, completed=done, total=total)

            return update, prog.stop

    def counter(done: int, total: int) -> None:
        print(f"\rlab: {done}/{total} runs", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return counter, lambda: None


def cmd_lab_run(args: argparse.Namespace) -> int:
    scenarios: list[Scenario] = []
    for path in args.scenarios:
        try:
            sc = load_scenario_file(path)
        except ConfigError as e:
            print(f"scenario {path} is invalid:", file=sys.stderr)
            for where, msg in e.problems:
                print(f"  {where}: {msg}", file=sys.stderr)
            return 2
        changes: dict[str, Any] = {}
        if args.seeds:
            changes["seeds"] = args.seeds
        if args.feedback_delay_tx is not None:
            changes["feedback"] = msgspec.structs.replace(sc.feedback, delay_tx=args.feedback_delay_tx, delay_s=0.0)
        if args.learn_from:
            changes["learn_from"] = args.learn_from
        if args.instances is not None:
            if not 1 <= args.instances <= 64:
                print("--instances must be between 1 and 64", file=sys.stderr)
                return 2
            changes["instances"] = args.instances
        if args.warmup is not None:
            if args.warmup < 0:
                print("--warmup must be 0 or more", file=sys.stderr)
                return 2
            changes["warmup"] = args.warmup
        scenarios.append(msgspec.structs.replace(sc, **changes) if changes else sc)
    if args.transactions is not None and args.transactions < 1:
        print("--transactions must be positive", file=sys.stderr)
        return 2
    update, stop = _progress(args.plain)
    try:
        all_runs = run_lab(scenarios, args.transactions, max(1, args.jobs), update)
    finally:
        stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    entries = []
    for path, sc, runs in zip(args.scenarios, scenarios, all_runs, strict=True):
        summary = report.summarize(sc.name, runs)
        ser = report.series(runs)
        change_tx = build_world(sc, sc.seeds[0], args.transactions).change_index if sc.change_points or any(
            ch.outages for ch in sc.channels) else []
        summaries.append(summary)
        entries.append({
            **summary, "file": str(path), "description": sc.description, "seeds": list(sc.seeds),
            "transactions": args.transactions or sc.transactions, "change_tx": change_tx,
            "feedback": msgspec.to_builtins(sc.feedback), "learn_from": sc.learn_from,
            "instances": sc.instances, "sync_interval_s": sc.sync_interval_s,
            "stats": msgspec.to_builtins(sc.stats),
            "strategies_config": {s.name: s.chain for s in sc.strategies}, "series": ser,
            "loss_by_phase": report.loss_by_phase(
                runs, report.phase_bounds(change_tx, args.transactions or sc.transactions)),
        })
        if not args.no_plots:
            report.write_plots(out, sc.name, ser, change_tx)
    report.print_table(summaries, plain=args.plain)
    report.print_loss_by_phase(entries)
    report.write_json(out / "report.json", {"definitions": report.DEFINITIONS, "scenarios": entries})
    print(f"report: {out / 'report.json'}" + ("" if args.no_plots else f"; plots: {out}/*.png"), file=sys.stderr)
    return 0


def cmd_lab_replay(args: argparse.Namespace) -> int:
    from adapters import registry as adapter_registry
    from policies import registry as policy_registry
    from policies.base import Chain, PolicyEnv
    from policies.success_rate import SuccessStats
    from router.model import Candidate, Capabilities, Payment, route_context
    from router.runtime import load

    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"config {args.config} is invalid:", file=sys.stderr)
        for where, msg in e.problems:
            print(f"  {where}: {msg}", file=sys.stderr)
        return 2
    env = PolicyEnv(state={"success_stats": SuccessStats(), "monthly_volume": {}})
    chains = {
        key: Chain(key, [policy_registry.build(s["policy"], {k: v for k, v in s.items() if k != "policy"}, env)
                         for s in steps])
        for key, steps in [("default", cfg.routing.default), *cfg.routing.merchants.items()]
    }
    cands = []
    for ch in cfg.channels:
        caps = Capabilities(
            currencies=frozenset(ch.currencies) if ch.currencies is not None else None,
            countries=frozenset(ch.countries) if ch.countries is not None else None,
            methods=frozenset(ch.methods),
        )
        lic = cfg.compliance.licences.get(ch.name)
        cands.append(Candidate(
            name=ch.name, adapter=ch.adapter, priority=ch.priority, weight=ch.weight, fees=ch.fees,
            capabilities=adapter_registry.create(ch.adapter, ch.credentials, caps).capabilities(),
            licensed_countries=frozenset(lic.countries) if lic and lic.countries is not None else None,
            licensed_currencies=frozenset(lic.currencies) if lic and lic.currencies is not None else None,
        ))
    candidates = tuple(cands)
    blocked = {cc for rule in cfg.compliance.blocked for cc in rule.countries}
    try:
        db = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True)
        sql = "SELECT doc FROM payments ORDER BY created_at DESC" + (" LIMIT ?" if args.limit else "")
        rows = db.execute(sql, (args.limit,) if args.limit else ()).fetchall()
        db.close()
    except sqlite3.Error as e:
        print(f"cannot read payments from {args.db}: {e}", file=sys.stderr)
        return 2
    moves: Counter[tuple[str, str]] = Counter()
    total = changed = 0
    for (doc,) in rows:
        p = msgspec.json.decode(doc, type=Payment)
        was = (p.routing.plan[0] if p.routing and p.routing.plan else None) or (
            p.attempts[0].channel if p.attempts else "-")
        ctx = route_context(p)
        if p.country in blocked:
            now = "(blocked)"
        else:
            plan, _ = chains.get(p.merchant_id, chains["default"]).run(ctx, candidates)
            now = plan[0].name if plan else "(none)"
        total += 1
        if now != was:
            changed += 1
            moves[(was, now)] += 1
    print(f"{total} payments replayed against {args.config}; {changed} would go to a different first channel")
    per_channel: Counter[str] = Counter()
    for (was, _), n in moves.items():
        per_channel[was] += n
    for origin, n in sorted(per_channel.items()):
        detail = ", ".join(f"{dest}: {k}" for (w, dest), k in sorted(moves.items()) if w == origin)
        print(f"  from {origin}: {n} ({detail})")
    return 0
