//! The policy: from the queue, the pool and the time, what to acquire, drain and release.
//!
//! A pure function ([`decide`]) over plain data ([`Queue`], [`Pool`], [`Config`]): no clock, no
//! I/O. Its rules, each kept by one step below and checked by the property tests:
//!
//! * **The queue drains.** Waiting jobs go to the kind the scheduler would route them to
//!   ([`Config::kind_for`]). A kind gets enough slots for its waiting work to drain in about
//!   `target_wait` (at least one slot while anything waits), counting every slot it has or is
//!   starting, busy ones too (they free up and take the queue).
//! * **Nothing is paid after the grace period.** An idle agent with no job waiting for its
//!   kind for `grace` is drained, then released.
//! * **Billing periods are used up.** An agent billed by periods is let go only within
//!   `renewal_margin` of the end of its paid period; before that it is kept (it is paid for
//!   anyway); at the margin it is renewed if needed, released if not.
//! * **The budget is hard.** An acquisition never takes the summed hourly price of the pool
//!   (every agent not yet released) above `budget_per_hour`. If the budget was lowered below
//!   the pool's price, agents are drained (idle ones first) until it fits once they are gone.
//! * **A busy agent is never released.** Release comes only after drain, when the agent runs
//!   nothing and has been draining for `drain_settle`, or when it never connected or is gone.
//! * **No flapping.** A kind is never both grown and shrunk in one round; an agent is never
//!   drained within `grace` of its kind's last acquisition; a draining agent is never brought
//!   back; deciding again on the state the decisions lead to decides nothing new.

use std::collections::BTreeMap;

use crate::config::{
    billed_secs, cost_micros, format_money, period_end_us, Config, KindConfig, SECOND_US,
};

/// Jobs waiting for an agent with these labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// The jobs' `runs-on` labels, sorted (empty = any generic agent).
    pub labels: Vec<String>,
    pub jobs: u32,
    /// Expected run time of those jobs, summed (from past runs of the same jobs).
    pub work_us: i64,
}

/// The waiting jobs, per label set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Queue {
    pub waiting: Vec<Demand>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Acquired, not connected yet.
    Starting,
    /// Connected, running nothing.
    Idle,
    /// Connected, running `busy_slots` jobs.
    Busy,
    /// Takes no new work; finishes what it runs.
    Draining,
    /// Was connected and went away without being drained (crashed, machine lost).
    Gone,
}

/// One agent the autoscaler acquired and has not released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolAgent {
    /// The autoscaler's id (`as-<kind>-<n>`).
    pub id: String,
    /// The agent's id on the server once it registered.
    pub agent_id: String,
    pub kind: String,
    pub capacity: u32,
    pub phase: Phase,
    /// Jobs it runs now.
    pub busy_slots: u32,
    /// When it was acquired: billing starts here.
    pub started_us: i64,
    /// Since when it has run nothing (connect time, or the end of its last job).
    pub idle_since_us: i64,
    /// Since when it drains, or since when it is gone.
    pub since_us: i64,
    pub price_per_hour_micros: u64,
    pub billing_granularity_secs: u64,
}

impl PoolAgent {
    fn cost_until(&self, now_us: i64) -> (u64, u64) {
        let secs = billed_secs(self.started_us, now_us, self.billing_granularity_secs);
        (secs, cost_micros(secs, self.price_per_hour_micros))
    }

    /// Within `margin` of the end of its paid period (always, for agents billed by periods
    /// no longer than the margin).
    pub fn in_renewal_window(&self, now_us: i64, margin_us: i64) -> bool {
        now_us >= period_end_us(self.started_us, now_us, self.billing_granularity_secs) - margin_us
    }

    /// Slots it offers to the queue: all of a starting agent's, the free and soon-free ones of
    /// a connected agent; none of a draining or gone one.
    fn slots(&self) -> u32 {
        match self.phase {
            Phase::Starting | Phase::Idle | Phase::Busy => self.capacity,
            Phase::Draining | Phase::Gone => 0,
        }
    }
}

/// The agents the autoscaler pays for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pool {
    pub agents: Vec<PoolAgent>,
    /// Agents ever requested: the next request id's number.
    pub requested: u64,
    /// Time of the last acquisition per kind.
    pub last_acquired_us: BTreeMap<String, i64>,
}

