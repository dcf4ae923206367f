"""The command line: help texts exist, route explain dry-runs a decision."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
REQUEST = {
    "amount": 100, "currency": "EUR", "country": "DE", "merchant_order_id": "x",
    "payment_method": {"type": "card", "card": {"number": "4242424242424242", "exp_month": 1, "exp_year": 2040}},
}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_route_explain_follows_the_merchant_chain() -> None:
    cfg = str(ROOT / "config/examples/single-node.yaml")
    out = run("route", "explain", "--config", cfg, "--merchant", "shop-eu", "--request", orjson.dumps(REQUEST).decode())
    assert out.returncode == 0, out.stderr
    doc = orjson.loads(out.stdout)
    assert doc["chain"] == "merchant:shop-eu" and doc["plan"] == ["backup", "primary"]
    assert [s["policy"] for s in doc["steps"]] == ["currency", "breaker", "priority"]
    # the default chain for another merchant: the primary first
    out = run("route", "explain", "--config", cfg, "--merchant", "shop-us", "--request", orjson.dumps(REQUEST).decode())
    assert orjson.loads(out.stdout)["plan"] == ["primary", "backup"]


def test_route_explain_reports_compliance_blocks_and_bad_requests() -> None:
    cfg = str(ROOT / "config/examples/single-node.yaml")
    out = run("route", "explain", "--config", cfg, "--request", orjson.dumps({**REQUEST, "country": "KP"}).decode())
    assert orjson.loads(out.stdout)["blocked_by"] == "sanctions-comprehensive"
    out = run("route", "explain", "--config", cfg, "--request", orjson.dumps({**REQUEST, "amount": -1}).decode())
    assert out.returncode == 1 and orjson.loads(out.stdout)["errors"][0]["field"] == "amount"


def test_every_command_has_help() -> None:
    for cmd in (["serve"], ["sandbox"], ["config", "check"], ["route", "explain"]):
        out = run(*cmd, "--help")
        assert out.returncode == 0 and "usage: payroute" in out.stdout


def test_reuse_port_is_refused_in_embedded_mode(tmp_path: Path) -> None:
    cfg = tmp_path / "embedded.yaml"
    cfg.write_text(f"storage: {{mode: embedded, sqlite_path: {tmp_path / 'p.db'}}}\n"
                   "merchants: [{id: alpha, api_keys: [{key: sk_test_cli_key_0000000000001}]}]\n")
    r = run("serve", "--config", str(cfg), "--reuse-port", "--port", "0")
    assert r.returncode == 2
    assert "--reuse-port needs storage.mode: scaleout" in r.stderr
    assert not (tmp_path / "p.db").exists()  # refused before anything was opened
