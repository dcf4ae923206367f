-- 0002: merchant webhooks out of the outbox (PostgreSQL). Mirrors migrations/sqlite/0002_webhooks.sql.
-- No foreign keys to outbox: the test fixtures TRUNCATE outbox on its own, and the dispatcher never
-- deletes anything anyway.

ALTER TABLE outbox ADD COLUMN fanned_out_at TIMESTAMPTZ;
CREATE INDEX outbox_not_fanned_out ON outbox (seq) WHERE fanned_out_at IS NULL;

CREATE TABLE webhook_endpoints (
    id                   TEXT PRIMARY KEY,
    merchant_id          TEXT NOT NULL,
    url                  TEXT NOT NULL,
    state                TEXT NOT NULL DEFAULT 'active',
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    failing_since        TIMESTAMPTZ,
    paused_until         TIMESTAMPTZ,
    disabled_reason      TEXT,
    updated_at           TIMESTAMPTZ NOT NULL
);

CREATE TABLE webhook_deliveries (
    event_id         TEXT NOT NULL,
    endpoint_id      TEXT NOT NULL,
    merchant_id      TEXT NOT NULL,
    payment_id       TEXT NOT NULL,
    seq              BIGINT NOT NULL,
    type             TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending',
    attempts         INTEGER NOT NULL DEFAULT 0,
    round_attempts   INTEGER NOT NULL DEFAULT 0,
    created_at       TIMESTAMPTZ NOT NULL,
    next_attempt_at  TIMESTAMPTZ NOT NULL,
    locked_until     TIMESTAMPTZ,
    lease_owner      TEXT,
    delivered_at     TIMESTAMPTZ,
    dead_at          TIMESTAMPTZ,
    last_status_code INTEGER,
    last_error       TEXT,
    PRIMARY KEY (event_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (endpoint_id, next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_order ON webhook_deliveries (endpoint_id, payment_id, seq) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_status_created ON webhook_deliveries (status, created_at);

CREATE TABLE webhook_attempts (
    event_id         TEXT NOT NULL,
    endpoint_id      TEXT NOT NULL,
    attempt          INTEGER NOT NULL,
    started_at       TIMESTAMPTZ NOT NULL,
    latency_ms       DOUBLE PRECISION NOT NULL,
    outcome          TEXT NOT NULL,
    status_code      INTEGER,
    error            TEXT,
    response_snippet TEXT,
    PRIMARY KEY (event_id, endpoint_id, attempt)
);
