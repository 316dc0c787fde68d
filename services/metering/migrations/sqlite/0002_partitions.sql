-- Partition-aware positions: every row says which partition its last event came from, the
-- consumer keeps one next offset per partition, and invoices read before the fold reached
-- their cut wait in pending_invoices.
ALTER TABLE usage_daily ADD COLUMN last_partition INTEGER NOT NULL DEFAULT 0;
ALTER TABLE job_parts ADD COLUMN last_partition INTEGER NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN last_partition INTEGER NOT NULL DEFAULT 0;
ALTER TABLE invoices ADD COLUMN partition INTEGER NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS metering_offsets (
    partition INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL
);
INSERT INTO metering_offsets (partition, next_offset)
    SELECT 0, next_offset FROM projection_offsets WHERE projection = 'metering';
CREATE TABLE IF NOT EXISTS metering_counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO metering_counters (name, value)
    SELECT 'rejected', rejected FROM projection_offsets WHERE projection = 'metering';
DROP TABLE projection_offsets;
CREATE TABLE IF NOT EXISTS pending_invoices (
    tenant TEXT NOT NULL,
    seq INTEGER NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    time_us INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (tenant, seq)
);
