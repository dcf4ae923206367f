"""Throughput of payroute's full pipeline vs a bare aiohttp pass-through hop, measured in one run.

Both forward to the same zero-latency sandbox channel (its own process). The load generator is `wrk`
(Debian package `wrk`; a C program in its own process, C connections for D seconds, every request a new
Idempotency-Key and order id: bench/wrk_payments.lua) or, without wrk, a closed loop of aiohttp clients
in this process (`--generator python`, which costs the machine more CPU than the hop it measures).
Prints requests/s, p50/p99 latency and the CPU time its server process(es) spent per request (user +
system, every thread, from /proc; the sandbox channel and the load generator not included) for both,
and the ratio.

Modes: `embedded` (SQLite, one process) or `scaleout` (Redis + PostgreSQL: a private redis-server on a
free port and a fresh PostgreSQL database that is dropped afterwards; `--instances N` runs N payroute
processes sharing the port with SO_REUSEPORT, and N bare-hop processes likewise). Scale-out needs the
test extras (it borrows tests/services.py) and `$PAYROUTE_TEST_PG` or PostgreSQL on 127.0.0.1:5432.

Run: .venv/bin/python bench/pipeline_throughput.py [-c 32] [-d 10] [--mode embedded|scaleout] [--instances N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk_test_bench_key_000000000001"
BARE_HOP = """
import sys, aiohttp
from aiohttp import web
upstream = sys.argv[2]
async def ctx(app):
    app["s"] = aiohttp.ClientSession()
    yield
    await app["s"].close()
async def hop(request):
    body = await request.read()
    async with request.app["s"].post(upstream + "/v1/charges", data=body,
            headers={"Content-Type": "application/json", "Idempotency-Key": request.headers["Idempotency-Key"]}) as r:
        return web.Response(status=201, body=await r.read(), content_type="application/json")
app = web.Application()
app.cleanup_ctx.append(ctx)
app.router.add_post("/v1/payments", hop)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None, reuse_port=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int) -> None:
    for _ in range(300):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


async def load(url: str, body_for, concurrency: int, seconds: float, headers: dict[str, str]) -> tuple[int, list[float], int]:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    counter = 0

    async def worker(session: aiohttp.ClientSession, w: int) -> None:
        nonlocal errors, counter
        while time.perf_counter() < stop:
            counter += 1
            n = counter
            t0 = time.perf_counter()
            async with session.post(url, data=orjson.dumps(body_for(w, n)),
                                    headers={**headers, "Idempotency-Key": f"b-{w}-{n}-{t0}"}) as r:
                await r.read()
                if r.status != 201:
                    errors += 1
            latencies.append(time.perf_counter() - t0)

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, headers={"Content-Type": "application/json"}) as s:
        await asyncio.gather(*(worker(s, w) for w in range(concurrency)))
    return len(latencies), latencies, errors


def pct(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] * 1000


@dataclass
class Services:
    procs: list[subprocess.Popen[bytes]]
    hop_url: str
    pr_url: str
    db: Path
    payroute_pids: list[int]
    cleanup: list[Callable[[], None]]
    hop_pids: list[int] = field(default_factory=list)

    @property
    def payroute_pid(self) -> int:
        return self.payroute_pids[0]


def _scaleout_storage(cleanup: list[Callable[[], None]]) -> str:
    """A private redis-server and a fresh PostgreSQL database (both removed by stop_services)."""
    sys.path.insert(0, str(ROOT))
    from tests.services import create_database, drop_database, start_redis, stop

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("scaleout mode needs redis-server (Debian package redis-server)")
    proc, port = start_redis(binary)
    cleanup.append(lambda: stop(proc))
    server = os.environ.get("PAYROUTE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
    name, dsn = create_database(server)
    cleanup.append(lambda: drop_database(server, name))
    return f"storage: {{mode: scaleout, redis_url: 'redis://127.0.0.1:{port}/0', postgres_dsn: '{dsn}'}}\n"


async def start_services(extra_config: str = "", mode: str = "embedded", instances: int = 1) -> Services:
    """Sandbox channel, bare hop(s) and payroute instance(s), each in its own process; returns once all listen."""
    tmp = Path(tempfile.mkdtemp(prefix="payroute-bench-"))
    sbx, hop, pr = free_port(), free_port(), free_port()
    svc = Services([], f"http://127.0.0.1:{hop}/v1/payments", f"http://127.0.0.1:{pr}/v1/payments", tmp / "bench.db",
                   [], [])
    try:
        storage = (f"storage: {{mode: embedded, sqlite_path: {tmp / 'bench.db'}}}\n" if mode == "embedded"
                   else _scaleout_storage(svc.cleanup))
        (tmp / "cfg.yaml").write_text(f"""
server: {{host: 127.0.0.1, port: {pr}, log_level: WARNING}}
{storage}sandbox: [{{name: sbx, port: {sbx}}}]
channels: [{{name: sbx, adapter: sandbox, base_url: "http://127.0.0.1:{sbx}", max_connections: 256}}]
merchants: [{{id: bench, api_keys: [{{key: {KEY}}}]}}]
""" + extra_config)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        def spawn(cmd: list[str]) -> subprocess.Popen[bytes]:
            svc.procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            return svc.procs[-1]

        spawn([sys.executable, "-m", "router.cli", "sandbox", "--config", str(tmp / "cfg.yaml")])
        for _ in range(instances):
            svc.hop_pids.append(spawn([sys.executable, "-c", BARE_HOP, str(hop), f"http://127.0.0.1:{sbx}"]).pid)
        # payroute without its own sandbox: the channel runs in the separate sandbox process above
        (tmp / "pr.yaml").write_text((tmp / "cfg.yaml").read_text().replace(f"sandbox: [{{name: sbx, port: {sbx}}}]\n", ""))
        serve = [sys.executable, "-m", "router.cli", "serve", "--config", str(tmp / "pr.yaml")]
        if instances > 1:
            serve.append("--reuse-port")
        for i in range(instances):
            svc.payroute_pids.append(spawn(serve).pid)
            if i == 0:
                await wait_port(pr)  # the first instance migrates the schema; the others start after it
        for port in (sbx, hop, pr):
            await wait_port(port)
    except BaseException:
        stop_services(svc)
        raise
    return svc


def stop_services(svc: Services) -> None:
    for p in svc.procs:
        p.terminate()
    for p in svc.procs:
        p.wait()
    for undo in reversed(svc.cleanup):
        undo()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time so far of these processes, all their threads (Linux /proc)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, mode: str, connections: int, seconds: float) -> tuple[float, float, float, int]:
    """wrk in its own process: (requests/s, p50 ms, p99 ms, non-2xx responses + socket errors)."""
    script = Path(__file__).resolve().parent / "wrk_payments.lua"
    out = subprocess.run(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds:.0f}s", "--latency", "-s", str(script), url,
         "--", mode, KEY, f"{time.time_ns()}"],
        check=True, capture_output=True, text=True,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            raise RuntimeError(f"wrk printed no {label}th percentile:\n{out}")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps, bad = wrk_rate(out)
    return rps, ms("50"), ms("99"), bad


