"""The `payroute` command line.

    payroute serve [--config FILE] [--host H] [--port P] [--reuse-port]   run the proxy (demo config when no --config)
    payroute sandbox [--config FILE] [--host H]            run only the config's sandbox channels
    payroute config check FILE                             validate a config; non-zero exit and paths on error
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import msgspec

from router.config import Config
from router.errors import ConfigError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"
# young collections every 10,000 net allocations instead of 700 (a payment allocates a few hundred
# tracked objects), with the startup heap frozen: about +10 % payments/s and a lower p99 in
# bench/pipeline_throughput.py against the defaults (1,200 vs 1,080 req/s, same machine, same day)
GC_THRESHOLDS = (10_000, 20, 20)
DEMO_KEY_DEFAULT = "sk_test_payroute_demo_key_0001"


def _load(path: str | None) -> Config:
    from router.runtime import load

    return load(path or DEMO_CONFIG)


def _fail_config(e: ConfigError, path: str) -> int:
    print(f"config {path} is invalid:", file=sys.stderr)
    for where, msg in e.problems:
        print(f"  {where}: {msg}", file=sys.stderr)
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from router.app import create_app
    from router.logs import setup_logging

    try:
        cfg = _load(args.config)
    except ConfigError as e:
        return _fail_config(e, args.config or str(DEMO_CONFIG))
    server = msgspec.structs.replace(
        cfg.server, host=args.host or cfg.server.host, port=args.port if args.port is not None else cfg.server.port
    )
    cfg = msgspec.structs.replace(cfg, server=server)
    if args.reuse_port and cfg.storage.mode != "scaleout":
        print("--reuse-port needs storage.mode: scaleout (embedded mode keeps idempotency claims and order locks "
              "in one process)", file=sys.stderr)
        return 2
    setup_logging(cfg.server.log_level)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    app = create_app(cfg, config_path=args.config, server_overrides=overrides)
    app.on_startup.append(_settle_heap)
    base = f"http://{server.host}:{server.port}"
    print(f"payroute listening on {base} (config {args.config or 'demo'}, version {cfg.digest})", flush=True)
    if args.config is None:
        import os

        key = os.environ.get("PAYROUTE_DEMO_API_KEY", DEMO_KEY_DEFAULT)
        print(f"demo merchant API key: {key}", flush=True)
        print(f"sandbox channels: {', '.join(f'{s.name}=127.0.0.1:{s.port}' for s in cfg.sandbox)}", flush=True)
        print(
            f"try: curl -s {base}/v1/payments -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
            "-d '{\"amount\":1099,\"currency\":\"USD\",\"country\":\"US\",\"merchant_order_id\":\"order-1\","
            "\"payment_method\":{\"type\":\"card\",\"card\":{\"number\":\"4242424242424242\",\"exp_month\":12,"
            "\"exp_year\":2034,\"cvc\":\"123\"}}}'",
            flush=True,
        )
    web.run_app(
        app, loop=_event_loop(), host=server.host, port=server.port, shutdown_timeout=cfg.server.shutdown_grace_s, print=None,
        reuse_port=args.reuse_port or None,
        access_log=logging.getLogger("aiohttp.access") if cfg.server.access_log else None,
    )
    return 0


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (a dependency): the same asyncio API on libuv, about 10 % less
    CPU per payment in bench/pipeline_throughput.py; the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


async def _settle_heap(app: object) -> None:
    """What exists at start (modules, config, compiled policies) lives as long as the process: move it out
    of the collector's sight, so a full collection scans only what requests made (shorter pauses, p99)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def cmd_sandbox(args: argparse.Namespace) -> int:
    from adapters.sandbox.server import ChannelSpec, run_sandbox

    try:
        cfg = _load(args.config)
    except ConfigError as e:
        return _fail_config(e, args.config or str(DEMO_CONFIG))
    if not cfg.sandbox:
        print("the config has no sandbox: section", file=sys.stderr)
        return 2
    specs = [msgspec.convert(msgspec.structs.asdict(s), ChannelSpec) for s in cfg.sandbox]

    async def run() -> None:
        running = await run_sandbox(specs, args.host)
        for r in running:
            print(f"sandbox channel {r.channel.name} on {r.base_url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            for r in running:
                await r.stop()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args.file)
    except ConfigError as e:
        return _fail_config(e, args.file)
    from router.runtime import config_warnings

    for where, msg in config_warnings(cfg):
        print(f"warning: {where}: {msg}")
    print(f"{args.file}: ok (version {cfg.digest}, {len(cfg.channels)} channels, {len(cfg.merchants)} merchants)")
    return 0


