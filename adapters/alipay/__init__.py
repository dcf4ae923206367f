"""The Alipay open platform gateway (`POST {base_url}/gateway.do`), RSA2-signed. Sans-IO.

`adapter.AlipayAdapter` translates canonical payments into `alipay.trade.precreate` (QR),
`alipay.trade.pay` (barcode, face to face), `alipay.trade.query`, `alipay.trade.refund` and
`alipay.trade.close`, verifies every response and notification with Alipay's public key, and maps
Alipay's gateway `code` / business `sub_code` through `codes`. `wire` holds the wire types, the exact
money conversion and the RSA2 signing helpers.
"""
