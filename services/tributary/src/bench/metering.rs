//! `tributary bench metering`: a synthetic log of usage ticks over many tenants; prints
//! ticks/s through the metering projection (fold + SQLite commits) and the time `audit`
//! takes to replay it (read + decode + fold, no writes).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use tributary_eventlog::EventLog;
use tributary_metering::audit::{replay, replay_log};
use tributary_metering::calendar::Day;
use tributary_metering::{MeteringProjector, MeteringState, MeteringStore};
use tributary_projections::BuildsState;
use tributary_proto::events::{envelope::Payload, Envelope, UsageTick};

/// CPU seconds (user + system) this process used so far: on a shared machine, events per
/// CPU-second say more about the code than events per wall-clock second.
fn cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass; RUSAGE_SELF is always valid.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Wall-clock and CPU time of one phase.
struct Phase {
    wall: Instant,
    cpu: f64,
}

impl Phase {
    fn start() -> Phase {
        Phase {
            wall: Instant::now(),
            cpu: cpu_secs(),
        }
    }

    /// `2.69s wall, 371416 events/s; 3.10 CPU-s, 322580 events/CPU-s`
    fn report(&self, events: u64) -> String {
        let wall = self.wall.elapsed().as_secs_f64();
        let cpu = cpu_secs() - self.cpu;
        format!(
            "{wall:.2}s wall, {:.0} events/s; {cpu:.2} CPU-s, {:.0} events/CPU-s",
            events as f64 / wall,
            events as f64 / cpu.max(1e-9)
        )
    }
}

/// Jobs running at once: their ticks interleave on the log, as builds' partitions do.
const CONCURRENT_JOBS: u64 = 64;
const TICK_MS: u64 = 10_000;

pub async fn bench(
    ticks: u64,
    tenants: u64,
    ticks_per_job: u64,
    data: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let tenants = tenants.max(1);
    let ticks_per_job = ticks_per_job.max(1);
    let tmp = tempfile::tempdir()?;
    let dir = data.unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let log = Arc::new(
        tributary_eventlog::sqlite::SqliteLog::open(&dir.join("bench-metering-events.db")).await?,
    );
    let jobs = ticks.div_ceil(ticks_per_job);
    println!(
        "bench metering: {ticks} usage ticks, {jobs} jobs of {ticks_per_job} ticks over {tenants} \
         tenants, {CONCURRENT_JOBS} jobs interleaved at a time, across a month end (sqlite, {})",
        dir.display()
    );

    // The synthetic log: starting 2 h before the end of October 2026.
    let base = Day::parse("2026-11-01").map_or(0, |d| d.start_us()) - 7_200_000_000;
    let build_ids: Vec<String> = (0..jobs).map(|_| tributary_proto::new_id()).collect();
    let phase = Phase::start();
    let mut batch = Vec::with_capacity(10_000);
    let mut written = 0u64;
    'outer: for wave in 0..jobs.div_ceil(CONCURRENT_JOBS) {
        for seq in 1..=ticks_per_job {
            for j in wave * CONCURRENT_JOBS..((wave + 1) * CONCURRENT_JOBS).min(jobs) {
                if written == ticks {
                    break 'outer;
                }
                let tenant = format!("tenant-{:04}", j % tenants);
                let start_us = base
                    + (wave * ticks_per_job * TICK_MS * 1000) as i64
                    + ((seq - 1) * TICK_MS * 1000) as i64;
                let mut env = Envelope::new(
                    &tenant,
                    "web",
                    &build_ids[j as usize],
                    Payload::UsageTick(UsageTick {
                        job: "build".into(),
                        attempt: 1,
                        agent_id: format!("agent-{}", j % 16),
                        machine_class: if j % 3 == 0 {
                            "linux-8cpu-32gb"
                        } else {
                            "linux-2cpu-4gb"
                        }
                        .into(),
                        millis: TICK_MS,
                        seq: seq as u32,
                        last: seq == ticks_per_job,
                        start_us,
                        end_us: start_us + (TICK_MS * 1000) as i64,
                    }),
                );
                env.time_us = start_us + (TICK_MS * 1000) as i64;
                batch.push(env);
                written += 1;
                if batch.len() == 10_000 {
                    log.append(&batch).await?;
                    batch.clear();
                }
            }
        }
    }
    if !batch.is_empty() {
        log.append(&batch).await?;
    }
    let end = log.end_offset().await?;
    println!("  generate + append:          {}", phase.report(end));

    // The projection: fold + one SQLite transaction per batch of 4096, from a fresh store.
    let store = MeteringStore::open(&dir.join("bench-metering.db")).await?;
    let mut projector = MeteringProjector::open(store.clone()).await?;
    let phase = Phase::start();
    projector.catch_up(log.as_ref()).await?;
    println!(
        "  metering projection (fold + SQLite commit per 16384): {} ({} usage records, {} job attempts)",
        phase.report(end),
        projector.state().usage.len(),
        projector.state().attempts.len()
    );

    let dyn_log: Arc<dyn EventLog> = log.clone();
    // Baseline: read + full protobuf decode (what a fold of decoded envelopes starts from).
    let phase = Phase::start();
    let mut n = 0u64;
    replay_log(dyn_log.clone(), end, |_, _| n += 1).await?;
    println!("  replay, read + full decode only: {}", phase.report(n));
    // The metering replay (`replay`, `replay --check`, `audit`'s metering side): read, then
    // view (ticks borrowed from the record) + fold.
    let phase = Phase::start();
    let replayed = replay(dyn_log.clone(), end).await?;
    println!(
        "  metering replay (read + view + fold): {}",
        phase.report(end)
    );
    // What `tributary audit` does: both folds over one pass, then the comparison.
    let phase = Phase::start();
    let mut builds = BuildsState::default();
    let mut metering = MeteringState::default();
    replay_log(dyn_log.clone(), end, |offset, env| {
        builds.apply(offset, env);
        metering.apply(offset, env);
    })
    .await?;
    let stored = store.load_all().await?;
    let diffs = tributary_metering::audit::compare(&stored, &metering, None);
    println!(
        "  full audit (both folds + load + compare): {}, {} differences",
        phase.report(end),
        diffs.len()
    );
    let ok = diffs.is_empty() && replayed == metering;
    log.close().await;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
