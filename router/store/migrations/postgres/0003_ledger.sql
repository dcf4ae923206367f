-- 0003: the double-entry ledger, settlement batches and reconciliation exceptions (PostgreSQL).
-- Mirrors migrations/sqlite/0003_ledger.sql: BIGINT signed minor units (debit > 0), timestamptz, DATE.

CREATE TABLE ledger_entries (
    id          TEXT PRIMARY KEY,
    txn_id      TEXT NOT NULL,
    account     TEXT NOT NULL,
    amount_minor BIGINT NOT NULL,
    currency    TEXT NOT NULL,
    payment_id  TEXT,
    merchant_id TEXT NOT NULL,
    kind        TEXT NOT NULL,
    posted_at   TIMESTAMPTZ NOT NULL
);
CREATE INDEX ledger_entries_account ON ledger_entries (account, currency, posted_at);
CREATE INDEX ledger_entries_merchant ON ledger_entries (merchant_id, posted_at);
CREATE INDEX ledger_entries_payment ON ledger_entries (payment_id);
CREATE INDEX ledger_entries_txn ON ledger_entries (txn_id);

CREATE TABLE settlement_batches (
    batch_key        TEXT PRIMARY KEY,
    merchant_id      TEXT NOT NULL,
    currency         TEXT NOT NULL,
    payout_date      DATE NOT NULL,
    period_start     DATE NOT NULL,
    period_end       DATE NOT NULL,
    gross            BIGINT NOT NULL,
    fees             BIGINT NOT NULL,
    refunds          BIGINT NOT NULL,
    chargebacks      BIGINT NOT NULL,
    reserve_held     BIGINT NOT NULL,
    reserve_released BIGINT NOT NULL,
    net              BIGINT NOT NULL,
    release_date     DATE,
    released_by      TEXT,
    recorded_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX settlement_batches_merchant ON settlement_batches (merchant_id, currency, payout_date);

CREATE TABLE recon_exceptions (
    id                TEXT PRIMARY KEY,
    run_id            TEXT NOT NULL,
    channel           TEXT NOT NULL,
    type              TEXT NOT NULL,
    kind              TEXT NOT NULL,
    reference         TEXT NOT NULL,
    payment_id        TEXT,
    detail            TEXT NOT NULL,
    ours              TEXT,
    theirs            TEXT,
    found_at          TIMESTAMPTZ NOT NULL,
    resolved_at       TIMESTAMPTZ,
    resolution_reason TEXT,
    resolved_by       TEXT
);
CREATE INDEX recon_exceptions_open ON recon_exceptions (channel, resolved_at);
