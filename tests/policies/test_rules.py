"""Rules: compiled predicates agree with a slow reference, first match wins, analyze is sound."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import rules
from policies.base import PolicyEnv, PolicyType, decode_params, validate_params
from policies.weighted import sticky_draw
from router.model import Candidate, Capabilities, RouteContext

PTYPE = PolicyType(rules.Params, rules.build, rules.channel_refs)
NAMES = ["a", "b", "c", "d"]
CANDS = tuple(Candidate(name=n, adapter="sandbox", capabilities=Capabilities()) for n in NAMES)


def policy(raw_rules: list[dict[str, Any]]) -> rules.RulesPolicy:
    return rules.build(decode_params(PTYPE, {"rules": raw_rules}), PolicyEnv())


def ctx(**kw: Any) -> RouteContext:
    base: dict[str, Any] = dict(
        payment_id="p1", merchant_id="m1", amount=1000, currency="EUR", country="DE", method="card",
        card_bin="424242", card_brand="visa",
    )
    return RouteContext(**(base | kw))


def names(cands: tuple[Candidate, ...]) -> list[str]:
    return [c.name for c in cands]


# --------------------------------------------------------------------------- slow reference evaluator


def ref_matches(cond: rules.Condition, c: RouteContext) -> bool:
    """Interpret the condition struct directly, every time."""
    if cond.amount is not None:
        if cond.amount.gte is not None and not c.amount >= cond.amount.gte:
            return False
        if cond.amount.lt is not None and not c.amount < cond.amount.lt:
            return False
    if cond.currency is not None and c.currency.upper() not in [v.upper() for v in cond.currency]:
        return False
    if cond.country is not None and c.country.upper() not in [v.upper() for v in cond.country]:
        return False
    if cond.card_brand is not None and (c.card_brand or "").lower() not in [v.lower() for v in cond.card_brand]:
        return False
    if cond.method is not None and c.method not in cond.method:
        return False
    if cond.merchant is not None and c.merchant_id not in cond.merchant:
        return False
    if cond.bin is not None:
        b = c.card_bin
        if b is None:
            return False
        ok = False
        for entry in cond.bin:
            lo, _, hi = entry.partition("-")
            hi = hi or lo
            head = b[: len(lo)]
            if len(head) == len(lo) and head.isdigit() and int(lo) <= int(head) <= int(hi):
                ok = True
        if not ok:
            return False
    for k, v in (cond.metadata or {}).items():
        if c.metadata.get(k) != v:
            return False
    return True


def ref_apply(rule: rules.Rule, c: RouteContext, cands: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
    out = rule.then
    if out.block:
        return ()
    if out.channels is not None:
        chosen = [x for name in dict.fromkeys(out.channels) for x in cands if x.name == name]
    else:
        assert out.split is not None
        present = [x for x in cands if x.name in out.split]
        positive = [x for x in present if out.split[x.name] > 0]
        if positive:
            point = sticky_draw(c.payment_id, f"rules:{rule.id}", sum(out.split[x.name] for x in positive))
            first = positive[-1]
            for x in positive:
                if point < out.split[x.name]:
                    first = x
                    break
                point -= out.split[x.name]
            chosen = [first, *(x for x in positive if x is not first), *(x for x in present if x not in positive)]
        else:
            chosen = present
    if out.fallback == "keep":
        chosen += [x for x in cands if x not in chosen]
    return tuple(chosen)


def ref_route(params: rules.Params, c: RouteContext, cands: tuple[Candidate, ...]) -> tuple[str | None, tuple[Candidate, ...]]:
    for rule in params.rules:
        if ref_matches(rule.when, c):
            return rule.id, ref_apply(rule, c, cands)
    return None, cands


# --------------------------------------------------------------------------- generators over small domains

BINS = ["4", "42", "4242", "5", "51", "400000-499999", "420000-429999", "40-45", "510000-559999", "222100-272099"]
ctx_bins = st.sampled_from(["424242", "400001", "510510", "222100", "378282", "42", "4242424242"]) | st.none()
amount_ranges = st.builds(
    lambda a, b: {k: v for k, v in (("gte", a), ("lt", b)) if v is not None},
    st.none() | st.sampled_from([0, 500, 1000, 5000]),
    st.none() | st.sampled_from([501, 1001, 5001, 100000]),
).filter(lambda r: "gte" not in r or "lt" not in r or r["gte"] < r["lt"])


def sub(values: list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True)


conditions = st.fixed_dictionaries(
    {},
    optional={
        "amount": amount_ranges,
        "currency": sub(["EUR", "usd", "JPY"]),
        "country": sub(["DE", "us", "JP"]),
        "card_brand": sub(["visa", "Mastercard", "amex"]),
        "bin": sub(BINS),
        "method": sub(["card", "alipay"]),
        "merchant": sub(["m1", "m2"]),
        "metadata": st.dictionaries(st.sampled_from(["tier", "risk"]), st.sampled_from(["gold", "low"]), max_size=2),
    },
)
outcomes = st.one_of(
    st.builds(lambda ch, fb: {"channels": ch, "fallback": fb}, sub(NAMES + ["ghost"]), st.sampled_from(["drop", "keep"])),
    st.builds(
        lambda sp, fb: {"split": sp, "fallback": fb},
        st.dictionaries(st.sampled_from(NAMES), st.integers(0, 5), min_size=1).filter(lambda d: any(d.values())),
        st.sampled_from(["drop", "keep"]),
    ),
    st.just({"block": True, "block_code": "sanctioned"}),
)
rule_lists = st.lists(st.tuples(conditions, outcomes), max_size=6).map(
    lambda rs: rules.Params(
        rules=[msgspec.convert({"id": f"r{i}", "when": w, "then": t}, rules.Rule) for i, (w, t) in enumerate(rs)]
    )
)
contexts = st.builds(
    ctx,
    payment_id=st.text(min_size=1, max_size=8),
    merchant_id=st.sampled_from(["m1", "m2"]),
    amount=st.sampled_from([0, 499, 500, 501, 999, 1000, 1001, 4999, 5000, 5001, 99999, 100000]),
    currency=st.sampled_from(["EUR", "USD", "JPY", "eur"]),
    country=st.sampled_from(["DE", "US", "JP"]),
    method=st.sampled_from(["card", "alipay"]),
    card_bin=ctx_bins,
    card_brand=st.sampled_from(["visa", "VISA", "mastercard", "amex"]) | st.none(),
    metadata=st.dictionaries(st.sampled_from(["tier", "risk"]), st.sampled_from(["gold", "low"]), max_size=2),
)
candidate_sets = st.permutations(CANDS).flatmap(lambda p: st.integers(0, len(p)).map(lambda n: tuple(p[:n])))


@settings(max_examples=500)
@given(rule_lists, contexts, candidate_sets)
def test_compiled_rules_agree_with_the_reference(params: rules.Params, c: RouteContext, cands: tuple[Candidate, ...]) -> None:
    compiled = rules.build(params, PolicyEnv())
    rule_id, expected = ref_route(params, c, cands)
    matched = compiled.match(c)
    assert (matched.id if matched else None) == rule_id
    assert compiled(c, cands) == expected


@settings(max_examples=300)
@given(rule_lists, st.lists(contexts, min_size=20, max_size=20))
def test_analyze_is_sound(params: rules.Params, cs: list[RouteContext]) -> None:
    """A rule reported unreachable is never the first match."""
    flagged = {int(path.removeprefix(".rules[").rstrip("]")) for path, _ in rules.analyze(params)}
    for c in cs:
        rule_id, _ = ref_route(params, c, CANDS)
        assert rule_id is None or int(rule_id[1:]) not in flagged


# --------------------------------------------------------------------------- behaviour


def test_first_matching_rule_wins_and_no_match_changes_nothing() -> None:
    p = policy([
        {"id": "big", "when": {"amount": {"gte": 10_000}}, "then": {"channels": ["c"]}},
        {"id": "eur", "when": {"currency": ["EUR"]}, "then": {"channels": ["b", "a"]}},
        {"id": "eur-big", "when": {"currency": ["EUR"], "amount": {"gte": 5000}}, "then": {"channels": ["d"]}},
    ])
    assert names(p(ctx(amount=20_000), CANDS)) == ["c"]
    assert names(p(ctx(amount=6000), CANDS)) == ["b", "a"]
    assert p(ctx(currency="USD"), CANDS) == CANDS


@pytest.mark.parametrize(
    ("when", "hit", "miss"),
    [
        ({"amount": {"gte": 100, "lt": 200}}, {"amount": 100}, {"amount": 200}),
        ({"amount": {"lt": 200}}, {"amount": 199}, {"amount": 200}),
        ({"currency": ["usd", "JPY"]}, {"currency": "USD"}, {"currency": "EUR"}),
        ({"country": ["US"]}, {"country": "US"}, {"country": "DE"}),
        ({"card_brand": ["Visa"]}, {"card_brand": "VISA"}, {"card_brand": None}),
        ({"bin": ["4242"]}, {"card_bin": "424242"}, {"card_bin": "400000"}),
        ({"bin": ["510000-559999"]}, {"card_bin": "555555"}, {"card_bin": "560000"}),
        ({"bin": ["510000-559999"]}, {"card_bin": "51000012"}, {"card_bin": "5100"}),
        ({"bin": ["4242"]}, {"card_bin": "4242"}, {"card_bin": None}),
        ({"method": ["alipay"]}, {"method": "alipay"}, {"method": "card"}),
        ({"merchant": ["m2"]}, {"merchant_id": "m2"}, {"merchant_id": "m1"}),
        ({"metadata": {"tier": "gold"}}, {"metadata": {"tier": "gold", "x": "y"}}, {"metadata": {"tier": "silver"}}),
        ({"currency": ["EUR"], "country": ["FR"]}, {"country": "FR"}, {"country": "DE"}),  # AND
    ],
)
def test_each_condition_type(when: dict[str, Any], hit: dict[str, Any], miss: dict[str, Any]) -> None:
    p = policy([{"id": "r", "when": when, "then": {"channels": ["b"]}}])
    assert names(p(ctx(**hit), CANDS)) == ["b"]
    assert p(ctx(**miss), CANDS) == CANDS


def test_channels_outcome_drops_or_keeps_the_others() -> None:
    drop = policy([{"id": "r", "then": {"channels": ["c", "a", "ghost"]}}])
    keep = policy([{"id": "r", "then": {"channels": ["c", "a"], "fallback": "keep"}}])
    assert names(drop(ctx(), CANDS)) == ["c", "a"]
    assert names(keep(ctx(), CANDS)) == ["c", "a", "b", "d"]


def test_block_returns_no_channel_and_says_which_rule_and_code() -> None:
    p = policy([
        {"id": "sanctions", "when": {"country": ["KP"]}, "then": {"block": True, "block_code": "sanctioned_country"}},
    ])
    assert p(ctx(country="KP"), CANDS) == ()
    matched = p.match(ctx(country="KP"))
    assert matched is not None and matched.id == "sanctions" and matched.outcome.block_code == "sanctioned_country"
    assert p.match(ctx()) is None


def test_split_is_sticky_and_follows_the_weights() -> None:
    p = policy([{"id": "s", "then": {"split": {"a": 1, "b": 3, "c": 0}}}])
    first: dict[str, int] = {}
    for i in range(4000):
        out = names(p(ctx(payment_id=f"pay{i}"), CANDS))
        assert out == names(p(ctx(payment_id=f"pay{i}"), CANDS))
        assert set(out) == {"a", "b", "c"} and out[-1] == "c"  # "d" dropped, zero weight last
        first[out[0]] = first.get(out[0], 0) + 1
    assert set(first) == {"a", "b"}
    assert 0.70 < first["b"] / 4000 < 0.80


def test_invalid_params_are_rejected_with_paths() -> None:
    def problems(raw_rules: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return validate_params(PTYPE, {"rules": raw_rules}, frozenset(NAMES))

    assert problems([{"id": "r", "then": {"channels": ["a"], "block": True}}])[0][0] == ".rules[0].then"
    assert problems([{"id": "r", "then": {}}])[0][0] == ".rules[0].then"
    assert problems([{"id": "r", "when": {"bin": ["42x"]}, "then": {"block": True}}])[0][0] == ".rules[0].when"
    assert problems([{"id": "r", "when": {"bin": ["5-45"]}, "then": {"block": True}}])[0][0] == ".rules[0].when"
    assert problems([{"id": "r", "when": {"amount": {"gte": 5, "lt": 5}}, "then": {"block": True}}])[0][0] == (
        ".rules[0].when.amount"
    )
    assert problems([{"id": "r", "when": {"currency": []}, "then": {"block": True}}])[0][0] == ".rules[0].when.currency"
    assert problems([{"id": "r", "when": {"colour": ["red"]}, "then": {"block": True}}])
    assert problems([{"id": "r", "then": {"block": True}}, {"id": "r", "then": {"block": True}}])
    assert problems([{"id": "r", "then": {"split": {"a": 1, "ghost": 1}}}]) == [
        (".rules[0].then.split.ghost", "unknown channel 'ghost'")
    ]
    assert problems([{"id": "r", "then": {"channels": ["a", "ghost"]}}]) == [
        (".rules[0].then.channels[1]", "unknown channel 'ghost'")
    ]


# --------------------------------------------------------------------------- analyze


def analyzed(raw_rules: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return rules.analyze(decode_params(PTYPE, {"rules": raw_rules}))


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ({}, {"currency": ["EUR"]}),  # missing condition = universal
        ({"amount": {"gte": 100}}, {"amount": {"gte": 200, "lt": 300}}),  # range contained
        ({"currency": ["EUR", "USD"]}, {"currency": ["usd"], "country": ["US"]}),  # subset, extra condition
        ({"bin": ["4"]}, {"bin": ["4242", "400000-499999"]}),  # prefix covers prefixes and ranges
        ({"bin": ["400000-449999", "450000-499999"]}, {"bin": ["440000-460000"]}),  # covered by a union
        ({"metadata": {"tier": "gold"}}, {"metadata": {"tier": "gold", "risk": "low"}}),
        ({"card_brand": ["VISA"]}, {"card_brand": ["visa"], "amount": {"lt": 10}}),
    ],
)
def test_analyze_finds_shadowed_rules(earlier: dict[str, Any], later: dict[str, Any]) -> None:
    warnings = analyzed([
        {"id": "first", "when": earlier, "then": {"channels": ["a"]}},
        {"id": "second", "when": later, "then": {"channels": ["b"]}},
    ])
    assert len(warnings) == 1
    path, msg = warnings[0]
    assert path == ".rules[1]" and "unreachable" in msg and "'first'" in msg


def test_analyze_finds_conflicting_rules() -> None:
    warnings = analyzed([
        {"id": "x", "when": {"currency": ["EUR", "USD"], "amount": {"gte": 0}}, "then": {"channels": ["a"]}},
        {"id": "y", "when": {"amount": {"gte": 0}, "currency": ["usd", "eur"]}, "then": {"block": True}},
    ])
    assert len(warnings) == 1 and warnings[0][0] == ".rules[1]" and "conflicts with rule 'x'" in warnings[0][1]


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ({"currency": ["EUR"]}, {}),
        ({"amount": {"gte": 100}}, {"amount": {"gte": 50}}),
        ({"currency": ["EUR"]}, {"currency": ["EUR", "USD"]}),
        ({"bin": ["42"]}, {"bin": ["4"]}),
        ({"bin": ["400000-449999"]}, {"bin": ["440000-460000"]}),
        ({"bin": ["424242"]}, {"bin": ["4242"]}),  # a 4-digit BIN matches the later rule only
        ({"metadata": {"tier": "gold", "risk": "low"}}, {"metadata": {"tier": "gold"}}),
        ({"currency": ["EUR"]}, {"country": ["DE"]}),
    ],
)
def test_analyze_is_quiet_when_the_later_rule_can_match(earlier: dict[str, Any], later: dict[str, Any]) -> None:
    assert analyzed([
        {"id": "first", "when": earlier, "then": {"channels": ["a"]}},
        {"id": "second", "when": later, "then": {"channels": ["b"]}},
    ]) == []


def test_analyze_is_quiet_on_a_clean_rule_set() -> None:
    assert analyzed([
        {"id": "sanctions", "when": {"country": ["KP", "IR"]}, "then": {"block": True, "block_code": "sanctioned"}},
        {"id": "cn-wallets", "when": {"method": ["alipay"], "country": ["CN"]}, "then": {"channels": ["c"]}},
        {"id": "amex", "when": {"card_brand": ["amex"]}, "then": {"channels": ["d"], "fallback": "keep"}},
        {"id": "big-eur", "when": {"currency": ["EUR"], "amount": {"gte": 100_000}}, "then": {"channels": ["b"]}},
        {"id": "eur-split", "when": {"currency": ["EUR"]}, "then": {"split": {"a": 1, "b": 1}}},
        {"id": "gold", "when": {"metadata": {"tier": "gold"}}, "then": {"channels": ["a"], "fallback": "keep"}},
    ]) == []
