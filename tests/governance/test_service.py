"""The maker-checker rules, over SQLite and PostgreSQL (real databases; injected clock)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from router.errors import ProblemError
from router.governance.model import GovernanceConfig, RefundThresholds, RequestStatus, Role
from router.governance.service import weight_decrease_only
from router.governance.store import GovernanceStore
from tests.governance import CONFIG_V1, World, build_world, make_store


@pytest.fixture(params=["sqlite", "postgres"])
async def store(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[GovernanceStore]:
    s = make_store(request.param, tmp_path, request)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def world(store: GovernanceStore) -> World:
    return await build_world(store)


async def refused(coro: object, status: int, code: str) -> ProblemError:
    with pytest.raises(ProblemError) as e:
        await coro  # type: ignore[misc]
    assert (e.value.status, e.value.code) == (status, code), e.value.body()
    return e.value


def config_payload(weight: int = 100) -> dict[str, str]:
    return {"yaml": CONFIG_V1.replace("weight: 100", f"weight: {weight}")}


async def audit_actions(w: World) -> list[tuple[str, str, str]]:
    entries = await w.svc.audit_entries(w.actors["aud"], 0, 1000)
    return [(e.actor, e.action, e.outcome) for e in entries]


async def test_config_change_needs_initial_then_final_review(world: World) -> None:
    w = world
    r = await w.svc.propose(w.actors["op"], "config", None, config_payload(120))
    assert r.status is RequestStatus.PENDING and "-    weight: 100" in r.diff and "+    weight: 120" in r.diff
    await refused(
        w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"), stage="final"), 409, "review_out_of_order"
    )
    r = await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"), stage="initial")
    assert r.status is RequestStatus.PENDING and w.stub.config_calls == []
    await refused(
        w.svc.approve(w.actors["rev2"], r.id, w.code("rev2"), stage="initial"), 409, "review_out_of_order"
    )
    r = await w.svc.approve(w.actors["rev2"], r.id, w.code("rev2"), stage="final")
    assert r.status is RequestStatus.APPLIED and w.stub.config_calls == [config_payload(120)["yaml"]]
    assert [rv.stage for rv in r.reviews] == ["initial", "final"]
    assert (
        w.svc.metrics.time_to_approve.labels("config", "reviewed")._sum.get() == 0
    )  # injected clock did not move


async def test_maker_cannot_approve_own_request(store: GovernanceStore) -> None:
    w = await build_world(
        store,
        GovernanceConfig(enabled=True, exclusive_roles=False),
        roles={"both": [Role.OPERATOR, Role.REVIEWER], "rev1": [Role.REVIEWER], "aud": [Role.AUDITOR]},
    )
    r = await w.svc.propose(w.actors["both"], "config", None, config_payload(90))
    await refused(w.svc.approve(w.actors["both"], r.id, w.code("both")), 403, "maker_cannot_review")
    await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
    w.clock.advance(seconds=30)
    await refused(w.svc.approve(w.actors["both"], r.id, w.code("both")), 403, "maker_cannot_review")
    assert (w.id("both"), "request.approve", "refused") in await audit_actions(w)
    assert (await w.svc.store.get_request(r.id)).status is RequestStatus.PENDING  # type: ignore[union-attr]


async def test_maker_role_without_checker_role_cannot_approve(world: World) -> None:
    r = await world.svc.propose(world.actors["op"], "config", None, config_payload(90))
    await refused(world.svc.approve(world.actors["op"], r.id, world.code("op")), 403, "forbidden")


async def test_same_reviewer_cannot_give_both_reviews(world: World) -> None:
    w = world
    r = await w.svc.propose(w.actors["op"], "config", None, config_payload(90))
    await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
    w.clock.advance(seconds=30)
    await refused(w.svc.approve(w.actors["rev1"], r.id, w.code("rev1")), 403, "already_reviewed")
    assert w.stub.config_calls == []


async def test_quorum_is_configurable(store: GovernanceStore) -> None:
    w = await build_world(store, GovernanceConfig(enabled=True, quorum=3))
    r = await w.svc.propose(w.actors["op"], "config", None, config_payload(80))
    r = await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"), stage="initial")
    r = await w.svc.approve(w.actors["rev2"], r.id, w.code("rev2"), stage="intermediate")
    assert r.status is RequestStatus.PENDING and w.stub.config_calls == []
    r = await w.svc.approve(w.actors["rev3"], r.id, w.code("rev3"), stage="final")
    assert r.status is RequestStatus.APPLIED and len(w.stub.config_calls) == 1


def test_quorum_below_two_is_a_config_problem() -> None:
    from router.governance.model import config_problems

    assert ("$.governance.quorum", "must be at least 2 (initial and final review)") in config_problems(
        GovernanceConfig(quorum=1)
    )
    assert config_problems(GovernanceConfig(quorum=2)) == []


async def test_missing_wrong_and_reused_totp_are_refused(world: World) -> None:
    w = world
    r1 = await w.svc.propose(w.actors["op"], "config", None, config_payload(90))
    await refused(w.svc.approve(w.actors["rev1"], r1.id, None), 403, "invalid_totp")
    wrong = f"{(int(w.code('rev1')) + 1) % 1_000_000:06d}"
    await refused(w.svc.approve(w.actors["rev1"], r1.id, wrong), 403, "invalid_totp")
    await refused(
        w.svc.approve(w.actors["rev1"], r1.id, w.code("rev2")), 403, "invalid_totp"
    )  # someone else's code
    code = w.code("rev1")
    await w.svc.approve(w.actors["rev1"], r1.id, code)
    r2 = await w.svc.propose(w.actors["op"], "merchant", "m1", {"action": "onboard", "name": "M1"})
    await refused(w.svc.approve(w.actors["rev1"], r2.id, code), 403, "totp_reused")
    # the refused approval consumed nothing and recorded no review
    assert (await w.svc.store.get_request(r2.id)).reviews == ()  # type: ignore[union-attr]
    w.clock.advance(seconds=30)
    assert (await w.svc.approve(w.actors["rev1"], r2.id, w.code("rev1"))).approvals[0].reviewer == w.id(
        "rev1"
    )


async def test_rejection_ends_the_request(world: World) -> None:
    w = world
    r = await w.svc.propose(w.actors["op"], "config", None, config_payload(90))
    await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
    r = await w.svc.reject(w.actors["rev2"], r.id, "not during peak")
    assert r.status is RequestStatus.REJECTED and r.reason == "not during peak"
    await refused(w.svc.approve(w.actors["rev3"], r.id, w.code("rev3")), 409, "request_not_pending")
    assert w.stub.config_calls == []
    # the object is free again
    assert (
        await w.svc.propose(w.actors["op"], "config", None, config_payload(91))
    ).status is RequestStatus.PENDING


async def test_requests_expire_and_are_terminated(world: World) -> None:
    w = world
    r = await w.svc.propose(w.actors["op"], "config", None, config_payload(90))
    await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
    w.clock.advance(hours=23, minutes=59)
    assert await w.svc.expire_due() == 0
    w.clock.advance(minutes=1)
    assert await w.svc.expire_due() == 1
    stored = await w.svc.store.get_request(r.id)
    assert stored is not None and stored.status is RequestStatus.EXPIRED
    await refused(w.svc.approve(w.actors["rev2"], r.id, w.code("rev2")), 409, "request_not_pending")
    assert ("system", "request.expired", "ok") in await audit_actions(w)


async def test_sweeper_terminates_hanging_requests(store: GovernanceStore) -> None:
    class Stop(Exception):
        pass

    rounds = []

    async def sleep(_: float) -> None:
        rounds.append(1)
        raise Stop

    w = await build_world(store, GovernanceConfig(enabled=True, request_ttl_s=60))
    w.svc._sleep = sleep
    r = await w.svc.propose(w.actors["op"], "merchant", "m1", {"action": "onboard"})
    w.clock.advance(seconds=61)
    with pytest.raises(Stop):
        await w.svc.run_sweeper()
    assert rounds == [1]
    assert (await store.get_request(r.id)).status is RequestStatus.EXPIRED  # type: ignore[union-attr]


async def test_stale_object_version_is_refused(world: World) -> None:
    w = world
    r = await w.svc.propose(w.actors["op"], "config", None, config_payload(90))
    await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
    w.stub.config_text = CONFIG_V1 + "# edited elsewhere\n"  # the running config moved on
    await refused(w.svc.approve(w.actors["rev2"], r.id, w.code("rev2")), 409, "stale_version")
    assert (await w.svc.store.get_request(r.id)).status is RequestStatus.STALE  # type: ignore[union-attr]
    assert w.stub.config_calls == []
    await refused(
        w.svc.propose(w.actors["op"], "config", None, config_payload(90), base_version=r.base_version),
        409,
        "stale_version",
    )


async def test_one_open_request_per_object(world: World) -> None:
    w = world
    await w.svc.propose(w.actors["op"], "merchant", "m1", {"action": "onboard"})
    await refused(
        w.svc.propose(w.actors["op"], "merchant", "m1", {"action": "onboard", "name": "x"}),
        409,
        "open_request_exists",
    )
    assert (
        await w.svc.propose(w.actors["op"], "merchant", "m2", {"action": "onboard"})
    ).status is RequestStatus.PENDING


RACE_ROUNDS = 50
RACERS = 6  # concurrent final approvals per round


async def test_50_races_of_concurrent_final_approvals_apply_exactly_once(store: GovernanceStore) -> None:
    """50 rounds, each a fresh request and RACERS concurrent final approvals; the clock moves 30 s a round
    so every code is fresh. Rounds alternate an external apply (config, through `applying`) and an
    internal one (merchant onboarding, written in the approval's transaction)."""
    roles: dict[str, list[Role]] = {"op": [Role.OPERATOR], "aud": [Role.AUDITOR]}
    roles.update({f"rev{i}": [Role.REVIEWER] for i in range(RACERS + 1)})
    w = await build_world(store, roles=roles)
    codes: list[str] = []
    for n in range(RACE_ROUNDS):
        w.clock.advance(seconds=30)
        external = n % 2 == 0
        if external:
            r = await w.svc.propose(w.actors["op"], "config", None, config_payload(200 + n))
        else:
            r = await w.svc.propose(w.actors["op"], "merchant", f"m{n}", {"action": "onboard"})
        await w.svc.approve(w.actors["rev0"], r.id, w.code("rev0"), stage="initial")
        results = await asyncio.gather(
            *(w.svc.approve(w.actors[f"rev{i}"], r.id, w.code(f"rev{i}"), stage="final")
              for i in range(1, RACERS + 1)),
            return_exceptions=True,
        )  # fmt: skip
        won = [x for x in results if not isinstance(x, BaseException)]
        assert len(won) == 1 and won[0].status is RequestStatus.APPLIED, (n, results)
        lost = [x for x in results if isinstance(x, BaseException)]
        assert all(isinstance(x, ProblemError) and x.status == 409 for x in lost), (n, lost)
        codes += [x.code for x in lost if isinstance(x, ProblemError)]
        final = await store.get_request(r.id)
        assert final is not None and final.status is RequestStatus.APPLIED and len(final.approvals) == 2
        # applied exactly once: one applier call / one object write per round so far
        assert len(w.stub.config_calls) == n // 2 + 1
        merchants = await store.list_objects("merchant")
        assert len(merchants) == (n + 1) // 2 and all(o.version == 1 for _, o in merchants)
    # real races: losers got past every check and lost the compare-and-set itself
    assert codes.count("request_conflict") >= RACE_ROUNDS, sorted(set(codes))
    entries = await w.svc.audit_entries(w.actors["aud"], 0, 100_000)
    applies = [e for e in entries if e.action == "request.apply" and e.outcome == "ok"]
    assert len(applies) == RACE_ROUNDS and len({e.request_id for e in applies}) == RACE_ROUNDS
    assert (await w.svc.verify()).ok


async def test_separation_of_duties(world: World) -> None:
    w = world
    # a maker-role admin cannot be granted the checker role, nor a checker a maker role
    await refused(
        w.svc.propose(w.actors["sec"], "grant", w.id("op"), {"action": "grant", "role": "reviewer"}),
        403,
        "roles_exclusive",
    )
    await refused(
        w.svc.propose(w.actors["sec"], "grant", w.id("rev1"), {"action": "grant", "role": "operator"}),
        403,
        "roles_exclusive",
    )
    # nobody grants anything to themselves: not by proposing ...
    await refused(
        w.svc.propose(w.actors["sec"], "grant", w.id("sec"), {"action": "grant", "role": "auditor"}),
        403,
        "self_grant",
    )
    # ... nor by approving a grant made out to them
    r = await w.svc.propose(w.actors["sec"], "grant", w.id("rev1"), {"action": "grant", "role": "auditor"})
    await refused(w.svc.approve(w.actors["rev1"], r.id, w.code("rev1")), 403, "self_grant")
    # only a security admin proposes grants
    await refused(
        w.svc.propose(w.actors["op"], "grant", w.id("aud"), {"action": "grant", "role": "operator"}),
        403,
        "forbidden",
    )
    await w.svc.approve(w.actors["rev2"], r.id, w.code("rev2"))
    r = await w.svc.approve(w.actors["rev3"], r.id, w.code("rev3"))
    assert r.status is RequestStatus.APPLIED
    assert await w.svc.active_roles(w.id("rev1")) == {Role.REVIEWER, Role.AUDITOR}


async def test_grants_expire_and_renewal_is_governed(world: World) -> None:
    w = world
    w.clock.advance(days=60)
    renew = await w.svc.propose(
        w.actors["sec"], "grant", w.id("rev1"), {"action": "renew", "role": "reviewer"}
    )
    await w.svc.approve(w.actors["rev2"], renew.id, w.code("rev2"))
    await refused(w.svc.approve(w.actors["rev1"], renew.id, w.code("rev1")), 403, "self_grant")
    assert (await w.svc.approve(w.actors["rev3"], renew.id, w.code("rev3"))).status is RequestStatus.APPLIED
    w.clock.advance(days=31)  # 91 days after bootstrap: the original grants lapsed, rev1's renewal did not
    # the operator's bootstrap grant lapsed too: it cannot propose
    await refused(w.svc.propose(w.actors["op"], "merchant", "m1", {"action": "onboard"}), 403, "forbidden")
    assert await w.svc.active_roles(w.id("rev1")) == {Role.REVIEWER}
    assert await w.svc.active_roles(w.id("rev2")) == set()


async def test_expired_grant_cannot_approve(world: World) -> None:
    w = world
    r = await w.svc.propose(w.actors["op"], "merchant", "m1", {"action": "onboard"})
    w.clock.advance(days=90)
    await refused(w.svc.approve(w.actors["rev1"], r.id, w.code("rev1")), 403, "forbidden")


async def test_auto_approval_only_within_policy(store: GovernanceStore) -> None:
    from router.governance.model import AutoApprovalPolicy

    cfg = GovernanceConfig(
        enabled=True,
        auto_approval=AutoApprovalPolicy(weight_decrease_max_pct=10, refunds_below_threshold=True),
        refund_thresholds=RefundThresholds(default={"USD": 10_000}),
    )
    w = await build_world(store, cfg)
    r = await w.svc.propose(w.actors["op"], "config", None, config_payload(90))  # -10 %: inside
    assert r.status is RequestStatus.APPLIED and r.auto_approved and len(w.stub.config_calls) == 1
    r = await w.svc.propose(
        w.actors["op"], "config", None, {"yaml": w.stub.config_text.replace("weight: 90", "weight: 80")}
    )
    assert r.status is RequestStatus.PENDING and not r.auto_approved  # -11.1 %: outside
    await w.svc.reject(w.actors["op"], r.id, "withdrawn")
    r = await w.svc.propose(
        w.actors["op"], "config", None, {"yaml": w.stub.config_text.replace("weight: 90", "weight: 95")}
    )
    assert r.status is RequestStatus.PENDING  # raising a weight is never low-risk
    await w.svc.reject(w.actors["op"], r.id, None)
    small = await w.svc.propose(
        w.actors["op"], "refund", None, {"merchant_id": "alpha", "payment_id": "pay_1", "amount": 9_999}
    )
    assert small.status is RequestStatus.APPLIED and small.auto_approved
    big = await w.svc.propose(
        w.actors["op"], "refund", None, {"merchant_id": "alpha", "payment_id": "pay_2", "amount": 10_000}
    )
    assert big.status is RequestStatus.PENDING
    assert w.stub.refund_calls == [("alpha", "pay_1", 9_999, None)]
    # the policy itself changes only through maker-checker, and never automatically
    pol = await w.svc.propose(w.actors["sec"], "auto_approval_policy", None, {"weight_decrease_max_pct": 0})
    assert pol.status is RequestStatus.PENDING
    await refused(
        w.svc.propose(w.actors["op"], "auto_approval_policy", None, {"weight_decrease_max_pct": 50}),
        403,
        "forbidden",
    )
    await w.svc.approve(w.actors["rev1"], pol.id, w.code("rev1"))
    assert (await w.svc.approve(w.actors["rev2"], pol.id, w.code("rev2"))).status is RequestStatus.APPLIED
    r = await w.svc.propose(
        w.actors["op"], "config", None, {"yaml": w.stub.config_text.replace("weight: 90", "weight: 89")}
    )
    assert r.status is RequestStatus.PENDING  # the new policy allows no automatic weight changes


async def test_refund_above_threshold_runs_once_after_two_approvals(store: GovernanceStore) -> None:
    cfg = GovernanceConfig(enabled=True, refund_thresholds=RefundThresholds(default={"USD": 10_000}))
    w = await build_world(store, cfg)
    assert w.svc.refund_needs_approval("alpha", "USD", 50_000) and not w.svc.refund_needs_approval(
        "alpha", "USD", 500
    )
    assert w.svc.refund_needs_approval("alpha", "EUR", 1)  # an unlisted currency always needs approval
    r = await w.svc.propose(
        w.actors["op"],
        "refund",
        None,
        {"merchant_id": "alpha", "payment_id": "pay_9", "amount": 50_000, "reason": "dispute"},
    )
    assert r.object_id == "alpha:pay_9" and r.payload["currency"] == "USD" and r.base_version == "3"
    await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
    r = await w.svc.approve(w.actors["rev2"], r.id, w.code("rev2"))
    assert r.status is RequestStatus.APPLIED and r.result == {
        "id": "pay_9",
        "status": "partially_refunded",
        "version": 4,
    }
    assert w.stub.refund_calls == [("alpha", "pay_9", 50_000, "dispute")]


async def test_ungoverned_operation_is_refused_and_audited(world: World) -> None:
    w = world
    p = await w.svc.refuse_ungoverned("merchant:alpha", "refund", "refund:alpha:pay_1", "10.0.0.1")
    assert (p.status, p.code) == (403, "approval_required")
    assert ("merchant:alpha", "refund", "refused") in await audit_actions(w)


async def test_failed_apply_ends_the_request_failed(world: World) -> None:
    w = world
    w.stub.fail_config = True
    r = await w.svc.propose(w.actors["op"], "config", None, config_payload(-1))
    await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
    r = await w.svc.approve(w.actors["rev2"], r.id, w.code("rev2"))
    assert r.status is RequestStatus.FAILED and "must not be negative" in (r.reason or "")


async def test_merchant_suspension_is_governed(world: World) -> None:
    w = world
    r = await w.svc.propose(
        w.actors["op"], "merchant", "m1", {"action": "onboard", "name": "M1", "max_amount": 5000}
    )
    await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
    await w.svc.approve(w.actors["rev2"], r.id, w.code("rev2"))
    w.clock.advance(seconds=30)
    r = await w.svc.propose(w.actors["op"], "merchant", "m1", {"action": "suspend", "reason": "fraud spike"})
    assert '"status": "suspended"' in r.diff
    assert await w.svc.suspended_merchants() == frozenset()
    await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
    await w.svc.approve(w.actors["rev2"], r.id, w.code("rev2"))
    assert await w.svc.suspended_merchants() == {"m1"}
    assert w.svc.is_suspended("m1") and not w.svc.is_suspended("m2")


async def test_audit_chain_covers_every_decision(world: World) -> None:
    w = world
    r = await w.svc.propose(w.actors["op"], "config", None, config_payload(90))
    await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
    await w.svc.approve(w.actors["rev2"], r.id, w.code("rev2"))
    actions = await audit_actions(w)
    assert (w.id("op"), "request.create", "ok") in actions
    assert (w.id("rev2"), "request.apply", "ok") in actions
    result = await w.svc.verify()
    assert result.ok and result.checked == len(actions)


def test_weight_decrease_only() -> None:
    lower = CONFIG_V1.replace("weight: 100", "weight: 90")
    assert weight_decrease_only(CONFIG_V1, lower, 10)
    assert not weight_decrease_only(CONFIG_V1, lower, 9.9)
    assert not weight_decrease_only(CONFIG_V1, CONFIG_V1, 10)  # nothing lowered
    assert not weight_decrease_only(CONFIG_V1, lower.replace("9001", "9009"), 10)  # something else changed
    assert not weight_decrease_only(CONFIG_V1, lower, 0)
