-- 0004: a merchant order may get a new payment after a definitive failure (issue 5, item 2).
-- Mirrors migrations/sqlite/0004_order_attempts.sql. Replaces the constraint payments_merchant_order
-- UNIQUE (merchant_id, merchant_order_id) with
--   * a unique (merchant_id, merchant_order_id, order_attempt): every payment of an order is numbered
--     1, 2, ...; the insert takes max + 1 inside its own transaction (two racing inserts of the same
--     number: one waits for the other and then finds the conflict);
--   * a partial unique (merchant_id, merchant_order_id) over the payments NOT in 'declined' / 'failed':
--     at most one live (non-failed) payment per order, whatever the callers do, even under races.
-- A payment moving INTO 'declined' or 'failed' therefore frees its order for a new attempt; it can never
-- move back out (declined and failed are terminal in router.model.TRANSITIONS), so an update can never
-- bring a second live payment back to an order. Existing payments become attempt 1.

ALTER TABLE payments ADD COLUMN order_attempt INTEGER NOT NULL DEFAULT 1;
ALTER TABLE payments DROP CONSTRAINT payments_merchant_order;
CREATE UNIQUE INDEX payments_order_attempt ON payments (merchant_id, merchant_order_id, order_attempt);
CREATE UNIQUE INDEX payments_live_order ON payments (merchant_id, merchant_order_id)
    WHERE status NOT IN ('declined', 'failed');
