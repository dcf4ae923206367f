-- 0006: mirrors migrations/sqlite/0006_webhook_claim_index.sql. The claim reads an endpoint's due
-- pending deliveries in (next_attempt_at, seq) order under FOR UPDATE SKIP LOCKED and stops at its
-- LIMIT; with seq in the index no sort of every due row is needed. Built inside the migration's
-- transaction (CONCURRENTLY cannot run there): the table is locked against writes while it builds.

CREATE INDEX webhook_deliveries_claim ON webhook_deliveries (endpoint_id, next_attempt_at, seq) WHERE status = 'pending';
DROP INDEX webhook_deliveries_due;
