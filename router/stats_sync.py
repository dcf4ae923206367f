"""Share success-rate statistics across payroute instances through Redis (scale-out mode).

Every `interval_s` each instance publishes its own discounted counts (a msgspec snapshot) under
`payroute:sr:<instance id>` with a TTL, and merges every other live instance's snapshot. Merging
replaces a peer's previous snapshot, so nothing is counted twice; a dead instance's counts expire
with its key, and each instance then forgets them (`SuccessStats.after_merge`, which also scales each key's windows
to the whole cluster's events). Routing never waits
on this: the policies read the in-memory merge.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import msgspec
from redis.asyncio import Redis

from policies.success_rate import Snapshot, SuccessStats
from router.errors import CoordinationUnavailable
from router.locks import coordination_errors

log = logging.getLogger("payroute.stats")
PREFIX = "payroute:sr:"
_decode = msgspec.msgpack.Decoder(Snapshot).decode
_encode = msgspec.msgpack.Encoder().encode


class StatsSync:
    def __init__(self, redis: Redis, stats: SuccessStats, *, interval_s: float = 2.0, instance: str | None = None) -> None:
        self.redis = redis
        self.stats = stats
        self.interval_s = interval_s
        self.instance = instance or secrets.token_hex(6)

    async def sync_once(self) -> int:
        """Publish ours, merge theirs; returns how many peers were merged."""
        with coordination_errors("stats sync"):
            await self.redis.set(PREFIX + self.instance, _encode(self.stats.snapshot()),
                                 px=int(self.interval_s * 5 * 1000))
            keys = [k async for k in self.redis.scan_iter(match=PREFIX + "*", count=100)]
            peers = [k for k in keys if (k.decode() if isinstance(k, bytes) else k) != PREFIX + self.instance]
            blobs = await self.redis.mget(peers) if peers else []
        merged = 0
        live = []
        for key, blob in zip(peers, blobs, strict=True):
            if not isinstance(blob, bytes):
                continue
            name = (key.decode() if isinstance(key, bytes) else key).removeprefix(PREFIX)
            try:
                self.stats.merge(name, _decode(blob))
                merged += 1
                live.append(name)
            except msgspec.DecodeError:
                log.warning("unreadable success-rate snapshot", extra={"peer": name})
        if gone := self.stats.after_merge(live):  # their keys expired: those instances are gone
            log.info("forgot the success-rate counts of departed instances", extra={"peers": gone})
        return merged

    async def run_forever(self) -> None:
        while True:
            try:
                await self.sync_once()
            except CoordinationUnavailable as e:
                log.warning("success-rate sync skipped", extra={"reason": str(e)})
            await asyncio.sleep(self.interval_s)
