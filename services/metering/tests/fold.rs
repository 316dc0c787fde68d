//! The pure metering parts: fold, pricing, invoices — unit and property tests, no I/O.

use proptest::prelude::*;
use tributary_metering::calendar::{Day, Period};
use tributary_metering::fold::{Effect, MeteringState};
use tributary_metering::invoice::{due, price, ADJUSTMENT, USAGE};
use tributary_metering::plan::PricePlan;
use tributary_proto::events::{envelope::Payload, Envelope, JobFinished, LineStarted, UsageTick};

const PLAN: &str = r#"
version = "test-1"
currency = "USD"
free_minutes_per_month = 2
round_up_secs = 60
[prices]
small = "0.010"
big = "0.100"
"#;

fn plan() -> PricePlan {
    PricePlan::parse(PLAN, "test plan").unwrap()
}

fn at(day: &str, secs: i64) -> i64 {
    Day::parse(day).unwrap().start_us() + secs * 1_000_000
}

struct T<'a> {
    tenant: &'a str,
    project: &'a str,
    build: &'a str,
    job: &'a str,
    class: &'a str,
}

impl T<'_> {
    /// Tick `seq` covering `[start, start + millis)`.
    fn tick(&self, seq: u32, start_us: i64, millis: u64, last: bool) -> Envelope {
        let mut env = Envelope::new(
            self.tenant,
            self.project,
            self.build,
            Payload::UsageTick(UsageTick {
                job: self.job.into(),
                attempt: 1,
                agent_id: "a".into(),
                machine_class: self.class.into(),
                millis,
                seq,
                last,
                start_us,
                end_us: start_us + millis as i64 * 1000,
            }),
        );
        env.time_us = start_us + millis as i64 * 1000;
        env
    }
}

const WEB: T = T {
    tenant: "acme",
    project: "web",
    build: "b1",
    job: "build",
    class: "small",
};

fn issue(state: &mut MeteringState, offset: u64, tenant: &str, period: &str) -> Effect {
    let plan = plan();
    let priced = price(state, tenant, Period::parse(period).unwrap(), &plan).unwrap();
    let env = Envelope::new(
        tenant,
        "",
        "",
        Payload::InvoiceIssued(priced.invoice.to_event(&plan, Vec::new())),
    );
    state.apply(offset, &env)
}

#[test]
fn a_duplicate_tick_counts_once() {
    let mut s = MeteringState::default();
    let t = WEB.tick(1, at("2026-11-03", 0), 10_000, false);
    assert_eq!(s.apply(0, &t), Effect::Counted);
    assert_eq!(s.apply(1, &t), Effect::Duplicate);
    // Re-sent with the same seq under another id (a re-encoded batch): still once.
    let mut again = t.clone();
    again.event_id = "other".into();
    assert_eq!(s.apply(2, &again), Effect::Duplicate);
    let a = s.attempts.values().next().unwrap();
    assert_eq!((a.millis, a.ticks), (10_000, 1));
    assert_eq!(s.usage.values().map(|u| u.millis).sum::<u64>(), 10_000);
}

#[test]
fn a_job_across_the_end_of_a_month_is_split_and_each_part_rounded() {
    let mut s = MeteringState::default();
    let midnight = Period::parse("2026-12").unwrap().start_us();
    // 90 s in November, 30 s in December, in two ticks; the first crosses midnight.
    s.apply(0, &WEB.tick(1, midnight - 90_000_000, 100_000, false));
    s.apply(1, &WEB.tick(2, midnight + 10_000_000, 20_000, true));
    let nov = price(&s, "acme", Period::parse("2026-11").unwrap(), &plan()).unwrap();
    let dec = price(&s, "acme", Period::parse("2026-12").unwrap(), &plan()).unwrap();
    assert_eq!(nov.invoice.lines.len(), 1);
    assert_eq!(nov.invoice.lines[0].millis, 90_000);
    assert_eq!(nov.invoice.lines[0].billed_millis, 120_000);
    assert_eq!(dec.invoice.lines[0].millis, 30_000);
    assert_eq!(dec.invoice.lines[0].billed_millis, 60_000);
    let days: Vec<String> = {
        let mut d: Vec<_> = s.usage.keys().map(|k| k.day.to_string()).collect();
        d.sort();
        d
    };
    assert_eq!(days, vec!["2026-11-30", "2026-12-01"]);
}

