//! A simulated cluster with a simulated clock: replays job arrivals through the policy (or a
//! fixed pool), assigning jobs like the scheduler does, and measures cost and queue waits.
//! `tributary bench autoscale` and the property tests run it; it does no I/O.

use std::collections::{BTreeMap, VecDeque};

use crate::config::{billed_secs, cost_micros, Config, KindConfig, SECOND_US};
use crate::durations::Durations;
use crate::policy::{apply, decide, Decision, Demand, Phase, Pool, PoolAgent, Queue};

/// One job of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceJob {
    pub arrival_us: i64,
    pub duration_us: i64,
    /// Its name: past runs of the same name give the expected duration.
    pub name: String,
    pub labels: Vec<String>,
}

/// Who sizes the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The policy, every `tick`.
    Policy,
    /// So many agents of each kind (by name), there from the start and never released.
    Fixed(Vec<(String, u32)>),
}

#[derive(Clone, Debug)]
pub struct SimOptions {
    /// How often the policy decides.
    pub tick_us: i64,
    /// Clock resolution: jobs start and end on these steps.
    pub step_us: i64,
    /// A fixed pool is paid at least until then (the length of the trace's day).
    pub until_us: i64,
    /// Give up this long after the last arrival (an unfinished job is reported, not hidden).
    pub horizon_us: i64,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            tick_us: 5 * SECOND_US,
            step_us: SECOND_US,
            until_us: 0,
            horizon_us: 48 * 3600 * SECOND_US,
        }
    }
}

/// What a run cost and how long jobs waited.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub cost_micros: u64,
    /// Queue wait of every job that started, arrival to start.
    pub waits_us: Vec<i64>,
    /// Jobs that never started (within the horizon).
    pub unstarted: usize,
    /// Jobs that never finished.
    pub unfinished: usize,
    /// Most agents paid for at once, and per kind.
    pub peak_agents: u32,
    pub peak_by_kind: BTreeMap<String, u32>,
    /// Highest summed hourly price of the pool at any time.
    pub peak_price_per_hour_micros: u64,
    /// Every decision with its time.
    pub decisions: Vec<(i64, Decision)>,
    /// Pool snapshots right before each decision round (for property tests).
    pub rounds: Vec<(i64, Queue, Pool)>,
    /// When the last job finished, and when the last agent was released.
    pub last_finish_us: i64,
    pub last_release_us: i64,
    /// A busy agent was released (must never happen).
    pub released_busy: u32,
}

impl SimReport {
    /// The `p`-th percentile (0..=100) of the waits, in µs.
    pub fn wait_percentile(&self, p: f64) -> i64 {
        percentile(&self.waits_us, p)
    }
}

