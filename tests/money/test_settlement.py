"""Settlement: payout dates per cycle and calendar, idempotent batches, rolling reserve."""

from __future__ import annotations

import argparse
import asyncio
import io
import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from router.model import Status
from router.money.cli import add_money_parsers
from router.money.ledger import LedgerEntry, balances, merchant_payable, merchant_reserve, postings_for
from router.money.reconcile import ChannelRow, reconcile, to_stored
from router.money.settlement import (
    BusinessCalendar,
    Cycle,
    HolidayCalendar,
    MerchantMoney,
    MoneyConfig,
    Reserve,
    payout_date,
    period_for,
    run_settlement,
    write_payout_file,
)
from router.money.store import MoneyStore
from router.store.base import PaymentStore
from router.store.postgres import PostgresStore
from router.store.sqlite import SqliteStore
from tests.money.lifecycle import PRICING, lifecycle, new_payment, step

US = BusinessCalendar(HolidayCalendar(country="US"))
CN = BusinessCalendar(HolidayCalendar(country="CN"))
PLAIN = BusinessCalendar(HolidayCalendar())
D = date.fromisoformat


@pytest.mark.parametrize(
    ("cycle", "cal", "activity", "payout"),
    [
        (Cycle(kind="t_plus", days=0), PLAIN, "2024-06-05", "2024-06-05"),  # Wed, same day
        (Cycle(kind="t_plus", days=0), PLAIN, "2024-06-08", "2024-06-10"),  # Sat -> Mon
        (Cycle(kind="t_plus", days=1), PLAIN, "2024-06-07", "2024-06-10"),  # Fri -> Mon
        (Cycle(kind="t_plus", days=1), US, "2024-07-03", "2024-07-05"),  # Thu 4 July skipped
        (Cycle(kind="t_plus", days=2), US, "2024-07-03", "2024-07-08"),
        (Cycle(kind="t_plus", days=2), PLAIN, "2024-07-03", "2024-07-05"),  # no calendar: 4 July is a day
        (Cycle(kind="t_plus", days=1), CN, "2024-09-30", "2024-10-08"),  # National Day week
        (Cycle(kind="weekly", weekday=4), PLAIN, "2024-06-03", "2024-06-07"),  # Mon -> that Fri
        (Cycle(kind="weekly", weekday=4), PLAIN, "2024-06-07", "2024-06-14"),  # Fri -> next Fri
        (Cycle(kind="weekly", weekday=4), BusinessCalendar(HolidayCalendar(extra=[D("2024-06-14")])),
         "2024-06-10", "2024-06-17"),  # a bank closure on the Friday rolls to Monday
        (Cycle(kind="monthly", day=31), PLAIN, "2024-01-15", "2024-02-29"),  # clamped, leap year
        (Cycle(kind="monthly", day=1), US, "2024-12-10", "2025-01-02"),  # 1 Jan is a holiday
        (Cycle(kind="monthly", day=15), PLAIN, "2024-05-31", "2024-06-17"),  # 15 June is a Saturday
    ],
)
def test_payout_dates(cycle: Cycle, cal: BusinessCalendar, activity: str, payout: str) -> None:
    assert payout_date(cycle, cal, D(activity)) == D(payout)


def test_periods_cover_each_activity_day_exactly_once() -> None:
    for cycle, cal in [(Cycle(kind="t_plus", days=1), US), (Cycle(kind="weekly", weekday=2), PLAIN),
                       (Cycle(kind="monthly", day=5), US), (Cycle(kind="t_plus", days=0), CN)]:
        covered: list[date] = []
        day = D("2024-01-01")
        while day <= D("2024-12-31"):
            period = period_for(cycle, cal, day)
            if period is not None:
                assert payout_date(cycle, cal, period[0]) == day == payout_date(cycle, cal, period[1])
                covered.extend(period[0] + timedelta(days=i) for i in range((period[1] - period[0]).days + 1))
            day += timedelta(days=1)
        assert len(covered) == len(set(covered))  # never settled twice
        assert covered == sorted(covered)
    # weekend activity counts as Monday's: T+1 pays Friday's on Monday and the weekend's with Monday's on Tuesday
    assert period_for(Cycle(kind="t_plus", days=1), PLAIN, D("2024-06-10")) == (D("2024-06-07"), D("2024-06-07"))
    assert period_for(Cycle(kind="t_plus", days=1), PLAIN, D("2024-06-11")) == (D("2024-06-08"), D("2024-06-10"))
    assert period_for(Cycle(kind="t_plus", days=1), PLAIN, D("2024-06-08")) is None  # Saturday