#[test]
fn per_job_rounding_free_minutes_and_exact_amounts() {
    let mut s = MeteringState::default();
    let day = "2026-11-10";
    // build b1: 61 s (-> 2 min) small; b2: 1 s (-> 1 min) small; b3: 5 min big.
    s.apply(0, &WEB.tick(1, at(day, 0), 61_000, true));
    let b2 = T { build: "b2", ..WEB };
    s.apply(1, &b2.tick(1, at(day, 100), 1_000, true));
    let b3 = T {
        build: "b3",
        class: "big",
        ..WEB
    };
    s.apply(2, &b3.tick(1, at(day, 200), 300_000, true));
    let inv = price(&s, "acme", Period::parse("2026-11").unwrap(), &plan())
        .unwrap()
        .invoice;
    // Lines in (project, class) order: big then small. The 2 free minutes go to `big` first.
    assert_eq!(inv.lines.len(), 2);
    let big = &inv.lines[0];
    assert_eq!((big.machine_class.as_str(), big.jobs), ("big", 1));
    assert_eq!(big.billed_millis, 300_000);
    assert_eq!(big.free_millis, 120_000);
    assert_eq!(big.amount_micros, 300_000); // 3 min * 0.100
    let small = &inv.lines[1];
    assert_eq!(
        (small.jobs, small.billed_millis, small.free_millis),
        (2, 180_000, 0)
    );
    assert_eq!(small.amount_micros, 30_000); // 3 min * 0.010
    assert_eq!(inv.total_micros, 330_000);
    assert!(inv.lines.iter().all(|l| l.kind == USAGE));
}

#[test]
fn an_issued_invoice_never_changes_and_late_ticks_become_an_adjustment() {
    let mut s = MeteringState::default();
    s.apply(0, &WEB.tick(1, at("2026-10-31", 0), 200_000, false));
    let oct = Period::parse("2026-10").unwrap();
    assert!(matches!(
        issue(&mut s, 1, "acme", "2026-10"),
        Effect::Accepted { .. }
    ));
    let issued = s.issued[&("acme".to_string(), oct)].clone();
    assert_eq!(issued.invoice.lines[0].billed_millis, 240_000);
    // A late tick for October (the agent's last one, delivered after the close): 50 s more.
    s.apply(2, &WEB.tick(2, at("2026-10-31", 200), 50_000, true));
    assert_eq!(
        s.issued[&("acme".to_string(), oct)],
        issued,
        "issued invoice unchanged"
    );
    // Issuing October again is refused.
    assert!(matches!(
        issue(&mut s, 3, "acme", "2026-10"),
        Effect::Rejected { .. }
    ));
    // November's invoice carries the adjustment: 250 s -> 5 min, 4 already billed: +1 min.
    let nov = price(&s, "acme", Period::parse("2026-11").unwrap(), &plan())
        .unwrap()
        .invoice;
    assert_eq!(nov.lines.len(), 1);
    let adj = &nov.lines[0];
    assert_eq!(
        (adj.kind.as_str(), adj.period.as_str()),
        (ADJUSTMENT, "2026-10")
    );
    assert_eq!(adj.billed_millis, 60_000);
    assert_eq!(adj.amount_micros, 10_000);
    assert!(matches!(
        issue(&mut s, 4, "acme", "2026-11"),
        Effect::Accepted { .. }
    ));
    // Settled: December has nothing left to adjust.
    let dec = price(&s, "acme", Period::parse("2026-12").unwrap(), &plan()).unwrap();
    assert!(dec.invoice.lines.is_empty());
}

#[test]
fn an_invoice_priced_before_a_tick_that_lands_first_is_rejected() {
    let mut s = MeteringState::default();
    s.apply(0, &WEB.tick(1, at("2026-10-30", 0), 60_000, false));
    let plan = plan();
    let stale = price(&s, "acme", Period::parse("2026-10").unwrap(), &plan).unwrap();
    s.apply(1, &WEB.tick(2, at("2026-10-30", 60), 60_000, true));
    let env = Envelope::new(
        "acme",
        "",
        "",
        Payload::InvoiceIssued(stale.invoice.to_event(&plan, Vec::new())),
    );
    assert!(matches!(s.apply(2, &env), Effect::Rejected { .. }));
    assert!(s.issued.is_empty());
    assert!(matches!(
        issue(&mut s, 3, "acme", "2026-10"),
        Effect::Accepted { .. }
    ));
}

