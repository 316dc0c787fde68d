//! The Agents service: agents dial out (they sit behind NAT) and pull work.
//!
//! * `Register` exchanges an enrollment token for an agent id and the agent's own token.
//! * `PullWork` is the agent's work stream: every lease assigned to it is pushed the moment the
//!   scheduler's `JobAssigned` is on the log (Buildkite-style streaming dispatch, no polling).
//!   An `AgentDraining` of the agent (the autoscaler lets it go) is pushed as a drain
//!   instruction (`Lease.drain`).
//!   Opening it appends `AgentConnected`; closing it appends `AgentDisconnected`. An
//!   `AgentRevoked` of the agent ends the stream with PERMISSION_DENIED saying how to register
//!   again ([`revoked_status`]); the scheduler requeues the revoked agent's leases.
//! * `Heartbeat` appends `AgentHeartbeat` (renewing the agent's leases) and answers which
//!   leases to stop.
//! * `SendEvents` is the only way an agent's events reach the log. Fencing: a lease that is no
//!   longer the agent's current one (requeued, finished, revoked) is refused with
//!   FAILED_PRECONDITION, and each event must belong to the lease's job attempt.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tributary_projections::directory::TokenKind;
use tributary_proto::api::{agents_server::Agents, *};
use tributary_proto::events::{
    envelope::Payload, AgentConnected, AgentDisconnected, AgentHeartbeat, AgentRegistered,
    Envelope, TokenIssued,
};
use tributary_scheduler::cluster::leases_to_cancel;

use crate::auth::{authenticate, new_token, sha256_hex, Principal};
use crate::state::{ApiState, Mark};
use tributary_eventlog::Topic;

pub struct AgentsApi {
    state: ApiState,
    /// Current work-stream session per agent (connection state, not domain state).
    sessions: Arc<Mutex<HashMap<String, String>>>,
}

