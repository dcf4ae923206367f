"""Instructions per routing decision, counted by valgrind's callgrind: deterministic, so two builds can be
compared on a machine too noisy for wall time (bench/routing_decision.py's figures).

Runs the rules chain of bench/routing_decision.py (region -> breaker -> rules -> success_rate -> cost over
10 candidates) from each source tree `--root` (default: this checkout; another build: `git worktree add
/tmp/old REV`; give --root twice to print a baseline and a candidate in one run), twice under callgrind with PYTHONHASHSEED=0: N and N + 3,000 decisions after the same
warm-up; the difference / 3,000 is the figure, setup excluded. Needs `valgrind` (Debian package).
Run: .venv/bin/python bench/routing_instructions.py [--root DIR ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

DECISIONS = 3000


def _decide(root: str, n: int) -> None:
    """The measured work: build the chain as bench/routing_decision.py does, then make n decisions."""
    import random

    sys.path[:0] = [root, os.path.join(root, "bench")]
    import msgspec
    import routing_decision as rd

    from policies import breaker, cost, region, rules, success_rate
    from policies.base import Chain, NoParams, PolicyEnv

    rng = random.Random(7)
    cands = rd.candidates()
    stats = success_rate.SuccessStats()
    for ctx in rd.contexts(1000, rng):
        for i in range(10):
            stats.record_outcome(f"ch{i}", ctx, rng.random() < 0.80 + i / 60, rng.random() * 3600)
    env = PolicyEnv({"success_stats": stats, "monthly_volume": {"ch0": 20_000_000}})
    chain = Chain("rules", [
        region.build(region.Params(), env),
        breaker.breaker(NoParams(), env),
        rules.build(msgspec.convert({"rules": rd.RULES}, rules.Params), env),
        success_rate.build(success_rate.Params(dimension="currency"), env),
        cost.build(cost.Params(), env),
    ])
    ctxs = rd.contexts(300 + n, rng)
    for ctx in ctxs:
        chain.run(ctx, cands)


def _instructions(root: str, n: int) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
         "--root", root, "--decide", str(n)],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"},
    ).stderr
    m = re.search(r"Collected : (\d+)", out)
    if m is None:
        raise RuntimeError(f"callgrind printed no count:\n{out}")
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", action="append", help="source tree to measure (repeatable; default: this checkout)")
    ap.add_argument("--decide", type=int, help=argparse.SUPPRESS)  # the child run under valgrind
    args = ap.parse_args()
    roots = args.root or [str(Path(__file__).resolve().parent.parent)]
    if args.decide is not None:
        _decide(roots[0], args.decide)
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian package valgrind)")
    for root in roots:
        per = (_instructions(root, DECISIONS) - _instructions(root, 0)) // DECISIONS
        print(f"{root}: {per:,} instructions per decision (rules chain, 10 candidates, callgrind, PYTHONHASHSEED=0)")


if __name__ == "__main__":
    main()
