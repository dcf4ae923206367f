"""Reconcile a 1,000,000-row channel report (Stripe balance-transaction CSV) against 1,000,000 of our
records, with a handful of injected mismatches. Prints wall time and peak memory (RSS of the whole
process, report generation included). Target: under 60 s and under 500 MB.

    .venv/bin/python bench/reconcile_1m.py [rows]
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

from router.money.reconcile import read_report, reconcile
from router.money.store import ReconRecord


def main(rows: int = 1_000_000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "balance_transactions.csv"
        with path.open("w") as f:
            f.write("id,Type,Source,Amount,Fee,Net,Currency,Created (UTC),Available On (UTC),Description\n")
            for i in range(rows):
                amount = 100 + i % 99_900
                fee = 30 + amount * 29 // 1000
                if i == 10:
                    amount += 1  # amount_mismatch
                f.write(f"txn_{i},charge,ch_{i:09d},{amount // 100}.{amount % 100:02d},{fee // 100}.{fee % 100:02d},"
                        f"0,usd,2024-06-03 10:00,2024-06-05 00:00,\n")
        ours = [
            ReconRecord(reference=f"ch_{i:09d}", kind="charge", amount=100 + i % 99_900, currency="USD",
                        status="captured", payment_id=f"pay_{i}", fee=30 + (100 + i % 99_900) * 29 // 1000)
            for i in range(rows)
        ]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        result = reconcile("stripe", ours, read_report(path, "stripe"), fmt="stripe")
        elapsed = time.perf_counter() - start
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"rows={result.rows} matched={result.matched} exceptions={result.counts()}")
    print(f"reconcile: {elapsed:.1f} s; peak RSS {peak_kb / 1024:.0f} MB (before matching {before / 1024:.0f} MB)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
