//! Build once per commit (`reuse: commit`): which job runs succeeded, folded from the log, and
//! the lookup the scheduler makes before queueing a job that asks for reuse.
//!
//! A run is indexed by (tenant, project, commit, definition): the definition is the sha256 of
//! the job's plan without its volatile fields ([`definition_hash`]), so any change to the job
//! (a line, an env value, an image, its needs...) defeats reuse. Only jobs that ask for reuse
//! are indexed, only builds with a commit, only the job's current attempt (a stale attempt's
//! events never count). The index keeps the latest successful run of each definition with
//! the artifacts its succeeded attempt uploaded. A job that was itself reused is not a new run:
//! the index keeps pointing at the run that did the work.

use std::collections::BTreeMap;

use prost::Message;
use sha2::{Digest, Sha256};
use tributary_proto::events::{envelope::Payload, ArtifactUploaded, Envelope, JobPlan, Status};

/// sha256 (hex) of the job's plan without volatile fields (`kept_from_build`, `kept_artifacts`).
pub fn definition_hash(plan: &JobPlan) -> String {
    let mut plan = plan.clone();
    plan.kept_from_build.clear();
    plan.kept_artifacts.clear();
    hex::encode(Sha256::digest(plan.encode_to_vec()))
}

/// A successful run a later job can reuse.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReusedFrom {
    pub build: String,
    pub job: String,
    pub attempt: u32,
    /// The build's number in its project (0 when unknown).
    pub number: u64,
    pub artifacts: Vec<ArtifactUploaded>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct PendingBuild {
    tenant: String,
    project: String,
    commit: String,
    number: u64,
    /// Jobs that ask for reuse, by id.
    jobs: BTreeMap<String, PendingJob>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct PendingJob {
    definition: String,
    attempt: u32,
    artifacts: Vec<ArtifactUploaded>,
}

type RunKey = (String, String, String, String);

/// Successful runs of jobs that ask for reuse, by (tenant, project, commit, definition).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReuseIndex {
    pending: BTreeMap<String, PendingBuild>,
    runs: BTreeMap<RunKey, ReusedFrom>,
}

impl ReuseIndex {
    /// Folds one event (any build). Pure.
    pub fn apply(&mut self, env: &Envelope) {
        let Some(payload) = &env.payload else { return };
        let build_id = &env.build_id;
        match payload {
            Payload::BuildTriggered(t) if !t.commit.is_empty() => {
                self.pending
                    .entry(build_id.clone())
                    .or_insert_with(|| PendingBuild {
                        tenant: env.tenant.clone(),
                        project: env.project.clone(),
                        commit: t.commit.clone(),
                        number: t.number,
                        jobs: BTreeMap::new(),
                    });
            }
            Payload::BuildQueued(q) => {
                let Some(build) = self.pending.get_mut(build_id) else {
                    return;
                };
                if !build.jobs.is_empty() {
                    return; // planned once
                }
                for plan in q.plan.iter().flat_map(|p| &p.jobs) {
                    if plan.reuse == "commit" && plan.kept_from_build.is_empty() {
                        build.jobs.insert(
                            plan.id.clone(),
                            PendingJob {
                                definition: definition_hash(plan),
                                ..PendingJob::default()
                            },
                        );
                    }
                }
            }
            Payload::JobQueued(e) => {
                if let Some(job) = self.job_mut(build_id, &e.job) {
                    if e.attempt > job.attempt {
                        job.attempt = e.attempt;
                        job.artifacts.clear();
                    }
                }
            }
            Payload::ArtifactUploaded(e) => {
                if let Some(job) = self.job_mut(build_id, &e.job) {
                    if e.attempt == job.attempt && e.attempt > 0 {
                        job.artifacts.retain(|a| a.path != e.path);
                        job.artifacts.push(e.clone());
                    }
                }
            }
            Payload::JobFinished(e) if e.status == Status::Succeeded as i32 => {
                let Some(build) = self.pending.get_mut(build_id) else {
                    return;
                };
                let Some(job) = build.jobs.get_mut(&e.job) else {
                    return;
                };
                if e.attempt == 0 || e.attempt != job.attempt {
                    return;
                }
                let key = (
                    build.tenant.clone(),
                    build.project.clone(),
                    build.commit.clone(),
                    job.definition.clone(),
                );
                self.runs.insert(
                    key,
                    ReusedFrom {
                        build: build_id.clone(),
                        job: e.job.clone(),
                        attempt: e.attempt,
                        number: build.number,
                        artifacts: std::mem::take(&mut job.artifacts),
                    },
                );
                // Nothing of this job matters any more.
                build.jobs.remove(&e.job);
            }
            Payload::BuildFinished(_) => {
                self.pending.remove(build_id);
            }
            _ => {}
        }
    }

    /// The run a job of `definition` at `commit` in the project can reuse.
    pub fn lookup(
        &self,
        tenant: &str,
        project: &str,
        commit: &str,
        definition: &str,
    ) -> Option<&ReusedFrom> {
        if commit.is_empty() {
            return None;
        }
        self.runs.get(&(
            tenant.to_owned(),
            project.to_owned(),
            commit.to_owned(),
            definition.to_owned(),
        ))
    }

    fn job_mut(&mut self, build: &str, job: &str) -> Option<&mut PendingJob> {
        self.pending.get_mut(build)?.jobs.get_mut(job)
    }
}
