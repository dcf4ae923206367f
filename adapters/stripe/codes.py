"""Stripe's decline codes -> outcome. Unknown codes are hard declines (the safe side).

The raw code is the error's `decline_code` when the issuer gave one, else its `code` (e.g.
`card_declined`, `expired_card`, `incorrect_cvc`). HARD: the card or the cardholder is the problem and
another channel would decline too. SOFT: Stripe, the network or the issuer had a transient problem,
or the channel cannot take this payment; the next channel may succeed.
"""

from __future__ import annotations

from router.model import Outcome

CODES: dict[str, Outcome] = {
    # --- the card or the cardholder: stop
    "authentication_required": Outcome.HARD_DECLINE,  # needs SCA: the customer must act, not a new channel
    "call_issuer": Outcome.HARD_DECLINE,
    "card_declined": Outcome.HARD_DECLINE,  # `code` when the issuer gave no decline_code
    "card_velocity_exceeded": Outcome.HARD_DECLINE,
    "do_not_honor": Outcome.HARD_DECLINE,
    "do_not_try_again": Outcome.HARD_DECLINE,
    "duplicate_transaction": Outcome.HARD_DECLINE,
    "expired_card": Outcome.HARD_DECLINE,
    "fraudulent": Outcome.HARD_DECLINE,
    "generic_decline": Outcome.HARD_DECLINE,
    "incorrect_cvc": Outcome.HARD_DECLINE,
    "incorrect_number": Outcome.HARD_DECLINE,
    "incorrect_pin": Outcome.HARD_DECLINE,
    "incorrect_zip": Outcome.HARD_DECLINE,
    "insufficient_funds": Outcome.HARD_DECLINE,
    "invalid_account": Outcome.HARD_DECLINE,
    "invalid_amount": Outcome.HARD_DECLINE,
    "invalid_cvc": Outcome.HARD_DECLINE,
    "invalid_expiry_month": Outcome.HARD_DECLINE,
    "invalid_expiry_year": Outcome.HARD_DECLINE,
    "invalid_number": Outcome.HARD_DECLINE,
    "invalid_pin": Outcome.HARD_DECLINE,
    "lost_card": Outcome.HARD_DECLINE,
    "merchant_blacklist": Outcome.HARD_DECLINE,
    "new_account_information_available": Outcome.HARD_DECLINE,
    "no_action_taken": Outcome.HARD_DECLINE,
    "not_permitted": Outcome.HARD_DECLINE,
    "offline_pin_required": Outcome.HARD_DECLINE,
    "online_or_offline_pin_required": Outcome.HARD_DECLINE,
    "payment_intent_authentication_failure": Outcome.HARD_DECLINE,  # the customer failed 3DS
    "pickup_card": Outcome.HARD_DECLINE,
    "pin_try_exceeded": Outcome.HARD_DECLINE,
    "restricted_card": Outcome.HARD_DECLINE,
    "revocation_of_all_authorizations": Outcome.HARD_DECLINE,
    "revocation_of_authorization": Outcome.HARD_DECLINE,
    "security_violation": Outcome.HARD_DECLINE,
    "service_not_allowed": Outcome.HARD_DECLINE,
    "stolen_card": Outcome.HARD_DECLINE,
    "stop_payment_order": Outcome.HARD_DECLINE,
    "testmode_decline": Outcome.HARD_DECLINE,
    "transaction_not_allowed": Outcome.HARD_DECLINE,
    "withdrawal_count_limit_exceeded": Outcome.HARD_DECLINE,
    # --- transient, or this channel cannot take it: fail over
    "approve_with_id": Outcome.SOFT_DECLINE,  # issuer wants a retry of the same authorization
    "card_not_supported": Outcome.SOFT_DECLINE,  # another acquirer/network may support the card
    "currency_not_supported": Outcome.SOFT_DECLINE,
    "issuer_not_available": Outcome.SOFT_DECLINE,
    "processing_error": Outcome.SOFT_DECLINE,
    "reenter_transaction": Outcome.SOFT_DECLINE,
    "try_again_later": Outcome.SOFT_DECLINE,
}

# Codes that say "a technical hiccup, the same request may pass later" (as opposed to a business decline).
TECHNICAL_RETRYABLE: frozenset[str] = frozenset(
    {
        "approve_with_id",
        "issuer_not_available",
        "processing_error",
        "reenter_transaction",
        "try_again_later",
        "lock_timeout",  # Stripe's 429 on concurrent writes to one object
        "rate_limit",
    }
)


def classify(code: str | None) -> Outcome:
    """Map a raw decline code; anything not in the table is a hard decline (the safe side)."""
    return CODES.get(code or "", Outcome.HARD_DECLINE)


def is_technical_retryable(code: str | None) -> bool:
    """True when the code describes a transient technical failure rather than a decision."""
    return (code or "") in TECHNICAL_RETRYABLE
