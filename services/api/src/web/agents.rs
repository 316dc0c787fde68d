//! Agents the tenant's jobs can run on: its own and the shared ones (the admin sees all),
//! with labels, capacity, current jobs and last heartbeat, from the cluster fold. A shared
//! agent running another tenant's job shows it as busy, without naming it.

use axum::extract::State;
use axum::http::HeaderMap;
use maud::{html, Markup};
use tributary_projections::directory::TokenKind;
use tributary_scheduler::cluster::AgentState;

use super::format::{ago, utc};
use super::layout;
use super::{page_session, urlencode, WebError};
use crate::state::ApiState;

/// One agent as the page shows it.
#[derive(Debug, PartialEq)]
pub struct AgentRow {
    pub id: String,
    pub name: String,
    pub state: &'static str,
    pub labels: Vec<String>,
    pub capacity: u32,
    pub shared: bool,
    pub last_seen_us: i64,
    /// (build, job) of the viewer's own running jobs.
    pub jobs: Vec<(String, String)>,
    /// Jobs of other tenants on this (shared) agent.
    pub others: usize,
}

fn agent_state(a: &AgentState) -> &'static str {
    if a.revoked {
        "revoked"
    } else if !a.connected {
        "disconnected"
    } else if a.draining {
        "draining"
    } else {
        "connected"
    }
}

/// Whether a viewer of `tenant` sees agent `a` (admins see every agent).
pub fn visible(a: &AgentState, tenant: &str, admin: bool) -> bool {
    a.registered && (admin || a.tenant.is_empty() || a.tenant == tenant)
}

pub async fn page(State(state): State<ApiState>, headers: HeaderMap) -> Result<Markup, WebError> {
    let session = page_session(&state, &headers, "/ui/agents")?;
    let end = state.log_end().await?;
    state.cluster.wait(&end).await?;
    let tenant = session.who.tenant.clone();
    let admin = session.who.kind == TokenKind::Admin;
    let rows: Vec<(AgentRow, Vec<String>)> = state.cluster.read(|c| {
        c.agents
            .iter()
            .filter(|(_, a)| visible(a, &tenant, admin))
            .map(|(id, a)| {
                let leased: Vec<(String, String)> = c
                    .agent_leases(id)
                    .map(|((b, j), _)| (b.clone(), j.clone()))
                    .collect();
                let tenants: Vec<String> = leased
                    .iter()
                    .map(|(b, _)| {
                        c.builds
                            .builds
                            .get(b)
                            .map(|r| r.tenant.clone())
                            .unwrap_or_default()
                    })
                    .collect();
                (
                    AgentRow {
                        id: id.clone(),
                        name: a.name.clone(),
                        state: agent_state(a),
                        labels: a.labels.clone(),
                        capacity: a.capacity,
                        shared: a.tenant.is_empty(),
                        last_seen_us: a.last_seen_us,
                        jobs: leased,
                        others: 0,
                    },
                    tenants,
                )
            })
            .collect()
    })?;
    let rows: Vec<AgentRow> = rows
        .into_iter()
        .map(|(mut row, tenants)| {
            let jobs = std::mem::take(&mut row.jobs);
            for (job, t) in jobs.into_iter().zip(tenants) {
                if t == tenant {
                    row.jobs.push(job);
                } else {
                    row.others += 1;
                }
            }
            row
        })
        .collect();
    let now = tributary_proto::now_us();
    Ok(layout::page(
        "Agents",
        Some(&session),
        html! {
            h1 { "Agents" }
            p.hint { "Your tenant's agents and the shared ones. Join one with "
                code { "tributary agent --server URL --token ENROLLMENT_TOKEN --labels …" } "." }
            @if rows.is_empty() { p.empty { "No agents." } }
            @else {
                table.list #agents {
                    thead { tr { th { "agent" } th { "state" } th { "labels" } th { "running" } th { "last heartbeat" } } }
                    tbody {
                        @for r in &rows {
                            tr data-agent=(r.id) data-state=(r.state) {
                                td { (r.name) br; small.mono { (r.id) } @if r.shared { " " small { "(shared)" } } }
                                td { span class={"badge ag-" (r.state)} { (r.state) } }
                                td { @for l in &r.labels { span.chip { (l) } " " } @if r.labels.is_empty() { small { "generic" } } }
                                td {
                                    (r.jobs.len() + r.others) " / " (r.capacity)
                                    @for (b, j) in &r.jobs { br; a href={"/ui/builds/" (urlencode(b))} { (j) } }
                                    @if r.others > 0 { br; small { (r.others) " of other tenants" } }
                                }
                                td { span title=(utc(r.last_seen_us)) { (ago(r.last_seen_us, now)) } }
                            }
                        }
                    }
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_see_their_own_and_shared_agents() {
        let mut a = AgentState {
            registered: true,
            ..AgentState::default()
        };
        assert!(visible(&a, "acme", false), "shared");
        a.tenant = "acme".into();
        assert!(visible(&a, "acme", false));
        assert!(!visible(&a, "globex", false));
        assert!(visible(&a, "globex", true), "admin");
        a.registered = false;
        assert!(!visible(&a, "acme", false));
    }
}
