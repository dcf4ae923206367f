"""`payroute webhooks list|show|redrive`: the webhook admin API from the command line (httpx).

    payroute webhooks list [--status dead] [--endpoint ID] [--merchant ID] [--since T] [--until T] [--limit N]
    payroute webhooks show EVENT_ID
    payroute webhooks redrive EVENT_ID [--endpoint ID]
    payroute webhooks redrive --endpoint ID [--since T] [--until T]        (bulk: dead letters only)

The server is `--url` (or $PAYROUTE_URL, default http://127.0.0.1:8080); the admin token is `--token`
(or $PAYROUTE_ADMIN_TOKEN). Output is JSON; the exit code is 0 on success, 1 on an API error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import httpx
import orjson


def _client(args: argparse.Namespace) -> httpx.Client:
    token = args.token or os.environ.get("PAYROUTE_ADMIN_TOKEN", "")
    return httpx.Client(
        base_url=args.url or os.environ.get("PAYROUTE_URL", "http://127.0.0.1:8080"),
        headers={"Authorization": f"Bearer {token}"}, timeout=30, transport=getattr(args, "transport", None),
    )


def _emit(resp: httpx.Response) -> int:
    try:
        doc: Any = resp.json()
    except ValueError:
        doc = {"status": resp.status_code, "body": resp.text[:2000]}
    print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    return 0 if resp.is_success else 1


def cmd_list(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("status", args.status), ("endpoint_id", args.endpoint), ("merchant_id", args.merchant),
                                ("since", args.since), ("until", args.until), ("limit", str(args.limit))) if v}
    with _client(args) as c:
        return _emit(c.get("/admin/v1/webhooks/events", params=params))


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        return _emit(c.get(f"/admin/v1/webhooks/events/{args.event_id}"))


def cmd_redrive(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.event_id:
            body = {"endpoint_id": args.endpoint} if args.endpoint else {}
            return _emit(c.post(f"/admin/v1/webhooks/events/{args.event_id}/redrive", json=body))
        if not (args.endpoint or args.since or args.until):
            print("redrive: give an EVENT_ID, or --endpoint and/or --since/--until for a bulk re-drive", file=sys.stderr)
            return 2
        bulk = {k: v for k, v in (("endpoint_id", args.endpoint), ("since", args.since), ("until", args.until)) if v}
        return _emit(c.post("/admin/v1/webhooks/events/redrive", json=bulk))


def add_webhooks_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `webhooks` to the `payroute` sub-commands (`subparsers` from `add_subparsers`)."""
    w = subparsers.add_parser("webhooks", help="merchant webhook deliveries, dead letters and re-drives",
                              description="Inspect webhook deliveries and re-drive dead letters through the admin API.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="payroute base URL (default $PAYROUTE_URL or http://127.0.0.1:8080)")
    common.add_argument("--token", help="admin token (default $PAYROUTE_ADMIN_TOKEN)")
    wsub = w.add_subparsers(dest="webhooks_command", required=True)
    ls = wsub.add_parser("list", parents=[common], help="list deliveries (newest first)")
    ls.add_argument("--status", choices=["pending", "delivered", "dead"])
    ls.add_argument("--endpoint", help="endpoint id (we_...)")
    ls.add_argument("--merchant", help="merchant id")
    ls.add_argument("--since", help="ISO-8601 time with offset: events created at or after")
    ls.add_argument("--until", help="ISO-8601 time with offset: events created before")
    ls.add_argument("--limit", type=int, default=100)
    ls.set_defaults(func=cmd_list)
    sh = wsub.add_parser("show", parents=[common], help="one event: its deliveries and attempt history")
    sh.add_argument("event_id")
    sh.set_defaults(func=cmd_show)
    rd = wsub.add_parser("redrive", parents=[common], help="re-drive dead letters: one event, or in bulk")
    rd.add_argument("event_id", nargs="?", help="the event to re-drive (omit for a bulk re-drive)")
    rd.add_argument("--endpoint", help="only this endpoint (required for a bulk re-drive unless a range is given)")
    rd.add_argument("--since", help="bulk: events created at or after (ISO-8601 with offset)")
    rd.add_argument("--until", help="bulk: events created before (ISO-8601 with offset)")
    rd.set_defaults(func=cmd_redrive)
    return w  # type: ignore[no-any-return]
