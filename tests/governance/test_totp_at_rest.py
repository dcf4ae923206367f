"""TOTP secrets are encrypted at rest (AES-256-GCM, associated data = the admin id), on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pyotp
import pytest

from router.errors import ProblemError
from router.governance.model import GovernanceConfig, RequestStatus, config_problems
from router.governance.service import GovernanceService
from router.governance.store import Commit, GovernanceStore
from router.governance.totp_crypto import TotpCipher, TotpSecretUnreadable, is_encrypted, parse_key
from tests.governance import CONFIG_V1, TOTP_KEY, build_world, make_store

OTHER_KEY = base64.b64encode(b"\x07" * 32).decode()  # base64 works as well as hex


@pytest.fixture(params=["sqlite", "postgres"])
async def store(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[GovernanceStore]:
    s = make_store(request.param, tmp_path, request)
    await s.start()
    yield s
    await s.close()


def payload(weight: int) -> dict[str, str]:
    return {"yaml": CONFIG_V1.replace("weight: 100", f"weight: {weight}")}


async def raw_admin_doc(store: GovernanceStore, admin_id: str) -> bytes:
    async with store._reader() as tx:  # type: ignore[attr-defined]
        row = await tx.fetchone("SELECT doc FROM governance_admins WHERE id = ?", admin_id)
    assert row is not None
    return bytes(row[0])


def b64_forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [
        secret,
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        base64.b32decode(secret).hex(),
    ]


async def test_stored_secret_is_encrypted_and_round_trips(store: GovernanceStore) -> None:
    w = await build_world(store)
    for name, secret in w.secrets.items():
        admin = await store.get_admin(w.id(name))
        assert admin is not None and admin.totp_secret is not None and is_encrypted(admin.totp_secret)
        doc = (await raw_admin_doc(store, w.id(name))).decode()
        for form in b64_forms(secret):
            assert form not in doc and form not in admin.totp_secret
        # round trip: the stored value decrypts to the enrolled secret, and codes from it verify
        assert TotpCipher(parse_key(TOTP_KEY)).open(admin.id, admin.totp_secret) == secret
    r = await w.svc.propose(w.actors["op"], "config", None, payload(90))
    await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
    r = await w.svc.approve(w.actors["rev2"], r.id, w.code("rev2"))
    assert r.status is RequestStatus.APPLIED


async def test_ciphertext_is_bound_to_the_admin(store: GovernanceStore) -> None:
    w = await build_world(store)
    rev1 = await store.get_admin(w.id("rev1"))
    rev2 = await store.get_admin(w.id("rev2"))
    assert rev1 is not None and rev1.totp_secret and rev2 is not None
    cipher = TotpCipher(parse_key(TOTP_KEY))
    with pytest.raises(TotpSecretUnreadable):
        cipher.open(rev2.id, rev1.totp_secret)
    # moved in the database onto another admin: that admin can no longer approve with the stolen secret
    await store.commit(Commit(admins=[msgspec.structs.replace(rev2, totp_secret=rev1.totp_secret)]))
    r = await w.svc.propose(w.actors["op"], "config", None, payload(90))
    await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))
    with pytest.raises(ProblemError) as e:
        await w.svc.approve(w.actors["rev2"], r.id, w.code("rev1"))
    assert (e.value.status, e.value.code) == (500, "totp_secret_unreadable")
    assert (await store.get_request(r.id)).status is RequestStatus.PENDING  # type: ignore[union-attr]


async def test_wrong_key_fails_to_verify_codes_with_a_clear_error(store: GovernanceStore) -> None:
    w = await build_world(store)
    r = await w.svc.propose(w.actors["op"], "config", None, payload(90))
    wrong = GovernanceService(
        store, GovernanceConfig(enabled=True, totp_encryption_key=OTHER_KEY), w.stub.appliers(), clock=w.clock
    )
    with pytest.raises(ProblemError) as e:
        await wrong.approve(w.actors["rev1"], r.id, w.code("rev1"))
    assert (e.value.status, e.value.code) == (500, "totp_secret_unreadable")
    assert "totp_encryption_key" in e.value.title and "does not decrypt" in (e.value.detail or "")
    # no key at all, while the stored secrets are encrypted: refused just as clearly
    nokey = GovernanceService(store, GovernanceConfig(enabled=True), w.stub.appliers(), clock=w.clock)
    with pytest.raises(ProblemError) as e:
        await nokey.approve(w.actors["rev1"], r.id, w.code("rev1"))
    assert e.value.code == "totp_secret_unreadable" and "not set" in (e.value.detail or "")
    entries = await w.svc.audit_entries(w.actors["aud"], 0, 1000)
    assert any(x.action == "request.approve" and x.outcome == "refused"
               and x.detail.get("code") == "totp_secret_unreadable" for x in entries)  # fmt: skip
    # the right key still works, and the refusals consumed no code
    assert (await w.svc.approve(w.actors["rev1"], r.id, w.code("rev1"))).approvals


async def test_legacy_plain_secrets_are_reencrypted(store: GovernanceStore) -> None:
    w = await build_world(store, encrypt=False)  # written before encryption existed
    plain = await store.get_admin(w.id("rev1"))
    assert plain is not None and plain.totp_secret == w.secrets["rev1"]
    keyed = GovernanceService(
        store, GovernanceConfig(enabled=True, totp_encryption_key=TOTP_KEY), w.stub.appliers(), clock=w.clock
    )
    # on next use: the code verifies against the legacy value, which is then replaced
    r = await keyed.propose(w.actors["op"], "config", None, payload(90))
    await keyed.approve(w.actors["rev1"], r.id, w.code("rev1"))
    after = await store.get_admin(w.id("rev1"))
    assert after is not None and after.totp_secret and is_encrypted(after.totp_secret)
    assert w.secrets["rev1"] not in (await raw_admin_doc(store, w.id("rev1"))).decode()
    # on start: every other legacy value
    assert not is_encrypted((await store.get_admin(w.id("rev2"))).totp_secret or "")  # type: ignore[union-attr]
    await keyed.start()
    for admin in await store.list_admins():
        assert admin.totp_secret is None or is_encrypted(admin.totp_secret)
    r = await keyed.approve(w.actors["rev2"], r.id, w.code("rev2"))
    assert r.status is RequestStatus.APPLIED
    assert (await keyed.verify()).ok


async def test_enrolment_and_reenrolment_store_only_ciphertext(store: GovernanceStore) -> None:
    w = await build_world(store)
    actor = w.actors["rev3"]
    w.clock.advance(seconds=30)
    secret, _ = await w.svc.enrol_totp(actor, w.code("rev3"))
    admin = await store.get_admin(actor.id)
    assert admin is not None and admin.totp_secret and is_encrypted(admin.totp_secret)
    assert secret not in (await raw_admin_doc(store, actor.id)).decode() and not admin.totp_confirmed
    await w.svc.confirm_totp(actor, pyotp.TOTP(secret).at(w.clock(), counter_offset=1))
    assert (await store.get_admin(actor.id)).totp_confirmed  # type: ignore[union-attr]


def test_key_format_is_checked() -> None:
    assert len(parse_key(TOTP_KEY)) == 32 and len(parse_key(OTHER_KEY)) == 32
    assert len(parse_key(base64.urlsafe_b64encode(b"\xff" * 32).decode().rstrip("="))) == 32
    for bad in ("", "short", "ab" * 31, base64.b64encode(b"x" * 16).decode()):
        with pytest.raises(ValueError):
            parse_key(bad)
    assert config_problems(GovernanceConfig(enabled=True, totp_encryption_key=TOTP_KEY)) == []
    assert [p for p, _ in config_problems(GovernanceConfig(enabled=True, totp_encryption_key="nope"))] == [
        "$.governance.totp_encryption_key"
    ]
