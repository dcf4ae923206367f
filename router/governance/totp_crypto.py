"""TOTP secrets at rest: AES-256-GCM under `governance.totp_encryption_key`, bound to the admin id.

Stored form (in the admin row's `totp_secret`, no schema change): ``v1:`` + base64(nonce(12) || ciphertext||tag).
The associated data is the admin id, so a ciphertext copied onto another admin does not decrypt.

The key is 32 bytes written as 64 hex characters or as base64 (standard or URL-safe, padding
optional); put it in the environment and reference it as ``${ENV}`` in the config.

A value without the ``v1:`` prefix is a legacy plain base32 secret (written before encryption, or
while no key was configured). With a key configured it is still accepted, only to be re-encrypted
at once (on service start, and on its next use).
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "v1:"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_NONCE = 12


class TotpSecretUnreadable(Exception):
    """A stored TOTP secret cannot be decrypted (wrong key, no key, another admin's ciphertext, corrupt)."""


def parse_key(text: str) -> bytes:
    """32 key bytes from 64 hex characters or base64; ValueError otherwise."""
    s = text.strip()
    if _HEX64.fullmatch(s):
        return bytes.fromhex(s)
    try:
        raw = base64.b64decode(s.replace("-", "+").replace("_", "/") + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError("must be 32 bytes: 64 hex characters or base64 (44 characters)")
    return raw


def is_encrypted(stored: str) -> bool:
    return stored.startswith(PREFIX)


class TotpCipher:
    """Encrypts and decrypts TOTP secrets; with no key, secrets stay plain (legacy mode)."""

    def __init__(self, key: bytes | None) -> None:
        if key is not None and len(key) != 32:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._aead = AESGCM(key) if key is not None else None

    @property
    def enabled(self) -> bool:
        return self._aead is not None

    def seal(self, admin_id: str, secret: str) -> str:
        """The form to store: encrypted when a key is configured, else the plain secret."""
        if self._aead is None:
            return secret
        nonce = os.urandom(_NONCE)
        ct = self._aead.encrypt(nonce, secret.encode(), admin_id.encode())
        return PREFIX + base64.b64encode(nonce + ct).decode()

    def open(self, admin_id: str, stored: str) -> str:
        """The plain base32 secret. Legacy plain values are returned as they are."""
        if not is_encrypted(stored):
            return stored
        if self._aead is None:
            raise TotpSecretUnreadable(
                "the TOTP secret is encrypted but governance.totp_encryption_key is not set"
            )
        try:
            blob = base64.b64decode(stored[len(PREFIX) :], validate=True)
            if len(blob) <= _NONCE:
                raise ValueError("too short")
            return self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], admin_id.encode()).decode()
        except (InvalidTag, binascii.Error, ValueError, UnicodeDecodeError):
            raise TotpSecretUnreadable(
                f"the TOTP secret of admin {admin_id} does not decrypt with governance.totp_encryption_key "
                "(a different key, or a value moved from another admin)"
            ) from None
