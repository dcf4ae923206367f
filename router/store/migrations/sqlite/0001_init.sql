-- 0001: payments with their attempts and operations, and the transactional outbox.
-- Money is INTEGER minor units. Times are fixed-width ISO-8601 UTC text
-- (YYYY-MM-DDTHH:MM:SS.ffffffZ), so text order is time order and range scans use the indexes.
-- `doc` is the authoritative msgspec JSON of the whole Payment; the other columns are projections
-- for lookups, the janitor and reporting.

CREATE TABLE payments (
    id                TEXT PRIMARY KEY,
    merchant_id       TEXT NOT NULL,
    merchant_order_id TEXT NOT NULL,
    status            TEXT NOT NULL,
    amount            INTEGER NOT NULL,
    currency          TEXT NOT NULL,
    version           INTEGER NOT NULL,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    doc               BLOB NOT NULL,
    UNIQUE (merchant_id, merchant_order_id)
);
CREATE INDEX payments_status_updated_at ON payments (status, updated_at);

CREATE TABLE attempts (
    payment_id        TEXT NOT NULL,
    seq               INTEGER NOT NULL,
    channel           TEXT NOT NULL,
    outcome           TEXT NOT NULL,
    code              TEXT,
    latency_ms        REAL NOT NULL,
    channel_key       TEXT NOT NULL,
    channel_reference TEXT,
    started_at        TEXT NOT NULL,
    PRIMARY KEY (payment_id, seq)
) WITHOUT ROWID;

CREATE TABLE operations (
    id                TEXT PRIMARY KEY,
    payment_id        TEXT NOT NULL,
    kind              TEXT NOT NULL,
    amount            INTEGER NOT NULL,
    status            TEXT NOT NULL,
    channel_reference TEXT,
    code              TEXT,
    created_at        TEXT NOT NULL
);
CREATE INDEX operations_payment_id ON operations (payment_id);

-- The implicit rowid gives commit order, which is what outbox_events() and the relay follow.
CREATE TABLE outbox (
    id              TEXT PRIMARY KEY,
    merchant_id     TEXT NOT NULL,
    payment_id      TEXT NOT NULL,
    type            TEXT NOT NULL,
    payload         BLOB NOT NULL,
    created_at      TEXT NOT NULL,
    delivered_at    TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL
);
CREATE INDEX outbox_delivered_next_attempt ON outbox (delivered_at, next_attempt_at);
CREATE INDEX outbox_payment_id ON outbox (payment_id);
