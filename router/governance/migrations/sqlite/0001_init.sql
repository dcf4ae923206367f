-- 0001: governance tables (SQLite). Kept apart from the payment store's migrations and tracked in
-- governance_schema_version. Each row's authoritative state is `doc` (msgspec JSON of the model
-- struct); the other columns are projections for lookups and constraints.

CREATE TABLE governance_admins (
    id           TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    doc          BLOB NOT NULL
);

CREATE TABLE governance_grants (
    id       TEXT PRIMARY KEY,
    admin_id TEXT NOT NULL REFERENCES governance_admins (id),
    role     TEXT NOT NULL,
    doc      BLOB NOT NULL
);
CREATE INDEX governance_grants_admin ON governance_grants (admin_id);

CREATE TABLE governance_requests (
    id        TEXT PRIMARY KEY,
    kind      TEXT NOT NULL,
    object_id TEXT NOT NULL,
    status    TEXT NOT NULL,
    version   INTEGER NOT NULL,
    doc       BLOB NOT NULL
);
-- one open request per governed object
CREATE UNIQUE INDEX governance_requests_one_open ON governance_requests (kind, object_id)
    WHERE status IN ('pending', 'applying');
CREATE INDEX governance_requests_status ON governance_requests (status, id);

-- TOTP replay protection: a (admin, time step) is accepted once
CREATE TABLE governance_totp_used (
    admin_id TEXT NOT NULL,
    step     INTEGER NOT NULL,
    PRIMARY KEY (admin_id, step)
);

-- governed objects kept here (merchants, grant sets, the auto-approval policy), with their versions
CREATE TABLE governance_objects (
    kind      TEXT NOT NULL,
    object_id TEXT NOT NULL,
    version   INTEGER NOT NULL,
    doc       BLOB NOT NULL,
    PRIMARY KEY (kind, object_id)
);

-- the hash chain: doc is the canonical JSON the hash covers
CREATE TABLE governance_audit (
    seq  INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    doc  BLOB NOT NULL
);
CREATE TRIGGER governance_audit_no_update BEFORE UPDATE ON governance_audit
BEGIN
    SELECT RAISE(ABORT, 'governance_audit is append-only');
END;
CREATE TRIGGER governance_audit_no_delete BEFORE DELETE ON governance_audit
BEGIN
    SELECT RAISE(ABORT, 'governance_audit is append-only');
END;

-- signed heads (external anchors); doc is the msgspec JSON of SignedHead
CREATE TABLE governance_audit_heads (
    seq INTEGER NOT NULL,
    doc BLOB NOT NULL
);
