-- 0001: payments with their attempts and operations, and the transactional outbox (PostgreSQL).
-- Mirrors migrations/sqlite/0001_init.sql. Money is BIGINT minor units; times are timestamptz
-- (microsecond precision, like Python's datetime). `doc` is the authoritative msgspec JSON of the
-- whole Payment, stored as BYTEA so it round-trips byte for byte (JSONB would reorder keys and
-- reject "\u0000" inside strings); the other columns are projections for lookups, the janitor and
-- reporting.

CREATE TABLE payments (
    id                TEXT PRIMARY KEY,
    merchant_id       TEXT NOT NULL,
    merchant_order_id TEXT NOT NULL,
    status            TEXT NOT NULL,
    amount            BIGINT NOT NULL,
    currency          TEXT NOT NULL,
    version           INTEGER NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL,
    doc               BYTEA NOT NULL,
    CONSTRAINT payments_merchant_order UNIQUE (merchant_id, merchant_order_id)
);
CREATE INDEX payments_status_updated_at ON payments (status, updated_at, id);

CREATE TABLE attempts (
    payment_id        TEXT NOT NULL REFERENCES payments (id),
    seq               INTEGER NOT NULL,
    channel           TEXT NOT NULL,
    outcome           TEXT NOT NULL,
    code              TEXT,
    latency_ms        DOUBLE PRECISION NOT NULL,
    channel_key       TEXT NOT NULL,
    channel_reference TEXT,
    started_at        TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (payment_id, seq)
);

CREATE TABLE operations (
    id                TEXT PRIMARY KEY,
    payment_id        TEXT NOT NULL REFERENCES payments (id),
    kind              TEXT NOT NULL,
    amount            BIGINT NOT NULL,
    status            TEXT NOT NULL,
    channel_reference TEXT,
    code              TEXT,
    created_at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX operations_payment_id ON operations (payment_id);

-- `seq` is assigned at INSERT, not at COMMIT: it is creation order, and for one payment (whose writes
-- are serialised by the optimistic version) also commit order. Across payments a smaller seq may
-- commit later, so a relay must not use max(seq) as a high-water mark; it polls undelivered rows.
CREATE TABLE outbox (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    id              TEXT PRIMARY KEY,
    merchant_id     TEXT NOT NULL,
    payment_id      TEXT NOT NULL,
    type            TEXT NOT NULL,
    payload         BYTEA NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    delivered_at    TIMESTAMPTZ,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX outbox_undelivered_next_attempt ON outbox (next_attempt_at) WHERE delivered_at IS NULL;
CREATE INDEX outbox_payment_id ON outbox (payment_id, seq);
