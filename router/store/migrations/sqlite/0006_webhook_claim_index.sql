-- 0006: the claim reads an endpoint's due pending deliveries in (next_attempt_at, seq) order and stops at
-- its LIMIT. 0002's index held only (endpoint_id, next_attempt_at), so rows due at the same instant (a
-- whole fanned-out backlog shares one) had to be sorted on seq in full for every claim. This one gives
-- the order outright; it covers everything the old one served, which goes (one index less to write).

CREATE INDEX webhook_deliveries_claim ON webhook_deliveries (endpoint_id, next_attempt_at, seq) WHERE status = 'pending';
DROP INDEX webhook_deliveries_due;

-- The fan-out reads the events not fanned out yet in commit (rowid) order. 0002's partial index on
-- (payment_id) does not give that order, so the planner scanned the whole outbox, which only grows,
-- on every dispatcher pass. Keyed on the column the partial index keeps NULL, the entries sort by rowid.
CREATE INDEX outbox_fan_out ON outbox (fanned_out_at) WHERE fanned_out_at IS NULL;
DROP INDEX outbox_not_fanned_out;
