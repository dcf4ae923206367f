"""WeChat Pay API v3 wire types, the out_trade_no derivation, and the signing/encryption primitives.

- Request bodies are msgspec Structs encoded once; the exact bytes encoded are the bytes signed.
- `sign_request` / `authorization_header`: SHA256withRSA (PKCS#1 v1.5) over
  "METHOD\\nPATH_WITH_QUERY\\nTIMESTAMP\\nNONCE\\nBODY\\n", base64 — the same string the wechatpayv3 SDK
  signs. `verify_response`: the platform's signature over "TIMESTAMP\\nNONCE\\nBODY\\n" (raw body bytes).
- `decrypt_resource` / `encrypt_resource`: AEAD_AES_256_GCM with the 32-byte API v3 key; nonce and
  associated data are UTF-8 strings, ciphertext is base64(ciphertext || 16-byte tag).
Nothing here does I/O; everything that can fail on channel input returns None / False instead of raising.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

import msgspec
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from cryptography.x509 import load_pem_x509_certificate

SCHEME = "WECHATPAY2-SHA256-RSA2048"

# WeChat's out_trade_no: 6-32 characters of [0-9A-Za-z_-|*] (documented limit).
_OUT_TRADE_NO = re.compile(r"^[0-9A-Za-z_\-|*]{6,32}$")


def out_trade_no(reference: str) -> str:
    """The channel's order number for our attempt reference, deterministically.

    Our references (`pay_<31 hex>-a<n>`) are longer than WeChat's 32-character limit, so a reference
    that does not fit is replaced by the first 32 hex digits of its SHA-256 (128 bits: collisions are
    not a practical concern). Deterministic, so a status query after a timeout finds the order; the
    reference itself travels in `attach` and comes back in queries and callbacks."""
    if _OUT_TRADE_NO.fullmatch(reference):
        return reference
    return hashlib.sha256(reference.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- request bodies


class Amount(msgspec.Struct, frozen=True, kw_only=True):
    total: int  # fen
    currency: str = "CNY"


class Payer(msgspec.Struct, frozen=True, kw_only=True):
    openid: str


class PrepayRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    appid: str
    mchid: str
    description: str
    out_trade_no: str
    notify_url: str
    amount: Amount
    attach: str | None = None
    payer: Payer | None = None


class RefundAmount(msgspec.Struct, frozen=True, kw_only=True):
    refund: int
    total: int
    currency: str = "CNY"


class RefundRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    out_trade_no: str
    out_refund_no: str
    amount: RefundAmount
    notify_url: str | None = None


class CloseRequest(msgspec.Struct, frozen=True, kw_only=True):
    mchid: str


# --------------------------------------------------------------------------- response bodies


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    message: str = ""


class NativeResponse(msgspec.Struct, frozen=True, kw_only=True):
    code_url: str


class JsapiResponse(msgspec.Struct, frozen=True, kw_only=True):
    prepay_id: str


class TransactionAmount(msgspec.Struct, frozen=True, kw_only=True):
    total: int | None = None
    payer_total: int | None = None
    currency: str | None = None


class Transaction(msgspec.Struct, frozen=True, kw_only=True):
    """A queried or notified transaction (only the fields we act on are required)."""

    mchid: str
    out_trade_no: str
    trade_state: str
    appid: str | None = None
    transaction_id: str | None = None
    trade_state_desc: str | None = None
    attach: str | None = None
    amount: TransactionAmount | None = None


class Refund(msgspec.Struct, frozen=True, kw_only=True):
    refund_id: str
    out_refund_no: str
    status: str
    out_trade_no: str | None = None


class RefundNotice(msgspec.Struct, frozen=True, kw_only=True):
    mchid: str
    out_trade_no: str
    out_refund_no: str
    refund_status: str
    refund_id: str | None = None
    transaction_id: str | None = None


class Resource(msgspec.Struct, frozen=True, kw_only=True):
    algorithm: str
    ciphertext: str
    nonce: str
    associated_data: str = ""
    original_type: str | None = None


class Notification(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    event_type: str
    resource_type: str
    resource: Resource
    create_time: str | None = None
    summary: str | None = None


# --------------------------------------------------------------------------- keys


def _pem(text: str, kind: str) -> bytes:
    # config values often carry PEMs with literal "\n" escapes, or just the base64 body
    text = text.strip().replace("\\n", "\n")
    if not text.startswith("-----BEGIN"):
        text = f"-----BEGIN {kind}-----\n{text}\n-----END {kind}-----"
    return text.encode()


def load_private_key(text: str) -> rsa.RSAPrivateKey:
    key = load_pem_private_key(_pem(text, "PRIVATE KEY"), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("merchant_private_key is not an RSA private key")
    return key


def load_public_key(text: str) -> rsa.RSAPublicKey:
    """A PEM public key, or a platform certificate PEM (its public key is taken)."""
    data = _pem(text, "PUBLIC KEY")
    key = (
        load_pem_x509_certificate(data).public_key()
        if b"BEGIN CERTIFICATE" in data
        else load_pem_public_key(data)
    )
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("platform_public_key is not an RSA public key")
    return key


# --------------------------------------------------------------------------- signatures


def rsa_sign(key: rsa.RSAPrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), SHA256())).decode()


def rsa_verify(key: rsa.RSAPublicKey, message: bytes, signature: str) -> bool:
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, message, padding.PKCS1v15(), SHA256())
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True


def request_message(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return f"{method}\n{path}\n{timestamp}\n{nonce}\n".encode() + body + b"\n"


def response_message(timestamp: str, nonce: str, body: bytes) -> bytes:
    return f"{timestamp}\n{nonce}\n".encode() + body + b"\n"


def authorization_header(
    key: rsa.RSAPrivateKey, *, mchid: str, serial_no: str, method: str, path: str, timestamp: str, nonce: str, body: bytes
) -> str:
    signature = rsa_sign(key, request_message(method, path, timestamp, nonce, body))
    # field order as the SDK and WeChat's docs write it (the server does not care; golden tests do)
    return (
        f'{SCHEME} mchid="{mchid}",nonce_str="{nonce}",signature="{signature}",'
        f'timestamp="{timestamp}",serial_no="{serial_no}"'
    )


def parse_authorization(header: str) -> dict[str, str] | None:
    """The fields of an Authorization header, or None when it is not a WeChat Pay v3 one."""
    scheme, _, rest = header.partition(" ")
    if scheme != SCHEME:
        return None
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or len(value) < 2 or not (value.startswith('"') and value.endswith('"')):
            return None
        fields[name] = value[1:-1]
    return fields


def jsapi_pay_sign(key: rsa.RSAPrivateKey, app_id: str, timestamp: str, nonce: str, package: str) -> str:
    """paySign for `wx.requestPayment` / WeixinJSBridge: RSA over "appId\\ntimeStamp\\nnonceStr\\npackage\\n"."""
    return rsa_sign(key, f"{app_id}\n{timestamp}\n{nonce}\n{package}\n".encode())


# --------------------------------------------------------------------------- AEAD_AES_256_GCM


def decrypt_resource(apiv3_key: bytes, nonce: str, associated_data: str, ciphertext: str) -> bytes | None:
    try:
        data = base64.b64decode(ciphertext, validate=True)
        return AESGCM(apiv3_key).decrypt(nonce.encode(), data, associated_data.encode())
    except (binascii.Error, ValueError, InvalidTag):
        return None


def encrypt_resource(apiv3_key: bytes, nonce: str, associated_data: str, plaintext: bytes) -> str:
    """What WeChat does to a notification resource (used by the protocol fake and the tests)."""
    return base64.b64encode(AESGCM(apiv3_key).encrypt(nonce.encode(), plaintext, associated_data.encode())).decode()
