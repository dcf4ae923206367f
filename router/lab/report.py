"""Lab results as figures: per-strategy summaries over seeds, a table, a JSON report and PNG plots.

Definitions (also written into the JSON report under `definitions`):
- approval: approved / routable payments (after failovers), mean ± sd over seeds;
- expected approval: mean first-attempt approval probability of the chosen first channel;
- EV: mean first-attempt expected value (1 - hard) * up * p * (amount - fee), minor units;
- regret: (oracle EV - strategy EV) / oracle EV, in %;
- uplift: strategy approval - static approval, in points;
- gap captured: (EV strategy - EV static) / (EV oracle - EV static), ratio of the means over seeds,
  in %; n/a when the oracle is within 0.05 % of static (nothing to capture);
- Δoracle: oracle expected approval - strategy expected approval, in points;
- loss by phase: what a strategy lost against the oracle (EV) within each phase of the run, as a share
  of what static lost over the whole run; phases run between change points (outage edges count), or
  are the run's quarters when there are none; the shares add up to 100 - gap captured;
- adaptation delay: per change point, transactions until the first window of `window` transactions
  after it where the first choice matches the oracle's best channel ≥ 80 % (None: never, before the
  next change point); the report gives the mean over the seeds that adapted and how many did not.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from router.lab.sim import RunResult

DEFINITIONS = {
    "approval": "approved / routable payments after failovers (compliance-blocked payments excluded)",
    "expected_approval": "mean first-attempt approval probability of the chosen first channel",
    "ev": "mean first-attempt expected value (1 - hard_decline) * up * p * (amount - fee), minor units",
    "regret_pct": "(oracle EV - strategy EV) / oracle EV * 100",
    "uplift_pts": "strategy approval - static approval, points",
    "gap_captured_pct": "(EV strategy - EV static) / (EV oracle - EV static) * 100 on means over seeds",
    "delta_oracle_pts": "oracle expected approval - strategy expected approval, points",
    "adaptation_delay": "per change point: tx until the first window of `window` tx after it whose first "
                        "choices match the oracle's best channel >= 80 %; null = not before the next change",
    "loss_by_phase": "per phase (between change points, else quarters of the run; at bucket resolution): "
                     "sum of (oracle EV - strategy EV) over its payments / the same for static over the run * 100",
    "static": "filters + one fixed priority order, no breaker: the best order in hindsight on EV "
              "(or as configured by `static:`)",
    "oracle": "each payment to the eligible, up channel with the highest true EV at that moment",
}


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(scenario: str, runs: Sequence[RunResult]) -> dict[str, Any]:
    """Per-strategy figures over seeds for one scenario; `runs` holds every (strategy, seed)."""
    by: dict[str, list[RunResult]] = {}
    for r in runs:
        by.setdefault(r.strategy, []).append(r)
    for rs in by.values():
        rs.sort(key=lambda r: r.seed)

    def mean_of(name: str, attr: str) -> float:
        return statistics.fmean(float(getattr(r, attr)) for r in by[name])

    static_ev = mean_of("static", "ev") if "static" in by else math.nan
    oracle_ev = mean_of("oracle", "ev") if "oracle" in by else math.nan
    static_app = [r.approved / max(r.n, 1) for r in by.get("static", [])]
    strategies: dict[str, Any] = {}
    for name, rs in by.items():
        app = [r.approved / max(r.n, 1) for r in rs]
        exp_app = [r.exp_approval for r in rs]
        ev = statistics.fmean(r.ev for r in rs)
        approved = sum(r.approved for r in rs)
        gap = oracle_ev - static_ev
        captured = (ev - static_ev) / gap * 100 if gap > 5e-4 * abs(oracle_ev) else None
        n_cp = max((len(r.adaptation) for r in rs), default=0)
        adaptation = []
        for k in range(n_cp):
            vals = [r.adaptation[k] for r in rs if k < len(r.adaptation)]
            done = [v for v in vals if v is not None]
            adaptation.append({"mean_tx": statistics.fmean(done) if done else None, "never": len(vals) - len(done)})
        strategies[name] = {
            "approval_pct": _pct(_mean_sd(app)),
            "expected_approval_pct": _pct(_mean_sd(exp_app)),
            "ev": ev,
            "regret_pct": (oracle_ev - ev) / oracle_ev * 100 if oracle_ev else None,
            "uplift_pts": (statistics.fmean(app) - statistics.fmean(static_app)) * 100 if static_app else None,
            "gap_captured_pct": captured,
            "delta_oracle_pts": (mean_of("oracle", "oracle_exp_approval") - statistics.fmean(exp_app)) * 100
            if "oracle" in by else None,
            "mean_fee": sum(r.fee_total for r in rs) / approved if approved else 0.0,
            "latency_p50_ms": statistics.fmean(r.latency_p50 for r in rs),
            "latency_p99_ms": statistics.fmean(r.latency_p99 for r in rs),
            "failovers_per_100": statistics.fmean(r.failovers / max(r.n, 1) * 100 for r in rs),
            "unknown_per_100": statistics.fmean(r.unknown / max(r.n, 1) * 100 for r in rs),
            "violations": sum(r.violations for r in rs),
            "blocked": rs[0].blocked,
            "adaptation": adaptation,
            "static_order": rs[0].order or None,
            "seeds": [r.seed for r in rs],
        }
    return {"scenario": scenario, "strategies": strategies}


def phase_bounds(change_tx: Sequence[int], transactions: int) -> list[int]:
    """Phase boundaries in tx: 0, the change points, the end; the run's quarters without change points."""
    inner = sorted({c for c in change_tx if 0 < c < transactions})
    if not inner:
        inner = [transactions * k // 4 for k in (1, 2, 3)]
    return [0, *inner, transactions]


def loss_by_phase(runs: Sequence[RunResult], bounds: Sequence[int]) -> dict[str, list[dict[str, Any]]]:
    """Per strategy and phase: EV lost against the oracle (mean over seeds), as % of static's whole loss.
    Empty when there is no static run or static loses nothing."""
    by: dict[str, list[RunResult]] = {}
    for r in runs:
        by.setdefault(r.strategy, []).append(r)

    def lost(name: str, lo: int, hi: int) -> float:
        rs = by[name]
        return statistics.fmean(
            sum(v for b, v in enumerate(r.series_ev_lost) if lo <= b * r.bucket < hi) for r in rs
        )

    if "static" not in by:
        return {}
    static_total = lost("static", bounds[0], bounds[-1])
    if static_total <= 0.0:
        return {}
    return {
        name: [{"from_tx": lo, "to_tx": hi, "pct_of_static_loss": lost(name, lo, hi) / static_total * 100}
               for lo, hi in zip(bounds, bounds[1:], strict=False)]
        for name in by if name != "oracle"
    }


def print_loss_by_phase(entries: Sequence[dict[str, Any]]) -> None:
    """One line per scenario and learning strategy: where it lost against the oracle."""
    lines = []
    for e in entries:
        for name, phases in (e.get("loss_by_phase") or {}).items():
            if name == "static":
                continue
            parts = ", ".join(f"{p['from_tx']}-{p['to_tx']}: {p['pct_of_static_loss']:.1f}" for p in phases)
            lines.append(f"  {e['scenario']} / {name}: {parts}")
    if lines:
        print("loss against the oracle by phase (tx ranges), % of static's loss over the run:")
        print("\n".join(lines))


def _pct(ms: tuple[float, float]) -> dict[str, float]:
    return {"mean": ms[0] * 100, "sd": ms[1] * 100}


def series(runs: Sequence[RunResult]) -> dict[str, Any]:
    """Bucketed time series averaged over seeds: approval and first-choice share per strategy."""
    out: dict[str, Any] = {}
    by: dict[str, list[RunResult]] = {}
    for r in runs:
        by.setdefault(r.strategy, []).append(r)
    for name, rs in by.items():
        nb = min(len(r.series_count) for r in rs)
        cnt = [sum(r.series_count[b] for r in rs) for b in range(nb)]
        app = [sum(r.series_approved[b] for r in rs) / max(cnt[b], 1) for b in range(nb)]
        exp = [sum(r.series_exp[b] for r in rs) / max(cnt[b], 1) for b in range(nb)]
        share = {ch: [sum(r.series_share[ch][b] for r in rs) / max(cnt[b], 1) for b in range(nb)]
                 for ch in rs[0].series_share}
        out[name] = {"bucket_tx": rs[0].bucket, "approval": app, "expected_approval": exp, "share": share}
    return out


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


COLUMNS = ["scenario", "strategy", "approval %", "exp. appr %", "Δoracle pts", "regret %", "uplift pts",
           "gap captured %", "mean fee", "lat p50/p99 ms", "failovers/100", "adapt. delay (tx)"]


def table_rows(summaries: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for s in summaries:
        for name, m in s["strategies"].items():
            adapt = ", ".join(
                ("never" if a["mean_tx"] is None else f"{a['mean_tx']:.0f}") + (f" ({a['never']}×never)"
                                                                               if a["never"] and a["mean_tx"] is not None else "")
                for a in m["adaptation"]
            ) or "-"
            rows.append([
                s["scenario"], name,
                f"{m['approval_pct']['mean']:.2f} ± {m['approval_pct']['sd']:.2f}",
                f"{m['expected_approval_pct']['mean']:.2f}",
                _fmt(m["delta_oracle_pts"]), _fmt(m["regret_pct"]), _fmt(m["uplift_pts"], "+.2f"),
                _fmt(m["gap_captured_pct"], ".1f"), f"{m['mean_fee']:.1f}",
                f"{m['latency_p50_ms']:.0f}/{m['latency_p99_ms']:.0f}", f"{m['failovers_per_100']:.1f}", adapt,
            ])
    return rows


def print_table(summaries: Sequence[dict[str, Any]], plain: bool = False) -> None:
    rows = table_rows(summaries)
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            plain = True
        else:
            table = Table(title="payroute lab", show_lines=False)
            for col in COLUMNS:
                table.add_column(col, justify="left" if col in ("scenario", "strategy") else "right")
            last = None
            for row in rows:
                if last is not None and row[0] != last:
                    table.add_section()
                last = row[0]
                table.add_row(*row)
            Console(width=220).print(table)
            return
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def write_plots(out: Path, scenario: str, ser: dict[str, Any], change_tx: Sequence[int]) -> list[Path]:
    """`{scenario}-approval.png` (rolling approval per strategy) and `{scenario}-share.png` (first-choice
    share of each channel per strategy, over time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, s in ser.items():
        xs = [(b + 0.5) * s["bucket_tx"] for b in range(len(s["approval"]))]
        ax.plot(xs, [v * 100 for v in s["approval"]], label=f"{name} (realized)", linewidth=1)
        ax.plot(xs, [v * 100 for v in s["expected_approval"]], linestyle="--", linewidth=0.8,
                label=f"{name} (expected, 1st attempt)")
    for cp in change_tx:
        ax.axvline(cp, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("transaction")
    ax.set_ylabel("approval %")
    ax.set_title(f"{scenario}: approval over time (mean over seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = out / f"{scenario}-approval.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    written.append(p)

    names = list(ser)
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.2 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        s = ser[name]
        xs = [(b + 0.5) * s["bucket_tx"] for b in range(len(s["approval"]))]
        ax.stackplot(xs, *[[v * 100 for v in vals] for vals in s["share"].values()], labels=list(s["share"]))
        ax.set_ylabel(f"{name}\nshare %", fontsize=8)
        ax.set_ylim(0, 100)
        for cp in change_tx:
            ax.axvline(cp, color="black", linewidth=0.6, linestyle=":")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("transaction")
    fig.suptitle(f"{scenario}: first-choice channel share")
    fig.tight_layout()
    p = out / f"{scenario}-share.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    written.append(p)
    return written
