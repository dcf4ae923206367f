"""Routing statistics that survive a restart (embedded mode): saved beside the database, loaded at start.

Without this, every restart would send traffic blind until the success statistics have learnt again
(the routing lab's cold start, which costs a third of a slow degradation's gap before anything has
changed). Every `routing.stats_save_s` seconds, and once more at shutdown, the instance's own learned
counts (`SuccessStats.snapshot()`) are written to `<db stem>-routing-stats.msgpack` next to the SQLite
file: to a temporary file, fsynced, then renamed over the old one, so a crash leaves the previous save
whole. At start they are loaded with `SuccessStats.restore` before the first payment is routed; their
timestamps are wall-clock, so time decay (`routing.stats.half_life_s`) discounts them by how long the
instance was down. A missing, unreadable or foreign file is logged and ignored (a cold start).

Scale-out instances share statistics through Redis instead (`router.stats_sync`): a new instance
merges its live peers' counts on its first sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import msgspec

from policies.success_rate import Snapshot, SuccessStats

log = logging.getLogger("payroute.stats")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Snapshot).decode


def stats_path(payments_db: Path) -> Path:
    """Where the embedded routing statistics are saved, next to the payments database."""
    return payments_db.with_name(f"{payments_db.stem}-routing-stats.msgpack")


class StatsFile:
    def __init__(self, path: Path, stats: SuccessStats) -> None:
        self.path = path
        self.stats = stats

    def load(self) -> int:
        """Restore the saved counts into `stats` (blocking: call it off the loop); how many keys."""
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as e:
            log.warning("routing statistics not loaded", extra={"path": str(self.path), "error": str(e)})
            return 0
        try:
            snapshot = _decode(blob)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("routing statistics unreadable; starting cold", extra={"path": str(self.path), "error": str(e)})
            return 0
        return self.stats.restore(snapshot)

    def save_blob(self, blob: bytes) -> None:
        """Write atomically (blocking): a temporary file beside the target, fsynced, renamed over it."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def save(self) -> None:
        # the snapshot is taken on the loop (the stats are single-threaded); only the I/O leaves it
        blob = _encode(self.stats.snapshot())
        await asyncio.to_thread(self.save_blob, blob)

    async def save_forever(self, every_s: Callable[[], float]) -> None:
        """Save every `every_s()` seconds (read each time, so a reload applies); 0 or less: idle."""
        while True:
            interval = every_s()
            await asyncio.sleep(interval if interval > 0 else 60.0)
            if interval <= 0 or every_s() <= 0:
                continue
            try:
                await self.save()
            except OSError as e:
                log.warning("routing statistics not saved; retrying later", extra={"path": str(self.path), "error": str(e)})

