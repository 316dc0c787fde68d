-- The metering read model as the first release created it (SQLite, metering.db).
CREATE TABLE IF NOT EXISTS projection_offsets (
    projection TEXT PRIMARY KEY,
    next_offset INTEGER NOT NULL,
    rejected INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS usage_daily (
    tenant TEXT NOT NULL,
    project TEXT NOT NULL,
    machine_class TEXT NOT NULL,
    day TEXT NOT NULL,
    millis INTEGER NOT NULL,
    last_offset INTEGER NOT NULL,
    PRIMARY KEY (tenant, project, machine_class, day)
);
CREATE TABLE IF NOT EXISTS job_parts (
    tenant TEXT NOT NULL,
    period TEXT NOT NULL,
    build_id TEXT NOT NULL,
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    machine_class TEXT NOT NULL,
    project TEXT NOT NULL,
    millis INTEGER NOT NULL,
    billed_millis INTEGER,
    last_offset INTEGER NOT NULL,
    PRIMARY KEY (tenant, period, build_id, job, attempt, machine_class)
);
CREATE TABLE IF NOT EXISTS attempts (
    build_id TEXT NOT NULL,
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    project TEXT NOT NULL,
    machine_class TEXT NOT NULL,
    millis INTEGER NOT NULL,
    ticks INTEGER NOT NULL,
    complete INTEGER NOT NULL,
    ended INTEGER NOT NULL,
    seq_contiguous INTEGER NOT NULL,
    seq_sparse TEXT NOT NULL,
    seq_ids TEXT NOT NULL,
    last_offset INTEGER NOT NULL,
    PRIMARY KEY (build_id, job, attempt)
);
CREATE TABLE IF NOT EXISTS invoices (
    tenant TEXT NOT NULL,
    period TEXT NOT NULL,
    offset INTEGER NOT NULL,
    time_us INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (tenant, period)
);
