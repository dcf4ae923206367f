"""A request left `applying` (the process died mid-apply, or the applier hung) ends `apply_unknown`
after applying_timeout_s: audited, counted, never re-applied. Injected clock; SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from router.governance.model import GovernanceConfig, RequestStatus
from router.governance.service import GovernanceMetrics, GovernanceService
from router.governance.store import GovernanceStore
from tests.governance import CONFIG_V1, TOTP_KEY, World, build_world, make_store

CFG = GovernanceConfig(enabled=True, applying_timeout_s=300, totp_encryption_key=TOTP_KEY)


class Crash(BaseException):
    """The process dying in the middle of the applier."""


@pytest.fixture(params=["sqlite", "postgres"])
async def store(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[GovernanceStore]:
    s = make_store(request.param, tmp_path, request)
    await s.start()
    yield s
    await s.close()


def payload(weight: int) -> dict[str, str]:
    return {"yaml": CONFIG_V1.replace("weight: 100", f"weight: {weight}")}


async def crash_mid_apply(w: World) -> str:
    """Approve a config change whose applier never returns (the process dies); the request stays applying."""

    async def crash(text: str) -> str:
        w.stub.config_calls.append(text)
        raise Crash

    w.svc.appliers = dataclasses.replace(w.svc.appliers, apply_config=crash)
    r = await w.svc.propose(w.actors["op"], "config", None, payload(90))
    await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
    with pytest.raises(Crash):
        await w.svc.approve(w.actors["rev2"], r.id, w.code("rev2"))
    assert (await w.svc.store.get_request(r.id)).status is RequestStatus.APPLYING  # type: ignore[union-attr]
    return r.id


def restarted(w: World, store: GovernanceStore) -> GovernanceService:
    return GovernanceService(store, CFG, w.stub.appliers(), clock=w.clock, metrics=GovernanceMetrics())


async def test_stuck_applying_ends_apply_unknown_on_start(store: GovernanceStore) -> None:
    w = await build_world(store, CFG)
    rid = await crash_mid_apply(w)
    svc = restarted(w, store)
    w.clock.advance(seconds=299)  # not yet: another instance may still be applying
    await svc.start()
    assert (await store.get_request(rid)).status is RequestStatus.APPLYING  # type: ignore[union-attr]
    w.clock.advance(seconds=1)
    await svc.start()
    r = await store.get_request(rid)
    assert r is not None and r.status is RequestStatus.APPLY_UNKNOWN
    assert r.reason is not None and "outcome is unknown" in r.reason and "never re-applied" in r.reason
    assert len(w.stub.config_calls) == 1  # the crashed attempt only: nothing re-applied
    assert svc.metrics.apply_unknown.labels("config")._value.get() == 1
    assert svc.metrics.requests.labels("config", "apply_unknown")._value.get() == 1
    entries = await w.svc.audit_entries(w.actors["aud"], 0, 1000)
    marked = [e for e in entries if e.action == "request.apply_unknown"]
    assert [(e.actor, e.outcome, e.request_id) for e in marked] == [("system", "failed", rid)]
    # terminal: a later start or approval does nothing more; the object is free for a new request
    await svc.start()
    assert svc.metrics.apply_unknown.labels("config")._value.get() == 1
    w.clock.advance(seconds=30)
    again = await svc.propose(w.actors["op"], "config", None, payload(80))
    assert again.status is RequestStatus.PENDING
    assert (await svc.verify()).ok


async def test_sweeper_marks_stuck_applying(store: GovernanceStore) -> None:
    class Stop(Exception):
        pass

    async def sleep(_: float) -> None:
        raise Stop

    w = await build_world(store, CFG)
    rid = await crash_mid_apply(w)
    svc = restarted(w, store)
    svc._sleep = sleep
    w.clock.advance(seconds=301)
    with pytest.raises(Stop):
        await svc.run_sweeper()
    assert (await store.get_request(rid)).status is RequestStatus.APPLY_UNKNOWN  # type: ignore[union-attr]
    assert len(w.stub.config_calls) == 1


async def test_applier_finishing_after_the_timeout_is_audited_not_applied_twice(
    store: GovernanceStore,
) -> None:
    w = await build_world(store, CFG)
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(text: str) -> str:
        w.stub.config_calls.append(text)
        started.set()
        await release.wait()
        return "v-late"

    w.svc.appliers = dataclasses.replace(w.svc.appliers, apply_config=slow)
    r = await w.svc.propose(w.actors["op"], "config", None, payload(90))
    await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
    final = asyncio.create_task(w.svc.approve(w.actors["rev2"], r.id, w.code("rev2")))
    await started.wait()
    w.clock.advance(seconds=600)
    assert await w.svc.recover_stuck_applying() == 1
    release.set()
    late = await final
    assert late.status is RequestStatus.APPLY_UNKNOWN and len(w.stub.config_calls) == 1
    entries = await w.svc.audit_entries(w.actors["aud"], 0, 1000)
    assert [(e.action, e.outcome) for e in entries if e.request_id == r.id][-2:] == [
        ("request.apply_unknown", "failed"),
        ("request.apply_late", "ok"),
    ]
    assert (await w.svc.verify()).ok
