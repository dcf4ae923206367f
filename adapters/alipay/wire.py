"""Alipay wire types and conversions: money, RSA2 signing, and the signed-substring extraction.

- Money: Alipay wants major units as a decimal string ("10.99"); `major_units` converts minor units
  with integer arithmetic only, so no float ever rounds an amount.
- RSA2 is SHA256withRSA (PKCS#1 v1.5), base64. A request is signed over its non-empty parameters
  except `sign`, sorted by key and joined `k=v&k2=v2` with raw (not url-encoded) values; a notification
  over all its parameters except `sign` and `sign_type`.
- A response is signed over the exact bytes of the `<method>_response` JSON value as Alipay sent them;
  `signed_member` finds that substring by walking the top-level object (string-aware, so braces inside
  strings cannot shift it) instead of re-serializing, which would change the bytes.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

GATEWAY_PATH = "/gateway.do"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded; charset=utf-8"
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"

# Alipay's domestic trade API is priced in CNY; refunds carry no exponent in `ChannelOperation`, so the
# exponent comes from here and any other currency is refused rather than guessed.
EXPONENTS: Mapping[str, int] = {"CNY": 2}


# --------------------------------------------------------------------------- response bodies


class TradeResponse(msgspec.Struct, kw_only=True):
    """The fields we read from any `alipay_trade_*_response` (or `error_response`) object."""

    code: str
    msg: str | None = None
    sub_code: str | None = None
    sub_msg: str | None = None
    out_trade_no: str | None = None
    trade_no: str | None = None
    trade_status: str | None = None
    qr_code: str | None = None
    total_amount: str | None = None
    refund_fee: str | None = None
    fund_change: str | None = None


class Envelope(msgspec.Struct):
    """Only to check the whole body is one JSON object with a string `sign` (or none)."""

    sign: str | None = None


trade_response_decoder = msgspec.json.Decoder(TradeResponse)
envelope_decoder = msgspec.json.Decoder(Envelope)


# --------------------------------------------------------------------------- money


def major_units(amount: int, exponent: int) -> str:
    """Minor units -> Alipay's decimal string, exactly: (1099, 2) -> "10.99", (5, 2) -> "0.05"."""
    if amount <= 0 or exponent < 0:
        raise ValueError("Alipay amounts are positive with a non-negative exponent")
    whole, frac = divmod(amount, 10**exponent)
    return f"{whole}.{frac:0{exponent}d}" if exponent else str(whole)


# --------------------------------------------------------------------------- keys and signatures


def _pem(text: str, kind: str) -> bytes:
    # Keys arrive from config/env: accept real newlines, "\n"-escaped ones, or a bare base64 body as
    # Alipay's console hands it out.
    text = text.strip().replace("\\n", "\n")
    if "-----BEGIN" not in text:
        body = "".join(text.split())
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        text = f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----"
    return text.encode()


def load_private_key(text: str) -> rsa.RSAPrivateKey:
    """PKCS#1 ("RSA PRIVATE KEY") or PKCS#8 ("PRIVATE KEY") PEM, or a bare PKCS#8 base64 body."""
    key = serialization.load_pem_private_key(_pem(text, "PRIVATE KEY"), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the Alipay app private key must be an RSA key")
    return key


def load_public_key(text: str) -> rsa.RSAPublicKey:
    """SubjectPublicKeyInfo ("PUBLIC KEY") PEM, PKCS#1 ("RSA PUBLIC KEY"), or a bare base64 body."""
    key = serialization.load_pem_public_key(_pem(text, "PUBLIC KEY"))
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the Alipay public key must be an RSA key")
    return key


def request_signing_string(params: Mapping[str, str]) -> str:
    """Request rule: non-empty params except `sign`, sorted by key, raw values."""
    return "&".join(f"{k}={params[k]}" for k in sorted(params) if k != "sign" and params[k] != "")


def notify_signing_string(params: Mapping[str, str]) -> str:
    """Notification rule: every param except `sign` and `sign_type`, sorted by key, raw values."""
    return "&".join(f"{k}={params[k]}" for k in sorted(params) if k not in ("sign", "sign_type"))


def rsa2_sign(key: rsa.RSAPrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode("ascii")


def rsa2_verify(key: rsa.RSAPublicKey, message: bytes, signature: str) -> bool:
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    try:
        key.verify(raw, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


# --------------------------------------------------------------------------- signed substring

_WS = b" \t\r\n"


def _skip_ws(raw: bytes, i: int) -> int:
    while i < len(raw) and raw[i] in _WS:
        i += 1
    return i


def _string_end(raw: bytes, i: int) -> int:
    """`raw[i]` is an opening quote; return the index just past the closing quote."""
    i += 1
    while i < len(raw):
        c = raw[i]
        if c == 0x5C:  # backslash: the next byte is escaped, whatever it is
            i += 2
            continue
        if c == 0x22:
            return i + 1
        i += 1
    raise ValueError("unterminated string")


def _value_end(raw: bytes, i: int) -> int:
    """Return the index just past the JSON value starting at `raw[i]`."""
    if i >= len(raw):
        raise ValueError("missing value")
    c = raw[i]
    if c == 0x22:
        return _string_end(raw, i)
    if c in (0x7B, 0x5B):  # { or [: count brackets, skipping strings whole
        depth = 0
        while i < len(raw):
            c = raw[i]
            if c == 0x22:
                i = _string_end(raw, i)
                continue
            if c in (0x7B, 0x5B):
                depth += 1
            elif c in (0x7D, 0x5D):
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        raise ValueError("unterminated container")
    start = i
    while i < len(raw) and raw[i] not in b",}] \t\r\n":
        i += 1
    if i == start:
        raise ValueError("empty value")
    return i


def top_level_members(raw: bytes) -> dict[str, bytes]:
    """The raw bytes of each member value of the top-level JSON object, as sent.

    Raises ValueError on anything that is not one well-formed object (the caller maps that to
    OutcomeUnknown). Duplicate keys are refused: which one would Alipay have signed?
    """
    msgspec.json.decode(raw)  # full validation first: the walk below may then trust the grammar
    i = _skip_ws(raw, 0)
    if i >= len(raw) or raw[i] != 0x7B:
        raise ValueError("not a JSON object")
    members: dict[str, bytes] = {}
    i = _skip_ws(raw, i + 1)
    if i < len(raw) and raw[i] == 0x7D:
        return members
    while True:
        end = _string_end(raw, i)
        key = msgspec.json.decode(raw[i:end], type=str)
        i = _skip_ws(raw, end)
        i = _skip_ws(raw, i + 1)  # the colon
        end = _value_end(raw, i)
        if key in members:
            raise ValueError(f"duplicate member {key!r}")
        members[key] = raw[i:end]
        i = _skip_ws(raw, end)
        if raw[i] == 0x7D:
            return members
        i = _skip_ws(raw, i + 1)  # the comma
