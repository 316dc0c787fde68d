-- Recently applied event ids per build: the projector skips re-deliveries (Kafka stores a
-- retried append twice). Bounded per build; written in the transaction of the build's rows.
CREATE TABLE IF NOT EXISTS build_event_ids (
    build_id TEXT PRIMARY KEY,
    ids TEXT NOT NULL
);
