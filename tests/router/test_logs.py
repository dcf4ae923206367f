from __future__ import annotations

import io
import logging

from router.logs import JsonFormatter, mask_pans, request_id


def test_mask_pans_keeps_first6_last4_and_leaves_other_numbers() -> None:
    assert mask_pans("card 4242424242424242 ok") == "card 424242******4242 ok"
    assert mask_pans("4242 4242 4242 4242") == "424242******4242"
    assert mask_pans("order 1234567890123") == "order 1234567890123"  # not Luhn-valid


def test_json_formatter_redacts_secret_fields_and_carries_request_id() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("t.logs")
    logger.addHandler(handler)
    logger.propagate = False
    token = request_id.set("req_1")
    try:
        logger.warning("hello", extra={"api_key": "sk_live_secret", "note": "pan 5555555555554444"})
    finally:
        request_id.reset(token)
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "sk_live_secret" not in out and '"api_key":"[redacted]"' in out
    assert "5555555555554444" not in out and "555555******4444" in out
    assert '"request_id":"req_1"' in out
