"""Adapter for WeChat Pay API v3 (Native and JSAPI payments, query, close, domestic refunds). Sans-IO.

Contract: requests carry a `WECHATPAY2-SHA256-RSA2048` Authorization signed with the merchant key;
every 2xx response and every callback must carry a `Wechatpay-*` signature by the configured platform
key, otherwise the answer is `OutcomeUnknown` (calls) or `CallbackRejected` (notifications) — never
approved. Callback resources are AES-256-GCM encrypted with the API v3 key. Capture is not supported
(WeChat Pay charges at once); void closes an unpaid order.
"""
