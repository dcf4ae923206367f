"""Property tests: filters return subsequences, rankers permutations, chains record removals."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from policies.base import Chain, StepTrace
from policies.registry import POLICIES, build
from router.model import Candidate, Capabilities, RouteContext

CURRENCIES = ["USD", "EUR", "JPY"]
COUNTRIES = ["US", "DE", "JP"]

candidates = st.lists(
    st.builds(
        lambda i, cur, cc, meth, prio, open_: Candidate(
            name=f"c{i}", adapter="sandbox", priority=prio, breaker_open=open_,
            capabilities=Capabilities(currencies=cur, countries=cc, methods=frozenset(meth)),
        ),
        st.integers(0, 1000),
        st.none() | st.frozensets(st.sampled_from(CURRENCIES)),
        st.none() | st.frozensets(st.sampled_from(COUNTRIES)),
        st.sets(st.sampled_from(["card", "wallet"]), min_size=1),
        st.integers(0, 5),
        st.booleans(),
    ),
    max_size=8,
    unique_by=lambda c: c.name,
).map(tuple)
contexts = st.builds(
    lambda cur, cc, meth: RouteContext(payment_id="p", merchant_id="m", amount=100, currency=cur, country=cc, method=meth),
    st.sampled_from(CURRENCIES), st.sampled_from(COUNTRIES), st.sampled_from(["card", "wallet"]),
)
FILTERS = ["currency", "country", "method", "breaker"]


def is_subsequence(sub: tuple[Candidate, ...], seq: tuple[Candidate, ...]) -> bool:
    it = iter(seq)
    return all(any(x is y for y in it) for x in sub)


@given(contexts, candidates, st.sampled_from(FILTERS))
def test_filters_return_subsequences_that_admit_the_payment(ctx: RouteContext, cands: tuple[Candidate, ...], name: str) -> None:
    out = build(name, {})(ctx, cands)
    assert is_subsequence(out, cands)
    for c in cands:
        admitted = {
            "currency": c.capabilities.currencies is None or ctx.currency in c.capabilities.currencies,
            "country": c.capabilities.countries is None or ctx.country in c.capabilities.countries,
            "method": ctx.method in c.capabilities.methods,
            "breaker": not c.breaker_open,
        }[name]
        assert (c in out) == admitted


@given(contexts, candidates, st.lists(st.sampled_from([f"c{i}" for i in range(20)]), max_size=5))
def test_priority_is_a_permutation_honouring_order(ctx: RouteContext, cands: tuple[Candidate, ...], order: list[str]) -> None:
    out = build("priority", {"order": order})(ctx, cands)
    assert sorted(c.name for c in out) == sorted(c.name for c in cands)
    named = [c.name for c in out if c.name in order]
    assert named == sorted(named, key=order.index)  # ordered as configured
    assert [c.name for c in out[: len(named)]] == named  # and ahead of the rest
    rest = out[len(named):]
    assert [(c.priority, c.name) for c in rest] == sorted((c.priority, c.name) for c in rest)


@given(contexts, candidates)
def test_chain_records_which_policy_removed_each_channel(ctx: RouteContext, cands: tuple[Candidate, ...]) -> None:
    chain = Chain("default", [build(n, {}) for n in [*FILTERS, "priority"]])
    plan, removed = chain.run(ctx, cands)
    assert {c.name for c in plan} | set(removed) == {c.name for c in cands}
    assert not {c.name for c in plan} & set(removed)
    assert set(removed.values()) <= set(FILTERS)


@given(contexts, candidates)
def test_chain_trace_is_each_steps_output_even_when_a_step_keeps_its_input(
    ctx: RouteContext, cands: tuple[Candidate, ...]
) -> None:
    steps = [build(n, {}) for n in ["breaker", "currency", "breaker", "priority"]]
    plan, removed, trace = Chain("default", steps).explain(ctx, cands)
    current = cands
    for step, (policy, output) in zip(steps, trace, strict=True):
        current = step(ctx, current)
        assert policy == step.name
        assert output == current
    assert plan == current
    assert all(isinstance(t, StepTrace) for t in trace)
    assert [c.name for c in plan] == trace[-1].names


def test_registry_lists_every_policy_module() -> None:
    assert set(POLICIES) == {
        "currency", "country", "method", "breaker", "priority", "region", "weighted", "rules", "success_rate", "cost",
    }
