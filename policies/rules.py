"""Routing rules: the first rule whose condition holds decides; no match leaves the candidates as they are.

A condition is an AND of the conditions given (a missing one holds for every payment):
`amount: {gte, lt}` (minor units, `gte <= amount < lt`), `currency`, `country` (the customer's),
`card_brand` (case-insensitive), `method`, `merchant` (lists: the value is one of them), `bin`
(prefixes like "4242" or same-length digit ranges like "400000-499999"; a BIN shorter than an entry
never matches it) and `metadata` (every key has exactly that value). Currency and country compare
upper-case.

An outcome is exactly one of:
- `channels: [..]` — those channels first, in that order; the others are removed, or kept after
  them in their input order with `fallback: keep`;
- `split: {channel: weight}` — a weighted choice among them, sticky per payment (see `weighted.py`),
  the other split channels following as fallbacks; non-split channels as with `channels`;
- `block: true` — no channel is eligible (empty plan); `block_code` says why, and `RulesPolicy.match`
  tells the caller which rule blocked.

Rules are compiled once, when the config loads, into predicate closures; a payment runs closures,
never interprets config. `analyze` reports unreachable (shadowed) and conflicting rules for
`payroute config check`; its shadowing check is sound (never warns about a rule that can match).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

from policies.base import PolicyEnv
from policies.weighted import sticky_order
from router.model import Candidate, RouteContext

NonEmpty = Annotated[list[str], msgspec.Meta(min_length=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class AmountRange(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gte: int | None = None
    lt: int | None = None

    def __post_init__(self) -> None:
        if self.gte is not None and self.lt is not None and self.gte >= self.lt:
            raise ValueError("amount range is empty: `gte` must be below `lt`")


class Condition(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    amount: AmountRange | None = None
    currency: NonEmpty | None = None
    country: NonEmpty | None = None
    card_brand: NonEmpty | None = None
    bin: NonEmpty | None = None
    method: NonEmpty | None = None
    merchant: NonEmpty | None = None
    metadata: dict[str, str] | None = None

    def __post_init__(self) -> None:
        for entry in self.bin or ():
            _parse_bin(entry)


class Outcome(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    channels: NonEmpty | None = None
    split: Annotated[dict[str, NonNegative], msgspec.Meta(min_length=1)] | None = None
    fallback: Literal["drop", "keep"] = "drop"
    block: bool = False
    block_code: str = "blocked_by_rule"

    def __post_init__(self) -> None:
        given = (self.channels is not None) + (self.split is not None) + self.block
        if given != 1:
            raise ValueError("an outcome needs exactly one of `channels`, `split` or `block: true`")
        if self.split is not None and not any(self.split.values()):
            raise ValueError("`split` needs at least one positive weight")


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    then: Outcome
    when: Condition = Condition()


class Params(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    rules: list[Rule] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.id in seen:
                raise ValueError(f"duplicate rule id {rule.id!r}")
            seen.add(rule.id)


# --------------------------------------------------------------------------- BIN entries


def _parse_bin(entry: str) -> tuple[int, int, int]:
    """(length, low, high) over the first `length` digits of a BIN; a prefix is a one-value range."""
    lo_s, sep, hi_s = entry.partition("-")
    if not sep:
        hi_s = lo_s
    if not (lo_s.isascii() and lo_s.isdigit() and hi_s.isascii() and hi_s.isdigit()) or len(lo_s) != len(hi_s):
        raise ValueError(f"bin entry {entry!r} is neither a digit prefix nor a same-length range like 400000-499999")
    if int(lo_s) > int(hi_s):
        raise ValueError(f"bin range {entry!r} is empty")
    return len(lo_s), int(lo_s), int(hi_s)


def _bin_matches(bin_: str, length: int, lo: int, hi: int) -> bool:
    head = bin_[:length]
    return len(head) == length and head.isdigit() and lo <= int(head) <= hi


# --------------------------------------------------------------------------- compilation

Predicate = Callable[[RouteContext], bool]
Action = Callable[[RouteContext, tuple[Candidate, ...]], tuple[Candidate, ...]]


def compile_condition(cond: Condition) -> Predicate:
    # each check is one closure reading one field (no helper calls): this runs for every rule tried
    checks: list[Predicate] = []
    if cond.amount is not None and (cond.amount.gte is not None or cond.amount.lt is not None):
        gte = cond.amount.gte if cond.amount.gte is not None else float("-inf")
        lt = cond.amount.lt if cond.amount.lt is not None else float("inf")
        checks.append(lambda ctx: gte <= ctx.amount < lt)
    if cond.currency is not None:
        currencies = frozenset(v.upper() for v in cond.currency)
        checks.append(lambda ctx: ctx.currency.upper() in currencies)
    if cond.country is not None:
        countries = frozenset(v.upper() for v in cond.country)
        checks.append(lambda ctx: ctx.country.upper() in countries)
    if cond.card_brand is not None:
        brands = frozenset(v.lower() for v in cond.card_brand)
        checks.append(lambda ctx: ctx.card_brand.lower() in brands if ctx.card_brand else False)
    if cond.method is not None:
        methods = frozenset(cond.method)
        checks.append(lambda ctx: ctx.method in methods)
    if cond.merchant is not None:
        merchants = frozenset(cond.merchant)
        checks.append(lambda ctx: ctx.merchant_id in merchants)
    if cond.bin is not None:
        parsed = [_parse_bin(e) for e in cond.bin]
        prefixes = tuple(e for e, (_, lo, hi) in zip(cond.bin, parsed, strict=True) if lo == hi)
        ranges = tuple(p for p in parsed if p[1] != p[2])

        def bin_check(ctx: RouteContext) -> bool:
            b = ctx.card_bin
            if b is None:
                return False
            if prefixes and b.startswith(prefixes):
                return True
            return any(_bin_matches(b, n, lo, hi) for n, lo, hi in ranges)

        checks.append(bin_check)
    if cond.metadata:
        required = tuple(cond.metadata.items())
        if len(required) == 1:
            ((mk, mv),) = required
            checks.append(lambda ctx: ctx.metadata.get(mk) == mv)
        else:
            def metadata_check(ctx: RouteContext) -> bool:
                get = ctx.metadata.get
                for k, v in required:
                    if get(k) != v:
                        return False
                return True

            checks.append(metadata_check)

    if not checks:
        return lambda ctx: True
    if len(checks) == 1:
        return checks[0]
    all_checks = tuple(checks)

    def conjunction(ctx: RouteContext) -> bool:
        for check in all_checks:
            if not check(ctx):
                return False
        return True

    return conjunction


def _named_first(order: list[str], keep_others: bool) -> Action:
    rank = {name: i for i, name in reversed(list(enumerate(order)))}

    def by_rank(c: Candidate) -> int:
        return rank[c.name]

    def action(ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        named = [c for c in candidates if c.name in rank]
        if len(named) > 1:
            named.sort(key=by_rank)
        if keep_others:
            named += [c for c in candidates if c.name not in rank]
        return tuple(named)

    return action


def _split(rule_id: str, weights: Mapping[str, int], keep_others: bool) -> Action:
    salt = f"rules:{rule_id}"

    def weight_of(c: Candidate) -> int:
        return weights[c.name]

    def action(ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        named = tuple(c for c in candidates if c.name in weights)
        ordered = sticky_order(ctx.payment_id, salt, named, weight_of)
        if keep_others:
            return (*ordered, *(c for c in candidates if c.name not in weights))
        return ordered

    return action


def _block(ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
    return ()


def compile_outcome(rule_id: str, outcome: Outcome) -> Action:
    keep = outcome.fallback == "keep"
    if outcome.block:
        return _block
    if outcome.split is not None:
        return _split(rule_id, dict(outcome.split), keep)
    assert outcome.channels is not None  # guaranteed by Outcome.__post_init__
    return _named_first(outcome.channels, keep)


@dataclass(frozen=True)
class CompiledRule:
    id: str
    outcome: Outcome
    matches: Predicate
    apply: Action


class RulesPolicy:
    name = "rules"

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(
            CompiledRule(r.id, r.then, compile_condition(r.when), compile_outcome(r.id, r.then)) for r in rules
        )
        self._compiled = tuple((r.matches, r.apply) for r in self.rules)  # the decision path's view

    def match(self, ctx: RouteContext) -> CompiledRule | None:
        """The rule that decides this payment (for the routing record, e.g. which rule blocked)."""
        for rule in self.rules:
            if rule.matches(ctx):
                return rule
        return None

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        for matches, apply in self._compiled:
            if matches(ctx):
                return apply(ctx, candidates)
        return candidates


def build(params: Params, env: PolicyEnv) -> RulesPolicy:
    return RulesPolicy(params.rules)


def channel_refs(params: Params) -> Iterable[tuple[str, str]]:
    for i, rule in enumerate(params.rules):
        for j, name in enumerate(rule.then.channels or ()):
            yield f".rules[{i}].then.channels[{j}]", name
        for name in rule.then.split or {}:
            yield f".rules[{i}].then.split.{name}", name


# --------------------------------------------------------------------------- static analysis


@dataclass(frozen=True)
class _Norm:
    """A condition in canonical form: None = holds for every payment on that axis."""

    amount: tuple[float, float] | None  # [gte, lt)
    sets: tuple[frozenset[str] | None, ...]  # currency, country, card_brand, method, merchant
    bins: tuple[tuple[int, int, int], ...] | None
    metadata: frozenset[tuple[str, str]]


def _normalize(cond: Condition) -> _Norm:
    amount: tuple[float, float] | None = None
    if cond.amount is not None and (cond.amount.gte is not None or cond.amount.lt is not None):
        amount = (
            cond.amount.gte if cond.amount.gte is not None else float("-inf"),
            cond.amount.lt if cond.amount.lt is not None else float("inf"),
        )

    def norm_set(values: list[str] | None, fold: Callable[[str], str]) -> frozenset[str] | None:
        return None if values is None else frozenset(fold(v) for v in values)

    return _Norm(
        amount=amount,
        sets=(
            norm_set(cond.currency, str.upper),
            norm_set(cond.country, str.upper),
            norm_set(cond.card_brand, str.lower),
            norm_set(cond.method, str),
            norm_set(cond.merchant, str),
        ),
        bins=None if cond.bin is None else tuple(_parse_bin(e) for e in cond.bin),
        metadata=frozenset((cond.metadata or {}).items()),
    )


def _bins_within(inner: tuple[tuple[int, int, int], ...], outer: tuple[tuple[int, int, int], ...]) -> bool:
    """Every BIN matching an `inner` entry matches some `outer` entry.

    An inner entry of length n is checked only against outer entries of length <= n, widened to n
    digits: an outer entry longer than n would not match a BIN of exactly n digits, so counting it
    would be unsound.
    """
    for n, lo, hi in inner:
        spans = sorted(
            (olo * 10 ** (n - m), (ohi + 1) * 10 ** (n - m) - 1) for m, olo, ohi in outer if m <= n
        )
        reach = lo  # the lowest value of [lo, hi] not yet covered
        for slo, shi in spans:
            if slo > reach:
                break
            reach = max(reach, shi + 1)
        if reach <= hi:
            return False
    return True


def _implies(a: _Norm, b: _Norm) -> bool:
    """Every payment matching `a` matches `b` (sound; may miss implications across BIN lengths)."""
    if b.amount is not None and (a.amount is None or not (b.amount[0] <= a.amount[0] and a.amount[1] <= b.amount[1])):
        return False
    for sa, sb in zip(a.sets, b.sets, strict=True):
        if sb is not None and (sa is None or not sa <= sb):
            return False
    if b.bins is not None and (a.bins is None or not _bins_within(a.bins, b.bins)):
        return False
    return b.metadata <= a.metadata


def analyze(params: Params) -> list[tuple[str, str]]:
    """Warnings as (path, message): rules no payment can reach, and rules that conflict."""
    warnings: list[tuple[str, str]] = []
    norms = [_normalize(r.when) for r in params.rules]
    for j, rule in enumerate(params.rules):
        for i in range(j):
            if not _implies(norms[j], norms[i]):
                continue
            earlier = params.rules[i]
            if _implies(norms[i], norms[j]) and earlier.then != rule.then:
                msg = (
                    f"rule {rule.id!r} conflicts with rule {earlier.id!r} (rules[{i}]): same condition, "
                    f"different outcome; the earlier one always wins, so this one never applies"
                )
            else:
                msg = (
                    f"rule {rule.id!r} is unreachable: every payment it matches is matched first by "
                    f"rule {earlier.id!r} (rules[{i}])"
                )
            warnings.append((f".rules[{j}]", msg))
            break
    return warnings