async def write_lifecycles(db: Path | PaymentStore, seed: int, n: int, start: datetime) -> list[LedgerEntry]:
    store = SqliteStore(db) if isinstance(db, Path) else db
    await store.start()
    out: list[LedgerEntry] = []
    try:
        rng = random.Random(seed)
        for i in range(n):
            at = start + timedelta(hours=rng.randint(0, 24 * 20))
            for before, after in lifecycle(rng, f"pay_{seed}_{i}", at):
                entries = postings_for(before, after, PRICING)
                out.extend(entries)
                if before is None:
                    await store.insert_payment(after, ledger=entries)
                else:
                    await store.update_payment(after, before.version, ledger=entries)
    finally:
        await store.close()
    return out


CFG = MoneyConfig(
    default_cycle=Cycle(kind="t_plus", days=1),
    merchants={"m1": MerchantMoney(settlement=Cycle(kind="weekly", weekday=0), reserve=Reserve(percent_bp=1000,
                                                                                              hold_days=14))},
    calendars={"USD": HolidayCalendar(country="US")},
)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_settle_run_twice_gives_the_same_batches_and_no_new_rows(tmp_path: Path, seed: int) -> None:
    db = tmp_path / "p.db"
    await write_lifecycles(db, seed, 30, datetime(2024, 6, 3, tzinfo=UTC))
    money = MoneyStore.sqlite(db)
    first_files, created = [], 0
    for i in range(60):
        on = date(2024, 6, 3) + timedelta(days=i)
        results = await run_settlement(money, CFG, on)
        created += sum(r.created for r in results)
        buf = io.StringIO()
        write_payout_file(await money.batches(payout_date=on), buf)
        first_files.append(buf.getvalue())
    assert created > 0
    entries_before = len(await money.entries())
    batches_before = await money.batches()
    for i in range(60):
        on = date(2024, 6, 3) + timedelta(days=i)
        again = await run_settlement(money, CFG, on)
        assert not any(r.created for r in again)
        buf = io.StringIO()
        write_payout_file(await money.batches(payout_date=on), buf)
        assert buf.getvalue() == first_files[i]
    assert len(await money.entries()) == entries_before
    assert await money.batches() == batches_before
    assert (await money.trial_balance()).balanced


