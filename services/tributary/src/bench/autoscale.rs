//! `tributary bench autoscale`: replays a day of job arrivals through the autoscaler's policy
//! with simulated time, and through two fixed pools, and prints cost and queue waits.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use tributary_autoscaler::config::{format_money, Config, SECOND_US};
use tributary_autoscaler::sim::{simulate, Mode, SimOptions, SimReport, TraceJob};
use tributary_autoscaler::trace;

/// The pool the benchmark sizes unless `--config` says otherwise.
const DEFAULT_POOL: &str = include_str!("../../../autoscaler/traces/bench-pool.toml");
const DAY_US: i64 = 24 * 3600 * SECOND_US;

pub struct Options {
    pub trace: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub generate: Option<PathBuf>,
    pub seed: u64,
}

pub fn bench_autoscale(options: Options) -> anyhow::Result<ExitCode> {
    if let Some(out) = &options.generate {
        let day = trace::generate_day(options.seed);
        std::fs::write(out, trace::render(&day))
            .with_context(|| format!("cannot write {}", out.display()))?;
        println!(
            "wrote {} jobs (seed {}) to {}",
            day.len(),
            options.seed,
            out.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let Some(path) = &options.trace else {
        anyhow::bail!(
            "no trace: pass --trace FILE (services/autoscaler/traces/day.csv is a synthetic day), \
             or --generate FILE to make one"
        );
    };
    let jobs = read_trace(path)?;
    let config = match &options.config {
        Some(p) => Config::load(p)?,
        None => Config::from_toml(DEFAULT_POOL, "bench-pool.toml (built in)")?,
    };
    let work: i64 = jobs.iter().map(|j| j.duration_us).sum();
    let peak_hour = (0..24)
        .map(|h| {
            jobs.iter()
                .filter(|j| j.arrival_us / (3600 * SECOND_US) == h)
                .count()
        })
        .max()
        .unwrap_or(0);
    println!(
        "bench autoscale: {} ({} jobs, {:.1} machine-hours of work, busiest hour {} jobs)",
        path.display(),
        jobs.len(),
        work as f64 / (3600.0 * SECOND_US as f64),
        peak_hour
    );
    let kinds: Vec<String> = config
        .kinds
        .iter()
        .map(|k| {
            format!(
                "{} (capacity {}, {}/h, billed per {} s, max {})",
                k.name,
                k.capacity,
                format_money(k.price_per_hour_micros),
                k.billing_granularity_secs,
                k.max_agents
            )
        })
        .collect();
    println!("pool: {}", kinds.join("; "));
    println!(
        "policy: grace {} s, renewal margin {} s, target wait {} s, budget {}/h; decisions every 5 s, 1 s clock",
        config.grace_us / SECOND_US,
        config.renewal_margin_us / SECOND_US,
        config.target_wait_us / SECOND_US,
        format_money(config.budget_per_hour_micros)
    );
    let sim = SimOptions {
        until_us: DAY_US,
        ..SimOptions::default()
    };
    let started = std::time::Instant::now();
    let policy = simulate(&jobs, &config, &Mode::Policy, &sim);
    let elapsed = started.elapsed();
    let peak: Vec<(String, u32)> = config
        .kinds
        .iter()
        .map(|k| {
            (
                k.name.clone(),
                policy
                    .peak_by_kind
                    .get(&k.name)
                    .copied()
                    .unwrap_or(0)
                    .max(1),
            )
        })
        .collect();
    let one: Vec<(String, u32)> = config.kinds.iter().map(|k| (k.name.clone(), 1)).collect();
    let fixed_peak = simulate(&jobs, &config, &Mode::Fixed(peak.clone()), &sim);
    let fixed_one = simulate(&jobs, &config, &Mode::Fixed(one.clone()), &sim);

    println!();
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "pool", "cost", "wait p50", "wait p95", "wait max", "unstarted"
    );
    row("autoscaler policy", &policy);
    row(&format!("fixed, peak size ({})", sizes(&peak)), &fixed_peak);
    row(&format!("fixed, one ({})", sizes(&one)), &fixed_one);
    let (acquired, released) = policy
        .decisions
        .iter()
        .fold((0, 0), |(a, r), (_, d)| match d {
            tributary_autoscaler::Decision::Acquire { ids, .. } => (a + ids.len(), r),
            tributary_autoscaler::Decision::Release { .. } => (a, r + 1),
            _ => (a, r),
        });
    println!();
    println!(
        "policy: {acquired} agents acquired, {released} released, peak {} agents at once, peak \
         price {}/h; simulated in {:.2} s",
        policy.peak_agents,
        format_money(policy.peak_price_per_hour_micros),
        elapsed.as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn read_trace(path: &Path) -> anyhow::Result<Vec<TraceJob>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the trace {}", path.display()))?;
    Ok(trace::parse(&text, &path.display().to_string())?)
}

fn sizes(sizes: &[(String, u32)]) -> String {
    sizes
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(" + ")
}

fn row(name: &str, r: &SimReport) {
    let s = |us: i64| format!("{:.0} s", us as f64 / SECOND_US as f64);
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>10} {:>10}",
        name,
        format_money(r.cost_micros),
        s(r.wait_percentile(50.0)),
        s(r.wait_percentile(95.0)),
        s(r.wait_percentile(100.0)),
        r.unstarted
    );
}
