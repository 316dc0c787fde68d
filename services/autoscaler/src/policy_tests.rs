use proptest::prelude::*;

use super::*;
use crate::config::{KindConfig, MICROS};
use crate::sim::{simulate, Mode, SimOptions, TraceJob};

const S: i64 = SECOND_US;

fn kind(name: &str, labels: &[&str], capacity: u32, price: u64, gran: u64, max: u32) -> KindConfig {
    KindConfig {
        name: name.into(),
        labels: labels.iter().map(|l| l.to_string()).collect(),
        capacity,
        price_per_hour_micros: price,
        billing_granularity_secs: gran,
        max_agents: max,
        boot_us: 30 * S,
    }
}

fn config() -> Config {
    Config {
        kinds: vec![
            kind("gpu", &["gpu"], 1, 2 * MICROS, 3600, 2),
            kind("small", &[], 1, MICROS / 10, 1, 20),
        ],
        grace_us: 60 * S,
        budget_per_hour_micros: 10 * MICROS,
        renewal_margin_us: 300 * S,
        target_wait_us: 60 * S,
        default_job_us: 30 * S,
        startup_timeout_us: 120 * S,
        drain_settle_us: S,
        tick_us: S,
        queue_delay_us: 0,
        command: None,
        kubernetes: None,
    }
}

fn waiting(labels: &[&str], jobs: u32, each_us: i64) -> Demand {
    Demand {
        labels: labels.iter().map(|l| l.to_string()).collect(),
        jobs,
        work_us: each_us * i64::from(jobs),
    }
}

fn agent(id: &str, kind: &KindConfig, phase: Phase, busy: u32, started_us: i64) -> PoolAgent {
    PoolAgent {
        id: id.into(),
        agent_id: format!("agent-{id}"),
        kind: kind.name.clone(),
        capacity: kind.capacity,
        phase,
        busy_slots: busy,
        started_us,
        idle_since_us: started_us,
        since_us: started_us,
        price_per_hour_micros: kind.price_per_hour_micros,
        billing_granularity_secs: kind.billing_granularity_secs,
    }
}

