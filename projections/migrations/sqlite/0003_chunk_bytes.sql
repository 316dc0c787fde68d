-- Log bytes per (build, job, attempt, step, line) from a separate logs topic (Kafka), folded
-- independently of the build's state events: a sum, so the order of the two topics does not
-- matter. A job's and line's log_bytes are read from the counters of the job's current attempt.
CREATE TABLE IF NOT EXISTS chunk_bytes (
    build_id TEXT NOT NULL,
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    step INTEGER NOT NULL,
    line INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (build_id, job, attempt, step, line)
);
-- Recently counted chunk event ids per build: re-deliveries are counted once.
CREATE TABLE IF NOT EXISTS chunk_event_ids (
    build_id TEXT PRIMARY KEY,
    ids TEXT NOT NULL
);
