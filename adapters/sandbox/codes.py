"""The sandbox channel's decline-code table: raw code -> outcome. Unknown codes are hard declines."""

from __future__ import annotations

from router.model import Outcome

CODES: dict[str, Outcome] = {
    # the card or the cardholder: another channel would decline too
    "do_not_honor": Outcome.HARD_DECLINE,
    "insufficient_funds": Outcome.HARD_DECLINE,
    "expired_card": Outcome.HARD_DECLINE,
    "incorrect_cvc": Outcome.HARD_DECLINE,
    "stolen_card": Outcome.HARD_DECLINE,
    "lost_card": Outcome.HARD_DECLINE,
    "fraudulent": Outcome.HARD_DECLINE,
    "invalid_account": Outcome.HARD_DECLINE,
    # the channel or its acquirer: worth trying the next channel
    "processing_error": Outcome.SOFT_DECLINE,
    "issuer_unavailable": Outcome.SOFT_DECLINE,
    "try_again_later": Outcome.SOFT_DECLINE,
    "risk_blocked": Outcome.SOFT_DECLINE,
    "currency_not_supported": Outcome.SOFT_DECLINE,
    "invalid_request": Outcome.SOFT_DECLINE,
}


def classify(code: str | None) -> Outcome:
    """Map a raw decline code; anything not in the table is a hard decline (the safe side)."""
    return CODES.get(code or "", Outcome.HARD_DECLINE)