#[test]
fn a_redelivered_invoice_changes_nothing_and_a_rival_one_is_rejected() {
    let mut s = MeteringState::default();
    s.apply(0, &WEB.tick(1, at("2026-10-03", 0), 90_000, true));
    let plan = plan();
    let oct = Period::parse("2026-10").unwrap();
    let priced = price(&s, "acme", oct, &plan).unwrap();
    let env = Envelope::new(
        "acme",
        "",
        "",
        Payload::InvoiceIssued(priced.invoice.to_event(&plan, Vec::new())),
    );
    assert!(matches!(s.apply(1, &env), Effect::Accepted { .. }));
    let before = s.clone();
    // Kafka delivers the same record again (same event id, another offset).
    assert_eq!(s.apply(2, &env), Effect::Duplicate);
    assert_eq!(s.rejected, 0);
    assert_eq!(s, before);
    // A dying replica's copy (another event id) for the same month: rejected, harmless.
    let mut rival = env.clone();
    rival.event_id = "rival".into();
    assert!(matches!(s.apply(3, &rival), Effect::Rejected { .. }));
    assert_eq!(s.issued, before.issued);
}

#[test]
fn an_invoice_waits_for_its_cut_whatever_the_partitions_interleaving() {
    use tributary_metering::Pos;
    use tributary_proto::events::LogPosition;
    let b2 = T { build: "b2", ..WEB };
    let t1 = WEB.tick(1, at("2026-10-03", 0), 61_000, true);
    let t2 = b2.tick(1, at("2026-10-04", 0), 30_000, true);
    let late = b2.tick(2, at("2026-10-04", 30), 30_000, true);
    // The issuer had read t1 (partition 1) and t2 (partition 2), not `late`.
    let mut issuer = MeteringState::default();
    issuer.apply(Pos::new(1, 0), &t1);
    issuer.apply(Pos::new(2, 0), &t2);
    let plan = plan();
    let oct = Period::parse("2026-10").unwrap();
    let priced = price(&issuer, "acme", oct, &plan).unwrap();
    let cut = vec![
        LogPosition {
            partition: 1,
            next_offset: 1,
        },
        LogPosition {
            partition: 2,
            next_offset: 1,
        },
    ];
    let inv = Envelope::new(
        "acme",
        "",
        "",
        Payload::InvoiceIssued(priced.invoice.to_event(&plan, cut)),
    );
    // Read before partition 2: it waits, then is accepted exactly when partition 2 reaches
    // the cut (before `late`, which follows on partition 2).
    let mut s = MeteringState::default();
    assert_eq!(s.apply(Pos::new(3, 0), &inv), Effect::Pending);
    s.apply(Pos::new(1, 0), &t1);
    assert!(!s.is_issued("acme", oct));
    s.apply(Pos::new(2, 0), &t2);
    assert!(s.is_issued("acme", oct));
    assert_eq!(s.take_decided().len(), 1);
    s.apply(Pos::new(2, 1), &late);
    // Read last: decided at once, same result.
    let mut r = MeteringState::default();
    r.apply(Pos::new(2, 0), &t2);
    r.apply(Pos::new(1, 0), &t1);
    r.apply(Pos::new(2, 1), &late);
    let mut r2 = r.clone();
    // (`late` already folded: pricing includes it, so this order rejects; the fold is only
    // order-free for ticks inside the cut — see docs/ARCHITECTURE.md.)
    assert!(matches!(
        r2.apply(Pos::new(3, 0), &inv),
        Effect::Rejected { .. }
    ));
    r.take_decided();
    let mut q = MeteringState::default();
    q.apply(Pos::new(1, 0), &t1);
    q.apply(Pos::new(2, 0), &t2);
    assert!(matches!(
        q.apply(Pos::new(3, 0), &inv),
        Effect::Accepted { .. }
    ));
    q.apply(Pos::new(2, 1), &late);
    assert_eq!(q.issued, s.issued);
    assert_eq!(q.parts, s.parts);
}

#[test]
fn due_invoices_follow_the_close_delay() {
    let mut s = MeteringState::default();
    s.apply(0, &WEB.tick(1, at("2026-10-30", 0), 60_000, true));
    let nov1 = Period::parse("2026-11").unwrap().start_us();
    let hour = 3_600_000_000;
    assert!(due(&s, &plan(), nov1 + hour - 1, hour).is_empty());
    let d = due(&s, &plan(), nov1 + hour, hour);
    assert_eq!(
        d,
        vec![("acme".to_string(), Period::parse("2026-10").unwrap())]
    );
    issue(&mut s, 1, "acme", "2026-10");
    assert!(due(&s, &plan(), nov1 + hour, hour).is_empty());
    // A late tick: due on November's invoice once November is over.
    s.apply(2, &WEB.tick(2, at("2026-10-30", 60), 60_000, true));
    assert!(due(&s, &plan(), nov1 + hour, hour).is_empty());
    let dec1 = Period::parse("2026-12").unwrap().start_us();
    assert_eq!(
        due(&s, &plan(), dec1 + hour, hour),
        vec![("acme".to_string(), Period::parse("2026-11").unwrap())]
    );
}

