"""The Adyen Checkout API v71 channel (cards). Sans-IO: `adapter` translates, `wire` holds the wire
types, encoders and the notification HMAC, `codes` the refusal-reason table.

Adyen has no payment status query in Checkout v71: the final word on a payment or a modification comes
by (HMAC-signed) notification, see `adapter`.
"""
