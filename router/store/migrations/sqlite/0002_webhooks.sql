-- 0002: merchant webhooks out of the outbox. One delivery per (event, endpoint); every attempt kept.
-- Times are the same fixed-width ISO-8601 UTC text as 0001. Nothing here is ever deleted by the
-- dispatcher: dead letters stay until an operator re-drives them.

ALTER TABLE outbox ADD COLUMN fanned_out_at TEXT;
CREATE INDEX outbox_not_fanned_out ON outbox (payment_id) WHERE fanned_out_at IS NULL;  -- small: only what waits

CREATE TABLE webhook_endpoints (
    id                   TEXT PRIMARY KEY,
    merchant_id          TEXT NOT NULL,
    url                  TEXT NOT NULL,
    state                TEXT NOT NULL DEFAULT 'active',   -- active | paused | disabled
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    failing_since        TEXT,
    paused_until         TEXT,
    disabled_reason      TEXT,
    updated_at           TEXT NOT NULL
);

CREATE TABLE webhook_deliveries (
    event_id         TEXT NOT NULL,
    endpoint_id      TEXT NOT NULL,
    merchant_id      TEXT NOT NULL,
    payment_id       TEXT NOT NULL,
    seq              INTEGER NOT NULL,              -- the outbox commit order: per-payment ordering
    type             TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending', -- pending | delivered | dead
    attempts         INTEGER NOT NULL DEFAULT 0,
    round_attempts   INTEGER NOT NULL DEFAULT 0,    -- since creation or the last re-drive
    created_at       TEXT NOT NULL,
    next_attempt_at  TEXT NOT NULL,
    locked_until     TEXT,
    lease_owner      TEXT,
    delivered_at     TEXT,
    dead_at          TEXT,
    last_status_code INTEGER,
    last_error       TEXT,
    PRIMARY KEY (event_id, endpoint_id)
) WITHOUT ROWID;
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (endpoint_id, next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_order ON webhook_deliveries (endpoint_id, payment_id, seq) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_status_created ON webhook_deliveries (status, created_at);

CREATE TABLE webhook_attempts (
    event_id         TEXT NOT NULL,
    endpoint_id      TEXT NOT NULL,
    attempt          INTEGER NOT NULL,
    started_at       TEXT NOT NULL,
    latency_ms       REAL NOT NULL,
    outcome          TEXT NOT NULL,
    status_code      INTEGER,
    error            TEXT,
    response_snippet TEXT,                          -- at most 512 bytes
    PRIMARY KEY (event_id, endpoint_id, attempt)
) WITHOUT ROWID;
