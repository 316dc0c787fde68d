//! The autoscaler on the scale-out deployment (Kafka + PostgreSQL), end to end: two `serve
//! autoscaler --kafka …` replicas with the `command` provider (scripts that start and stop real
//! `tributary agent` processes), a queue of builds and no agent. The active replica requests
//! agents, which run the builds; it is killed with SIGKILL while agents are out; the standby
//! takes over (never requesting an agent the other had requested again, never more than
//! `max_agents` at once), the builds finish, and the agents are drained and released.
//!
//! Needs `scripts/setup-brokers.sh` (Kafka on 127.0.0.1:19092, PostgreSQL on 127.0.0.1:5432).

use crate::common;
use crate::scale;

use std::collections::BTreeMap;
use std::time::Duration;

use scale::{Ev, Options, ScaleOut};
use tributary_proto::events::envelope::Payload;

const PATIENCE: Duration = Duration::from_secs(600);
const MAX_AGENTS: usize = 3;

/// Live requests (requested, not released) after each event, at most.
fn most_live(events: &[Ev]) -> usize {
    let mut live: BTreeMap<String, ()> = BTreeMap::new();
    let mut most = 0;
    for e in events {
        match &e.env.payload {
            Some(Payload::AgentRequested(r)) => {
                live.insert(r.request_id.clone(), ());
            }
            Some(Payload::AgentReleased(r)) => {
                live.remove(&r.request_id);
            }
            _ => {}
        }
        most = most.max(live.len());
    }
    most
}

fn count(events: &[Ev], what: fn(&Payload) -> Option<String>) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for e in events {
        if let Some(id) = e.env.payload.as_ref().and_then(what) {
            *n.entry(id).or_default() += 1;
        }
    }
    n
}

#[test]
fn the_standby_autoscaler_takes_over_on_kafka_without_requesting_twice() {
    let mut out = ScaleOut::start(Options {
        apis: 1,
        schedulers: 1,
        projectors: 1,
        agents: 0,
        lease_ttl: 5.0,
        ..Options::default()
    });
    let pool = out.root.join("pool");
    std::fs::create_dir_all(&pool).expect("pool dir");
    let bin = common::bin();
    // acquire: a real agent in the background (its pid kept by request id); release: SIGTERM.
    let acquire = pool.join("acquire.sh");
    std::fs::write(
        &acquire,
        format!(
            "#!/bin/sh\nset -e\necho \"$TRIBUTARY_REQUEST_ID\" >> {dir}/acquired\n\
             mkdir -p {dir}/$TRIBUTARY_REQUEST_ID\n\
             setsid {bin} agent --server \"$TRIBUTARY_SERVER\" --token \"$TRIBUTARY_ENROLLMENT_TOKEN\" \
             --name \"$TRIBUTARY_REQUEST_ID\" --capacity \"$TRIBUTARY_AGENT_CAPACITY\" \
             --workdir {dir}/$TRIBUTARY_REQUEST_ID > {dir}/$TRIBUTARY_REQUEST_ID.log 2>&1 < /dev/null &\n\
             echo $! > {dir}/$TRIBUTARY_REQUEST_ID.pid\necho \"$TRIBUTARY_REQUEST_ID\"\n",
            dir = pool.display(),
        ),
    )
    .expect("acquire script");
    let release = pool.join("release.sh");
    std::fs::write(
        &release,
        format!(
            "#!/bin/sh\nkill -TERM $(cat {dir}/$TRIBUTARY_MACHINE.pid) 2>/dev/null || true\n",
            dir = pool.display()
        ),
    )
    .expect("release script");
    for script in [&acquire, &release] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let config = pool.join("pool.toml");
    std::fs::write(
        &config,
        format!(
            "budget_per_hour = 100.0\ngrace_secs = 3\nrenewal_margin_secs = 1\n\
             target_wait_secs = 2\ndefault_job_secs = 4\nstartup_timeout_secs = 120\n\
             drain_settle_secs = 0.5\ntick_secs = 0.2\n\
             [[kind]]\nname = \"cmd\"\ncapacity = 1\nprice_per_hour = 3.6\nbilling = \"second\"\n\
             max_agents = {MAX_AGENTS}\n\
             [command]\nacquire = \"{}\"\nrelease = \"{}\"\n",
            acquire.display(),
            release.display()
        ),
    )
    .expect("pool.toml");
    let flags = [
        "--provider",
        "command",
        "--config",
        config.to_str().expect("utf-8"),
    ];
    let mut first = out.autoscaler("autoscaler-0", &flags);
    wait_for_log(&first, "active autoscaler replica");
    let mut second = out.autoscaler("autoscaler-1", &flags);
    wait_for_log(&second, "autoscaler started");

    out.project(
        "p",
        "jobs:\n  a:\n    steps: [\"sleep 2\"]\n  b:\n    steps: [\"sleep 2\"]\n",
    );
    let builds: Vec<String> = (0..4).map(|_| out.trigger(0, "p")).collect();
    // Agents are out: kill the active replica while they work.
    out.wait_events("an agent provisioned", PATIENCE, |events| {
        events
            .iter()
            .any(|e| matches!(e.env.payload, Some(Payload::AgentProvisioned(_))))
    });
    first.kill();
    wait_for_log(&second, "active autoscaler replica");
    out.wait_finished(&builds, PATIENCE);
    for build in &builds {
        assert_eq!(out.get(0, build)["status"], "succeeded", "build {build}");
    }
    // Drained and released: every request released, no agent process left.
    out.wait_events("every agent released", PATIENCE, |events| {
        let requested = count(events, |p| match p {
            Payload::AgentRequested(r) => Some(r.request_id.clone()),
            _ => None,
        });
        let released = count(events, |p| match p {
            Payload::AgentReleased(r) => Some(r.request_id.clone()),
            _ => None,
        });
        !requested.is_empty() && requested.keys().eq(released.keys())
    });
    let events = out.events().to_vec();
    let requested = count(&events, |p| match p {
        Payload::AgentRequested(r) => Some(r.request_id.clone()),
        _ => None,
    });
    assert!(
        requested.values().all(|n| *n == 1),
        "a request id was requested twice: {requested:?}"
    );
    let acquired = std::fs::read_to_string(pool.join("acquired")).expect("acquired");
    let mut ids: Vec<&str> = acquired.lines().collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        n,
        "the provider acquired a request twice: {acquired}"
    );
    assert!(
        most_live(&events) <= MAX_AGENTS,
        "more than {MAX_AGENTS} agents at once: the standby requested beside the active one"
    );
    common::wait_until("the agents to exit", PATIENCE, || {
        ids.iter().all(|id| {
            let pid = std::fs::read_to_string(pool.join(format!("{id}.pid"))).unwrap_or_default();
            // Gone, or a zombie waiting for init.
            std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))
                .map_or(true, |s| s.contains("State:\tZ"))
        })
    });
    second.assert_running();
}

fn wait_for_log(service: &scale::Service, text: &str) {
    common::wait_until(
        &format!("{} to log {text:?}", service.name),
        PATIENCE,
        || service.log_text().contains(text),
    );
}
