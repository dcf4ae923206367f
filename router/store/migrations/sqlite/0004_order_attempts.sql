-- 0004: a merchant order may get a new payment after a definitive failure (issue 5, item 2).
-- Replaces UNIQUE (merchant_id, merchant_order_id) with
--   * a unique (merchant_id, merchant_order_id, order_attempt): every payment of an order is numbered
--     1, 2, ...; the insert takes max + 1 inside its own write transaction;
--   * a partial unique (merchant_id, merchant_order_id) over the payments NOT in 'declined' / 'failed':
--     at most one live (non-failed) payment per order, whatever the callers do, even under races.
-- A payment moving INTO 'declined' or 'failed' therefore frees its order for a new attempt; it can never
-- move back out (declined and failed are terminal in router.model.TRANSITIONS), so an update can never
-- bring a second live payment back to an order. Existing payments become attempt 1.
-- SQLite cannot drop an inline UNIQUE constraint: the table is rebuilt (same columns, data, indexes).
-- No other table references payments, and no trigger or view uses it.

CREATE TABLE payments_0004 (
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
    order_attempt     INTEGER NOT NULL DEFAULT 1
);
INSERT INTO payments_0004 (id, merchant_id, merchant_order_id, status, amount, currency, version, created_at,
    updated_at, doc, order_attempt)
    SELECT id, merchant_id, merchant_order_id, status, amount, currency, version, created_at, updated_at, doc, 1
    FROM payments ORDER BY rowid;
DROP TABLE payments;
ALTER TABLE payments_0004 RENAME TO payments;
CREATE INDEX payments_status_updated_at ON payments (status, updated_at);
CREATE UNIQUE INDEX payments_order_attempt ON payments (merchant_id, merchant_order_id, order_attempt);
CREATE UNIQUE INDEX payments_live_order ON payments (merchant_id, merchant_order_id)
    WHERE status NOT IN ('declined', 'failed');
