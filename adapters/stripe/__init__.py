"""The Stripe channel: PaymentIntents API pinned to `Stripe-Version: 2023-08-16`. Sans-IO.

`adapter.StripeAdapter` translates canonical requests into form-encoded Stripe calls and Stripe's
answers (PaymentIntent, Refund, error objects, signed webhook events) into `ChannelResult`s;
`wire` holds the wire types, the form encoder and the `Stripe-Signature` helpers; `codes` is the
decline-code table.
"""
