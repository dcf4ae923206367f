-- 0005: inbound channel callbacks, stored before they are acknowledged and deduplicated by the
-- channel's own event id. `outcome` records what applying it did (applied, unchanged, unmatched,
-- mismatch). Payloads are what the channel sent; channels never send card numbers in notifications.
CREATE TABLE channel_callbacks (
    channel     TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payment_id  TEXT,
    payload     BLOB NOT NULL,
    outcome     TEXT,
    PRIMARY KEY (channel, event_id)
);
