-- 0001: governance tables (PostgreSQL). Mirrors sqlite/0001_init.sql. Docs are BYTEA (msgspec JSON,
-- byte for byte). The audit chain is append-only: triggers refuse UPDATE, DELETE and TRUNCATE for
-- every role, the owner included (only a superuser disabling triggers gets past them); deployments
-- should additionally run the application as a role that was only granted SELECT, INSERT on it.

CREATE TABLE governance_admins (
    id           TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    doc          BYTEA NOT NULL
);

CREATE TABLE governance_grants (
    id       TEXT PRIMARY KEY,
    admin_id TEXT NOT NULL REFERENCES governance_admins (id),
    role     TEXT NOT NULL,
    doc      BYTEA NOT NULL
);
CREATE INDEX governance_grants_admin ON governance_grants (admin_id);

CREATE TABLE governance_requests (
    id        TEXT PRIMARY KEY,
    kind      TEXT NOT NULL,
    object_id TEXT NOT NULL,
    status    TEXT NOT NULL,
    version   INTEGER NOT NULL,
    doc       BYTEA NOT NULL
);
CREATE UNIQUE INDEX governance_requests_one_open ON governance_requests (kind, object_id)
    WHERE status IN ('pending', 'applying');
CREATE INDEX governance_requests_status ON governance_requests (status, id);

CREATE TABLE governance_totp_used (
    admin_id TEXT NOT NULL,
    step     BIGINT NOT NULL,
    PRIMARY KEY (admin_id, step)
);

CREATE TABLE governance_objects (
    kind      TEXT NOT NULL,
    object_id TEXT NOT NULL,
    version   INTEGER NOT NULL,
    doc       BYTEA NOT NULL,
    PRIMARY KEY (kind, object_id)
);

CREATE TABLE governance_audit (
    seq  BIGINT PRIMARY KEY,
    hash TEXT NOT NULL,
    doc  BYTEA NOT NULL
);

CREATE FUNCTION governance_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'governance_audit is append-only' USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER governance_audit_no_update_delete BEFORE UPDATE OR DELETE ON governance_audit
    FOR EACH ROW EXECUTE FUNCTION governance_audit_append_only();
CREATE TRIGGER governance_audit_no_truncate BEFORE TRUNCATE ON governance_audit
    FOR EACH STATEMENT EXECUTE FUNCTION governance_audit_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON governance_audit FROM PUBLIC;

-- signed heads (external anchors); doc is the msgspec JSON of SignedHead
CREATE TABLE governance_audit_heads (
    seq INTEGER NOT NULL,
    doc BYTEA NOT NULL
);
