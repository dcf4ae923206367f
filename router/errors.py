"""The few error types payroute raises, and the two that steer the attempt loop.

- `ChannelUnavailable`: the channel did not take the request (connect failed, or it answered that it
  did not process it). Safe to retry, then to fail over. Counts against the breaker.
- `OutcomeUnknown`: bytes left and we cannot tell whether the channel acted on them. Never retried on
  another channel; the payment goes `pending` and a status query resolves it. Counts against the breaker.
- `ProblemError`: a client-facing RFC 9457 problem (4xx, or 503 when we must fail closed).
- `ConfigError`: a config that does not load; carries every bad path.
Anything else is our own bug: a 500, never retried.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ChannelUnavailable(Exception):
    """Nothing was processed by the channel: safe to retry on it and to fail over."""

    def __init__(self, reason: str, *, code: str = "unavailable") -> None:
        super().__init__(reason)
        self.code = code


class OutcomeUnknown(Exception):
    """The request may have been processed: never fail over; resolve by status query."""

    def __init__(self, reason: str, *, code: str = "unknown") -> None:
        super().__init__(reason)
        self.code = code


class StoreUnavailable(Exception):
    """The durable store cannot be reached (bounded timeouts): state changes fail closed with a 503."""


class CoordinationUnavailable(Exception):
    """Redis (idempotency, locks) cannot be reached: state changes fail closed with a 503."""


class CallbackRejected(Exception):
    """An inbound channel notification that does not verify (signature, timestamp, body)."""


class IntegrationError(Exception):
    """The channel answered something impossible for its protocol (a bug on one side)."""


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "code": self.code, "message": self.message}


class ProblemError(Exception):
    """An RFC 9457 problem the client receives as `application/problem+json`."""

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str | None = None,
        errors: list[FieldError] | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.extra = extra or {}

    def body(self, instance: str | None = None) -> dict[str, object]:
        doc: dict[str, object] = {
            "type": f"https://payroute.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "code": self.code,
        }
        if self.detail:
            doc["detail"] = self.detail
        if instance:
            doc["instance"] = instance
        if self.errors:
            doc["errors"] = [e.as_dict() for e in self.errors]
        doc.update(self.extra)
        return doc


def invalid_request(errors: list[FieldError]) -> ProblemError:
    return ProblemError(
        400,
        "invalid_request",
        "The request is invalid",
        "; ".join(f"{e.field}: {e.message}" for e in errors) or None,
        errors,
    )


class IllegalTransition(ProblemError):
    def __init__(self, current: str, action: str, detail: str | None = None) -> None:
        super().__init__(
            409,
            "illegal_transition",
            "The payment cannot make this transition",
            detail or f"cannot {action} a payment that is {current}",
            extra={"current_status": current},
        )


class VersionConflict(Exception):
    """An optimistic write lost the race: the stored version moved on."""


class DuplicateOrder(Exception):
    """A payment for this merchant order id already exists."""

    def __init__(self, existing_payment_id: str) -> None:
        super().__init__(existing_payment_id)
        self.existing_payment_id = existing_payment_id


@dataclass
class ConfigError(Exception):
    """A config that does not load. Each entry is (path, message)."""

    problems: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(f"{path}: {msg}" for path, msg in self.problems)
