-- The metering read model (PostgreSQL, in its own schema: `metering` unless told otherwise).
CREATE TABLE IF NOT EXISTS metering_offsets (
    partition BIGINT PRIMARY KEY,
    next_offset BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS metering_counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS usage_daily (
    tenant TEXT NOT NULL,
    project TEXT NOT NULL,
    machine_class TEXT NOT NULL,
    day TEXT NOT NULL,
    millis BIGINT NOT NULL,
    last_offset BIGINT NOT NULL,
    last_partition BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, project, machine_class, day)
);
CREATE TABLE IF NOT EXISTS job_parts (
    tenant TEXT NOT NULL,
    period TEXT NOT NULL,
    build_id TEXT NOT NULL,
    job TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    machine_class TEXT NOT NULL,
    project TEXT NOT NULL,
    millis BIGINT NOT NULL,
    billed_millis BIGINT,
    last_offset BIGINT NOT NULL,
    last_partition BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, period, build_id, job, attempt, machine_class)
);
CREATE TABLE IF NOT EXISTS attempts (
    build_id TEXT NOT NULL,
    job TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    project TEXT NOT NULL,
    machine_class TEXT NOT NULL,
    millis BIGINT NOT NULL,
    ticks BIGINT NOT NULL,
    complete BIGINT NOT NULL,
    ended BIGINT NOT NULL,
    seq_contiguous BIGINT NOT NULL,
    seq_sparse TEXT NOT NULL,
    seq_ids TEXT NOT NULL,
    last_offset BIGINT NOT NULL,
    last_partition BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (build_id, job, attempt)
);
CREATE TABLE IF NOT EXISTS invoices (
    tenant TEXT NOT NULL,
    period TEXT NOT NULL,
    "offset" BIGINT NOT NULL,
    time_us BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    body BYTEA NOT NULL,
    partition BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, period)
);
CREATE TABLE IF NOT EXISTS pending_invoices (
    tenant TEXT NOT NULL,
    seq BIGINT NOT NULL,
    partition BIGINT NOT NULL,
    "offset" BIGINT NOT NULL,
    time_us BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (tenant, seq)
);
