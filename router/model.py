"""The canonical model every layer speaks, and the seams between layers.

Money is an `int` in minor units plus an ISO 4217 currency. Times are aware UTC datetimes. Values are
frozen msgspec Structs: validated once at the edge, cheap to encode. The card number exists only in
`SensitiveCard`, which is handed to an adapter for the channel call and never stored, logged or
encoded; everything else sees `CardSummary` (BIN, last 4, brand, expiry, keyed fingerprint).

Seams declared here (so adapters and policies depend only on this module and `router.errors`):
`ChannelAdapter` (sans-IO translator), `WireRequest`/`WireResponse`, `ChannelResult`, `Candidate`,
`RouteContext` and `Policy`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec


def utcnow() -> datetime:
    return datetime.now(UTC)


class Status(enum.StrEnum):
    PROCESSING = "processing"  # recorded before the first channel call; never left by a clean run
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    DECLINED = "declined"
    FAILED = "failed"
    PENDING = "pending"
    REQUIRES_ACTION = "requires_action"
    VOIDED = "voided"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"
    MANUAL_REVIEW = "manual_review"  # the janitor could not settle it in time: an operator decides


TERMINAL = frozenset({Status.DECLINED, Status.FAILED, Status.VOIDED, Status.REFUNDED})

# The explicit, monotonic state machine. Anything not listed is a 409.
TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.PROCESSING: frozenset(
        {
            Status.AUTHORIZED,
            Status.CAPTURED,
            Status.DECLINED,
            Status.FAILED,
            Status.PENDING,
            Status.REQUIRES_ACTION,
            Status.MANUAL_REVIEW,
        }
    ),
    Status.PENDING: frozenset(
        {Status.AUTHORIZED, Status.CAPTURED, Status.DECLINED, Status.FAILED, Status.MANUAL_REVIEW}
    ),
    Status.REQUIRES_ACTION: frozenset(
        {Status.AUTHORIZED, Status.CAPTURED, Status.DECLINED, Status.FAILED, Status.MANUAL_REVIEW}
    ),
    Status.MANUAL_REVIEW: frozenset({Status.AUTHORIZED, Status.CAPTURED, Status.DECLINED, Status.FAILED}),
    Status.AUTHORIZED: frozenset({Status.CAPTURED, Status.VOIDED}),
    Status.CAPTURED: frozenset({Status.PARTIALLY_REFUNDED, Status.REFUNDED}),
    Status.PARTIALLY_REFUNDED: frozenset({Status.PARTIALLY_REFUNDED, Status.REFUNDED}),
    Status.DECLINED: frozenset(),
    Status.FAILED: frozenset(),
    Status.VOIDED: frozenset(),
    Status.REFUNDED: frozenset(),
}


def can_transition(current: Status, to: Status) -> bool:
    return to in TRANSITIONS[current]


class Outcome(enum.StrEnum):
    """What one channel call came to. A decline is data, not an exception."""

    APPROVED = "approved"
    HARD_DECLINE = "hard_decline"  # stop: another channel would not help
    SOFT_DECLINE = "soft_decline"  # fail over to the next channel in the plan
    REQUIRES_ACTION = "requires_action"  # wallet flow waits for the customer
    PENDING = "pending"  # the channel itself says it is still processing
    UNAVAILABLE = "unavailable"  # ChannelUnavailable after retries: nothing was charged
    UNKNOWN = "unknown"  # OutcomeUnknown: may have been charged
    SKIPPED = "skipped"  # breaker open at attempt time
    NOT_CHARGED = "not_charged"  # a status query: the channel has no charge under this reference


class DeclineCategory(enum.StrEnum):
    HARD = "hard"
    SOFT = "soft"


# --------------------------------------------------------------------------- request side


class CardSummary(msgspec.Struct, frozen=True, kw_only=True):
    """All of a card that may exist beyond the channel call."""

    bin: str
    last4: str
    brand: str
    exp_month: int
    exp_year: int
    fingerprint: str  # keyed HMAC of the PAN: equal cards match, the PAN cannot be recovered


class SensitiveCard:
    """The full card, in memory only, for the channel call. Its repr never shows the PAN or CVC."""

    __slots__ = ("number", "cvc", "exp_month", "exp_year", "holder_name", "summary")

    def __init__(
        self,
        number: str,
        cvc: str | None,
        exp_month: int,
        exp_year: int,
        holder_name: str | None,
        summary: CardSummary,
    ) -> None:
        self.number = number
        self.cvc = cvc
        self.exp_month = exp_month
        self.exp_year = exp_year
        self.holder_name = holder_name
        self.summary = summary

    def __repr__(self) -> str:
        return f"SensitiveCard({self.summary.bin}******{self.summary.last4})"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # never pickled into a queue or cache by accident
        raise TypeError("SensitiveCard is not serializable")


class PaymentMethod(msgspec.Struct, frozen=True, kw_only=True):
    type: str  # card | alipay | wechatpay
    card: CardSummary | None = None
    wallet: dict[str, str] | None = None  # wallet flow: {"flow": "qr"} / {"flow": "jsapi", "openid": ...}


class PaymentRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A validated, canonical `POST /v1/payments` body (without the sensitive card)."""

    merchant_id: str
    merchant_order_id: str
    amount: int
    currency: str
    exponent: int
    country: str
    capture: bool
    payment_method: PaymentMethod
    description: str | None = None
    customer_id: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


