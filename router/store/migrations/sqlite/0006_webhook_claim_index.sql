-- 0006: the claim reads an endpoint's due pending deliveries in (next_attempt_at, seq) order and stops at
-- its LIMIT. 0002's index held only (endpoint_id, next_attempt_at), so rows due at the same instant (a
-- whole fanned-out backlog shares one) had to be sorted on seq in full for every claim. This one gives
-- the order outright; it covers everything the old one served, which goes (one index less to write).

CREATE INDEX webhook_deliveries_claim ON webhook_deliveries (endpoint_id, next_attempt_at, seq) WHERE status = 'pending';
DROP INDEX webhook_deliveries_due;
