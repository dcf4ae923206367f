"""Every payment acknowledged to a client survives `kill -9` of the payroute process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson

from tests.conftest import API_KEY, payment_body, wait_for

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, port: int, sbx_port: int, script: str = "{latency_ms: 2, latency_jitter_ms: 2}") -> Path:
    cfg = f"""
server: {{host: 127.0.0.1, port: {port}}}
storage: {{mode: embedded, sqlite_path: {tmp / 'payroute.db'}}}
sandbox:
  - {{name: sbx, port: {sbx_port}, script: {script}}}
channels:
  - {{name: sbx, adapter: sandbox, base_url: "http://127.0.0.1:{sbx_port}"}}
merchants:
  - {{id: alpha, api_keys: [{{key: {API_KEY}}}]}}
"""
    path = tmp / "payroute.yaml"
    path.write_text(cfg)
    return path


async def wait_ready(base: str, proc: subprocess.Popen[bytes], path: str = "/readyz") -> None:
    """Wait until the process answers 200 on `path` (payroute's /readyz; a standalone sandbox's
    /_sandbox/ledger): a test that sends before its channel listens measures a refused connection."""
    async with httpx.AsyncClient(base_url=base) as c:
        for _ in range(200):
            assert proc.poll() is None, f"{base} exited before it was ready"
            try:
                if (await c.get(path)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{base} did not become ready")


async def test_acknowledged_payments_survive_kill_9(tmp_path: Path) -> None:
    port, sbx_port = free_port(), free_port()
    config = write_config(tmp_path, port, sbx_port)
    log = (tmp_path / "stderr.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", "--config", str(config)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    base = f"http://127.0.0.1:{port}"
    acknowledged: dict[str, str] = {}
    try:
        await wait_ready(base, proc)
        stop = asyncio.Event()

        async def client(n: int) -> None:
            async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as c:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        r = await c.post("/v1/payments", json=payment_body(merchant_order_id=f"k9-{n}-{i}"))
                    except httpx.TransportError:
                        return  # the server died under us: this one was never acknowledged
                    if r.status_code == 201:
                        acknowledged[r.json()["id"]] = r.json()["status"]

        tasks = [asyncio.create_task(client(n)) for n in range(16)]
        deadline = time.monotonic() + 20
        while len(acknowledged) < 300 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # mid-flight: requests are in every stage of the pipeline
        proc.wait()
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert len(acknowledged) >= 300, "too few payments acknowledged for the test to mean anything"

    db = sqlite3.connect(tmp_path / "payroute.db")
    rows = {pid: (status, doc) for pid, status, doc in db.execute("SELECT id, status, doc FROM payments")}
    events = {pid for (pid,) in db.execute("SELECT payment_id FROM outbox")}
    db.close()
    missing = [pid for pid in acknowledged if pid not in rows]
    assert not missing, f"{len(missing)} acknowledged payments lost, e.g. {missing[:3]}"
    for pid, status in acknowledged.items():
        assert rows[pid][0] == status
        assert orjson.loads(rows[pid][1])["status"] == status
        assert pid in events  # and its outbox event, from the same transaction


def recorded_status(db_path: Path, order_id: str) -> str | None:
    """The order's status in the durable record (the server has created it), None before its row."""
    db = sqlite3.connect(db_path, timeout=1)
    try:
        row = db.execute("SELECT status FROM payments WHERE merchant_order_id = ?", (order_id,)).fetchone()
    finally:
        db.close()
    return None if row is None else str(row[0])


async def test_sigterm_finishes_in_flight_payments_then_exits(tmp_path: Path) -> None:
    port, sbx_port = free_port(), free_port()
    config = write_config(tmp_path, port, sbx_port, script="{latency_ms: 1500}")
    log = (tmp_path / "stderr.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", "--config", str(config)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base, proc)
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as c:
            in_flight = asyncio.create_task(c.post("/v1/payments", json=payment_body(merchant_order_id="term-1")))
            db_path = tmp_path / "payroute.db"
            await wait_for(lambda: recorded_status(db_path, "term-1"), "term-1 recorded")
            assert recorded_status(db_path, "term-1") == "processing"  # written before the channel call
            proc.send_signal(signal.SIGTERM)
            r = await in_flight
            assert r.status_code == 201 and r.json()["status"] == "captured"
            paid = r.json()["id"]
            # no new connections once it has stopped listening
            for _ in range(100):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    db = sqlite3.connect(tmp_path / "payroute.db")
    assert db.execute("SELECT status FROM payments WHERE id = ?", (paid,)).fetchone() == ("captured",)
    db.close()
