"""Chains of policies, and the record of what each step removed.

A chain runs its steps in order; each step's output feeds the next. The result is the ordered
attempt plan plus, for every channel that did not make it, the policy that removed it, so anyone
can ask "why did this payment go there?".
"""

from __future__ import annotations

from collections.abc import Sequence

from router.model import Candidate, Policy, RouteContext


class Chain:
    def __init__(self, name: str, steps: Sequence[Policy]) -> None:
        self.name = name
        self.steps = tuple(steps)

    def run(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[tuple[Candidate, ...], dict[str, str]]:
        removed: dict[str, str] = {}
        current = candidates
        for step in self.steps:
            nxt = step(ctx, current)
            if len(nxt) != len(current):
                kept = {c.name for c in nxt}
                for c in current:
                    if c.name not in kept:
                        removed[c.name] = step.name
            current = nxt
        return current, removed
