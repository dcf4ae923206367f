"""`kill -9` between the state commit and the dispatch loses no webhook.

A payroute process (embedded SQLite, in-config sandbox channel, one merchant endpoint on a loopback
receiver in this test process) runs with a poll interval of an hour, so the outbox events its payments
commit are not sent. It is killed with SIGKILL, restarted on the same database with a short poll
interval, and every committed event must then reach the receiver, signed (verified with the
`standardwebhooks` package). Redelivering an id is allowed (at least once); the distinct webhook-ids
received must be exactly the committed events.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
from standardwebhooks.webhooks import Webhook

from router.webhooks import new_secret
from tests.conftest import API_KEY, payment_body
from tests.e2e.test_durability import ROOT, free_port, wait_ready
from tests.router.test_webhooks import Receiver, StartReceiver, receiver  # noqa: F401 - the fixture


def write_config(tmp: Path, port: int, sbx_port: int, hook_url: str, secret: str, poll_interval_s: float) -> Path:
    cfg = f"""
server: {{host: 127.0.0.1, port: {port}}}
storage: {{mode: embedded, sqlite_path: {tmp / 'payroute.db'}}}
sandbox:
  - {{name: sbx, port: {sbx_port}, script: {{latency_ms: 1}}}}
channels:
  - {{name: sbx, adapter: sandbox, base_url: "http://127.0.0.1:{sbx_port}"}}
merchants:
  - id: alpha
    api_keys: [{{key: {API_KEY}}}]
    webhooks: [{{url: "{hook_url}", secret: "{secret}"}}]
webhooks:
  allow_networks: ["127.0.0.0/8"]
  poll_interval_s: {poll_interval_s}
  schedule_s: [0, 0.2, 0.5, 1, 2]
"""
    path = tmp / "payroute.yaml"
    path.write_text(cfg)
    return path


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "router.cli", "serve", "--config", str(config)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )


def committed_events(db_path: Path) -> dict[str, str]:
    """event id -> payment id, for every event in the outbox (what the killed process committed)."""
    db = sqlite3.connect(db_path)
    try:
        return dict(db.execute("SELECT id, payment_id FROM outbox").fetchall())
    finally:
        db.close()


async def test_kill_9_between_state_commit_and_dispatch_loses_nothing(
    tmp_path: Path, receiver: StartReceiver  # noqa: F811
) -> None:
    rec: Receiver = await receiver()
    secret = new_secret()
    port, sbx_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "stderr.log"

    # 1. a process whose dispatcher only looks at the outbox once an hour: payments commit events, none is sent
    config = write_config(tmp_path, port, sbx_port, rec.url, secret, poll_interval_s=3600)
    proc = start(config, log)
    paid: list[str] = []
    try:
        await wait_ready(base, proc)
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as c:

            async def pay(n: int) -> None:
                for i in range(10):
                    r = await c.post("/v1/payments", json=payment_body(merchant_order_id=f"crash-{n}-{i}"))
                    assert r.status_code == 201, r.text
                    paid.append(r.json()["id"])

            await asyncio.gather(*(pay(n) for n in range(4)))
        await asyncio.sleep(0.2)  # would any delivery have gone out, it would have by now
        assert rec.hits == [], "the dispatcher sent before the kill: the test would not exercise the crash"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    events = committed_events(tmp_path / "payroute.db")
    assert set(events.values()) == set(paid), "every acknowledged payment has its events in the outbox"
    assert len(events) >= len(paid)
    db = sqlite3.connect(tmp_path / "payroute.db")
    try:  # committed, not dispatched: no delivery was even recorded as attempted
        assert db.execute("SELECT count(*) FROM webhook_attempts").fetchone()[0] == 0
    finally:
        db.close()

    # 2. restart on the same database with a short poll interval: everything committed arrives
    config = write_config(tmp_path, port, sbx_port, rec.url, secret, poll_interval_s=0.05)
    proc = start(config, log)
    try:
        await wait_ready(base, proc)
        deadline = time.monotonic() + 30
        while {h.event_id for h in rec.hits} < set(events) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    received = {h.event_id for h in rec.hits}
    missing = set(events) - received
    assert not missing, f"{len(missing)} of {len(events)} committed events never arrived, e.g. {sorted(missing)[:3]}"
    assert received == set(events)  # distinct webhook-ids received = events committed: nothing extra
    verifier = Webhook(secret)
    for hit in rec.hits:
        doc = verifier.verify(hit.body, hit.headers)
        assert doc["id"] == hit.event_id
        assert doc["data"]["id"] == events[hit.event_id]  # the event is about the payment it was committed for
    # per payment, its events arrived in commit order
    db = sqlite3.connect(tmp_path / "payroute.db")
    try:
        order = [eid for (eid,) in db.execute("SELECT id FROM outbox ORDER BY rowid")]
        undelivered = db.execute("SELECT count(*) FROM webhook_deliveries WHERE status <> 'delivered'").fetchone()[0]
    finally:
        db.close()
    assert undelivered == 0
    first_seen: dict[str, int] = {}
    for i, h in enumerate(rec.hits):
        first_seen.setdefault(h.event_id, i)
    for pid in paid:
        mine = [e for e in order if events[e] == pid]
        assert sorted(mine, key=first_seen.__getitem__) == mine, pid
