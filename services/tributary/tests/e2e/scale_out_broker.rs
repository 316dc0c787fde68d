//! The broker goes away mid-run (issue 4): the scale-out processes (2 `serve api`, 2 `serve
//! scheduler`, 1 `serve projector`, 2 agents) run on a Kafka broker of this test's own, which
//! is killed (SIGKILL) while builds run, stays down for 40 s (longer than the producer's
//! delivery timeout, so appends fail rather than wait) and is restarted on the same port and
//! data. Every service keeps running and reconnects, every build finishes with
//! its expected result, no (build, job, attempt) is assigned twice, and the read models equal a
//! fresh replay. While the broker is down, the services' health endpoints say so.
//!
//! Needs the Kafka jars and Java of `scripts/setup-brokers.sh`, and its PostgreSQL.

use crate::common;
use crate::scale;

use std::time::{Duration, Instant};

use scale::{assignments, Broker, Options, ScaleOut};
use tributary_proto::events::envelope::Payload;

const PATIENCE: Duration = Duration::from_secs(600);

const PIPELINE: &str = r#"
jobs:
  compile:
    matrix:
      n: ["1", "2"]
    steps:
      - script:
          - echo compile-${{ matrix.n }}
          - sleep 1
  test:
    needs: compile
    steps:
      - echo test
"#;

/// How long a trigger may keep failing as unavailable right after the broker came back (the
/// API's readiness probe answered, its producer may still be reconnecting).
const TRIGGER_PATIENCE: Duration = Duration::from_secs(120);

/// Triggers through API `api`. Only an error saying the log is unavailable is retried, for
/// [`TRIGGER_PATIENCE`]; any other error fails the test at once with what it said.
fn trigger(out: &ScaleOut, api: usize) -> String {
    let deadline = Instant::now() + TRIGGER_PATIENCE;
    loop {
        let result = out.cli(api, &["trigger", "p"]);
        if result.status.success() {
            return String::from_utf8_lossy(&result.stdout)
                .lines()
                .next()
                .expect("build id")
                .trim()
                .to_owned();
        }
        let err = String::from_utf8_lossy(&result.stderr).into_owned();
        let transient = ["unavailable", "Unavailable", "timed out", "deadline"]
            .iter()
            .any(|w| err.contains(w));
        assert!(
            transient && Instant::now() < deadline,
            "trigger through api-{api} failed{}: {err}",
            if transient {
                format!(" for {TRIGGER_PATIENCE:?}")
            } else {
                String::new()
            }
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn services_reconnect_after_the_broker_restarts_and_every_build_finishes() {
    tributary_testkit::require!(Kafka, Postgres);
    let mut broker = Broker::start();
    let mut out = ScaleOut::start(Options {
        projectors: 1,
        brokers: Some(broker.addr.clone()),
        ..Options::default()
    });
    out.project("p", PIPELINE);
    out.agent_id(0);
    out.agent_id(1);

    let mut builds: Vec<String> = (0..8).map(|i| trigger(&out, i % 2)).collect();
    out.wait_events("builds to be running", PATIENCE, |events| {
        events
            .iter()
            .any(|e| matches!(&e.env.payload, Some(Payload::JobStarted(_))))
            && scale::finished_of(events).len() >= 2
    });

    broker.kill();
    // Down while jobs run, longer than the producer's delivery timeout (30 s), so appends
    // really fail (agents re-send their events); the health endpoints report the outage.
    let down = Instant::now();
    for s in out.schedulers.iter().chain(&out.projectors) {
        common::wait_until(
            &format!("{} to report the outage", s.name),
            Duration::from_secs(120),
            || {
                common::http_get(&s.addr, "/readyz")
                    .is_some_and(|(code, body)| code == 503 && body.contains("Kafka"))
            },
        );
    }
    let remaining = Duration::from_secs(40).saturating_sub(down.elapsed());
    std::thread::sleep(remaining);
    out.assert_all_running();
    broker.start_again();

    for s in out
        .schedulers
        .iter()
        .chain(&out.projectors)
        .chain(&out.apis)
    {
        common::wait_until(
            &format!("{} to report the broker back", s.name),
            PATIENCE,
            || common::http_get(&s.addr, "/readyz").is_some_and(|(code, _)| code == 200),
        );
    }
    builds.extend((0..6).map(|i| trigger(&out, i % 2)));
    out.wait_finished(&builds, PATIENCE);
    out.assert_all_running();

    let finished = out.finished();
    for id in &builds {
        assert_eq!(finished[id], "succeeded", "build {id}");
    }
    let events = out.events().to_vec();
    let assigned = assignments(&events);
    let twice: Vec<_> = assigned.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "attempts assigned twice: {twice:?}");
    let requeued = events
        .iter()
        .filter(|e| matches!(&e.env.payload, Some(Payload::JobRequeued(_))))
        .count();
    let waited = out
        .schedulers
        .iter()
        .filter(|s| s.log_text().contains("failed; retrying in 1 s"))
        .count();
    eprintln!(
        "{} events, {} attempts assigned, {requeued} requeued; {waited} scheduler(s) retried \
         an append during the outage",
        events.len(),
        assigned.len()
    );

    out.wait_projected(PATIENCE);
    for id in &builds {
        let b = out.get(0, id);
        assert_eq!(b["status"], "succeeded", "{b}");
    }
    let check = out.replay(true);
    assert!(
        check.status.success(),
        "replay --check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    drop(out);
    drop(broker);
}
