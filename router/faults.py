"""Crash points for fault-injection tests: `PAYROUTE_FAULT_CRASH_AT=<point>` makes the process die there.

The process exits with `os._exit(137)` — no cleanup, no flush, exactly like `kill -9` — the first
time a payment reaches the named point. Unset (the default), each check is one attribute read.
Points: `after_claim` (the idempotency key is claimed, nothing recorded), `after_record` (the payment
is recorded as processing, nothing sent), `during_send` (the request to the channel has left; the
process dies before the answer), `before_commit` (the channel answered; the outcome is not written).
"""

from __future__ import annotations

import asyncio
import os

POINTS = frozenset({"after_claim", "after_record", "during_send", "before_commit"})
_AT = os.environ.get("PAYROUTE_FAULT_CRASH_AT") or None
if _AT is not None and _AT not in POINTS:
    raise SystemExit(f"PAYROUTE_FAULT_CRASH_AT must be one of {sorted(POINTS)}")


def crash_point(name: str) -> None:
    if _AT == name:
        if name == "during_send":
            # let the request leave first: die while the channel is working on it
            asyncio.get_running_loop().call_later(0.05, os._exit, 137)
        else:
            os._exit(137)
