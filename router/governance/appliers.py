"""What applying each governed object does, through callables the app injects.

Two families:
- External objects live elsewhere; applying calls out: `apply_config(new_yaml_text) -> version`
  (validate + hot-swap + write the file), `apply_refund(merchant_id, payment_id, amount, reason)`
  (the normal payment path: `Pipeline.refund`), `redrive_webhooks(params)`, `rotate_secret(params)`.
  Their current version comes from `current_config()` / `refund_target()`.
- Internal objects (merchants, role grants, the auto-approval policy) live in the governance store;
  the service writes them in the same transaction as the final approval (see `service.py`).

An applier that is not wired (None) makes proposals of that kind fail at once with 501
`not_available`, before anyone spends a review on them. Webhook delivery does not exist in payroute
yet (the outbox is written, nothing sends it), so re-drive and secret rotation are unwired today.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from router.errors import ProblemError


class ConfigSnapshot(msgspec.Struct, frozen=True):
    text: str  # the YAML as the file holds it (for the diff)
    version: str  # the running config's version (Config.digest)


class RefundTarget(msgspec.Struct, frozen=True):
    version: int  # Payment.version: the refund is refused if the payment moved on
    currency: str
    refundable: int  # captured minus refunds succeeded or pending


ApplyConfig = Callable[[str], Awaitable[str]]
CurrentConfig = Callable[[], Awaitable[ConfigSnapshot]]
ApplyRefund = Callable[[str, str, int, str | None], Awaitable[Any]]
LookupRefund = Callable[[str, str], Awaitable[RefundTarget | None]]
ApplyParams = Callable[[Mapping[str, Any]], Awaitable[Mapping[str, Any]]]


@dataclass(frozen=True)
class Appliers:
    apply_config: ApplyConfig | None = None
    current_config: CurrentConfig | None = None
    apply_refund: ApplyRefund | None = None
    refund_target: LookupRefund | None = None
    redrive_webhooks: ApplyParams | None = None  # not available yet: payroute has no webhook delivery
    rotate_secret: ApplyParams | None = None  # not available yet

    def require(self, kind: str) -> None:
        """Refuse a proposal whose applier is not wired (501)."""
        needed: dict[str, tuple[object, ...]] = {
            "config": (self.apply_config, self.current_config),
            "refund": (self.apply_refund,),
            "webhook_redrive": (self.redrive_webhooks,),
            "secret_rotation": (self.rotate_secret,),
        }
        if any(f is None for f in needed.get(kind, ())):
            raise ProblemError(
                501, "not_available", f"Governed {kind} changes are not available yet",
                "this payroute has nothing wired to apply them (webhook delivery and secret rotation do not exist yet)"
                if kind in ("webhook_redrive", "secret_rotation") else "the applier is not wired",
            )  # fmt: skip


def result_doc(value: Any) -> dict[str, Any]:
    """What an applier returned, as a JSON-able mapping stored on the request."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"version": value}
    built = msgspec.to_builtins(value)
    if isinstance(built, dict):
        # a refunded Payment: keep what an operator needs, not the whole document
        keys = ("id", "status", "amount", "currency", "refunded_amount", "version")
        picked = {k: built[k] for k in keys if k in built}
        return picked or built
    return {"value": built}
