-- 0003: the double-entry ledger, settlement batches and reconciliation exceptions.
-- Amounts are INTEGER minor units, signed (debit > 0). Times are the fixed-width UTC text of 0001;
-- dates are YYYY-MM-DD text. Column names avoid `amount`/`created_at`: `amount_minor` is signed,
-- `posted_at` is the posting time. Ledger entries are written in the same transaction as the payment
-- change they describe; nothing here is ever updated except a batch's `released_by` and an
-- exception's resolution.

CREATE TABLE ledger_entries (
    id          TEXT PRIMARY KEY,
    txn_id      TEXT NOT NULL,
    account     TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    currency    TEXT NOT NULL,
    payment_id  TEXT,
    merchant_id TEXT NOT NULL,
    kind        TEXT NOT NULL,
    posted_at   TEXT NOT NULL
);
CREATE INDEX ledger_entries_account ON ledger_entries (account, currency, posted_at);
CREATE INDEX ledger_entries_merchant ON ledger_entries (merchant_id, posted_at);
CREATE INDEX ledger_entries_payment ON ledger_entries (payment_id);
CREATE INDEX ledger_entries_txn ON ledger_entries (txn_id);

CREATE TABLE settlement_batches (
    batch_key        TEXT PRIMARY KEY,   -- merchant|currency|payout date: running twice adds nothing
    merchant_id      TEXT NOT NULL,
    currency         TEXT NOT NULL,
    payout_date      TEXT NOT NULL,
    period_start     TEXT NOT NULL,
    period_end       TEXT NOT NULL,
    gross            INTEGER NOT NULL,
    fees             INTEGER NOT NULL,
    refunds          INTEGER NOT NULL,
    chargebacks      INTEGER NOT NULL,
    reserve_held     INTEGER NOT NULL,
    reserve_released INTEGER NOT NULL,
    net              INTEGER NOT NULL,
    release_date     TEXT,               -- when reserve_held becomes releasable
    released_by      TEXT,               -- the batch that released it
    recorded_at      TEXT NOT NULL
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
    found_at          TEXT NOT NULL,
    resolved_at       TEXT,
    resolution_reason TEXT,
    resolved_by       TEXT
);
CREATE INDEX recon_exceptions_open ON recon_exceptions (channel, resolved_at);