#[test]
fn job_events_mark_the_attempt_ended_and_other_events_change_nothing() {
    let mut s = MeteringState::default();
    s.apply(0, &WEB.tick(1, at("2026-11-01", 0), 1_000, false));
    let noise = Envelope::new(
        "acme",
        "web",
        "b1",
        Payload::LineStarted(LineStarted::default()),
    );
    assert_eq!(s.apply(1, &noise), Effect::Nothing);
    let fin = Envelope::new(
        "acme",
        "web",
        "b1",
        Payload::JobFinished(JobFinished {
            job: "build".into(),
            attempt: 1,
            ..JobFinished::default()
        }),
    );
    assert_eq!(s.apply(2, &fin), Effect::Ended);
    assert!(s.attempts.values().all(|a| a.ended && !a.complete));
}

fn arb_ticks() -> impl Strategy<Value = Vec<Envelope>> {
    // Up to 3 tenants x 4 builds x 2 jobs, each with 1..8 ticks across a month end.
    proptest::collection::vec(
        (
            0usize..3,
            0usize..4,
            0usize..2,
            1u32..8,
            0i64..200_000,
            1u64..90_000,
        ),
        1..40,
    )
    .prop_map(|specs| {
        let base = Period::parse("2026-12").unwrap().start_us() - 100_000_000;
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (t, b, j, n, offset_ms, len) in specs {
            if !seen.insert((t, b, j)) {
                continue;
            }
            let tenant = ["acme", "globex", "initech"][t];
            let build = format!("build-{t}-{b}");
            let job = ["build", "test"][j];
            let spec = T {
                tenant,
                project: "p",
                build: &build,
                job,
                class: if b % 2 == 0 { "small" } else { "big" },
            };
            let mut start = base + offset_ms * 1000;
            for seq in 1..=n {
                out.push(spec.tick(seq, start, len, seq == n));
                start += len as i64 * 1000;
            }
        }
        out
    })
}

proptest! {
    /// Ticks interleaved across builds and partitions, in any order, re-delivered any number
    /// of times, with other events between them, fold to the same usage.
    #[test]
    fn usage_does_not_depend_on_order_or_redelivery(
        ticks in arb_ticks(),
        order in proptest::collection::vec(any::<u32>(), 0..200),
        dups in proptest::collection::vec(any::<u16>(), 0..20),
    ) {
        let mut in_order = MeteringState::default();
        for (i, t) in ticks.iter().enumerate() {
            in_order.apply(i as u64, t);
        }
        let mut shuffled: Vec<Envelope> = ticks.clone();
        for (i, r) in order.iter().enumerate() {
            let n = shuffled.len();
            shuffled.swap(i % n, *r as usize % n);
        }
        for d in &dups {
            let t = ticks[*d as usize % ticks.len()].clone();
            shuffled.insert(*d as usize % (shuffled.len() + 1), t);
        }
        let noise = Envelope::new("acme", "p", "x", Payload::LineStarted(LineStarted::default()));
        let mut other = MeteringState::default();
        for (i, t) in shuffled.iter().enumerate() {
            other.apply(2 * i as u64, &noise);
            other.apply(2 * i as u64 + 1, t);
        }
        let strip = |s: &MeteringState| {
            let mut usage: Vec<_> = s.usage.iter().map(|(k, u)| (k.clone(), u.millis)).collect();
            usage.sort();
            let mut parts: Vec<_> = s.parts.iter().map(|(k, p)| (k.clone(), p.millis)).collect();
            parts.sort();
            let mut attempts: Vec<_> = s.attempts.iter().map(|(k, a)| (k.clone(), a.millis, a.ticks, a.complete)).collect();
            attempts.sort();
            (usage, parts, attempts)
        };
        prop_assert_eq!(strip(&in_order), strip(&other));
        let total: u64 = ticks.iter().map(|t| match &t.payload { Some(Payload::UsageTick(u)) => u.millis, _ => 0 }).sum();
        prop_assert_eq!(other.usage.values().map(|u| u.millis).sum::<u64>(), total);
        // And every invoice prices the same.
        for tenant in ["acme", "globex", "initech"] {
            for p in ["2026-11", "2026-12"] {
                let p = Period::parse(p).unwrap();
                prop_assert_eq!(
                    price(&in_order, tenant, p, &plan()).unwrap().invoice,
                    price(&other, tenant, p, &plan()).unwrap().invoice
                );
            }
        }
    }
}
