"""Alipay's code tables: gateway `code` and business `sub_code` -> outcome.

Alipay answers every call with a gateway `code` (10000 success, 10003 waiting for the buyer, 20000
unknown service error, 20001 missing authorization, 4000x rejected) and, for 40004 "business failed",
a `sub_code` such as `ACQ.BUYER_BALANCE_NOT_ENOUGH`. `classify` maps one answer to an `Outcome`:

- HARD_DECLINE / SOFT_DECLINE: a decline is data (soft: another channel may take the payment);
- UNAVAILABLE: Alipay says it did not process the request (the adapter raises `ChannelUnavailable`);
- UNKNOWN: the request may have taken effect (the adapter raises `OutcomeUnknown`; a query resolves it).

An unknown `sub_code` under 40004 is a hard decline (the safe side); an unknown gateway `code` is
UNKNOWN, because we cannot tell whether Alipay acted on the request.
"""

from __future__ import annotations

from router.model import Outcome

SUCCESS = "10000"
WAITING = "10003"  # alipay.trade.pay: the buyer must still confirm on the phone

GATEWAY_CODES: dict[str, Outcome] = {
    "20000": Outcome.UNKNOWN,  # "service unavailable / unknown error": Alipay asks us to query
    "20001": Outcome.UNAVAILABLE,  # insufficient authorization (app_auth_token, auth_token)
    "40001": Outcome.SOFT_DECLINE,  # missing parameter: rejected before any business processing
    "40002": Outcome.SOFT_DECLINE,  # invalid parameter: rejected before any business processing
    "40004": Outcome.HARD_DECLINE,  # business failure without a sub_code we know
    "40006": Outcome.UNAVAILABLE,  # the app lacks the permission: nothing processed, try elsewhere
}

SUB_CODES: dict[str, Outcome] = {
    # the request may have taken effect, or already has: resolve by alipay.trade.query
    "ACQ.SYSTEM_ERROR": Outcome.UNKNOWN,
    "ACQ.TRADE_HAS_SUCCESS": Outcome.UNKNOWN,  # a retry of a paid trade: the query says approved
    "aop.ACQ.SYSTEM_ERROR": Outcome.UNKNOWN,
    # our credentials or signature: the gateway refused before processing
    "isv.invalid-signature": Outcome.UNAVAILABLE,
    "isv.missing-signature": Outcome.UNAVAILABLE,
    "isv.invalid-app-id": Outcome.UNAVAILABLE,
    "isv.missing-app-id": Outcome.UNAVAILABLE,
    "isv.invalid-timestamp": Outcome.UNAVAILABLE,
    "isv.insufficient-isv-permissions": Outcome.UNAVAILABLE,
    "isv.insufficient-user-permissions": Outcome.UNAVAILABLE,
    # the buyer or the buyer's funds: another channel would not help
    "ACQ.BUYER_BALANCE_NOT_ENOUGH": Outcome.HARD_DECLINE,
    "ACQ.BUYER_BANKCARD_BALANCE_NOT_ENOUGH": Outcome.HARD_DECLINE,
    "ACQ.PAYMENT_AUTH_CODE_INVALID": Outcome.HARD_DECLINE,
    "ACQ.BUYER_ENABLE_STATUS_FORBID": Outcome.HARD_DECLINE,
    "ACQ.BUYER_PAYMENT_AMOUNT_DAY_LIMIT_ERROR": Outcome.HARD_DECLINE,
    "ACQ.BUYER_PAYMENT_AMOUNT_MONTH_LIMIT_ERROR": Outcome.HARD_DECLINE,
    "ACQ.ERROR_BALANCE_PAYMENT_DISABLE": Outcome.HARD_DECLINE,
    "ACQ.PAYMENT_FAIL": Outcome.HARD_DECLINE,
    "ACQ.TRADE_BUYER_NOT_MATCH": Outcome.HARD_DECLINE,
    # the trade itself: its state forbids the call
    "ACQ.TRADE_HAS_CLOSE": Outcome.HARD_DECLINE,
    "ACQ.TRADE_HAS_FINISHED": Outcome.HARD_DECLINE,
    "ACQ.TRADE_NOT_EXIST": Outcome.HARD_DECLINE,  # a status query maps it to NOT_CHARGED instead
    "ACQ.TRADE_STATUS_ERROR": Outcome.HARD_DECLINE,
    "ACQ.CONTEXT_INCONSISTENT": Outcome.HARD_DECLINE,  # same out_trade_no, different order details
    "ACQ.REASON_TRADE_BEEN_FREEZEN": Outcome.HARD_DECLINE,
    "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL": Outcome.HARD_DECLINE,  # refunds would exceed the paid total
    "ACQ.DISCORDANT_REPEAT_REQUEST": Outcome.HARD_DECLINE,  # same out_request_no, different amount
    "ACQ.REFUND_FEE_ERROR": Outcome.HARD_DECLINE,
    # the merchant or this channel's contract: another channel (or later) may succeed
    "ACQ.SELLER_BALANCE_NOT_ENOUGH": Outcome.SOFT_DECLINE,
    "ACQ.EXIST_FORBIDDEN_WORD": Outcome.SOFT_DECLINE,
    "ACQ.ACCESS_FORBIDDEN": Outcome.SOFT_DECLINE,
    "ACQ.TOTAL_FEE_EXCEED": Outcome.SOFT_DECLINE,
    "ACQ.INVALID_PARAMETER": Outcome.SOFT_DECLINE,
    "ACQ.PARTNER_ERROR": Outcome.SOFT_DECLINE,
    "ACQ.SELLER_BEEN_BLOCKED": Outcome.SOFT_DECLINE,
    "ACQ.INVALID_STORE_ID": Outcome.SOFT_DECLINE,
    "ACQ.PULL_MOBILE_CASHIER_FAIL": Outcome.SOFT_DECLINE,
}

# codes that say "technical, not a decision": worth a retry or a status query, never a decline
TECHNICAL: frozenset[str] = frozenset(
    code for table in (GATEWAY_CODES, SUB_CODES) for code, outcome in table.items()
    if outcome in (Outcome.UNKNOWN, Outcome.UNAVAILABLE)
)


def classify(code: str, sub_code: str | None) -> Outcome:
    """Map a non-success answer. The sub_code decides when we know it; else the gateway code."""
    if sub_code and sub_code in SUB_CODES:
        return SUB_CODES[sub_code]
    return GATEWAY_CODES.get(code, Outcome.UNKNOWN)


def is_retryable(code: str | None) -> bool:
    """True for a technical code (gateway or sub_code): the answer is not a decision about the buyer."""
    return code in TECHNICAL
