"""Adyen refusal reasons (`refusalReasonCode`, docs.adyen.com/development-resources/refusal-reasons) ->
outcome. Unknown codes are hard declines (the safe side: no failover on a code we do not understand).

HARD: the card or the cardholder said no; another channel reaches the same issuer and would decline too.
SOFT: the acquirer, Adyen or the network failed technically, or Adyen does not support the transaction;
another channel may well take it.
"""

from __future__ import annotations

from router.model import Outcome

# code -> (Adyen's refusalReason text, outcome)
REFUSAL_REASONS: dict[str, tuple[str, Outcome]] = {
    "2": ("Refused", Outcome.HARD_DECLINE),
    "3": ("Referral", Outcome.HARD_DECLINE),
    "4": ("Acquirer Error", Outcome.SOFT_DECLINE),
    "5": ("Blocked Card", Outcome.HARD_DECLINE),
    "6": ("Expired Card", Outcome.HARD_DECLINE),
    "7": ("Invalid Amount", Outcome.HARD_DECLINE),
    "8": ("Invalid Card Number", Outcome.HARD_DECLINE),
    "9": ("Issuer Unavailable", Outcome.SOFT_DECLINE),
    # Adyen or this acquirer cannot process this card/transaction type; another channel may
    "10": ("Not supported", Outcome.SOFT_DECLINE),
    "11": ("3D Not Authenticated", Outcome.HARD_DECLINE),
    "12": ("Not enough balance", Outcome.HARD_DECLINE),
    # fraud verdicts are never cascaded to another channel: that is exactly what card testers exploit
    "14": ("Acquirer Fraud", Outcome.HARD_DECLINE),
    "15": ("Cancelled", Outcome.HARD_DECLINE),
    "16": ("Shopper Cancelled", Outcome.HARD_DECLINE),
    "17": ("Invalid Pin", Outcome.HARD_DECLINE),
    "18": ("Pin tries exceeded", Outcome.HARD_DECLINE),
    "19": ("Pin validation not possible", Outcome.SOFT_DECLINE),
    "20": ("FRAUD", Outcome.HARD_DECLINE),
    # Adyen never sent it to the acquirer: nothing reached the issuer
    "21": ("Not Submitted", Outcome.SOFT_DECLINE),
    "22": ("FRAUD-CANCELLED", Outcome.HARD_DECLINE),
    "23": ("Transaction Not Permitted", Outcome.HARD_DECLINE),
    "24": ("CVC Declined", Outcome.HARD_DECLINE),
    "25": ("Restricted Card", Outcome.HARD_DECLINE),
    "26": ("Revocation Of Auth", Outcome.HARD_DECLINE),
    "27": ("Declined Non Generic", Outcome.HARD_DECLINE),
    "28": ("Withdrawal amount exceeded", Outcome.HARD_DECLINE),
    "29": ("Withdrawal count exceeded", Outcome.HARD_DECLINE),
    "31": ("Issuer Suspected Fraud", Outcome.HARD_DECLINE),
    "32": ("AVS Declined", Outcome.HARD_DECLINE),
    "33": ("Card requires online pin", Outcome.HARD_DECLINE),
    "34": ("No checking account available on Card", Outcome.HARD_DECLINE),
    "35": ("No savings account available on Card", Outcome.HARD_DECLINE),
    "36": ("Mobile pin required", Outcome.HARD_DECLINE),
    "37": ("Contactless fallback", Outcome.HARD_DECLINE),
    # the issuer wants SCA; the same issuer behind another channel wants it too
    "38": ("Authentication required", Outcome.HARD_DECLINE),
    "39": ("RReq not received from DS", Outcome.SOFT_DECLINE),
    "40": ("Current AID is in Penalty Box", Outcome.HARD_DECLINE),
    "41": ("CVM Required Restart Payment", Outcome.HARD_DECLINE),
    "42": ("3DS Authentication Error", Outcome.SOFT_DECLINE),
    "43": ("Online PIN required", Outcome.HARD_DECLINE),
    "44": ("Try another interface", Outcome.HARD_DECLINE),
    "45": ("Chip downgrade mode", Outcome.HARD_DECLINE),
    # Adyen blocks retries of a card the issuer keeps declining (scheme retry fees): do not cascade
    "46": ("Transaction blocked by Adyen to prevent excessive retry fees", Outcome.HARD_DECLINE),
}

# technical failures on the way to the issuer: retrying later (or elsewhere) can succeed
TECHNICAL: frozenset[str] = frozenset({"4", "9", "19", "21", "39", "42"})

# notifications carry the reason text, not the code
_BY_REASON: dict[str, str] = {text.casefold(): code for code, (text, _) in REFUSAL_REASONS.items()}


def classify(code: str | None) -> Outcome:
    """Map a `refusalReasonCode`; anything not in the table is a hard decline."""
    entry = REFUSAL_REASONS.get(code or "")
    return entry[1] if entry else Outcome.HARD_DECLINE


def is_technical(code: str | None) -> bool:
    """True for refusals caused by a technical failure (worth a retry), not by the card."""
    return (code or "") in TECHNICAL


def code_for_reason(reason: str | None) -> str | None:
    """The `refusalReasonCode` for a notification's `reason` text (e.g. "CVC Declined"), if known.

    Adyen may append detail after a colon ("Refused: 05 Do not honor"), so only the head is matched."""
    if not reason:
        return None
    return _BY_REASON.get(reason.split(":", 1)[0].strip().casefold())
