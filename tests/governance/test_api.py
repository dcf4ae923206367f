"""The governance admin API over real loopback HTTP, and the `payroute admin` CLI against it."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from aiohttp import web

from router.errors import ProblemError
from router.governance import cli as gov_cli
from router.governance.api import GOVERNANCE, GovernanceHolder, governance_ctx, register_governance_routes
from router.governance.model import GovernanceConfig, RefundThresholds
from router.governance.store import SqliteGovernanceStore
from router.metrics import Metrics
from tests.governance import CONFIG_V1, Clock, StubAppliers

LEGACY = "legacy-admin-token-0001"
P = "/admin/v1/governance"


@dataclass
class Api:
    base: str
    clock: Clock
    stub: StubAppliers
    http: httpx.AsyncClient
    tokens: dict[str, str]
    ids: dict[str, str]
    secrets: dict[str, str]

    def as_(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def code(self, name: str) -> str:
        return pyotp.TOTP(self.secrets[name]).at(self.clock())

    async def post(self, name: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return await self.http.post(P + path, json=body or {}, headers=self.as_(name))

    async def get(self, name: str, path: str) -> httpx.Response:
        return await self.http.get(P + path, headers=self.as_(name))


def legacy_auth(request: web.Request) -> None:
    if request.headers.get("Authorization") != f"Bearer {LEGACY}":
        raise ProblemError(401, "unauthenticated", "An admin token is required")


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    from router.app import METRICS, edge

    clock, stub = Clock(), StubAppliers()
    cfg = GovernanceConfig(enabled=True, refund_thresholds=RefundThresholds(default={"USD": 10_000}))
    app = web.Application(middlewares=[edge])
    app[METRICS] = Metrics()
    holder = GovernanceHolder(bootstrap_auth=legacy_auth)
    app[GOVERNANCE] = holder
    register_governance_routes(app.router)
    app.cleanup_ctx.append(
        governance_ctx(
            holder,
            cfg,
            lambda: SqliteGovernanceStore(tmp_path / "gov.db"),
            stub.appliers(),
            registry=app[METRICS].registry,
            clock=clock,
            sweeper=False,
        )
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        roles = {
            "sec": ["security_admin"],
            "op": ["operator"],
            "rev1": ["reviewer"],
            "rev2": ["reviewer"],
            "aud": ["auditor"],
        }
        resp = await http.post(
            P + "/bootstrap",
            json={"admins": [{"name": n, "roles": r} for n, r in roles.items()]},
            headers={"Authorization": f"Bearer {LEGACY}"},
        )
        assert resp.status_code == 201, resp.text
        created = resp.json()["admins"]
        a = Api(
            base,
            clock,
            stub,
            http,
            {x["name"]: x["token"] for x in created},
            {x["name"]: x["id"] for x in created},
            {},
        )
        for name in roles:
            enrol = await a.post(name, "/me/totp")
            assert enrol.status_code == 201 and enrol.json()["otpauth_uri"].startswith("otpauth://totp/")
            secret = enrol.json()["secret"]
            confirm = await a.post(
                name, "/me/totp/confirm", {"totp": pyotp.TOTP(secret).at(clock(), counter_offset=-1)}
            )
            assert confirm.status_code == 200, confirm.text
            a.secrets[name] = secret
        yield a
    await runner.cleanup()


async def test_bootstrap_happens_once_and_needs_the_legacy_token(api: Api) -> None:
    again = await api.http.post(
        P + "/bootstrap",
        json={"admins": [{"name": "x", "roles": ["reviewer"]}]},
        headers={"Authorization": f"Bearer {LEGACY}"},
    )
    assert again.status_code == 409 and again.json()["code"] == "already_bootstrapped"
    anon = await api.http.post(P + "/bootstrap", json={"admins": [{"name": "x"}]})
    assert anon.status_code == 401 and anon.headers["content-type"] == "application/problem+json"


async def test_tokens_are_stored_hashed(api: Api, tmp_path: Path) -> None:
    import sqlite3

    def read() -> list[tuple[str, bytes]]:
        conn = sqlite3.connect(tmp_path / "gov.db")
        try:
            return conn.execute("SELECT token_sha256, doc FROM governance_admins").fetchall()
        finally:
            conn.close()

    rows = await asyncio.to_thread(read)
    token = api.tokens["op"]
    assert hashlib.sha256(token.encode()).hexdigest() in {r[0] for r in rows}
    assert all(token.encode() not in bytes(r[1]) for r in rows)
    me = await api.get("op", "/me")
    assert me.status_code == 200 and "totp_secret" not in me.json() and me.json()["roles"] == ["operator"]
    assert (await api.http.get(P + "/me", headers={"Authorization": "Bearer nope"})).status_code == 401


async def test_governed_config_change_end_to_end(api: Api) -> None:
    new_yaml = CONFIG_V1.replace("weight: 50", "weight: 60")
    created = await api.post("op", "/requests", {"kind": "config", "payload": {"yaml": new_yaml}})
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    shown = (await api.get("aud", f"/requests/{rid}")).json()
    assert shown["status"] == "pending" and shown["next_review"] == "initial"
    assert "-    weight: 50\n+    weight: 60" in shown["diff"]
    # the maker, by every path: approving, and there is no other way to count as a reviewer
    own = await api.post("op", f"/requests/{rid}/approve", {"totp": api.code("op")})
    assert own.status_code == 403
    no_code = await api.post("rev1", f"/requests/{rid}/approve", {})
    assert no_code.status_code == 403 and no_code.json()["code"] == "invalid_totp"
    first = await api.post("rev1", f"/requests/{rid}/approve", {"totp": api.code("rev1"), "stage": "initial"})
    assert first.status_code == 200 and first.json()["next_review"] == "final"
    assert api.stub.config_calls == []
    final = await api.post("rev2", f"/requests/{rid}/approve", {"totp": api.code("rev2"), "stage": "final"})
    assert final.status_code == 200 and final.json()["status"] == "applied"
    assert api.stub.config_calls == [new_yaml] and final.json()["result"] == {
        "version": api.stub.config_version
    }
    listed = (await api.get("rev1", "/requests?status=applied")).json()["requests"]
    assert [r["id"] for r in listed] == [rid] and "diff" not in listed[0]
    verify = await api.get("aud", "/audit/verify")
    assert verify.status_code == 200 and verify.json()["ok"] is True
    entries = (await api.get("aud", "/audit?limit=1000")).json()["entries"]
    assert any(
        e["action"] == "request.apply" and e["request_id"] == rid and e["actor"] == api.ids["rev2"]
        for e in entries
    )
    assert any(
        e["action"] == "request.approve" and e["outcome"] == "refused" and e["actor"] == api.ids["op"]
        for e in entries
    )
    assert (await api.get("op", "/audit")).status_code == 403  # an operator does not read the audit log


async def test_governed_refund_above_threshold(api: Api) -> None:
    created = await api.post(
        "op",
        "/requests",
        {
            "kind": "refund",
            "payload": {
                "merchant_id": "alpha",
                "payment_id": "pay_1",
                "amount": 25_000,
                "reason": "chargeback",
            },
        },
    )
    assert created.status_code == 201 and created.json()["object_id"] == "alpha:pay_1"
    rid = created.json()["id"]
    rejected_first = await api.post(
        "rev1", f"/requests/{rid}/approve", {"totp": api.code("rev1"), "stage": "final"}
    )
    assert rejected_first.status_code == 409 and rejected_first.json()["code"] == "review_out_of_order"
    assert (await api.post("rev1", f"/requests/{rid}/approve", {"totp": api.code("rev1")})).status_code == 200
    done = await api.post("rev2", f"/requests/{rid}/approve", {"totp": api.code("rev2")})
    assert done.json()["status"] == "applied"
    assert api.stub.refund_calls == [("alpha", "pay_1", 25_000, "chargeback")]


async def test_unwired_kinds_are_not_available(api: Api) -> None:
    resp = await api.post("op", "/requests", {"kind": "webhook_redrive", "payload": {"merchant_id": "alpha"}})
    assert resp.status_code == 501 and resp.json()["code"] == "not_available"


async def test_reject_ends_and_reviewer_cannot_approve_twice(api: Api) -> None:
    rid = (
        await api.post(
            "op", "/requests", {"kind": "merchant", "object_id": "m1", "payload": {"action": "onboard"}}
        )
    ).json()["id"]
    assert (await api.post("rev1", f"/requests/{rid}/approve", {"totp": api.code("rev1")})).status_code == 200
    api.clock.advance(seconds=30)
    twice = await api.post("rev1", f"/requests/{rid}/approve", {"totp": api.code("rev1")})
    assert twice.status_code == 403 and twice.json()["code"] == "already_reviewed"
    rej = await api.post("rev2", f"/requests/{rid}/reject", {"reason": "unknown merchant"})
    assert rej.status_code == 200 and rej.json()["status"] == "rejected"


async def test_cli_lists_shows_approves_and_verifies(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    rid = (
        await api.post("op", "/requests", {"kind": "config", "payload": {"yaml": CONFIG_V1 + "# x\n"}})
    ).json()["id"]
    parser = argparse.ArgumentParser(prog="payroute")
    gov_cli.add_admin_parser(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return int(args.func(args))

    url = ["--url", api.base]
    assert await asyncio.to_thread(run, "admin", "list", *url, "--token", api.tokens["rev1"]) == 0
    assert rid in capsys.readouterr().out
    assert await asyncio.to_thread(run, "admin", "show", rid, *url, "--token", api.tokens["rev1"]) == 0
    assert "+# x" in capsys.readouterr().out
    assert (
        await asyncio.to_thread(
            run, "admin", "approve", rid, *url, "--token", api.tokens["op"], "--totp", api.code("op")
        )
        == 1
    )
    capsys.readouterr()
    assert (
        await asyncio.to_thread(
            run, "admin", "approve", rid, *url, "--token", api.tokens["rev1"], "--totp", api.code("rev1")
        )
        == 0
    )
    assert (
        await asyncio.to_thread(
            run, "admin", "approve", rid, *url, "--token", api.tokens["rev2"], "--totp", api.code("rev2")
        )
        == 0
    )
    assert '"status": "applied"' in capsys.readouterr().out
    assert await asyncio.to_thread(run, "admin", "audit-verify", *url, "--token", api.tokens["aud"]) == 0
    assert await asyncio.to_thread(run, "admin", "reject", rid, *url, "--token", api.tokens["rev1"]) == 1
