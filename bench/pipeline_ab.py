"""Two payroute builds side by side under the same load: the CPU each spends per payment, and B / A.

On a shared or noisy machine, runs of bench/pipeline_throughput.py one after the other differ by more
than most changes gain. Here builds A and B run at the same time, each its own `payroute serve`
(embedded mode, SQLite, its own file) in front of one zero-latency sandbox channel process, each
loaded by its own `wrk` (C connections, every request a new Idempotency-Key and order id:
bench/wrk_payments.lua): whatever else the machine does falls on both alike. Every round prints
requests/s and server CPU per request (user + system, every thread, from /proc) of each, and the ratio
B / A of the CPU; the last line gives the medians. Run A against itself to see the noise floor.

A build is a git revision (exported with `git archive` to a temporary folder) or `.` for the working
tree. Needs `wrk` (Debian package `wrk`).

Run: .venv/bin/python bench/pipeline_ab.py --a HEAD~1 --b . [--rounds 5] [-d 8] [-c 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline_throughput import KEY, cpu_seconds, free_port, wait_port, wrk_rate

ROOT = Path(__file__).resolve().parent.parent


def build(rev: str, into: Path) -> Path:
    if rev == ".":
        return ROOT
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def config(tmp: Path, name: str, port: int, sandbox_port: int, with_sandbox: bool) -> Path:
    path = tmp / f"{name}.yaml"
    sandbox = f"sandbox: [{{name: sbx, port: {sandbox_port}}}]\n" if with_sandbox else ""
    path.write_text(f"""
server: {{host: 127.0.0.1, port: {port}, log_level: WARNING}}
storage: {{mode: embedded, sqlite_path: {tmp / (name + '.db')}}}
{sandbox}channels: [{{name: sbx, adapter: sandbox, base_url: "http://127.0.0.1:{sandbox_port}", max_connections: 256}}]
merchants: [{{id: bench, api_keys: [{{key: {KEY}}}]}}]
""")
    return path


def wrk(url: str, connections: int, seconds: float) -> subprocess.Popen[str]:
    script = Path(__file__).resolve().parent / "wrk_payments.lua"
    return subprocess.Popen(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds:.0f}s", "-s", str(script), url,
         "--", "payroute", KEY, f"{time.time_ns()}"],
        stdout=subprocess.PIPE, text=True,
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", default="HEAD", help="git revision, or . for the working tree (default HEAD)")
    ap.add_argument("--b", default=".", help="git revision, or . for the working tree (default .)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-d", "--duration", type=float, default=8.0, help="seconds per round")
    ap.add_argument("-c", "--connections", type=int, default=16, help="per build")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk (Debian package wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="payroute-ab-"))
    trees = {"A": build(args.a, tmp / "a"), "B": build(args.b, tmp / "b")}
    sandbox_port, ports = free_port(), {"A": free_port(), "B": free_port()}
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(tree: Path, *cmd: str) -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen([sys.executable, "-m", "router.cli", *cmd], cwd=tree,
                                      env={**os.environ, "PYTHONPATH": str(tree)},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return procs[-1]

    try:
        spawn(trees["A"], "sandbox", "--config", str(config(tmp, "sandbox", 0, sandbox_port, True)))
        pids = {n: spawn(trees[n], "serve", "--config", str(config(tmp, n, ports[n], sandbox_port, False))).pid
                for n in "AB"}
        for port in (sandbox_port, *ports.values()):
            await wait_port(port)
        urls = {n: f"http://127.0.0.1:{ports[n]}/v1/payments" for n in "AB"}
        for w in [wrk(urls[n], args.connections, 2) for n in "AB"]:  # warm-up
            w.communicate()
        cpu: dict[str, list[float]] = {"A": [], "B": []}
        rps: dict[str, list[float]] = {"A": [], "B": []}
        print(f"A = {args.a}, B = {args.b}; {args.connections} connections each, {args.duration:.0f} s rounds")
        for r in range(args.rounds):
            before = {n: cpu_seconds([pids[n]]) for n in "AB"}
            running = {n: wrk(urls[n], args.connections, args.duration) for n in "AB"}
            outs = {n: running[n].communicate()[0] for n in "AB"}
            cells = []
            for n in "AB":
                r_s, bad = wrk_rate(outs[n])
                us = (cpu_seconds([pids[n]]) - before[n]) / max(r_s * args.duration, 1) * 1e6
                cpu[n].append(us)
                rps[n].append(r_s)
                cells.append(f"{n} {r_s:6.0f} req/s {us:6.0f} us/req" + (f" ({bad} errors)" if bad else ""))
            print(f"round {r + 1}: {'   '.join(cells)}   B/A CPU {cpu['B'][-1] / cpu['A'][-1]:.3f}", flush=True)
        ratios = [b / a for a, b in zip(cpu["A"], cpu["B"], strict=True)]
        print(f"median: A {statistics.median(rps['A']):.0f} req/s {statistics.median(cpu['A']):.0f} us/req, "
              f"B {statistics.median(rps['B']):.0f} req/s {statistics.median(cpu['B']):.0f} us/req; "
              f"B/A CPU per request {statistics.median(ratios):.3f}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
