"""WeChat Pay API v3 code tables: error `code` -> outcome, `trade_state` -> outcome, refund status -> outcome.

`Outcome.UNAVAILABLE` in a table means "raise ChannelUnavailable" (WeChat did not process the request),
`Outcome.UNKNOWN` means "raise OutcomeUnknown" (it may have acted; resolve by a signed status query),
`Outcome.NOT_CHARGED` means the order does not exist. An error code not in the table is a hard decline
(the safe side: no failover to a channel that may double-charge), except that any 5xx is unknown.
"""

from __future__ import annotations

from router.model import Outcome

ERRORS: dict[str, Outcome] = {
    # WeChat's side failed mid-way: the order may exist; query before anything else
    "SYSTEM_ERROR": Outcome.UNKNOWN,  # 500
    "BANK_ERROR": Outcome.UNKNOWN,  # 500
    # answers that say "something already happened to this out_trade_no": only a signed query can tell
    # what, and an unsigned error body must never approve a payment
    "ORDERPAID": Outcome.UNKNOWN,  # 403 the order is already paid
    "OUT_TRADE_NO_USED": Outcome.UNKNOWN,  # 403 same out_trade_no, different parameters
    # not processed at all: retry, then fail over; counts against the breaker
    "FREQUENCY_LIMITED": Outcome.UNAVAILABLE,  # 429
    "SIGN_ERROR": Outcome.UNAVAILABLE,  # 401 our key/serial is wrong (config), not the customer
    "MCH_NOT_EXISTS": Outcome.UNAVAILABLE,  # 400 mchid unknown (config)
    "APPID_MCHID_NOT_MATCH": Outcome.UNAVAILABLE,  # 400 appid not bound to mchid (config)
    "NO_AUTH": Outcome.UNAVAILABLE,  # 403 the merchant lacks this product (config)
    # a request WeChat refused to process: nothing charged, another channel may take it
    "PARAM_ERROR": Outcome.SOFT_DECLINE,  # 400
    "INVALID_REQUEST": Outcome.SOFT_DECLINE,  # 400
    "OPENID_MISMATCH": Outcome.SOFT_DECLINE,  # 400 the openid belongs to another appid
    "ORDER_CLOSED": Outcome.SOFT_DECLINE,  # 400 this attempt's order is closed: it can never be paid
    # the customer's or merchant's account: another channel would not help
    "NOTENOUGH": Outcome.HARD_DECLINE,  # 403 balance insufficient
    "NOT_ENOUGH": Outcome.HARD_DECLINE,  # 403 refund: merchant balance insufficient
    "ACCOUNTERROR": Outcome.HARD_DECLINE,  # 403 account abnormal
    "USER_ACCOUNT_ABNORMAL": Outcome.HARD_DECLINE,  # 403 refund: payer account abnormal
    "RULELIMIT": Outcome.HARD_DECLINE,  # 403 business rule limit
    "TRADE_ERROR": Outcome.HARD_DECLINE,  # 403 trade failed for a business reason
    "REQUEST_BLOCKED": Outcome.HARD_DECLINE,  # 403 blocked by risk control
    # the order is not there (status query: never charged)
    "ORDER_NOT_EXIST": Outcome.NOT_CHARGED,  # 404
    "ORDERNOTEXIST": Outcome.NOT_CHARGED,  # 404 (older spelling)
    "RESOURCE_NOT_EXISTS": Outcome.NOT_CHARGED,  # 404
}

# technical codes where asking again (same parameters, same out_trade_no) is the documented remedy
RETRYABLE = frozenset({"SYSTEM_ERROR", "BANK_ERROR", "FREQUENCY_LIMITED"})

TRADE_STATES: dict[str, Outcome] = {
    "SUCCESS": Outcome.APPROVED,  # paid (captured: WeChat has no separate capture)
    "REFUND": Outcome.APPROVED,  # paid, then (partly) refunded
    "NOTPAY": Outcome.REQUIRES_ACTION,  # waiting for the customer to scan / confirm
    "USERPAYING": Outcome.PENDING,  # the customer is entering the password
    "ACCEPT": Outcome.PENDING,  # accepted, being debited
    "CLOSED": Outcome.HARD_DECLINE,  # closed unpaid (by us or by timeout)
    "REVOKED": Outcome.HARD_DECLINE,  # revoked (payment-code flows)
    "PAYERROR": Outcome.SOFT_DECLINE,  # failed for another reason (e.g. the bank): another channel may do
}

REFUND_STATES: dict[str, Outcome] = {
    "SUCCESS": Outcome.APPROVED,
    "PROCESSING": Outcome.PENDING,
    "ABNORMAL": Outcome.PENDING,  # the money left us but could not reach the payer: manual handling
    "CLOSED": Outcome.HARD_DECLINE,
}


def classify(code: str | None, http_status: int) -> Outcome:
    """The outcome for an error answer; unknown codes are hard declines, any 5xx is unknown."""
    if http_status >= 500:
        return Outcome.UNKNOWN
    if code in ERRORS:
        return ERRORS[code]
    if http_status in (401, 429):
        return Outcome.UNAVAILABLE
    if http_status == 404:
        return Outcome.UNKNOWN  # a 404 without a known code may be a wrong path or a proxy, not "no order"
    return Outcome.HARD_DECLINE


def is_retryable(code: str | None) -> bool:
    return code in RETRYABLE