def cmd_route_explain(args: argparse.Namespace) -> int:
    """Dry-run a routing decision: no channel is called, nothing is stored."""
    import orjson

    from router.errors import ProblemError
    from router.model import RouteContext
    from router.runtime import Runtime
    from router.validation import Limits, validate_payment

    try:
        cfg = _load(args.config)
    except ConfigError as e:
        return _fail_config(e, args.config)
    raw = Path(args.request[1:]).read_bytes() if args.request.startswith("@") else args.request.encode()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        print(f"--request is not JSON: {e}", file=sys.stderr)
        return 2
    merchant = args.merchant or (cfg.merchants[0].id if cfg.merchants else "none")
    rt = Runtime(cfg)
    from datetime import UTC, datetime

    try:
        req, _card = validate_payment(body, merchant_id=merchant, fingerprint_key=rt.fingerprint_key,
                                      limits=Limits(max_amount=cfg.server.max_amount), today=datetime.now(UTC).date())
    except ProblemError as p:
        print(orjson.dumps(p.body(), option=orjson.OPT_INDENT_2).decode())
        return 1
    out: dict[str, object] = {"merchant": merchant, "config_version": rt.version}
    rule = rt.blocked.get(req.country)
    if rule is not None:
        out.update(blocked_by=rule.id, plan=[])
    else:
        chain = rt.chain_for(merchant)
        ctx = RouteContext(payment_id=args.payment_id, merchant_id=merchant, amount=req.amount, currency=req.currency,
                           country=req.country, method=req.payment_method.type,
                           card_bin=req.payment_method.card.bin if req.payment_method.card else None,
                           card_brand=req.payment_method.card.brand if req.payment_method.card else None,
                           metadata=req.metadata)
        plan, removed, trace = chain.explain(ctx, rt.candidates())
        out.update(chain=chain.name, candidates=list(rt.channels), plan=[c.name for c in plan], removed=removed,
                   steps=[{"policy": t.policy, "output": t.names} for t in trace])
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="payroute", description="payroute: one payment endpoint, many channels.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the payment proxy", description=(
        "Run the proxy. Without --config, runs the demo (config/demo.yaml): three sandbox channels in-process on "
        "loopback, a demo merchant whose API key is printed at start, SQLite in the current directory."))
    s.add_argument("--config", help="YAML config file (default: the demo config)")
    s.add_argument("--host", help="listen address (default: server.host from the config)")
    s.add_argument("--port", type=int, help="listen port (default: server.port from the config)")
    s.add_argument("--reuse-port", action="store_true", help=(
        "let several payroute instances on this host share the port (SO_REUSEPORT; the kernel spreads "
        "connections). Scale-out mode only: embedded mode keeps its idempotency claims and order locks in process"))
    s.set_defaults(func=cmd_serve)
    sb = sub.add_parser("sandbox", help="run the config's sandbox channels standalone",
                        description="Run the sandbox channels of a config's sandbox: section (default: the demo's).")
    sb.add_argument("--config", help="YAML config file with a sandbox: section (default: the demo config)")
    sb.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    sb.set_defaults(func=cmd_sandbox)
    r = sub.add_parser("route", help="routing tools")
    rsub = r.add_subparsers(dest="route_command", required=True)
    ex = rsub.add_parser("explain", help="dry-run a routing decision (no channel is called)", description=(
        "Show which channels a payment would be routed to and what each policy of the chain did. "
        "Nothing is sent to any channel and nothing is stored. Breakers are taken as closed."))
    ex.add_argument("--config", required=True, help="YAML config file")
    ex.add_argument("--request", required=True, help="the POST /v1/payments body as JSON, or @FILE")
    ex.add_argument("--merchant", help="merchant id (default: the first merchant in the config)")
    ex.add_argument("--payment-id", default="pay_explain", help="seed for sticky weighted choices (default pay_explain)")
    ex.set_defaults(func=cmd_route_explain)
    from router.lab.cli import add_lab_parser

    add_lab_parser(sub)  # payroute lab run | lab replay
    from router.webhooks_cli import add_webhooks_parser

    add_webhooks_parser(sub)  # payroute webhooks list | show | redrive
    from router.governance.cli import add_admin_parser

    add_admin_parser(sub)  # payroute admin ... (maker-checker requests, audit verify)
    from router.money.cli import add_money_parsers

    add_money_parsers(sub)  # payroute settle run | reconcile | ledger
    c = sub.add_parser("config", help="config tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    chk = csub.add_parser("check", help="validate a config file", description=(
        "Validate a config file: YAML, types, references, env-var interpolation. Exit 0 when valid; "
        "exit 2 and one line per bad path otherwise."))
    chk.add_argument("file")
    chk.set_defaults(func=cmd_config_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