def wrk_rate(out: str) -> tuple[float, int]:
    """(requests/s, non-2xx responses + socket errors) from wrk's output."""
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock is not None:
        bad += sum(int(x) for x in sock.groups())
    return float(m.group(1)), bad


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    ap.add_argument("-d", "--duration", type=float, default=10.0)
    ap.add_argument("--generator", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python",
                    help="load generator (default: wrk when installed)")
    ap.add_argument("--mode", choices=["embedded", "scaleout"], default="embedded")
    ap.add_argument("--instances", type=int, default=1, help="payroute (and bare-hop) processes sharing the port")
    args = ap.parse_args()
    if args.instances > 1 and args.mode != "scaleout":
        ap.error("--instances > 1 needs --mode scaleout (embedded mode is one process)")
    svc = await start_services(mode=args.mode, instances=args.instances)
    rows: list[tuple[str, float, float, float, int, float]] = []  # name, req/s, p50, p99, errors, CPU us/req
    try:
        if args.generator == "wrk":
            run_wrk(svc.hop_url, "hop", args.concurrency, 2)  # warm-up
            run_wrk(svc.pr_url, "payroute", args.concurrency, 2)
            for name, url, mode, pids in (("bare aiohttp hop (baseline)", svc.hop_url, "hop", svc.hop_pids),
                                          ("payroute full pipeline", svc.pr_url, "payroute", svc.payroute_pids)):
                cpu0 = cpu_seconds(pids)
                rps, p50, p99, bad = run_wrk(url, mode, args.concurrency, args.duration)
                cpu_us = (cpu_seconds(pids) - cpu0) / max(rps * args.duration, 1) * 1e6
                rows.append((name, rps, p50, p99, bad, cpu_us))
        else:
            card = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"}

            def hop_body(w: int, n: int) -> dict[str, object]:
                return {"amount": 1099, "currency": "USD", "capture": True, "reference": f"r-{w}-{n}", "card": card}

            def pr_body(w: int, n: int) -> dict[str, object]:
                return {"amount": 1099, "currency": "USD", "country": "US",
                        "merchant_order_id": f"o-{w}-{n}-{time.time_ns()}", "payment_method": {"type": "card", "card": card}}

            auth = {"Authorization": f"Bearer {KEY}"}
            await load(svc.hop_url, hop_body, args.concurrency, 1.0, {})  # warm-up
            await load(svc.pr_url, pr_body, args.concurrency, 1.0, auth)
            for name, url, body, hdrs, pids in (
                ("bare aiohttp hop (baseline)", svc.hop_url, hop_body, {}, svc.hop_pids),
                ("payroute full pipeline", svc.pr_url, pr_body, auth, svc.payroute_pids),
            ):
                cpu0 = cpu_seconds(pids)
                n, lat, err = await load(url, body, args.concurrency, args.duration, hdrs)
                cpu_us = (cpu_seconds(pids) - cpu0) / max(n, 1) * 1e6
                rows.append((name, n / args.duration, pct(lat, 0.5), pct(lat, 0.99), err, cpu_us))
    finally:
        stop_services(svc)
    storage = "SQLite" if args.mode == "embedded" else "Redis + PostgreSQL"
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}; {args.mode} mode "
          f"({storage}), {args.instances} process(es) each; closed loop, {args.concurrency} connections, "
          f"{args.duration:.0f} s each; load generator: {args.generator}")
    print(f"{'':28} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'server CPU us/req':>18}")
    for name, rps, p50, p99, err, cpu_us in rows:
        print(f"{name:28} {rps:9.0f} {p50:8.2f} {p99:8.2f} {err:7d} {cpu_us:18.0f}")
    (_, hop_rps, hop_p50, _, _, _), (_, pr_rps, pr_p50, _, _, _) = rows
    print(f"ratio payroute / bare hop: {pr_rps / max(hop_rps, 1):.2f}x (target >= 0.6x); "
          f"median latency added: {pr_p50 - hop_p50:.2f} ms")


if __name__ == "__main__":
    asyncio.run(main())
