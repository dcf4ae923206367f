"""ExamplePay's decline codes -> outcome. Unknown codes are hard declines (the safe side).

Fill this table from the PSP's documentation, one row per code, and give every row a reason:
- HARD_DECLINE: the card or the cardholder is the problem; another channel reaches the same issuer and
  would decline too (and cascading fraud verdicts is exactly what card testers exploit). Stop.
- SOFT_DECLINE: this channel (or its acquirer) could not take the payment, or had a transient problem;
  the next channel in the plan may succeed. Fail over.
An unknown code is a hard decline: failing over on a code nobody understood can charge twice.

`TECHNICAL` marks the codes that describe a technical hiccup rather than a business decision (worth a
retry later on the same channel); it is information for metrics and alerting, not a retry switch: the
pipeline only ever retries `ChannelUnavailable`, never a decline.
"""

from __future__ import annotations

from router.model import Outcome

CODES: dict[str, Outcome] = {
    # --- the card or the cardholder: stop
    "card_declined": Outcome.HARD_DECLINE,  # generic issuer refusal without a reason
    "insufficient_funds": Outcome.HARD_DECLINE,
    "expired_card": Outcome.HARD_DECLINE,
    "incorrect_cvc": Outcome.HARD_DECLINE,
    "invalid_card_number": Outcome.HARD_DECLINE,
    "lost_or_stolen": Outcome.HARD_DECLINE,
    "suspected_fraud": Outcome.HARD_DECLINE,  # never cascade a fraud verdict
    "authentication_failed": Outcome.HARD_DECLINE,  # the customer failed 3DS
    # --- this channel cannot take it, or a transient failure: fail over
    "issuer_unavailable": Outcome.SOFT_DECLINE,
    "acquirer_error": Outcome.SOFT_DECLINE,
    "processing_error": Outcome.SOFT_DECLINE,
    "card_not_supported": Outcome.SOFT_DECLINE,  # another acquirer/network may support the card
    "currency_not_supported": Outcome.SOFT_DECLINE,
    "invalid_request": Outcome.SOFT_DECLINE,  # ExamplePay refused the request: nothing was charged
}

TECHNICAL: frozenset[str] = frozenset({"issuer_unavailable", "acquirer_error", "processing_error"})


def classify(code: str | None) -> Outcome:
    """Map a raw decline code; anything not in the table is a hard decline."""
    return CODES.get(code or "", Outcome.HARD_DECLINE)


def is_technical(code: str | None) -> bool:
    """True when the code describes a transient technical failure rather than a decision."""
    return (code or "") in TECHNICAL
