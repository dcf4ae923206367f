"""Throughput of payroute's full pipeline vs a bare aiohttp pass-through hop, measured in one run.

Both forward to the same zero-latency sandbox channel (its own process). The load generator is a
closed loop of aiohttp clients in this process (C concurrent, D seconds each). Prints requests/s and
p50/p99 latency for both, and the ratio. Run: .venv/bin/python bench/pipeline_throughput.py [-c 32] [-d 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
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

    @property
    def payroute_pid(self) -> int:
        return self.procs[-1].pid


async def start_services(extra_config: str = "") -> Services:
    """Sandbox channel, bare hop and payroute, each in its own process; returns once all listen."""
    tmp = Path(tempfile.mkdtemp(prefix="payroute-bench-"))
    sbx, hop, pr = free_port(), free_port(), free_port()
    (tmp / "cfg.yaml").write_text(f"""
server: {{host: 127.0.0.1, port: {pr}, log_level: WARNING}}
storage: {{mode: embedded, sqlite_path: {tmp / 'bench.db'}}}
sandbox: [{{name: sbx, port: {sbx}}}]
channels: [{{name: sbx, adapter: sandbox, base_url: "http://127.0.0.1:{sbx}", max_connections: 256}}]
merchants: [{{id: bench, api_keys: [{{key: {KEY}}}]}}]
""" + extra_config)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-m", "router.cli", "sandbox", "--config", str(tmp / "cfg.yaml")], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-c", BARE_HOP, str(hop), f"http://127.0.0.1:{sbx}"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    # payroute without its own sandbox: the channel runs in the separate sandbox process above
    (tmp / "pr.yaml").write_text((tmp / "cfg.yaml").read_text().replace(f"sandbox: [{{name: sbx, port: {sbx}}}]\n", ""))
    procs.append(subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--config", str(tmp / "pr.yaml")], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    svc = Services(procs, f"http://127.0.0.1:{hop}/v1/payments", f"http://127.0.0.1:{pr}/v1/payments", tmp / "bench.db")
    try:
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


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    ap.add_argument("-d", "--duration", type=float, default=10.0)
    args = ap.parse_args()
    svc = await start_services()
    try:
        card = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"}

        def hop_body(w: int, n: int) -> dict[str, object]:
            return {"amount": 1099, "currency": "USD", "capture": True, "reference": f"r-{w}-{n}", "card": card}

        def pr_body(w: int, n: int) -> dict[str, object]:
            return {"amount": 1099, "currency": "USD", "country": "US", "merchant_order_id": f"o-{w}-{n}-{time.time_ns()}",
                    "payment_method": {"type": "card", "card": card}}

        await load(svc.hop_url, hop_body, args.concurrency, 1.0, {})  # warm-up
        await load(svc.pr_url, pr_body, args.concurrency, 1.0, {"Authorization": f"Bearer {KEY}"})
        n_hop, lat_hop, e_hop = await load(svc.hop_url, hop_body, args.concurrency, args.duration, {})
        n_pr, lat_pr, e_pr = await load(svc.pr_url, pr_body, args.concurrency, args.duration,
                                        {"Authorization": f"Bearer {KEY}"})
    finally:
        stop_services(svc)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"closed loop, {args.concurrency} clients, {args.duration:.0f} s each, load generator in-process (Python)")
    print(f"{'':28} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, n, lat, err in (("bare aiohttp hop (baseline)", n_hop, lat_hop, e_hop),
                              ("payroute full pipeline", n_pr, lat_pr, e_pr)):
        print(f"{name:28} {n / args.duration:9.0f} {pct(lat, 0.5):8.2f} {pct(lat, 0.99):8.2f} {err:7d}")
    print(f"ratio payroute / bare hop: {n_pr / max(n_hop, 1):.2f}x  (median latency added: "
          f"{statistics.median(lat_pr) * 1000 - statistics.median(lat_hop) * 1000:.2f} ms)")


if __name__ == "__main__":
    asyncio.run(main())
