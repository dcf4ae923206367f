"""Chains of policies, the record of what each step did, and how a policy type is declared.

A chain runs its steps in order; each step's output feeds the next. The result is the ordered
attempt plan plus, for every channel that did not make it, the policy that removed it, and a trace of
what every step did (its input and output order), so anyone can ask "why did this payment go there?".

A policy type is declared by a `PolicyType`: a msgspec `Params` struct (typed, unknown keys refused,
errors with paths), a `build(params, env)` factory, and the channel names its params refer to.
`env` carries in-memory live state (e.g. success-rate statistics); policies never do I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from router.model import Candidate, Policy, RouteContext


@dataclass(frozen=True)
class PolicyEnv:
    """Live, in-memory state some policies read (never written by them). Keys are policy-defined."""

    state: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyType:
    params: type[msgspec.Struct]
    build: Callable[[Any, PolicyEnv], Policy]
    channel_refs: Callable[[Any], Iterable[tuple[str, str]]] = lambda _p: ()  # (relative path, channel name)


class NoParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


def decode_params(ptype: PolicyType, raw: Mapping[str, Any]) -> Any:
    return msgspec.convert(dict(raw), ptype.params, str_keys=True)


def validate_params(ptype: PolicyType, raw: Mapping[str, Any], channels: frozenset[str]) -> list[tuple[str, str]]:
    """Problems with one step's params, as (path relative to the step, message)."""
    try:
        params = decode_params(ptype, raw)
    except msgspec.ValidationError as e:
        msg = str(e)
        if " - at `$" in msg:
            text, _, path = msg.rpartition(" - at `$")
            return [(path.rstrip("`") or ".", text)]
        return [(".", msg)]
    return [(rel, f"unknown channel {name!r}") for rel, name in ptype.channel_refs(params) if name not in channels]


class StepTrace(NamedTuple):
    """One step of a decision: the policy and the candidates it passed on, in order. The names are read
    when the trace is recorded (`names`), not while deciding."""

    policy: str
    output: tuple[Candidate, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.output]


_new_trace = tuple.__new__


class Chain:
    def __init__(self, name: str, steps: Sequence[Policy]) -> None:
        self.name = name
        self.steps = tuple(steps)
        self._calls = tuple((step.name, step.__call__) for step in self.steps)  # bound: no slot lookup per call

    def run(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[tuple[Candidate, ...], dict[str, str]]:
        plan, removed, _ = self.explain(ctx, candidates)
        return plan, removed

    def explain(
        self, ctx: RouteContext, candidates: tuple[Candidate, ...]
    ) -> tuple[tuple[Candidate, ...], dict[str, str], list[StepTrace]]:
        removed: dict[str, str] = {}
        trace: list[StepTrace] = []
        current = candidates
        for policy, call in self._calls:
            nxt = call(ctx, current)
            if len(nxt) != len(current):
                kept = {c.name for c in nxt}
                for c in current:
                    if c.name not in kept:
                        removed[c.name] = policy
            trace.append(_new_trace(StepTrace, (policy, nxt)))  # StepTrace(...) without its Python __new__
            current = nxt
        return current, removed, trace
