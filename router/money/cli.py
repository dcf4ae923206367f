"""`payroute settle|reconcile|ledger`: the money commands. Wire with `add_money_parsers(subparsers)`.

They read the `storage:` and `money:` sections of a config file (env vars interpolated; other
sections are ignored here, so this works whatever else the file holds) and open the same database
the proxy writes. Exit codes: 0 fine; 1 the books need attention (exceptions found, trial balance
not zero); 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from router.config import StorageConfig, interpolate
from router.money.reconcile import (
    FORMATS,
    Format,
    ReportError,
    read_report,
    reconcile,
    to_stored,
    write_exceptions,
)
from router.money.settlement import Batch, MoneyConfig, RunResult, run_settlement, write_payout_file
from router.money.store import MoneyStore, write_journal_csv


class _Settings(msgspec.Struct, kw_only=True):
    storage: StorageConfig = StorageConfig()
    money: MoneyConfig = MoneyConfig()


def load_settings(path: str | None) -> _Settings:
    if path is None:
        return _Settings()
    text, missing = interpolate(Path(path).read_text(), os.environ)
    if missing:
        raise ValueError(f"{path}: environment variables not set: {[m[0] for m in missing]}")
    raw: Any = yaml.safe_load(text) or {}
    return msgspec.convert({k: raw[k] for k in ("storage", "money") if k in raw}, _Settings, str_keys=True)


async def open_money_store(storage: StorageConfig) -> MoneyStore:
    """Migrate (by starting the payment store once), then open the money queries on the same database."""
    if storage.mode == "scaleout":
        from router.store.postgres import PostgresStore

        if not storage.postgres_dsn:
            raise ValueError("storage.postgres_dsn is required in scaleout mode")
        pg = PostgresStore(storage.postgres_dsn)
        await pg.start()
        await pg.close()
        return MoneyStore.postgres(storage.postgres_dsn)
    from router.store.sqlite import SqliteStore

    lite = SqliteStore(storage.sqlite_path, synchronous=storage.synchronous)
    await lite.start()
    await lite.close()
    return MoneyStore.sqlite(storage.sqlite_path)


# --------------------------------------------------------------------------- settle
# Each command is synchronous: database calls run in `asyncio.run`, file I/O and matching outside it.


def _settle_run(args: argparse.Namespace, console: Console) -> int:
    settings = load_settings(args.config)
    on = date.fromisoformat(args.date)

    async def work() -> tuple[list[RunResult], list[Batch]]:
        store = await open_money_store(settings.storage)
        results = await run_settlement(store, settings.money, on)
        return results, await store.batches(payout_date=on)

    results, batches = asyncio.run(work())
    out_dir = Path(args.out or settings.money.payout_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payout = out_dir / f"payouts-{on.isoformat()}.csv"
    with payout.open("w", newline="") as f:
        write_payout_file(batches, f)
    table = Table(title=f"settlement {on.isoformat()}")
    for col in ("merchant", "currency", "period", "gross", "fees", "refunds", "reserve", "released", "net", "new"):
        table.add_column(col, justify="right" if col not in ("merchant", "currency", "period") else "left")
    for r in results:
        b = r.batch
        table.add_row(b.merchant_id, b.currency, f"{b.period_start}..{b.period_end}", str(b.gross), str(b.fees),
                      str(b.refunds), str(b.reserve_held), str(b.reserve_released), str(b.net),
                      "yes" if r.created else "no (exists)")
    console.print(table)
    console.print(f"payout file: {payout}")
    return 0


# --------------------------------------------------------------------------- reconcile


def _reconcile(args: argparse.Namespace, console: Console) -> int:
    settings = load_settings(args.config)
    store = asyncio.run(open_money_store(settings.storage))
    if args.resolve:
        if not args.reason:
            console.print("--resolve needs --reason")
            return 2
        ok = asyncio.run(store.resolve_exception(args.resolve, args.reason, args.by, datetime.now(UTC)))
        console.print("resolved" if ok else "no open exception with that id")
        return 0 if ok else 1
    if not args.file or not args.channel:
        console.print("reconcile needs FILE and --channel (or --resolve ID --reason TEXT)")
        return 2
    fmt: Format = args.format
    since = datetime.combine(date.fromisoformat(args.since), datetime.min.time(), tzinfo=UTC) if args.since else None
    until = (datetime.combine(date.fromisoformat(args.until) + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
             if args.until else None)
    ours = asyncio.run(store.channel_records(args.channel, since=since, until=until))
    with Progress(TextColumn("reconciling {task.fields[name]}"), BarColumn(), TextColumn("{task.completed} rows"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("rows", total=None, name=Path(args.file).name)
        seen = 0

        def on_row(_: object) -> None:
            nonlocal seen
            seen += 1
            if seen % 1000 == 0:
                progress.update(task, completed=seen)

        try:
            result = reconcile(args.channel, ours, read_report(args.file, fmt), fmt=fmt, on_row=on_row)
        except (ReportError, KeyError, TypeError, msgspec.DecodeError) as e:
            console.print(f"cannot read {args.file} as {fmt}: {e}")
            return 2
        progress.update(task, completed=result.rows)
    run_id = f"recon_{uuid.uuid4().hex[:16]}"
    asyncio.run(store.save_exceptions(to_stored(result, run_id, datetime.now(UTC))))
    out = Path(args.exceptions or f"{Path(args.file).stem}.exceptions.json")
    with out.open("w") as f:
        write_exceptions(result, f)
    table = Table(title=f"reconciliation {args.channel} ({fmt})")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("report rows", str(result.rows))
    table.add_row("matched", str(result.matched))
    for type_, n in result.counts().items():
        table.add_row(type_, str(n))
    console.print(table)
    console.print(f"exceptions file: {out}")
    return 1 if result.exceptions else 0


# --------------------------------------------------------------------------- ledger


def _ledger(args: argparse.Namespace, console: Console) -> int:
    settings = load_settings(args.config)
    store = asyncio.run(open_money_store(settings.storage))
    if args.ledger_command == "trial-balance":
        tb = asyncio.run(store.trial_balance())
        table = Table(title="trial balance (debit +, credit -)")
        for col in ("account", "currency", "balance"):
            table.add_column(col, justify="right" if col == "balance" else "left")
        for a in tb.accounts:
            table.add_row(a.account, a.currency, str(a.balance))
        for cur, total in sorted(tb.totals.items()):
            table.add_row("TOTAL", cur, str(total))
        console.print(table)
        return 0 if tb.balanced else 1
    if args.ledger_command == "statement":
        since = datetime.combine(date.fromisoformat(args.since), datetime.min.time(), tzinfo=UTC)
        until = datetime.combine(date.fromisoformat(args.until) + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
        st = asyncio.run(store.statement(args.merchant, args.currency.upper(), since, until))
        if args.json:
            sys.stdout.write(msgspec.json.encode(st).decode() + "\n")
            return 0
        table = Table(title=f"statement {st.merchant_id} {st.currency} {args.since}..{args.until}")
        for col in ("at", "kind", "payment", "amount", "balance"):
            table.add_column(col)
        table.add_row("", "opening", "", "", str(st.opening))
        for line in st.lines:
            table.add_row(line.at.isoformat(), line.kind, line.payment_id or "", str(line.amount), str(line.balance))
        table.add_row("", "closing", "", "", str(st.closing))
        console.print(table)
        return 0
    entries = asyncio.run(store.entries())
    if args.out in (None, "-"):
        write_journal_csv(entries, sys.stdout)
        return 0
    with Path(args.out).open("w", newline="") as f:
        n = write_journal_csv(entries, f)
    console.print(f"{n} entries written to {args.out}")
    return 0


def _runner(fn: Callable[[argparse.Namespace, Console], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        # tables and progress on stderr (stdout stays for data); no emoji or markup: ":a:" in "channel:a:clearing"
        console = Console(stderr=True, emoji=False, markup=False, highlight=False)
        try:
            return fn(args, console)
        except (ValueError, OSError, msgspec.ValidationError) as e:
            console.print(f"error: {e}")
            return 2

    return run


def add_money_parsers(sub: Any) -> None:
    """Register `settle`, `reconcile` and `ledger` on an argparse subparsers object."""
    s = sub.add_parser("settle", help="settlement batches")
    ssub = s.add_subparsers(dest="settle_command", required=True)
    run = ssub.add_parser("run", help="create the settlement batches paid out on a date (idempotent)", description=(
        "Create every merchant's settlement batch whose payout date is --date, post its reserve and payout "
        "entries, and write the payout file. Running it again for the same date changes nothing."))
    run.add_argument("--date", required=True, help="payout date, YYYY-MM-DD")
    run.add_argument("--config", help="config file with storage: and money: sections")
    run.add_argument("--out", help="directory for the payout file (default: money.payout_dir)")
    run.set_defaults(func=_runner(_settle_run))

    r = sub.add_parser("reconcile", help="reconcile a channel settlement report against the record", description=(
        "Match a channel's report against our record by channel reference and list the exceptions. "
        "Exit 1 when there are exceptions."))
    r.add_argument("file", nargs="?", help="the report file")
    r.add_argument("--channel", help="the channel name as configured")
    r.add_argument("--format", choices=FORMATS, default="sandbox", help="report format (default sandbox)")
    r.add_argument("--config", help="config file with storage: and money: sections")
    r.add_argument("--exceptions", help="where to write the exceptions JSON (default FILE.exceptions.json)")
    r.add_argument("--since", help="only our payments created on or after this day (YYYY-MM-DD, UTC)")
    r.add_argument("--until", help="only our payments created on or before this day (inclusive)")
    r.add_argument("--resolve", metavar="EXCEPTION_ID", help="resolve an exception instead (needs --reason)")
    r.add_argument("--reason", help="why the exception is resolved")
    r.add_argument("--by", default=os.environ.get("USER", "operator"), help="who resolves it")
    r.set_defaults(func=_runner(_reconcile))

    lg = sub.add_parser("ledger", help="ledger reports")
    lsub = lg.add_subparsers(dest="ledger_command", required=True)
    tb = lsub.add_parser("trial-balance", help="balances per account; totals per currency must be zero")
    st = lsub.add_parser("statement", help="a merchant's statement")
    st.add_argument("--merchant", required=True)
    st.add_argument("--currency", required=True)
    st.add_argument("--since", required=True, help="first day, YYYY-MM-DD")
    st.add_argument("--until", required=True, help="last day, YYYY-MM-DD (inclusive)")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ex = lsub.add_parser("export", help="CSV journal for an ERP (one row per entry)")
    ex.add_argument("--out", help="file to write (default stdout)")
    for p in (tb, st, ex):
        p.add_argument("--config", help="config file with storage: and money: sections")
        p.set_defaults(func=_runner(_ledger))