pub fn percentile(values: &[i64], p: f64) -> i64 {
    if values.is_empty() {
        return 0;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

struct SimAgent {
    pool: PoolAgent,
    labels: Vec<String>,
    ready_us: i64,
    /// The jobs it runs.
    running: Vec<Run>,
}

struct Run {
    end_us: i64,
    name: String,
    duration_us: i64,
}

impl SimAgent {
    fn takes_work(&self) -> bool {
        matches!(self.pool.phase, Phase::Idle | Phase::Busy)
    }

    fn free(&self) -> u32 {
        self.pool.capacity.saturating_sub(self.running.len() as u32)
    }
}

/// Replays `trace` (sorted by arrival) with `config`'s kinds.
pub fn simulate(
    trace: &[TraceJob],
    config: &Config,
    mode: &Mode,
    options: &SimOptions,
) -> SimReport {
    let mut report = SimReport::default();
    let mut agents: Vec<SimAgent> = Vec::new();
    let mut pool_meta = Pool::default();
    let mut durations = Durations::default();
    if let Mode::Fixed(sizes) = mode {
        for (name, n) in sizes {
            if let Some(kind) = config.kind(name) {
                for i in 0..*n {
                    agents.push(new_agent(kind, format!("fixed-{name}-{i}"), 0, 0));
                }
            }
        }
    }
    let step = options.step_us.max(1);
    let tick = options.tick_us.max(step);
    let last_arrival = trace.last().map_or(0, |j| j.arrival_us);
    let give_up = last_arrival + options.horizon_us;
    let mut next_arrival = 0usize;
    let mut waiting: VecDeque<usize> = VecDeque::new();
    let mut finished = 0usize;
    let mut lost = 0usize;
    let mut started = 0usize;
    let mut t = 0i64;
    let mut next_tick = 0i64;
    loop {
        let mut dirty = false;
        // Jobs end.
        for a in &mut agents {
            let mut i = 0;
            while i < a.running.len() {
                if a.running[i].end_us <= t {
                    let run = a.running.swap_remove(i);
                    let end = run.end_us;
                    durations.record(&run.name, run.duration_us);
                    finished += 1;
                    report.last_finish_us = report.last_finish_us.max(end);
                    if a.running.is_empty() {
                        a.pool.idle_since_us = end;
                    }
                    dirty = true;
                } else {
                    i += 1;
                }
            }
            a.pool.busy_slots = a.running.len() as u32;
            if a.pool.phase == Phase::Starting && a.ready_us <= t {
                a.pool.phase = Phase::Idle;
                a.pool.idle_since_us = a.ready_us;
                dirty = true;
            }
            if matches!(a.pool.phase, Phase::Idle | Phase::Busy) {
                a.pool.phase = if a.running.is_empty() {
                    Phase::Idle
                } else {
                    Phase::Busy
                };
            }
        }
        // Jobs arrive.
        while next_arrival < trace.len() && trace[next_arrival].arrival_us <= t {
            waiting.push_back(next_arrival);
            next_arrival += 1;
            dirty = true;
        }
        // The scheduler assigns, first come first served.
        if dirty && !waiting.is_empty() {
            let mut still = VecDeque::with_capacity(waiting.len());
            while let Some(j) = waiting.pop_front() {
                let job = &trace[j];
                match route(&agents, &job.labels) {
                    Some(i) => {
                        let a = &mut agents[i];
                        a.running.push(Run {
                            end_us: t + job.duration_us.max(step),
                            name: job.name.clone(),
                            duration_us: job.duration_us,
                        });
                        a.pool.busy_slots = a.running.len() as u32;
                        a.pool.phase = Phase::Busy;
                        report.waits_us.push(t - job.arrival_us);
                        started += 1;
                    }
                    None => still.push_back(j),
                }
            }
            waiting = still;
        }
        // The policy decides.
        if matches!(mode, Mode::Policy) && t >= next_tick {
            next_tick = t + tick;
            let queue = queue_of(trace, &waiting, &durations, config);
            let pool = Pool {
                agents: agents.iter().map(|a| a.pool.clone()).collect(),
                ..pool_meta.clone()
            };
            let decisions = decide(&queue, &pool, t, config);
            if !decisions.is_empty() {
                report.rounds.push((t, queue, pool.clone()));
            }
            let mut after = pool;
            apply(&mut after, &decisions, t);
            pool_meta.requested = after.requested;
            pool_meta.last_acquired_us = after.last_acquired_us.clone();
            for d in &decisions {
                match d {
                    Decision::Acquire { kind, ids, .. } => {
                        if let Some(k) = config.kind(kind) {
                            for id in ids {
                                agents.push(new_agent(k, id.clone(), t, t + k.boot_us));
                            }
                        }
                    }
                    Decision::Drain { id, .. } => {
                        if let Some(a) = agents.iter_mut().find(|a| &a.pool.id == id) {
                            if a.pool.phase != Phase::Draining {
                                a.pool.phase = Phase::Draining;
                                a.pool.since_us = t;
                            }
                        }
                    }
                    Decision::Release {
                        id, cost_micros, ..
                    } => {
                        if let Some(i) = agents.iter().position(|a| &a.pool.id == id) {
                            if !agents[i].running.is_empty() {
                                report.released_busy += 1;
                                lost += agents[i].running.len();
                            }
                            agents.remove(i);
                            report.cost_micros += cost_micros;
                            report.last_release_us = t;
                        }
                    }
                }
                report.decisions.push((t, d.clone()));
            }
        }
        report.peak_agents = report.peak_agents.max(agents.len() as u32);
        let mut by_kind: BTreeMap<&str, u32> = BTreeMap::new();
        for a in &agents {
            *by_kind.entry(a.pool.kind.as_str()).or_default() += 1;
        }
        for (k, n) in by_kind {
            let peak = report.peak_by_kind.entry(k.to_owned()).or_default();
            *peak = (*peak).max(n);
        }
        let price: u64 = agents.iter().map(|a| a.pool.price_per_hour_micros).sum();
        report.peak_price_per_hour_micros = report.peak_price_per_hour_micros.max(price);

        let all_done =
            next_arrival == trace.len() && finished + lost >= trace.len() && waiting.is_empty();
        let settled = match mode {
            Mode::Policy => agents.is_empty(),
            Mode::Fixed(_) => t >= options.until_us,
        };
        if (all_done && settled) || t > give_up {
            break;
        }
        t += step;
    }
    // What is still paid for is billed until now.
    let end = t.max(options.until_us);
    for a in &agents {
        let paid_until = if matches!(mode, Mode::Fixed(_)) {
            end
        } else {
            t
        };
        report.cost_micros += cost_micros(
            billed_secs(
                a.pool.started_us,
                paid_until,
                a.pool.billing_granularity_secs,
            ),
            a.pool.price_per_hour_micros,
        );
    }
    report.unstarted = trace.len() - started;
    report.unfinished = trace.len().saturating_sub(finished);
    report
}

fn new_agent(kind: &KindConfig, id: String, now_us: i64, ready_us: i64) -> SimAgent {
    SimAgent {
        pool: PoolAgent {
            id,
            agent_id: String::new(),
            kind: kind.name.clone(),
            capacity: kind.capacity,
            phase: if ready_us <= now_us {
                Phase::Idle
            } else {
                Phase::Starting
            },
            busy_slots: 0,
            started_us: now_us,
            idle_since_us: ready_us,
            since_us: now_us,
            price_per_hour_micros: kind.price_per_hour_micros,
            billing_granularity_secs: kind.billing_granularity_secs,
        },
        labels: kind.labels.clone(),
        ready_us,
        running: Vec::new(),
    }
}

/// The scheduler's routing: agents carrying all labels, else generic agents; the one with the
/// most free slots. `None` when the candidates are all full (or there are none).
fn route(agents: &[SimAgent], labels: &[String]) -> Option<usize> {
    let available = |pred: &dyn Fn(&SimAgent) -> bool| -> Vec<usize> {
        agents
            .iter()
            .enumerate()
            .filter(|(_, a)| a.takes_work() && pred(a))
            .map(|(i, _)| i)
            .collect()
    };
    let labelled = available(&|a| labels.iter().all(|l| a.labels.contains(l)));
    let generic = available(&|a| a.labels.is_empty());
    let candidates = if labels.is_empty() {
        if generic.is_empty() {
            labelled
        } else {
            generic
        }
    } else if labelled.is_empty() {
        generic
    } else {
        labelled
    };
    candidates
        .into_iter()
        .filter(|&i| agents[i].free() > 0)
        .max_by_key(|&i| (agents[i].free(), std::cmp::Reverse(i)))
}

fn queue_of(
    trace: &[TraceJob],
    waiting: &VecDeque<usize>,
    durations: &Durations,
    config: &Config,
) -> Queue {
    let mut groups: BTreeMap<Vec<String>, Demand> = BTreeMap::new();
    for &j in waiting {
        let job = &trace[j];
        let mut labels = job.labels.clone();
        labels.sort();
        let d = groups.entry(labels.clone()).or_insert_with(|| Demand {
            labels,
            ..Demand::default()
        });
        d.jobs += 1;
        d.work_us += durations.expected(&job.name, config.default_job_us);
    }
    Queue {
        waiting: groups.into_values().collect(),
    }
}
