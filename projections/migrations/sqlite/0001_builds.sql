-- The builds read model and the projections' consumer offsets (SQLite).
-- IF NOT EXISTS: databases created before migrations existed hold exactly these tables.
CREATE TABLE IF NOT EXISTS projection_offsets (
    projection TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (projection, partition)
);
CREATE TABLE IF NOT EXISTS builds (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    project TEXT NOT NULL,
    number INTEGER NOT NULL,
    phase TEXT NOT NULL,
    who TEXT NOT NULL,
    source TEXT NOT NULL,
    repository TEXT NOT NULL,
    git_ref TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    pipeline_path TEXT NOT NULL,
    triggered_us INTEGER NOT NULL,
    started_us INTEGER,
    finished_us INTEGER,
    reason TEXT NOT NULL,
    last_offset INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS builds_by_project ON builds (tenant, project, triggered_us);
CREATE TABLE IF NOT EXISTS jobs (
    build_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    matrix TEXT NOT NULL,
    needs TEXT NOT NULL,
    phase TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    queued_us INTEGER,
    started_us INTEGER,
    finished_us INTEGER,
    exit_code INTEGER,
    reason TEXT NOT NULL,
    log_bytes INTEGER NOT NULL,
    PRIMARY KEY (build_id, idx)
);
CREATE TABLE IF NOT EXISTS steps (
    build_id TEXT NOT NULL,
    job_idx INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    phase TEXT NOT NULL,
    started_us INTEGER,
    duration_us INTEGER,
    exit_code INTEGER,
    PRIMARY KEY (build_id, job_idx, idx)
);
CREATE TABLE IF NOT EXISTS lines (
    build_id TEXT NOT NULL,
    job_idx INTEGER NOT NULL,
    step_idx INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    phase TEXT NOT NULL,
    started_us INTEGER,
    duration_us INTEGER,
    exit_code INTEGER,
    log_bytes INTEGER NOT NULL,
    PRIMARY KEY (build_id, job_idx, step_idx, idx)
);
