"""kill -9 at each recovery point: after restart every payment reaches a terminal state, and no order
is charged twice. payroute and the sandbox channel run as separate processes; the crash is the
process dying at a named point (router/faults.py, `os._exit(137)`: no cleanup, like kill -9)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, payment_body
from tests.e2e.test_durability import ROOT, free_port, wait_ready


def start(args: list[str], tmp: Path, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with (tmp / f"{name}.log").open("ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "router.cli", *args], cwd=ROOT, stdout=log, stderr=log,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def halt(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.mark.parametrize(
    ("point", "final", "channel_up"),
    [
        ("after_claim", "captured", True),
        ("after_record", "failed", True),
        ("during_send", "captured", True),
        ("before_commit", "captured", True),
        # the channel refused the connection (nothing charged), then the process died before recording it
        ("before_commit", "failed", False),
    ],
)
async def test_kill_at_recovery_point_then_restart_charges_at_most_once(
    tmp_path: Path, point: str, final: str, channel_up: bool
) -> None:
    sbx_port, port = free_port(), free_port()
    (tmp_path / "sandbox.yaml").write_text(f"sandbox: [{{name: sbx, port: {sbx_port}, script: {{latency_ms: 300}}}}]\n")
    (tmp_path / "payroute.yaml").write_text(f"""
server: {{host: 127.0.0.1, port: {port}, payment_deadline_ms: 2000}}
storage: {{mode: embedded, sqlite_path: {tmp_path / 'p.db'}}}
janitor: {{min_age_s: 2.5, interval_s: 0.2}}
channels: [{{name: sbx, adapter: sandbox, base_url: "http://127.0.0.1:{sbx_port}"}}]
merchants: [{{id: alpha, api_keys: [{{key: {API_KEY}}}]}}]
""")
    def start_sandbox() -> subprocess.Popen[bytes]:
        return start(["sandbox", "--config", str(tmp_path / "sandbox.yaml")], tmp_path, "sandbox")

    sandbox = start_sandbox() if channel_up else None
    serve = ["serve", "--config", str(tmp_path / "payroute.yaml")]
    base = f"http://127.0.0.1:{port}"
    body = payment_body(merchant_order_id=f"crash-{point}")
    headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": f"key-{point}"}
    proc = start(serve, tmp_path, "payroute-1", {"PAYROUTE_FAULT_CRASH_AT": point})
    try:
        # the charge must reach a listening channel: were the sandbox still starting, the attempt is
        # refused, nothing is charged and `failed` is the right answer (this raced ~1 run in 50)
        if sandbox is not None:
            await wait_ready(f"http://127.0.0.1:{sbx_port}", sandbox, "/_sandbox/ledger")
        await wait_ready(base, proc)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as c:
            with pytest.raises(httpx.TransportError):
                await c.post("/v1/payments", json=body)
        assert proc.wait(timeout=10) == 137  # it died at the crash point
        if sandbox is None:  # the channel comes back: recovery asks it, and it knows no such charge
            sandbox = start_sandbox()
            await wait_ready(f"http://127.0.0.1:{sbx_port}", sandbox, "/_sandbox/ledger")
        proc = start(serve, tmp_path, "payroute-2")
        await wait_ready(base, proc)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as c:
            # the merchant retries the same request: it either runs (nothing was recorded) or points
            # at the payment the crash left behind; it never starts a second charge
            retry = await c.post("/v1/payments", json=body)
            assert retry.status_code in (201, 409), retry.text
            pid = retry.json()["id"] if retry.status_code == 201 else retry.json()["existing_payment_id"]
            status = ""
            for _ in range(200):
                status = (await c.get(f"/v1/payments/{pid}")).json()["status"]
                if status not in ("processing", "pending"):
                    break
                await asyncio.sleep(0.1)
            assert status == final
            again = await c.post("/v1/payments", json=body, headers={"Idempotency-Key": f"other-{point}"})
            assert again.status_code == 409
            ledger = (await c.get(f"http://127.0.0.1:{sbx_port}/_sandbox/ledger")).json()
        mine = [ch for ch in ledger["charges"] if ch["reference"].startswith(pid)]
        approved = [ch for ch in mine if ch["status"] in ("authorized", "captured")]
        assert len(approved) == (1 if final == "captured" else 0), mine
        assert len(ledger["charges"]) == len(mine)  # no other payment appeared for this order
    finally:
        halt(proc)
        if sandbox is not None:
            halt(sandbox)
