"""Latency payroute adds at a fixed open-loop rate (default 1,000 requests/s), without coordinated omission.

Same set-up as bench/pipeline_throughput.py: a zero-latency sandbox channel in its own process, a bare
aiohttp pass-through hop and payroute's full pipeline both forwarding to it. The load generator (this
process) schedules request i at its intended send time `start + i / rate` whatever happened to earlier
requests, and measures each latency from that intended time, so a stall is charged to every request
it delays (no coordinated omission). The bare hop and payroute are measured one after the other, each
after a warm-up. Prints p50/p99/p99.9 of both, the difference (what payroute adds) against the target
(added <= 1 ms p50, <= 5 ms p99; printed, never asserted), and the achieved rate: if the generator
itself falls behind, the figures are flagged as not trustworthy.
The generator's client is a lean one over asyncio's transports (keep-alive connections, responses read
by Content-Length, no task per request) on uvloop; it prints its own CPU per request: about half of
aiohttp's client here (2026-12-04: 240-270 against 500-630 us per request), most of what is left being
the kernel's loopback TCP inside the socket write. `--client aiohttp` is the client it used before.
Run: .venv/bin/python bench/latency_open_loop.py [-r 1000] [-d 20] [--mode embedded|scaleout] [--instances N]
     [--client raw|aiohttp]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import aiohttp
import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline_throughput import KEY, pct, start_services, stop_services  # noqa: E402

TARGET_P50_MS = 1.0
TARGET_P99_MS = 5.0


Done = Callable[[bool, float], None]  # (answered 201, intended send time)


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time: writes a prepared request, reads its
    response by Content-Length (every response here has one), calls the request's `done`."""

    def __init__(self, idle: list[_Conn]) -> None:
        self.idle = idle
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.done: Done | None = None
        self.intended = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)

    def send(self, request: bytes, intended: float, done: Done) -> None:
        assert self.transport is not None
        self.done, self.intended = done, intended
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.done is None:
            return
        head = bytes(self.buf[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
        stop = head.find(b"\r\n", at + 2)
        total = end + 4 + int(head[at + 17:stop if stop >= 0 else len(head)])
        if len(self.buf) < total:
            return
        del self.buf[:total]
        done, self.done = self.done, None
        self.idle.append(self)
        done(head[9:12] == b"201", self.intended)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)
        if self.done is not None:
            done, self.done = self.done, None
            done(False, self.intended)


class Client:
    """Starts request i at its intended time without waiting for it; `done` is called when it ends."""

    def start(self, i: int, intended: float, body: bytes, done: Done) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class RawClient(Client):
    """A pool of keep-alive connections over asyncio's transports, no task or future per request: about
    half of aiohttp's client CPU per request, which the generator would otherwise take from the servers."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parsed = urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        fixed = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.head = (f"POST {parsed.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                     f"Content-Type: application/json\r\n{fixed}")
        self.idle: list[_Conn] = []
        self.all: list[_Conn] = []
        self.connecting: set[asyncio.Task[None]] = set()

    def start(self, i: int, intended: float, body: bytes, done: Done) -> None:
        request = f"{self.head}Idempotency-Key: ol-{i}-{intended}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        if self.idle:
            self.idle.pop().send(request, intended, done)
        else:  # all connections busy: a new one (the pool grows to the concurrency the rate needs)
            t = asyncio.get_running_loop().create_task(self._connect_and_send(request, intended, done))
            self.connecting.add(t)
            t.add_done_callback(self.connecting.discard)

    async def _connect_and_send(self, request: bytes, intended: float, done: Done) -> None:
        try:
            _, conn = await asyncio.get_running_loop().create_connection(lambda: _Conn(self.idle), self.host, self.port)
        except OSError:
            done(False, intended)
            return
        self.all.append(conn)
        conn.send(request, intended, done)

    async def close(self) -> None:
        for c in self.all:
            if c.transport is not None:
                c.transport.close()


class AiohttpClient(Client):
    """aiohttp's client, a task per request (`--client aiohttp`, this bench's generator until 2026-12-04)."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url, self.headers = url, headers
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024),
                                             headers={"Content-Type": "application/json"})
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, i: int, intended: float, body: bytes, done: Done) -> None:
        t = asyncio.get_running_loop().create_task(self._one(i, intended, body, done))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _one(self, i: int, intended: float, body: bytes, done: Done) -> None:
        try:
            async with self.session.post(self.url, data=body,
                                         headers={**self.headers, "Idempotency-Key": f"ol-{i}-{intended}"}) as r:
                await r.read()
                ok = r.status == 201
        except aiohttp.ClientError:
            ok = False
        done(ok, intended)

    async def close(self) -> None:
        await self.session.close()