async def test_every_captured_unit_is_paid_out_once_reserve_included(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    ledger = await write_lifecycles(db, 11, 40, datetime(2024, 6, 3, tzinfo=UTC))
    money = MoneyStore.sqlite(db)
    for i in range(120):  # long enough for every reserve to be released
        await run_settlement(money, CFG, date(2024, 6, 3) + timedelta(days=i))
    b = {k: v for k, v in balances(await money.entries()).items() if k[0].startswith("merchant:")}
    assert all(v == 0 for v in b.values()), b  # nothing owed, nothing held: all paid out
    payouts = sum(x.net for x in await money.batches())
    owed = -sum(v for (acct, _), v in balances(ledger).items() if acct.startswith("merchant:"))
    assert payouts == owed


async def test_reserve_is_held_then_released_after_the_hold_period(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    store = SqliteStore(db)
    await store.start()
    try:
        p = new_payment("pay_r", "m9", 100_000, "EUR", "a", datetime(2024, 6, 3, 10, tzinfo=UTC))
        cap = step(p, p.created_at, status=Status.CAPTURED, captured_amount=100_000, channel_reference="ch_r")
        await store.insert_payment(p)
        await store.update_payment(cap, p.version, ledger=postings_for(p, cap, PRICING))
    finally:
        await store.close()
    cfg = MoneyConfig(merchants={"m9": MerchantMoney(settlement=Cycle(kind="t_plus", days=0),
                                                     reserve=Reserve(percent_bp=500, hold_days=7))})
    money = MoneyStore.sqlite(db)
    [first] = await run_settlement(money, cfg, date(2024, 6, 3))
    fee = 250 * 100_000 // 10_000  # default price list: 2.5 %
    assert first.batch.gross == 100_000 and first.batch.fees == fee
    assert first.batch.reserve_held == 5_000 and first.batch.net == 100_000 - fee - 5_000
    assert first.batch.release_date == date(2024, 6, 10)
    for day in range(4, 10):  # nothing to pay, nothing released yet
        assert await run_settlement(money, cfg, date(2024, 6, day)) == []
    assert balances(await money.entries())[(merchant_reserve("m9"), "EUR")] == -5_000
    [release] = await run_settlement(money, cfg, date(2024, 6, 10))
    assert release.batch.reserve_released == 5_000 and release.batch.net == 5_000 and release.batch.gross == 0
    final = balances(await money.entries())
    assert final[(merchant_reserve("m9"), "EUR")] == 0 and final[(merchant_payable("m9"), "EUR")] == 0
    assert (await money.get_batch(first.batch.batch_key)) is not None
    assert (await money.get_batch(first.batch.batch_key)).released_by == release.batch.batch_key  # type: ignore[union-attr]
    assert await run_settlement(money, cfg, date(2024, 6, 11)) == []  # released once only


async def test_cli_settle_run_twice_writes_the_same_payout_file(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    await write_lifecycles(db, 5, 10, datetime(2024, 6, 3, tzinfo=UTC))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage:\n  sqlite_path: {db}\nmoney:\n  default_cycle: {{kind: t_plus, days: 1}}\n"
                   f"  payout_dir: {tmp_path / 'out'}\nchannels: []\n")
    parser = argparse.ArgumentParser(prog="payroute")
    add_money_parsers(parser.add_subparsers(dest="command", required=True))

    def cli(*argv: str) -> int:
        args = parser.parse_args([*argv, "--config", str(cfg)])
        return int(args.func(args))

    payout = tmp_path / "out" / "payouts-2024-06-11.csv"
    assert await asyncio.to_thread(cli, "settle", "run", "--date", "2024-06-11") == 0
    first = payout.read_bytes()
    assert first.count(b"\n") > 1
    assert await asyncio.to_thread(cli, "settle", "run", "--date", "2024-06-11") == 0
    assert payout.read_bytes() == first
    assert await asyncio.to_thread(cli, "ledger", "trial-balance") == 0
    assert await asyncio.to_thread(cli, "ledger", "export", "--out", str(tmp_path / "j.csv")) == 0
    assert (tmp_path / "j.csv").read_text().startswith("date,journal_id,line_id,account,debit,credit")


async def test_postgres_and_sqlite_settle_to_the_same_batches(tmp_path: Path, fresh_postgres_dsn: str) -> None:
    start = datetime(2024, 6, 3, tzinfo=UTC)
    await write_lifecycles(tmp_path / "p.db", 21, 25, start)
    await write_lifecycles(PostgresStore(fresh_postgres_dsn), 21, 25, start)
    stores = [MoneyStore.sqlite(tmp_path / "p.db"), MoneyStore.postgres(fresh_postgres_dsn)]
    for money in stores:
        for i in range(45):
            await run_settlement(money, CFG, date(2024, 6, 3) + timedelta(days=i))
        assert not any(r.created for r in await run_settlement(money, CFG, date(2024, 6, 10)))
    lite, pg = stores
    assert await pg.batches() == await lite.batches() and await pg.batches()
    assert await pg.entries() == await lite.entries()
    assert (await pg.trial_balance()) == (await lite.trial_balance()) and (await pg.trial_balance()).balanced
    since, until = start - timedelta(days=1), start + timedelta(days=60)
    assert await pg.statement("m1", "EUR", since, until) == await lite.statement("m1", "EUR", since, until)
    assert await pg.monthly_activity(start) == await lite.monthly_activity(start)
    for money in stores:
        ours = await money.channel_records("a")
        assert ours
        window = await money.channel_records("a", since=start + timedelta(days=2), until=start + timedelta(days=9))
        assert 0 < len(window) < len(ours) and set(window) <= set(ours)
        report = [ChannelRow(reference=o.reference, kind=o.kind, amount=o.amount + 1, currency=o.currency,
                             status=o.status) for o in ours[:2]]
        result = reconcile("a", ours, report, fmt="sandbox")
        await money.save_exceptions(to_stored(result, "run", start))
        await money.save_exceptions(to_stored(result, "run-again", start))  # same report: same ids, no new rows
        stored = await money.exceptions(channel="a", open_only=True)
        assert sorted(e.id for e in stored) == sorted(e.id for e in result.exceptions)
        assert await money.resolve_exception(stored[0].id, "checked with the channel", "op", start)
        assert len(await money.exceptions(channel="a", open_only=True)) == len(stored) - 1
    assert [e.id for e in await pg.exceptions()] == [e.id for e in await lite.exceptions()]
