-- The builds read model and the projections' consumer offsets (PostgreSQL).
CREATE TABLE IF NOT EXISTS projection_offsets (
    projection TEXT NOT NULL,
    partition BIGINT NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (projection, partition)
);
CREATE TABLE IF NOT EXISTS builds (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    project TEXT NOT NULL,
    number BIGINT NOT NULL,
    phase TEXT NOT NULL,
    who TEXT NOT NULL,
    source TEXT NOT NULL,
    repository TEXT NOT NULL,
    git_ref TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    pipeline_path TEXT NOT NULL,
    triggered_us BIGINT NOT NULL,
    started_us BIGINT,
    finished_us BIGINT,
    reason TEXT NOT NULL,
    last_offset BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS builds_by_project ON builds (tenant, project, triggered_us);
CREATE TABLE IF NOT EXISTS jobs (
    build_id TEXT NOT NULL,
    idx BIGINT NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    matrix TEXT NOT NULL,
    needs TEXT NOT NULL,
    phase TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    agent_id TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    queued_us BIGINT,
    started_us BIGINT,
    finished_us BIGINT,
    exit_code BIGINT,
    reason TEXT NOT NULL,
    log_bytes BIGINT NOT NULL,
    PRIMARY KEY (build_id, idx)
);
CREATE TABLE IF NOT EXISTS steps (
    build_id TEXT NOT NULL,
    job_idx BIGINT NOT NULL,
    idx BIGINT NOT NULL,
    name TEXT NOT NULL,
    phase TEXT NOT NULL,
    started_us BIGINT,
    duration_us BIGINT,
    exit_code BIGINT,
    PRIMARY KEY (build_id, job_idx, idx)
);
CREATE TABLE IF NOT EXISTS lines (
    build_id TEXT NOT NULL,
    job_idx BIGINT NOT NULL,
    step_idx BIGINT NOT NULL,
    idx BIGINT NOT NULL,
    text TEXT NOT NULL,
    phase TEXT NOT NULL,
    started_us BIGINT,
    duration_us BIGINT,
    exit_code BIGINT,
    log_bytes BIGINT NOT NULL,
    PRIMARY KEY (build_id, job_idx, step_idx, idx)
);