fn acquired(ds: &[Decision]) -> Vec<(String, usize)> {
    ds.iter()
        .filter_map(|d| match d {
            Decision::Acquire { kind, ids, .. } => Some((kind.clone(), ids.len())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_burst_acquires_enough_slots_to_drain_it_in_the_target_time_once() {
    let c = config();
    let queue = Queue {
        waiting: vec![waiting(&[], 40, 10 * S)],
    };
    let mut pool = Pool::default();
    let ds = decide(&queue, &pool, 1000 * S, &c);
    // 400 s of work, 60 s target: 7 slots.
    assert_eq!(acquired(&ds), vec![("small".to_owned(), 7)]);
    let Decision::Acquire {
        ids,
        reason,
        cost_micros,
        ..
    } = &ds[0]
    else {
        unreachable!()
    };
    assert_eq!(ids[0], "as-small-0");
    assert!(reason.contains("40 job(s) wait"), "{reason}");
    assert_eq!(*cost_micros, 28); // one second at 0.10/h, rounded up
    apply(&mut pool, &ds, 1000 * S);
    assert!(
        decide(&queue, &pool, 1001 * S, &c).is_empty(),
        "starting agents cover the demand: nothing more"
    );
    // Once they run 7 jobs, 33 wait (330 s of work): 7 slots still suffice.
    for a in &mut pool.agents {
        a.phase = Phase::Busy;
        a.busy_slots = 1;
    }
    let later = Queue {
        waiting: vec![waiting(&[], 33, 10 * S)],
    };
    assert!(decide(&later, &pool, 1040 * S, &c).is_empty());
}

#[test]
fn labelled_jobs_go_to_their_kind_and_unknown_labels_to_the_generic_kind() {
    let c = config();
    let queue = Queue {
        waiting: vec![waiting(&["gpu"], 5, 600 * S), waiting(&["arm"], 1, 10 * S)],
    };
    let ds = decide(&queue, &Pool::default(), 0, &c);
    assert_eq!(
        acquired(&ds),
        vec![("gpu".to_owned(), 2), ("small".to_owned(), 1)],
        "gpu is capped at max_agents"
    );
}

#[test]
fn the_budget_caps_acquisitions() {
    let mut c = config();
    c.budget_per_hour_micros = 5 * MICROS; // two gpus (4/h) and ten small (1/h)
    let queue = Queue {
        waiting: vec![waiting(&["gpu"], 5, 600 * S), waiting(&[], 100, 600 * S)],
    };
    let mut pool = Pool::default();
    let ds = decide(&queue, &pool, 0, &c);
    assert_eq!(
        acquired(&ds),
        vec![("gpu".to_owned(), 2), ("small".to_owned(), 10)]
    );
    apply(&mut pool, &ds, 0);
    assert_eq!(pool.price_per_hour_micros(), 5 * MICROS);
    assert!(acquired(&decide(&queue, &pool, S, &c)).is_empty());
}

#[test]
fn an_idle_agent_is_drained_after_the_grace_period_then_released_with_its_cost() {
    let c = config();
    let small = c.kind("small").unwrap().clone();
    let mut pool = Pool::default();
    pool.agents.push(agent("a", &small, Phase::Idle, 0, 0));
    let empty = Queue::default();
    assert!(decide(&empty, &pool, 59 * S, &c).is_empty(), "within grace");
    let ds = decide(&empty, &pool, 61 * S, &c);
    assert!(
        matches!(&ds[..], [Decision::Drain { id, .. }] if id == "a"),
        "{ds:?}"
    );
    apply(&mut pool, &ds, 61 * S);
    assert!(decide(&empty, &pool, 61 * S, &c).is_empty(), "settling");
    let ds = decide(&empty, &pool, 63 * S, &c);
    match &ds[..] {
        [Decision::Release {
            id,
            billed_secs,
            cost_micros,
            ..
        }] => {
            assert_eq!(id, "a");
            assert_eq!(*billed_secs, 63);
            assert_eq!(*cost_micros, (63 * MICROS / 10).div_ceil(3600));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_hourly_agent_is_kept_until_the_end_of_its_paid_hour_then_not_renewed() {
    let c = config();
    let gpu = c.kind("gpu").unwrap().clone();
    let mut pool = Pool::default();
    pool.agents.push(agent("g", &gpu, Phase::Idle, 0, 0));
    let empty = Queue::default();
    // Idle well past the grace period, but the hour is paid: keep it.
    assert!(decide(&empty, &pool, 600 * S, &c).is_empty());
    assert!(decide(&empty, &pool, 3299 * S, &c).is_empty());
    // Within the renewal margin (5 min before the hour ends): no-go, drain.
    let ds = decide(&empty, &pool, 3300 * S, &c);
    match &ds[..] {
        [Decision::Drain { reason, .. }] => assert!(reason.contains("not renewed"), "{reason}"),
        other => panic!("{other:?}"),
    }
    apply(&mut pool, &ds, 3300 * S);
    let ds = decide(&empty, &pool, 3302 * S, &c);
    assert!(
        matches!(&ds[..], [Decision::Release { billed_secs: 3600, cost_micros, .. }] if *cost_micros == 2 * MICROS),
        "{ds:?}"
    );
    // Work waiting at the renewal point: go, it is renewed (kept).
    let mut pool = Pool::default();
    pool.agents.push(agent("g", &gpu, Phase::Busy, 1, 0));
    let queue = Queue {
        waiting: vec![waiting(&["gpu"], 1, 60 * S)],
    };
    let ds = decide(&queue, &pool, 3400 * S, &c);
    assert!(
        !ds.iter()
            .any(|d| matches!(d, Decision::Drain { .. } | Decision::Release { .. })),
        "{ds:?}"
    );
}

#[test]
fn a_busy_agent_is_never_released_even_when_draining() {
    let c = config();
    let small = c.kind("small").unwrap().clone();
    let mut pool = Pool::default();
    let mut a = agent("a", &small, Phase::Draining, 1, 0);
    a.since_us = 10 * S;
    pool.agents.push(a);
    assert!(decide(&Queue::default(), &pool, 10_000 * S, &c).is_empty());
    pool.agents[0].busy_slots = 0;
    assert!(matches!(
        &decide(&Queue::default(), &pool, 10_000 * S, &c)[..],
        [Decision::Release { .. }]
    ));
}

#[test]
fn agents_that_never_connect_or_vanish_are_released() {
    let c = config();
    let small = c.kind("small").unwrap().clone();
    let mut pool = Pool::default();
    pool.agents.push(agent("s", &small, Phase::Starting, 0, 0));
    pool.agents.push(agent("g", &small, Phase::Gone, 0, 0));
    assert!(decide(&Queue::default(), &pool, 100 * S, &c).is_empty());
    let ds = decide(&Queue::default(), &pool, 121 * S, &c);
    assert_eq!(ds.len(), 2, "{ds:?}");
    assert!(ds.iter().all(|d| matches!(d, Decision::Release { .. })));
}

#[test]
fn a_lowered_budget_drains_idle_agents_first() {
    let mut c = config();
    let gpu = c.kind("gpu").unwrap().clone();
    let mut pool = Pool::default();
    pool.agents.push(agent("busy", &gpu, Phase::Busy, 1, 0));
    pool.agents.push(agent("idle", &gpu, Phase::Idle, 0, 0));
    c.budget_per_hour_micros = 3 * MICROS;
    let ds = decide(&Queue::default(), &pool, 10 * S, &c);
    assert!(
        matches!(&ds[..], [Decision::Drain { id, reason, .. }] if id == "idle" && reason.contains("budget")),
        "{ds:?}"
    );
}

#[test]
fn an_agent_is_not_drained_within_grace_of_its_kinds_last_acquisition() {
    let c = config();
    let small = c.kind("small").unwrap().clone();
    let mut pool = Pool::default();
    pool.agents.push(agent("old", &small, Phase::Idle, 0, 0));
    pool.last_acquired_us.insert("small".into(), 1000 * S);
    assert!(decide(&Queue::default(), &pool, 1030 * S, &c).is_empty());
    assert_eq!(decide(&Queue::default(), &pool, 1061 * S, &c).len(), 1);
}

// ---- properties ----

fn arb_kind(i: usize) -> impl Strategy<Value = KindConfig> {
    (
        prop::sample::select(vec![
            vec![],
            vec!["gpu".to_string()],
            vec!["arm".to_string()],
        ]),
        1u32..4,
        1u64..3 * MICROS,
        prop::sample::select(vec![1u64, 60, 3600]),
        1u32..6,
    )
        .prop_map(move |(labels, capacity, price, gran, max)| KindConfig {
            name: format!("k{i}"),
            labels,
            capacity,
            price_per_hour_micros: price,
            billing_granularity_secs: gran,
            max_agents: max,
            boot_us: 20 * S,
        })
}

fn arb_config() -> impl Strategy<Value = Config> {
    (
        prop::collection::vec(0..3usize, 1..4),
        1i64..600,
        1u64..20,
        0i64..900,
        1i64..300,
    )
        .prop_flat_map(|(ks, grace, budget, margin, target)| {
            let kinds: Vec<_> = (0..ks.len()).map(arb_kind).collect();
            (kinds, Just((grace, budget, margin, target)))
        })
        .prop_map(|(kinds, (grace, budget, margin, target))| Config {
            kinds,
            grace_us: grace * S,
            budget_per_hour_micros: budget * MICROS,
            renewal_margin_us: margin * S,
            target_wait_us: target * S,
            default_job_us: 60 * S,
            startup_timeout_us: 300 * S,
            drain_settle_us: S,
            tick_us: S,
            queue_delay_us: 0,
            command: None,
            kubernetes: None,
        })
}

fn arb_queue() -> impl Strategy<Value = Queue> {
    prop::collection::vec(
        (
            prop::sample::select(vec![
                vec![],
                vec!["gpu".to_string()],
                vec!["arm".to_string()],
            ]),
            0u32..50,
            1i64..1000,
        ),
        0..4,
    )
    .prop_map(|gs| Queue {
        waiting: gs
            .into_iter()
            .map(|(labels, jobs, each)| Demand {
                labels,
                jobs,
                work_us: each * S * i64::from(jobs),
            })
            .collect(),
    })
}

fn arb_phase() -> impl Strategy<Value = Phase> {
    prop::sample::select(vec![
        Phase::Starting,
        Phase::Idle,
        Phase::Busy,
        Phase::Draining,
        Phase::Gone,
    ])
}

/// A config, and a pool within its budget.
fn arb_world() -> impl Strategy<Value = (Config, Queue, Pool, i64)> {
    (arb_config(), arb_queue(), 0i64..20_000)
        .prop_flat_map(|(config, queue, now)| {
            let n = config.kinds.len();
            let agents = prop::collection::vec(
                (0..n, arb_phase(), 0u32..4, 0i64..20_000, 0i64..20_000),
                0..8,
            );
            (Just(config), Just(queue), agents, Just(now))
        })
        .prop_map(|(config, queue, agents, now)| {
            let mut pool = Pool::default();
            for (i, (k, phase, busy, started, idle)) in agents.into_iter().enumerate() {
                let kind = &config.kinds[k];
                if pool.price_per_hour_micros() + kind.price_per_hour_micros
                    > config.budget_per_hour_micros
                {
                    continue;
                }
                let started = started.min(now);
                let busy = match phase {
                    Phase::Busy => busy.clamp(1, kind.capacity),
                    Phase::Idle | Phase::Starting => 0,
                    _ => busy.min(kind.capacity),
                };
                let mut a = agent(&format!("p{i}"), kind, phase, busy, started);
                a.idle_since_us = (started + idle).min(now);
                a.since_us = a.idle_since_us;
                pool.agents.push(a);
            }
            pool.requested = pool.agents.len() as u64;
            (config, queue, pool, now)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_over_budget_never_releases_busy_agents_and_respects_billing(
        (config, queue, pool, now) in arb_world()
    ) {
        let ds = decide(&queue, &pool, now, &config);
        let mut after = pool.clone();
        apply(&mut after, &ds, now);
        // Hard budget.
        prop_assert!(after.price_per_hour_micros() <= config.budget_per_hour_micros);
        for d in &ds {
            match d {
                Decision::Release { id, .. } => {
                    let a = pool.agents.iter().find(|a| &a.id == id).unwrap();
                    prop_assert_eq!(a.busy_slots, 0, "released a busy agent");
                    prop_assert!(
                        matches!(a.phase, Phase::Draining | Phase::Starting | Phase::Gone),
                        "released an agent that was not drained first: {:?}", a.phase
                    );
                }
                Decision::Drain { id, .. } => {
                    let a = pool.agents.iter().find(|a| &a.id == id).unwrap();
                    prop_assert!(a.phase != Phase::Draining, "drained twice");
                    // Within budget, an agent is let go only at the end of its paid period,
                    // after the grace period.
                    prop_assert!(a.phase == Phase::Idle);
                    prop_assert!(a.in_renewal_window(now, config.renewal_margin_us));
                    prop_assert!(now - a.idle_since_us >= config.grace_us);
                }
                Decision::Acquire { ids, .. } => {
                    prop_assert!(!ids.is_empty());
                }
            }
        }
        // No flapping within a round: a kind is not both grown and shrunk.
        for d in &ds {
            if let Decision::Acquire { kind, .. } = d {
                let shrunk = ds.iter().any(|x| matches!(x, Decision::Drain { id, .. }
                    if pool.agents.iter().any(|a| &a.id == id && &a.kind == kind)));
                prop_assert!(!shrunk, "kind {} grown and shrunk in one round", kind);
            }
        }
        // Max agents per kind.
        for k in &config.kinds {
            let live = after.agents.iter().filter(|a| a.kind == k.name).count() as u32;
            let before = pool.agents.iter().filter(|a| a.kind == k.name).count() as u32;
            prop_assert!(live <= k.max_agents.max(before));
        }
        // Deciding again on the result, at the same time, acquires nothing more.
        let again = decide(&queue, &after, now, &config);
        prop_assert!(!again.iter().any(|d| matches!(d, Decision::Acquire { .. })), "{:?}", again);
        // Request ids are never reused.
        let mut ids: Vec<&String> = after.agents.iter().map(|a| &a.id).collect();
        ids.sort();
        ids.dedup();
        prop_assert_eq!(ids.len(), after.agents.len());
    }
}

fn arb_trace() -> impl Strategy<Value = Vec<TraceJob>> {
    prop::collection::vec(
        (
            0i64..7200,
            1i64..900,
            0usize..4,
            prop::sample::select(vec![vec![], vec!["gpu".to_string()]]),
            1usize..6,
        ),
        1..30,
    )
    .prop_map(|bursts| {
        let mut jobs: Vec<TraceJob> = bursts
            .into_iter()
            .flat_map(|(at, dur, name, labels, n)| {
                (0..n).map(move |i| TraceJob {
                    arrival_us: at * S,
                    duration_us: (dur + i as i64) * S,
                    name: format!("job-{name}"),
                    labels: labels.clone(),
                })
            })
            .collect();
        jobs.sort_by_key(|j| j.arrival_us);
        jobs
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Under a simulated clock: every job runs, the pool never goes over budget, no busy agent
    /// is released, no agent is drained within grace of its kind's acquisition, and once the
    /// last job is done the pool is empty within grace + a billing period + a tick.
    #[test]
    fn the_queue_drains_and_the_pool_returns_to_zero(
        trace in arb_trace(),
        gran in prop::sample::select(vec![1u64, 60, 3600]),
        grace in 10i64..300,
    ) {
        let config = Config {
            kinds: vec![
                kind("gpu", &["gpu"], 1, 2 * MICROS, gran, 3),
                kind("small", &[], 2, MICROS / 2, gran, 8),
            ],
            grace_us: grace * S,
            budget_per_hour_micros: 7 * MICROS,
            renewal_margin_us: 120 * S,
            target_wait_us: 120 * S,
            default_job_us: 60 * S,
            startup_timeout_us: 300 * S,
            drain_settle_us: S,
            tick_us: 5 * S,
            queue_delay_us: 0,
            command: None,
            kubernetes: None,
        };
        let options = SimOptions { tick_us: 5 * S, step_us: S, until_us: 0, horizon_us: 48 * 3600 * S };
        let r = simulate(&trace, &config, &Mode::Policy, &options);
        prop_assert_eq!(r.unstarted, 0);
        prop_assert_eq!(r.unfinished, 0);
        prop_assert_eq!(r.released_busy, 0);
        prop_assert!(r.peak_price_per_hour_micros <= config.budget_per_hour_micros);
        let bound = r.last_finish_us + grace * S + gran as i64 * S + 10 * S;
        prop_assert!(r.last_release_us <= bound, "released at {} > {}", r.last_release_us, bound);
        let mut last_acquire: std::collections::BTreeMap<String, i64> = Default::default();
        let kind_of = |id: &str| id.trim_start_matches("as-").rsplit_once('-').map(|(k, _)| k.to_owned()).unwrap_or_default();
        for (t, d) in &r.decisions {
            match d {
                Decision::Acquire { kind, .. } => { last_acquire.insert(kind.clone(), *t); }
                Decision::Drain { id, .. } => {
                    if let Some(a) = last_acquire.get(&kind_of(id)) {
                        prop_assert!(t - a >= config.grace_us, "flap: drained {} at {} after acquiring at {}", id, t, a);
                    }
                }
                Decision::Release { .. } => {}
            }
        }
    }
}