impl Pool {
    /// Summed hourly price of every agent not released.
    pub fn price_per_hour_micros(&self) -> u64 {
        self.agents.iter().map(|a| a.price_per_hour_micros).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Acquire `ids.len()` agents of `kind` (one AgentRequested each).
    Acquire {
        kind: String,
        ids: Vec<String>,
        labels: Vec<String>,
        capacity: u32,
        price_per_hour_micros: u64,
        billing_granularity_secs: u64,
        reason: String,
        /// Committed by each agent: its first billing period.
        cost_micros: u64,
    },
    /// The agent takes no new work and finishes what it runs.
    Drain {
        id: String,
        agent_id: String,
        reason: String,
    },
    /// Stop paying for the agent.
    Release {
        id: String,
        agent_id: String,
        reason: String,
        billed_secs: u64,
        cost_micros: u64,
    },
}

/// The id of the `n`-th agent ever requested, of `kind`.
pub fn request_id(kind: &str, n: u64) -> String {
    format!("as-{kind}-{n}")
}

fn secs(us: i64) -> String {
    let s = us as f64 / SECOND_US as f64;
    if s >= 10.0 || s == s.trunc() {
        format!("{s:.0}s")
    } else {
        format!("{s:.1}s")
    }
}

/// What to do now. Releases first, then acquisitions, then drains; deterministic (kinds in
/// configuration order, agents in pool order).
pub fn decide(queue: &Queue, pool: &Pool, now_us: i64, config: &Config) -> Vec<Decision> {
    let mut out = Vec::new();

    // 1. Release what is drained, never came up, or went away. Never a busy agent.
    for a in &pool.agents {
        if a.busy_slots > 0 {
            continue;
        }
        let reason = match a.phase {
            Phase::Draining if now_us - a.since_us >= config.drain_settle_us => {
                "drained: runs nothing".to_owned()
            }
            Phase::Starting if now_us - a.started_us > config.startup_timeout_us => {
                format!("did not connect within {}", secs(config.startup_timeout_us))
            }
            Phase::Gone if now_us - a.since_us > config.startup_timeout_us => format!(
                "disconnected for more than {} without being drained",
                secs(config.startup_timeout_us)
            ),
            _ => continue,
        };
        let (billed_secs, cost_micros) = a.cost_until(now_us);
        out.push(Decision::Release {
            id: a.id.clone(),
            agent_id: a.agent_id.clone(),
            reason,
            billed_secs,
            cost_micros,
        });
    }

    // Demand per kind, with the scheduler's routing.
    let mut demand: BTreeMap<&str, (u32, i64, Vec<String>)> = BTreeMap::new();
    for d in &queue.waiting {
        if d.jobs == 0 {
            continue;
        }
        if let Some(kind) = config.kind_for(&d.labels) {
            let e = demand.entry(kind.name.as_str()).or_default();
            e.0 += d.jobs;
            e.1 += d.work_us.max(0);
            if !d.labels.is_empty() {
                e.2.push(format!("[{}]", d.labels.join(", ")));
            }
        }
    }

    // 2. Acquire where work waits, within max_agents and the budget.
    let mut price = pool.price_per_hour_micros();
    let mut requested = pool.requested;
    let mut grown: Vec<&str> = Vec::new();
    for kind in &config.kinds {
        let Some((jobs, work_us, labels)) = demand.get(kind.name.as_str()) else {
            continue;
        };
        let of_kind: Vec<&PoolAgent> = pool.agents.iter().filter(|a| a.kind == kind.name).collect();
        let have: u32 = of_kind.iter().map(|a| a.slots()).sum();
        let busy: u32 = of_kind
            .iter()
            .filter(|a| a.slots() > 0)
            .map(|a| a.busy_slots)
            .sum();
        let by_work = (*work_us as u64).div_ceil(config.target_wait_us.max(1) as u64);
        let want = (by_work.min(u64::from(*jobs + busy)) as u32).max(1);
        if want <= have {
            continue;
        }
        let mut n = (want - have).div_ceil(kind.capacity.max(1));
        let live = of_kind.len() as u32;
        n = n.min(kind.max_agents.saturating_sub(live));
        let room = config.budget_per_hour_micros.saturating_sub(price);
        if let Some(fit) = room.checked_div(kind.price_per_hour_micros) {
            n = n.min(fit.min(u64::from(u32::MAX)) as u32);
        }
        if n == 0 {
            continue;
        }
        let ids: Vec<String> = (0..n)
            .map(|i| request_id(&kind.name, requested + u64::from(i)))
            .collect();
        requested += u64::from(n);
        price += kind.price_per_hour_micros * u64::from(n);
        grown.push(&kind.name);
        let first = kind.billing_granularity_secs.max(1);
        let what = if labels.is_empty() {
            String::new()
        } else {
            format!(" for {}", labels.join(" "))
        };
        out.push(Decision::Acquire {
            kind: kind.name.clone(),
            ids,
            labels: kind.labels.clone(),
            capacity: kind.capacity,
            price_per_hour_micros: kind.price_per_hour_micros,
            billing_granularity_secs: kind.billing_granularity_secs,
            reason: format!(
                "{jobs} job(s) wait{what} (about {} of work): {want} slot(s) drain them in about \
                 {}, {have} there or starting; {n} x {} at {}/h",
                secs(*work_us),
                secs(config.target_wait_us),
                kind.name,
                format_money(kind.price_per_hour_micros)
            ),
            cost_micros: cost_micros(first, kind.price_per_hour_micros),
        });
    }

    // 3. Let idle agents go: no work for their kind for the grace period, at the end of their
    //    paid period.
    let mut draining_price: u64 = pool
        .agents
        .iter()
        .filter(|a| a.phase == Phase::Draining)
        .map(|a| a.price_per_hour_micros)
        .sum();
    let mut drained: Vec<&str> = Vec::new();
    for a in &pool.agents {
        if a.phase != Phase::Idle || grown.contains(&a.kind.as_str()) {
            continue;
        }
        let Some(kind) = config.kind(&a.kind) else {
            // A kind no longer configured: it is not wanted.
            drained.push(&a.id);
            draining_price += a.price_per_hour_micros;
            out.push(drain(a, format!("kind {} is no longer configured", a.kind)));
            continue;
        };
        if demand.contains_key(kind.name.as_str()) {
            continue;
        }
        let idle = now_us - a.idle_since_us;
        let since_acquired = pool
            .last_acquired_us
            .get(&a.kind)
            .map_or(i64::MAX, |t| now_us - t);
        if idle < config.grace_us || since_acquired < config.grace_us {
            continue;
        }
        if !a.in_renewal_window(now_us, config.renewal_margin_us) {
            continue; // paid until the period ends anyway
        }
        drained.push(&a.id);
        draining_price += a.price_per_hour_micros;
        out.push(drain(
            a,
            format!(
                "idle for {} with no job waiting for kind {}{}",
                secs(idle),
                kind.name,
                renewal_note(a, now_us, kind)
            ),
        ));
    }

    // 4. Over budget (it was lowered): drain until the pool fits once the drained are gone.
    let budget = config.budget_per_hour_micros;
    if price.saturating_sub(draining_price) > budget {
        let mut candidates: Vec<&PoolAgent> = pool
            .agents
            .iter()
            .filter(|a| {
                matches!(a.phase, Phase::Idle | Phase::Busy | Phase::Starting)
                    && !drained.contains(&a.id.as_str())
            })
            .collect();
        // Idle first, then starting, then busy; the newest first among equals.
        candidates.sort_by_key(|a| {
            let rank = match a.phase {
                Phase::Idle => 0,
                Phase::Starting => 1,
                _ => 2,
            };
            (rank, std::cmp::Reverse(a.started_us))
        });
        for a in candidates {
            if price.saturating_sub(draining_price) <= budget {
                break;
            }
            draining_price += a.price_per_hour_micros;
            out.push(drain(
                a,
                format!(
                    "the pool costs {}/h, over the budget of {}/h",
                    format_money(price),
                    format_money(budget)
                ),
            ));
        }
    }
    out
}

fn drain(a: &PoolAgent, reason: String) -> Decision {
    Decision::Drain {
        id: a.id.clone(),
        agent_id: a.agent_id.clone(),
        reason,
    }
}

fn renewal_note(a: &PoolAgent, now_us: i64, kind: &KindConfig) -> String {
    if kind.billing_granularity_secs <= 1 {
        return String::new();
    }
    let end = period_end_us(a.started_us, now_us, a.billing_granularity_secs);
    format!(
        "; its paid period ends in {}: not renewed",
        secs((end - now_us).max(0))
    )
}

/// The pool after `decisions` take effect at `now_us`: acquired agents starting, drained ones
/// draining, released ones gone. What the log's fold gives once the decisions' events are on
/// it; the simulator and the property tests use it.
pub fn apply(pool: &mut Pool, decisions: &[Decision], now_us: i64) {
    for d in decisions {
        match d {
            Decision::Acquire {
                kind,
                ids,
                capacity,
                price_per_hour_micros,
                billing_granularity_secs,
                ..
            } => {
                for id in ids {
                    pool.agents.push(PoolAgent {
                        id: id.clone(),
                        agent_id: String::new(),
                        kind: kind.clone(),
                        capacity: *capacity,
                        phase: Phase::Starting,
                        busy_slots: 0,
                        started_us: now_us,
                        idle_since_us: now_us,
                        since_us: now_us,
                        price_per_hour_micros: *price_per_hour_micros,
                        billing_granularity_secs: *billing_granularity_secs,
                    });
                }
                pool.requested += ids.len() as u64;
                pool.last_acquired_us.insert(kind.clone(), now_us);
            }
            Decision::Drain { id, .. } => {
                if let Some(a) = pool.agents.iter_mut().find(|a| &a.id == id) {
                    if a.phase != Phase::Draining {
                        a.phase = Phase::Draining;
                        a.since_us = now_us;
                    }
                }
            }
            Decision::Release { id, .. } => pool.agents.retain(|a| &a.id != id),
        }
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
