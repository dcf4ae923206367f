"""`payroute admin ...`: change requests and the audit log from a terminal, over the admin API (httpx).

    payroute admin list [--status S]              payroute admin show ID
    payroute admin propose KIND [--object ID] (--payload JSON|@FILE | --config-file FILE)
    payroute admin approve ID [--totp CODE] [--stage initial|intermediate|final]
    payroute admin reject ID [--reason TEXT]      payroute admin audit-verify [--sqlite PATH | --dsn DSN]

The server is `--url` or $PAYROUTE_ADMIN_URL; the token `--token` or $PAYROUTE_ADMIN_TOKEN. `approve`
asks for the TOTP code when `--totp` is not given. `audit-verify` with `--sqlite`/`--dsn` reads the
database directly (not trusting a possibly compromised server); exit 0 when the chain verifies, 1 if not.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson

_TRANSPORT: httpx.BaseTransport | None = None  # tests may inject one


def _client(args: argparse.Namespace) -> httpx.Client:
    url = args.url or os.environ.get("PAYROUTE_ADMIN_URL", "http://127.0.0.1:8080")
    token = args.token or os.environ.get("PAYROUTE_ADMIN_TOKEN", "")
    return httpx.Client(
        base_url=url.rstrip("/") + "/admin/v1/governance",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        transport=_TRANSPORT,
    )


def _print(doc: Any) -> None:
    print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())


def _result(resp: httpx.Response) -> int:
    try:
        doc = resp.json()
    except ValueError:
        doc = {"status": resp.status_code, "body": resp.text}
    if resp.is_success:
        if isinstance(doc, dict) and "diff" in doc:
            diff = doc.pop("diff")
            _print(doc)
            print(diff)
        else:
            _print(doc)
        return 0
    print(
        f"error {resp.status_code}: {doc.get('title', '') if isinstance(doc, dict) else ''}", file=sys.stderr
    )
    _print(doc)
    return 1


def _read_arg(value: str) -> bytes:
    return Path(value[1:]).read_bytes() if value.startswith("@") else value.encode()


def cmd_list(args: argparse.Namespace) -> int:
    params = {"status": args.status} if args.status else {}
    with _client(args) as c:
        return _result(c.get("/requests", params=params))


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        return _result(c.get(f"/requests/{args.id}"))


def cmd_propose(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"kind": args.kind}
    if args.object:
        body["object_id"] = args.object
    if args.config_file:
        body["payload"] = {"yaml": Path(args.config_file).read_text()}
    elif args.payload:
        try:
            body["payload"] = orjson.loads(_read_arg(args.payload))
        except orjson.JSONDecodeError as e:
            print(f"--payload is not JSON: {e}", file=sys.stderr)
            return 2
    else:
        print("give --payload or --config-file", file=sys.stderr)
        return 2
    if args.base_version:
        body["base_version"] = args.base_version
    with _client(args) as c:
        return _result(c.post("/requests", json=body))


def cmd_approve(args: argparse.Namespace) -> int:
    code = args.totp or getpass.getpass("TOTP code: ")
    body = {"totp": code.strip()}
    if args.stage:
        body["stage"] = args.stage
    with _client(args) as c:
        return _result(c.post(f"/requests/{args.id}/approve", json=body))


def cmd_reject(args: argparse.Namespace) -> int:
    with _client(args) as c:
        return _result(
            c.post(f"/requests/{args.id}/reject", json={"reason": args.reason} if args.reason else {})
        )


def cmd_audit_verify(args: argparse.Namespace) -> int:
    if args.sqlite or args.dsn:
        from router.governance import audit
        from router.governance.store import GovernanceStore, PostgresGovernanceStore, SqliteGovernanceStore

        key = os.environ.get("PAYROUTE_AUDIT_KEY")

        async def run() -> audit.VerifyResult:
            store: GovernanceStore = (
                SqliteGovernanceStore(args.sqlite) if args.sqlite else PostgresGovernanceStore(args.dsn)
            )
            await store.start()
            try:
                return audit.verify_chain(
                    await store.audit_rows(), await store.heads(), key.encode() if key else None
                )
            finally:
                await store.close()

        import msgspec

        result = asyncio.run(run())
        _print(msgspec.to_builtins(result))
        return 0 if result.ok else 1
    with _client(args) as c:
        resp = c.get("/audit/verify")
    if resp.status_code == 409:  # the chain did not verify: the body names the first bad entry
        _print(resp.json())
        return 1
    return _result(resp)


def add_admin_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `admin` with its sub-commands to the top-level `payroute` sub-parsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "admin", help="maker-checker change requests and the audit log (over the admin API)",
        description="Work with governed change requests and the audit log. Server: --url or $PAYROUTE_ADMIN_URL; "
                    "token: --token or $PAYROUTE_ADMIN_TOKEN.")  # fmt: skip
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", help="payroute base URL (default $PAYROUTE_ADMIN_URL or http://127.0.0.1:8080)"
    )
    common.add_argument("--token", help="admin API token (default $PAYROUTE_ADMIN_TOKEN)")
    sub = p.add_subparsers(dest="admin_command", required=True)
    ls = sub.add_parser("list", parents=[common], help="list change requests")
    ls.add_argument("--status", help="pending | applied | rejected | expired | ...")
    ls.set_defaults(func=cmd_list)
    sh = sub.add_parser("show", parents=[common], help="show one request with its diff")
    sh.add_argument("id")
    sh.set_defaults(func=cmd_show)
    pr = sub.add_parser("propose", parents=[common], help="propose a governed change")
    pr.add_argument(
        "kind",
        help="config | merchant | grant | refund | auto_approval_policy | webhook_redrive | secret_rotation",
    )
    pr.add_argument("--object", help="object id (merchant id, admin id for grants, ...)")
    pr.add_argument("--payload", help="the payload as JSON, or @FILE")
    pr.add_argument("--config-file", help="for kind config: the proposed YAML file")
    pr.add_argument("--base-version", help="refuse if the object is no longer at this version")
    pr.set_defaults(func=cmd_propose)
    ap = sub.add_parser(
        "approve", parents=[common], help="approve (initial, then final review) with a TOTP code"
    )
    ap.add_argument("id")
    ap.add_argument("--totp", help="the current TOTP code (asked for when not given)")
    ap.add_argument(
        "--stage", choices=["initial", "intermediate", "final"], help="refuse unless this is the stage due"
    )
    ap.set_defaults(func=cmd_approve)
    rj = sub.add_parser("reject", parents=[common], help="reject (or, as its maker, withdraw) a request")
    rj.add_argument("id")
    rj.add_argument("--reason")
    rj.set_defaults(func=cmd_reject)
    av = sub.add_parser(
        "audit-verify", parents=[common], help="verify the audit hash chain; names the first bad entry"
    )
    src = av.add_mutually_exclusive_group()
    src.add_argument("--sqlite", help="read this governance SQLite file directly")
    src.add_argument("--dsn", help="read this PostgreSQL database directly")
    av.set_defaults(func=cmd_audit_verify)
    return p