impl AgentsApi {
    pub fn new(state: ApiState) -> Self {
        AgentsApi {
            state,
            sessions: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The calling agent: a live agent token of an agent that is not revoked.
    fn agent_principal<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let who = self.state.directory(|d| authenticate(d, request))??;
        if who.kind != TokenKind::Agent {
            return Err(Status::permission_denied("this call needs an agent token"));
        }
        let revoked = self
            .state
            .cluster
            .read(|c| c.agents.get(&who.name).is_none_or(|a| a.revoked))?;
        if revoked {
            return Err(revoked_status(&who.name));
        }
        Ok(who)
    }

    /// The calling agent; `agent_id` in the request must be its own.
    fn agent<T>(&self, request: &Request<T>, agent_id: &str) -> Result<Principal, Status> {
        let who = self.agent_principal(request)?;
        if who.name != agent_id {
            return Err(Status::permission_denied(
                "agent_id does not match the agent token",
            ));
        }
        Ok(who)
    }

    fn session(&self, agent_id: &str) -> String {
        self.sessions
            .lock()
            .ok()
            .and_then(|s| s.get(agent_id).cloned())
            .unwrap_or_default()
    }
}

/// The lease message for a job assigned to an agent, from the build's first event
/// (BuildTriggered: repository and commit) and the cluster state (the job's plan).
async fn lease_message(
    state: &ApiState,
    build_id: &str,
    job: &str,
    attempt: u32,
    lease_id: &str,
) -> Result<Option<Lease>, Status> {
    // Read at the build's start (the API's index), not from the partition's beginning.
    let Some((env, t)) = crate::builds::triggered_of(state, build_id).await? else {
        return Ok(None);
    };
    let (plan, artifacts, caches, superseded_caches) = state.cluster.read(|c| {
        (
            c.job_plan(build_id, job).cloned(),
            c.needed_artifacts(build_id, job),
            c.cache_entries(build_id),
            c.superseded_caches(build_id),
        )
    })?;
    // The job's secrets, opened for this lease only (the stream is the agent's own).
    let (secrets, missing_secrets) = match &plan {
        Some(p) if !p.secrets.is_empty() => state.directory(|d| {
            crate::secrets::for_job(
                d,
                state.server_key.as_ref(),
                &env.tenant,
                &env.project,
                &p.secrets,
            )
        })?,
        _ => (Vec::new(), Vec::new()),
    };
    Ok(plan.map(|plan| Lease {
        secrets,
        missing_secrets,
        lease_id: lease_id.to_owned(),
        tenant: env.tenant.clone(),
        project: env.project.clone(),
        build_id: build_id.to_owned(),
        job: Some(plan),
        attempt,
        repository: t.repository.clone(),
        commit: t.commit.clone(),
        cancel: false,
        artifacts,
        caches,
        superseded_caches,
        cache_limit_bytes: state.cache_limit_bytes,
        drain: false,
    }))
}

/// What a revoked (or unknown) agent hears on every call, its work stream included: the
/// agent stops (`tributary agent` exits non-zero with this message).
pub fn revoked_status(agent_id: &str) -> Status {
    Status::permission_denied(format!(
        "agent {agent_id} is revoked or unknown: it gets no more work and its jobs run \
         elsewhere; to use this machine again, delete agent.json in the agent's work directory \
         and start it again with an enrollment token (--token; `tributary admin token-create \
         --kind enrollment`)"
    ))
}

/// Tells the agent to drain (the autoscaler lets it go).
fn drain_message() -> Lease {
    Lease {
        drain: true,
        ..Lease::default()
    }
}

/// What the agent says it can run (`tributary-capabilities-bin` metadata); none = host jobs
/// only, as agents that predate container jobs.
fn capabilities<T>(request: &Request<T>) -> Result<AgentCapabilities, Status> {
    let Some(value) = request
        .metadata()
        .get_bin(tributary_proto::CAPABILITIES_METADATA)
    else {
        return Ok(AgentCapabilities::default());
    };
    let bytes = value
        .to_bytes()
        .map_err(|_| Status::invalid_argument("capabilities metadata is not base64"))?;
    let mut caps = <AgentCapabilities as prost::Message>::decode(bytes.as_ref())
        .map_err(|e| Status::invalid_argument(format!("capabilities metadata: {e}")))?;
    // For people only; bounded so an agent cannot bloat the log.
    caps.engine = caps.engine.chars().take(200).collect();
    Ok(caps)
}

/// Job and attempt an agent event is about; None for types an agent may not send.
fn job_attempt(payload: &Payload) -> Option<(&str, u32)> {
    Some(match payload {
        Payload::JobStarted(e) => (&e.job, e.attempt),
        Payload::StepStarted(e) => (&e.job, e.attempt),
        Payload::LineStarted(e) => (&e.job, e.attempt),
        Payload::LogChunk(e) => (&e.job, e.attempt),
        Payload::LineExited(e) => (&e.job, e.attempt),
        Payload::StepFinished(e) => (&e.job, e.attempt),
        Payload::ArtifactUploaded(e) => (&e.job, e.attempt),
        Payload::JobFinished(e) => (&e.job, e.attempt),
        Payload::UsageTick(e) => (&e.job, e.attempt),
        Payload::CacheRestored(e) => (&e.job, e.attempt),
        Payload::CacheSaved(e) => (&e.job, e.attempt),
        Payload::CacheEvicted(e) => (&e.job, e.attempt),
        Payload::ImageBuilt(e) => (&e.job, e.attempt),
        Payload::ImageReused(e) => (&e.job, e.attempt),
        Payload::ImagePruned(e) => (&e.job, e.attempt),
        _ => return None,
    })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Agents for AgentsApi {
    async fn register(
        &self,
        request: Request<RegisterAgentRequest>,
    ) -> Result<Response<RegisterAgentResponse>, Status> {
        let caps = capabilities(&request)?;
        let req = request.into_inner();
        let sha = sha256_hex(req.enrollment_token.trim());
        let mut token = self.state.directory(|d| d.token(&sha).cloned())?;
        if token.is_none() {
            // Maybe created a moment ago through another API replica: look again once this
            // replica's directory has folded everything on the log now.
            let end = self.state.log_end().await?;
            self.state.wait_directory(&end).await?;
            token = self.state.directory(|d| d.token(&sha).cloned())?;
        }
        let token =
            token.ok_or_else(|| Status::unauthenticated("unknown or revoked enrollment token"))?;
        // Agents enrolled with the admin token are shared by every tenant.
        let tenant = match token.kind {
            TokenKind::Enrollment => token.tenant.clone(),
            TokenKind::Admin => String::new(),
            _ => {
                return Err(Status::permission_denied(
                    "registering needs an enrollment token",
                ))
            }
        };
        if req.capacity == 0 || req.capacity > 256 {
            return Err(Status::invalid_argument(
                "capacity must be between 1 and 256",
            ));
        }
        if let Some(bad) = req.labels.iter().find(|l| !crate::admin::valid_name(l)) {
            return Err(Status::invalid_argument(format!(
                "invalid label {bad:?}: letters, digits, '-', '_' and '.' only"
            )));
        }
        let agent_id = tributary_proto::new_id();
        let (agent_token, sha256) = new_token();
        let name = if req.name.is_empty() {
            agent_id.clone()
        } else {
            req.name
        };
        let registered = Payload::AgentRegistered(AgentRegistered {
            agent_id: agent_id.clone(),
            name,
            labels: req.labels,
            capacity: req.capacity,
            tenant: tenant.clone(),
            token_sha256: sha256.clone(),
            containers: caps.containers,
            engine: caps.engine,
        });
        let issued = Payload::TokenIssued(TokenIssued {
            token_id: tributary_proto::new_id(),
            tenant: tenant.clone(),
            kind: "agent".into(),
            name: agent_id.clone(),
            sha256,
        });
        let events = [
            Envelope::new(&tenant, "", "", registered),
            Envelope::new(&tenant, "", "", issued),
        ];
        let offsets = self.state.append(&events).await?;
        let end = self.state.mark_after(&events, &offsets);
        self.state.wait_directory(&end).await?;
        self.state.cluster.wait(&end).await?;
        tracing::info!(agent_id = %agent_id, tenant = %tenant, "agent registered");
        Ok(Response::new(RegisterAgentResponse {
            agent_id,
            agent_token,
        }))
    }

    type PullWorkStream = BoxStream<Lease>;

    async fn pull_work(
        &self,
        request: Request<PullWorkRequest>,
    ) -> Result<Response<Self::PullWorkStream>, Status> {
        let agent_id = request.get_ref().agent_id.clone();
        let who = self.agent(&request, &agent_id)?;
        let caps = capabilities(&request)?;
        let req = request.into_inner();
        let session = tributary_proto::new_id();
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(agent_id.clone(), session.clone());
        }
        let connected = Payload::AgentConnected(AgentConnected {
            agent_id: agent_id.clone(),
            labels: req.labels,
            capacity: req.capacity,
            session_id: session.clone(),
            containers: caps.containers,
            engine: caps.engine,
        });
        let events = [Envelope::new(&who.tenant, "", "", connected)];
        let offsets = self.state.append(&events).await?;
        self.state
            .cluster
            .wait(&self.state.mark_after(&events, &offsets))
            .await?;
        // Everything before `from` is in the cluster fold (pending leases below); everything
        // from it on comes through the subscription.
        let from = self.state.log_end().await?;
        self.state.cluster.wait(&from).await?;
        let layout = self.state.log.layout();
        let from: Vec<(u32, u64)> = from
            .0
            .into_iter()
            .filter(|(p, _)| layout.topic_partitions(Topic::Events).contains(p))
            .collect();
        // Leases already assigned (and not started) as of `from`, then every new assignment.
        let pending: Vec<(String, String, u32, String)> = self.state.cluster.read(|c| {
            c.agent_leases(&agent_id)
                .filter(|(_, l)| l.started_us.is_none())
                .map(|((b, j), l)| (b.clone(), j.clone(), l.attempt, l.lease_id.clone()))
                .collect()
        })?;
        // An agent the autoscaler is draining hears it first thing; one revoked since the
        // check above (before `from`, so not in the subscription) hears that and nothing else.
        let (draining, revoked) = self.state.cluster.read(|c| {
            c.agents
                .get(&agent_id)
                .map_or((false, true), |a| (a.drain_requested, a.revoked))
        })?;
        let (tx, rx) = mpsc::channel::<Result<Lease, Status>>(64);
        if revoked {
            let _ = tx.send(Err(revoked_status(&agent_id))).await;
        } else if draining {
            let _ = tx.send(Ok(drain_message())).await;
        }
        let state = self.state.clone();
        let sessions = self.sessions.clone();
        let tenant = who.tenant.clone();
        tokio::spawn(async move {
            let mut sub = state.log.subscribe_partitions(&from);
            let mut send = if revoked { Vec::new() } else { pending };
            let mut open = !revoked;
            while open {
                for (build, job, attempt, lease_id) in send.drain(..) {
                    match lease_message(&state, &build, &job, attempt, &lease_id).await {
                        Ok(Some(lease)) => {
                            if tx.send(Ok(lease)).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => {
                            tracing::warn!(build_id = %build, job_id = %job, "lease for an unknown build")
                        }
                        Err(e) => tracing::error!(error = %e, "cannot build a lease"),
                    }
                }
                let batch = tokio::select! {
                    b = sub.next_batch() => b,
                    _ = tx.closed() => break,
                };
                let Ok(records) = batch else { break };
                for record in &records {
                    let Ok(env) = record.decode() else { continue };
                    if let Some(Payload::BuildCanceled(_)) = &env.payload {
                        // Tell the agent at once (heartbeats would take up to their interval).
                        let _ = state.cluster.wait(&Mark::after(record)).await;
                        let leases: Vec<String> = state
                            .cluster
                            .read(|c| {
                                c.agent_leases(&agent_id)
                                    .filter(|((b, _), _)| *b == env.build_id)
                                    .map(|(_, l)| l.lease_id.clone())
                                    .collect()
                            })
                            .unwrap_or_default();
                        for lease_id in leases {
                            let stop = Lease {
                                lease_id,
                                cancel: true,
                                ..Lease::default()
                            };
                            if tx.send(Ok(stop)).await.is_err() {
                                break;
                            }
                        }
                    }
                    if let Some(Payload::AgentRevoked(r)) = &env.payload {
                        if r.agent_id == agent_id {
                            tracing::info!(agent_id = %agent_id, "agent revoked: ending its work stream");
                            let _ = tx.send(Err(revoked_status(&agent_id))).await;
                            open = false;
                            break;
                        }
                    }
                    if let Some(Payload::AgentDraining(d)) = &env.payload {
                        if d.agent_id == agent_id && tx.send(Ok(drain_message())).await.is_err() {
                            break;
                        }
                    }
                    if let Some(Payload::JobAssigned(a)) = &env.payload {
                        if a.agent_id == agent_id {
                            // The lease must be in the cluster fold before the agent uses it.
                            let _ = state.cluster.wait(&Mark::after(record)).await;
                            send.push((
                                env.build_id.clone(),
                                a.job.clone(),
                                a.attempt,
                                a.lease_id.clone(),
                            ));
                        }
                    }
                }
                if tx.is_closed() {
                    break;
                }
            }
            let current = sessions.lock().ok().and_then(|s| s.get(&agent_id).cloned());
            if current.as_deref() == Some(session.as_str()) {
                let gone = Payload::AgentDisconnected(AgentDisconnected {
                    agent_id: agent_id.clone(),
                    session_id: session.clone(),
                    reason: if open {
                        "work stream closed"
                    } else {
                        "revoked"
                    }
                    .into(),
                });
                if let Err(e) = state
                    .log
                    .append(&[Envelope::new(&tenant, "", "", gone)])
                    .await
                {
                    tracing::error!(error = %e, "cannot record AgentDisconnected");
                }
                tracing::info!(agent_id = %agent_id, "agent disconnected");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let agent_id = request.get_ref().agent_id.clone();
        let who = self.agent(&request, &agent_id)?;
        let req = request.into_inner();
        let beat = Payload::AgentHeartbeat(AgentHeartbeat {
            agent_id: agent_id.clone(),
            lease_ids: req.lease_ids.clone(),
            draining: req.draining,
            session_id: self.session(&agent_id),
        });
        let events = [Envelope::new(&who.tenant, "", "", beat)];
        let offsets = self.state.append(&events).await?;
        // Answer from a state that includes this heartbeat.
        self.state
            .cluster
            .wait(&self.state.mark_after(&events, &offsets))
            .await?;
        let cancel_lease_ids = self
            .state
            .cluster
            .read(|c| leases_to_cancel(c, &agent_id, &req.lease_ids))?;
        Ok(Response::new(HeartbeatResponse { cancel_lease_ids }))
    }

    async fn send_events(
        &self,
        request: Request<SendEventsRequest>,
    ) -> Result<Response<SendEventsResponse>, Status> {
        let who = self.agent_principal(&request)?;
        let req = request.into_inner();
        let end = self.state.log_end().await?;
        self.state.cluster.wait(&end).await?;
        let lease = self.state.cluster.read(|c| {
            c.lease(&req.lease_id).map(|((build, job), l)| {
                let tenant = c
                    .builds
                    .builds
                    .get(build)
                    .map(|b| (b.tenant.clone(), b.project.clone()));
                (
                    build.clone(),
                    job.clone(),
                    l.attempt,
                    l.agent_id.clone(),
                    tenant,
                )
            })
        })?;
        let Some((build, job, attempt, agent, Some((tenant, project)))) = lease else {
            return Err(Status::failed_precondition(format!(
                "lease {} is not current (the job was requeued, finished or canceled); stop it",
                req.lease_id
            )));
        };
        if agent != who.name {
            return Err(Status::failed_precondition(format!(
                "lease {} belongs to another agent",
                req.lease_id
            )));
        }
        let mut events = Vec::with_capacity(req.events.len());
        for mut env in req.events {
            let Some(payload) = &env.payload else {
                return Err(Status::invalid_argument("an event without a payload"));
            };
            match job_attempt(payload) {
                Some((j, a)) if j == job && a == attempt => {}
                Some(_) => {
                    return Err(Status::invalid_argument(format!(
                        "event {} is not about job {job} attempt {attempt} of this lease",
                        env.type_name()
                    )))
                }
                None => {
                    return Err(Status::invalid_argument(format!(
                        "agents may not send {} events",
                        env.type_name()
                    )))
                }
            }
            if uuid_v7(&env.event_id).is_none() {
                return Err(Status::invalid_argument(
                    "every event needs a UUID v7 event_id",
                ));
            }
            env.tenant = tenant.clone();
            env.project = project.clone();
            env.build_id = build.clone();
            events.push(env);
        }
        let offsets = append_chunks_first(&self.state, &events).await?;
        Ok(Response::new(SendEventsResponse { offsets }))
    }
}

/// Appends an agent's batch. Where log chunks have partitions of their own, the chunks go
/// first and the state events after them, so every chunk of an attempt is on the log before
/// the attempt's `JobFinished` (and so before its build's `BuildFinished`): what lets a tail
/// end knowing it has every chunk ([`crate::follow`]). Returns the offsets in `events`' order.
async fn append_chunks_first(state: &ApiState, events: &[Envelope]) -> Result<Vec<u64>, Status> {
    if state.log.layout().logs == 0 {
        return state.append(events).await;
    }
    type Indexed<'a> = Vec<(usize, &'a Envelope)>;
    let (chunks, rest): (Indexed, Indexed) = events
        .iter()
        .enumerate()
        .partition(|(_, e)| Topic::of(e) == Topic::Logs);
    let mut offsets = vec![0; events.len()];
    for part in [chunks, rest] {
        if part.is_empty() {
            continue;
        }
        let batch: Vec<Envelope> = part.iter().map(|(_, e)| (*e).clone()).collect();
        let got = state.append(&batch).await?;
        for ((i, _), offset) in part.iter().zip(got) {
            offsets[*i] = offset;
        }
    }
    Ok(offsets)
}

fn uuid_v7(id: &str) -> Option<()> {
    let parsed = id.parse::<tributary_proto::Uuid>().ok()?;
    (parsed.get_version_num() == 7).then_some(())
}