async def open_loop(client: Client, body_for: Callable[[int], object], rate: float,
                    seconds: float) -> tuple[list[float], int, float, float, float]:
    """Request i started at `start + i / rate` whatever earlier ones did. Returns (latencies from the
    intended send time, errors, worst send lag, achieved rate, the generator's CPU per request in µs)."""
    loop = asyncio.get_running_loop()
    n = int(rate * seconds)
    latencies: list[float] = []
    errors = 0
    outstanding = n
    finished = loop.create_future()

    def done(ok: bool, intended: float) -> None:
        nonlocal errors, outstanding
        latencies.append(time.perf_counter() - intended)
        if not ok:
            errors += 1
        outstanding -= 1
        if outstanding == 0:
            finished.set_result(None)

    worst_lag = 0.0
    cpu0 = time.process_time()
    start = time.perf_counter() + 0.05
    i = 0
    while i < n:  # every request whose time has come, then sleep until the next one's
        now = time.perf_counter()
        while i < n and start + i / rate <= now:
            intended = start + i / rate
            if now - intended > worst_lag:
                worst_lag = now - intended
            client.start(i, intended, orjson.dumps(body_for(i)), done)
            i += 1
        if i < n:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
    sent_in = time.perf_counter() - start
    if n:
        await finished
    cpu_us = (time.process_time() - cpu0) / max(n, 1) * 1e6
    return latencies, errors, worst_lag, n / max(sent_in, 1e-9), cpu_us


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-r", "--rate", type=float, default=1000.0, help="requests per second")
    ap.add_argument("-d", "--duration", type=float, default=20.0, help="seconds measured, per target")
    ap.add_argument("-w", "--warmup", type=float, default=3.0)
    ap.add_argument("--mode", choices=["embedded", "scaleout"], default="embedded",
                    help="scaleout: Redis + PostgreSQL (see bench/pipeline_throughput.py)")
    ap.add_argument("--instances", type=int, default=1, help="payroute (and bare-hop) processes sharing the port")
    ap.add_argument("--client", choices=["raw", "aiohttp"], default="raw",
                    help="the generator's HTTP client: raw asyncio connections (default, lean) or aiohttp's")
    args = ap.parse_args()
    if args.instances > 1 and args.mode != "scaleout":
        ap.error("--instances > 1 needs --mode scaleout (embedded mode is one process)")
    svc = await start_services(mode=args.mode, instances=args.instances)
    card = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"}

    def hop_body(i: int) -> dict[str, object]:
        return {"amount": 1099, "currency": "USD", "capture": True, "reference": f"r-{i}", "card": card}

    def pr_body(i: int) -> dict[str, object]:
        return {"amount": 1099, "currency": "USD", "country": "US", "merchant_order_id": f"ol-{i}-{time.time_ns()}",
                "payment_method": {"type": "card", "card": card}}

    auth = {"Authorization": f"Bearer {KEY}"}
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    try:
        kind = RawClient if args.client == "raw" else AiohttpClient
        client = kind(svc.hop_url, {})
        await open_loop(client, hop_body, args.rate, args.warmup)
        hop = await open_loop(client, hop_body, args.rate, args.duration)
        await client.close()
        client = kind(svc.pr_url, auth)
        await open_loop(client, pr_body, args.rate, args.warmup)
        pr = await open_loop(client, pr_body, args.rate, args.duration)
        await client.close()
    finally:
        stop_services(svc)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}; open loop "
          f"{args.rate:.0f} req/s for {args.duration:.0f} s each, latency from the intended send time "
          f"(no coordinated omission), load generator in-process (Python, {args.client} client, {loop_name}), {args.mode} mode "
          f"({'SQLite, synchronous=FULL' if args.mode == 'embedded' else 'Redis + PostgreSQL'}), "
          f"{args.instances} process(es) each")
    print(f"{'':28} {'sent/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max lag ms':>10} {'errors':>7} "
          f"{'generator CPU us/req':>21}")
    for name, (lat, err, lag, achieved, gen_us) in (("bare aiohttp hop (baseline)", hop), ("payroute full pipeline", pr)):
        print(f"{name:28} {achieved:8.0f} {pct(lat, 0.5):8.2f} {pct(lat, 0.99):8.2f} {pct(lat, 0.999):9.2f} "
              f"{lag * 1000:10.2f} {err:7d} {gen_us:21.0f}")
    add50 = pct(pr[0], 0.5) - pct(hop[0], 0.5)
    add99 = pct(pr[0], 0.99) - pct(hop[0], 0.99)
    ok = lambda v, t: "meets" if v <= t else f"misses by {v - t:.2f} ms"  # noqa: E731
    print(f"added by payroute: p50 {add50:+.2f} ms (target <= {TARGET_P50_MS:.0f} ms: {ok(add50, TARGET_P50_MS)}), "
          f"p99 {add99:+.2f} ms (target <= {TARGET_P99_MS:.0f} ms: {ok(add99, TARGET_P99_MS)})")
    for name, (_, _, _, achieved, _) in (("bare hop", hop), ("payroute", pr)):
        if achieved < args.rate * 0.98:
            print(f"WARNING: the generator sent only {achieved:.0f}/s to {name}: it fell behind, figures understate")


if __name__ == "__main__":
    try:  # the generator on the event loop payroute serves on (less CPU per request), where installed
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