# --------------------------------------------------------------------------- record side


class Decline(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    message: str
    category: DeclineCategory
    channel: str | None = None


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    seq: int  # 1-based position in this payment's attempt history
    channel: str
    outcome: Outcome
    code: str | None  # the channel's raw code, kept as received
    latency_ms: float
    channel_key: str  # the deterministic channel idempotency key used (and reused on retries)
    channel_reference: str | None = None
    retries: int = 0
    started_at: datetime = msgspec.field(default_factory=utcnow)


class Operation(msgspec.Struct, frozen=True, kw_only=True):
    """A capture, void or refund applied to a payment."""

    id: str
    kind: str  # capture | void | refund
    amount: int
    status: str  # succeeded | failed | pending
    channel_reference: str | None = None
    code: str | None = None
    reason: str | None = None
    created_at: datetime = msgspec.field(default_factory=utcnow)


class RouteStep(msgspec.Struct, frozen=True, kw_only=True):
    policy: str
    output: list[str]  # the candidates after this step, in order


class RoutingDecision(msgspec.Struct, frozen=True, kw_only=True):
    """Why the payment went where it went."""

    chain: str  # "default" or "merchant:<id>"
    config_version: str
    candidates: list[str]  # every configured channel considered
    plan: list[str]  # the ordered attempt plan after filters and rankers
    removed: dict[str, str] = msgspec.field(default_factory=dict)  # channel -> policy that removed it
    steps: list[RouteStep] = msgspec.field(default_factory=list)  # what each policy of the chain output
    blocked_by: str | None = None  # compliance rule id when refused before routing


class Payment(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    merchant_id: str
    merchant_order_id: str
    status: Status
    amount: int
    currency: str
    country: str
    capture: bool
    payment_method: PaymentMethod
    captured_amount: int = 0
    refunded_amount: int = 0
    channel: str | None = None
    channel_reference: str | None = None
    decline: Decline | None = None
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    operations: list[Operation] = msgspec.field(default_factory=list)
    routing: RoutingDecision | None = None
    next_action: dict[str, Any] | None = None
    description: str | None = None
    customer_id: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    idempotency_key: str | None = None
    duplicate_of: str | None = None  # flagged by the fingerprint window: an earlier look-alike payment
    version: int = 1
    created_at: datetime = msgspec.field(default_factory=utcnow)
    updated_at: datetime = msgspec.field(default_factory=utcnow)


class OutboxEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A merchant-facing event, written in the same transaction as the change it describes."""

    id: str
    merchant_id: str
    payment_id: str
    type: str  # e.g. payment.captured
    payload: bytes  # the JSON the webhook will carry
    created_at: datetime = msgspec.field(default_factory=utcnow)


# --------------------------------------------------------------------------- adapter seam


class WireRequest(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    path: str  # appended to the channel's base_url
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    body: bytes = b""


class WireResponse(msgspec.Struct, frozen=True, kw_only=True):
    status: int
    headers: dict[str, str]
    body: bytes


class ChannelAuthorize(msgspec.Struct, frozen=True, kw_only=True, dict=True):
    """What an adapter needs to build an authorization. Holds the sensitive card: never encode it."""

    payment_id: str
    attempt: int
    channel_key: str  # deterministic: same payment + attempt -> same key, on every retry
    reference: str  # deterministic merchant reference the channel can be queried by
    amount: int
    currency: str
    exponent: int
    country: str
    capture: bool
    card: Any  # SensitiveCard for method "card"; None for wallets
    method: str = "card"  # card | alipay | wechatpay
    wallet: dict[str, str] | None = None  # wallet flow parameters, e.g. {"flow": "native"} or {"flow": "jsapi", "openid": ...}
    notify_url: str | None = None  # where the channel should send its callback (our /callbacks/{channel})
    return_url: str | None = None  # where a redirect flow returns the customer
    description: str | None = None


class ChannelOperation(msgspec.Struct, frozen=True, kw_only=True):
    kind: str  # capture | void | refund
    payment_id: str
    channel_reference: str
    channel_key: str
    amount: int  # of this operation, minor units
    currency: str
    exponent: int = 2  # ISO 4217 minor-unit digits of `currency`
    payment_amount: int = 0  # the payment's authorized amount (some channels want the order total on refunds)


class ChannelResult(msgspec.Struct, frozen=True, kw_only=True):
    outcome: Outcome
    channel_reference: str | None = None
    code: str | None = None
    message: str | None = None
    captured: bool = False
    next_action: dict[str, Any] | None = None


class CallbackEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A verified inbound channel notification, translated."""

    event_id: str | None  # the channel's id for the notification (dedup), if it has one
    reference: str | None  # our deterministic attempt reference, when the channel echoes it
    channel_reference: str | None
    result: ChannelResult
    kind: str = "authorization"  # authorization | capture | void | refund
    amount: int | None = None  # what the channel says was paid, minor units (checked against the record)
    currency: str | None = None


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    currencies: frozenset[str] | None = None  # None: any
    countries: frozenset[str] | None = None
    methods: frozenset[str] = frozenset({"card"})
    operations: frozenset[str] = frozenset({"authorize", "capture", "void", "refund", "status"})


class ChannelAdapter(Protocol):
    """A translator between the canonical model and one channel's wire protocol. No I/O.

    `parse_*` return a `ChannelResult`; they raise `ChannelUnavailable` when the channel says it did
    not process the request and `OutcomeUnknown` when the answer leaves the outcome open.
    """

    kind: str

    def capabilities(self) -> Capabilities: ...

    def build_authorize(self, req: ChannelAuthorize) -> WireRequest: ...

    def parse_authorize(self, resp: WireResponse) -> ChannelResult: ...

    def build_status(self, reference: str, channel_reference: str | None) -> WireRequest: ...

    def parse_status(self, resp: WireResponse) -> ChannelResult: ...

    def build_operation(self, op: ChannelOperation) -> WireRequest: ...

    def parse_operation(self, op: ChannelOperation, resp: WireResponse) -> ChannelResult: ...

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> tuple[CallbackEvent, WireResponse]:
        """Verify and translate an inbound notification; return it and the acknowledgement to answer.

        Raises `CallbackRejected` when the signature or the body does not verify."""
        ...


# --------------------------------------------------------------------------- routing seam


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """A channel as the policies see it: static capabilities plus a snapshot of live state."""

    name: str
    adapter: str
    capabilities: Capabilities
    priority: int = 100
    weight: int = 1
    breaker_open: bool = False
    fees: Any = None  # the channel's fee schedule as configured (decoded by policies/cost.py)
    licensed_countries: frozenset[str] | None = None  # compliance licences: None = not restricted
    licensed_currencies: frozenset[str] | None = None


class RouteContext(msgspec.Struct, frozen=True, kw_only=True):
    payment_id: str
    merchant_id: str
    amount: int
    currency: str
    country: str
    method: str
    card_bin: str | None = None
    card_brand: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


def route_context(p: Payment) -> RouteContext:
    """What routing sees of a payment (the same at its decision, in the lab's replay and when a late
    outcome is learnt)."""
    card = p.payment_method.card
    return RouteContext(
        payment_id=p.id, merchant_id=p.merchant_id, amount=p.amount, currency=p.currency, country=p.country,
        method=p.payment_method.type, card_bin=card.bin if card else None, card_brand=card.brand if card else None,
        metadata=p.metadata,
    )


class Policy(Protocol):
    """A pure function over an ordered tuple of candidates.

    Filters return a subsequence (order kept); rankers return a permutation. No I/O.
    """

    name: str

    def __call__(self, ctx: RouteContext, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]: ...
