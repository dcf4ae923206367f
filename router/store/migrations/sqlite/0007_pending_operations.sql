-- 0007: the janitor looks for operations (captures, voids, refunds) whose outcome the channel has not
-- told yet; few rows are ever pending, so a partial index keeps that lookup small.
CREATE INDEX operations_pending ON operations (created_at, payment_id) WHERE status = 'pending';
