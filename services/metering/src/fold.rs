//! The metering fold: UsageTick, job and InvoiceIssued events → usage per tenant, project,
//! machine class and day; machine time per job attempt and month (what invoices bill); and
//! the issued invoices. Pure: no clock (days and months come from the ticks' intervals), no
//! I/O, deterministic.
//!
//! * **Idempotent**: a tick counts once per job attempt and `seq` (the agent numbers its
//!   ticks 1, 2, ...; a re-delivered tick keeps its event id and its seq). Ticks without a
//!   seq fall back to their event id.
//! * **Order-free usage**: usage is a sum, so ticks of one job interleaved with any other
//!   events, in any order, give the same usage. Only InvoiceIssued is ordered against ticks:
//!   a tick of a month folded after that month's invoice is late and is billed as an
//!   adjustment on the tenant's next invoice.
//! * **Invoices are validated, then frozen**: an InvoiceIssued is accepted only if pricing
//!   this state with its own plan gives exactly its lines and total (see
//!   [`crate::invoice`]); accepted invoices never change. It is decided once the fold has
//!   folded every partition up to the invoice's `cut` (the issuer's positions when it priced
//!   it): until then it waits in [`MeteringState::pending`], so on a partitioned log the
//!   decision does not depend on how the partitions interleave. Invoices of one tenant are
//!   decided in log order (they share the tenant's partition).
//! * **Positions**: every row remembers the [`Pos`] (partition, offset) of the event that
//!   last changed it; the fold keeps the next offset of every partition it has read.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

/// Hash maps with a fixed, fast hasher: the fold is deterministic and hot (one lookup per
/// tick), SipHash's DoS resistance buys nothing for keys taken from our own log.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;

use tributary_proto::events::{envelope::Payload, Envelope, InvoiceIssued, UsageTick};

/// Where an event is on the log: its partition and its offset in it. On the single-partition
/// SQLite log the partition is always 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pos {
    pub partition: u32,
    pub offset: u64,
}

impl Pos {
    /// An offset of partition 0 (the single-partition log).
    pub const fn at(offset: u64) -> Pos {
        Pos {
            partition: 0,
            offset,
        }
    }

    pub const fn new(partition: u32, offset: u64) -> Pos {
        Pos { partition, offset }
    }
}

/// An offset of partition 0: the single-partition log's positions.
impl From<u64> for Pos {
    fn from(offset: u64) -> Pos {
        Pos::at(offset)
    }
}

/// `offset 12` on partition 0, `offset 12 of partition 3` elsewhere.
impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.partition == 0 {
            write!(f, "offset {}", self.offset)
        } else {
            write!(f, "offset {} of partition {}", self.offset, self.partition)
        }
    }
}

use crate::calendar::{for_each_day, Day, Period};
use crate::invoice::{price, Invoice};
use crate::plan::PricePlan;
use crate::view::{Tick, View};

/// One job attempt of one build.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptKey {
    pub build_id: String,
    pub job: String,
    pub attempt: u32,
}

/// What the ticks of one attempt add up to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttemptUsage {
    pub tenant: String,
    pub project: String,
    pub machine_class: String,
    pub millis: u64,
    pub ticks: u64,
    /// The agent sent its last tick (`last = true`).
    pub complete: bool,
    /// The attempt ended on the log (JobFinished or JobRequeued).
    pub ended: bool,
    pub seqs: SeqSet,
    pub last: Pos,
}

/// The tick sequence numbers seen: `1..=contiguous` plus the ones beyond a gap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqSet {
    pub contiguous: u32,
    pub sparse: BTreeSet<u32>,
    /// Event ids of ticks without a seq (seq 0).
    pub ids: BTreeSet<String>,
}

impl SeqSet {
    /// Records a tick; false if it was seen already.
    pub fn insert(&mut self, seq: u32, event_id: &str) -> bool {
        if seq == 0 {
            return self.ids.insert(event_id.to_owned());
        }
        if seq <= self.contiguous {
            return false;
        }
        if seq == self.contiguous + 1 && self.sparse.is_empty() {
            self.contiguous = seq; // in order: the common case, no allocation
            return true;
        }
        if !self.sparse.insert(seq) {
            return false;
        }
        while self.sparse.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
        true
    }
}

/// Machine time of one job attempt in one month and machine class: what invoices bill.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartKey {
    pub tenant: String,
    pub period: Period,
    pub build_id: String,
    pub job: String,
    pub attempt: u32,
    pub machine_class: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Part {
    pub project: String,
    pub millis: u64,
    /// Billed time as of the last accepted invoice that billed this part (None: never billed).
    pub billed_millis: Option<u64>,
    pub last: Pos,
}

/// A usage record: machine time per tenant, project, machine class and day.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UsageKey {
    pub tenant: String,
    pub project: String,
    pub machine_class: String,
    pub day: Day,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub millis: u64,
    pub last: Pos,
}

/// An accepted InvoiceIssued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedInvoice {
    pub invoice: Invoice,
    pub at: Pos,
    pub time_us: i64,
    pub event_id: String,
}

/// An InvoiceIssued read but not yet decided: the fold has not reached its cut.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingInvoice {
    /// The event as appended (with its plan and cut).
    pub event: InvoiceIssued,
    pub at: Pos,
    pub time_us: i64,
    pub event_id: String,
}

/// What one event did to the state (for the projector's dirty rows and for logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    Nothing,
    /// A tick counted.
    Counted,
    /// A tick seen before (same attempt and seq, or same event id), or an invoice event
    /// seen before (same event id).
    Duplicate,
    /// An InvoiceIssued waiting until the fold reaches its cut.
    Pending,
    /// An attempt was marked ended.
    Ended,
    Accepted {
        tenant: String,
        period: Period,
    },
    /// An InvoiceIssued that does not match the state at its offset, or repeats an issued one.
    Rejected {
        tenant: String,
        period: String,
        reason: String,
    },
}

/// Keys changed since the last [`MeteringState::take_dirty`], when tracking is on.
#[derive(Clone, Debug, Default)]
pub struct Dirty {
    pub attempts: HashSet<AttemptKey>,
    pub parts: HashSet<PartKey>,
    pub usage: HashSet<UsageKey>,
    pub invoices: HashSet<(String, Period)>,
    /// Tenants whose queue of pending invoices changed.
    pub pending: HashSet<String>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.attempts.is_empty()
            && self.parts.is_empty()
            && self.usage.is_empty()
            && self.invoices.is_empty()
            && self.pending.is_empty()
    }
}

#[derive(Clone, Debug, Default)]
pub struct MeteringState {
    pub attempts: HashMap<AttemptKey, AttemptUsage>,
    pub parts: HashMap<PartKey, Part>,
    /// Every key of `parts`, ordered (tenant, month, ...): pricing reads a tenant's range.
    pub part_keys: BTreeSet<PartKey>,
    pub usage: HashMap<UsageKey, Usage>,
    pub issued: BTreeMap<(String, Period), IssuedInvoice>,
    /// InvoiceIssued events that were not accepted.
    pub rejected: u64,
    /// Per tenant, the invoices read but not decided yet, in log order.
    pub pending: BTreeMap<String, VecDeque<PendingInvoice>>,
    /// The next offset to read of each partition (index), as far as the fold has read it.
    pub positions: Vec<u64>,
    /// Decisions on pending invoices taken since the last [`MeteringState::take_decided`].
    decided: Vec<(Pos, Effect)>,
    track: bool,
    dirty: Dirty,
    /// Reused lookup keys: a tick allocates nothing unless it creates a row.
    scratch: Scratch,
}

#[derive(Clone, Debug)]
struct Scratch {
    attempt: AttemptKey,
    usage: UsageKey,
    part: PartKey,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            attempt: AttemptKey {
                build_id: String::new(),
                job: String::new(),
                attempt: 0,
            },
            usage: UsageKey {
                tenant: String::new(),
                project: String::new(),
                machine_class: String::new(),
                day: Day(0),
            },
            part: PartKey {
                tenant: String::new(),
                period: Period { year: 0, month: 1 },
                build_id: String::new(),
                job: String::new(),
                attempt: 0,
                machine_class: String::new(),
            },
        }
    }
}

fn set(dst: &mut String, src: &str) {
    dst.clear();
    dst.push_str(src);
}

impl PartialEq for MeteringState {
    fn eq(&self, other: &Self) -> bool {
        self.attempts == other.attempts
            && self.parts == other.parts
            && self.usage == other.usage
            && self.issued == other.issued
            && self.pending == other.pending
    }
}

impl MeteringState {
    /// A state that records which keys each event changes (for the projector).
    pub fn tracking() -> Self {
        MeteringState {
            track: true,
            ..MeteringState::default()
        }
    }

    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    /// Decisions taken on pending invoices (accepted or rejected, with the invoice's
    /// position) since the last call: for logs.
    pub fn take_decided(&mut self) -> Vec<(Pos, Effect)> {
        std::mem::take(&mut self.decided)
    }

    /// Applies the event at `at`.
    pub fn apply(&mut self, at: impl Into<Pos>, env: &Envelope) -> Effect {
        let at = at.into();
        self.advance(at);
        let effect = self.apply_decoded(at, env);
        self.decide_pending();
        effect
    }

    fn apply_decoded(&mut self, at: Pos, env: &Envelope) -> Effect {
        match &env.payload {
            Some(Payload::UsageTick(t)) => self.apply_tick(at, &Tick::of(env, t)),
            Some(Payload::JobFinished(e)) => self.end_attempt(&env.build_id, &e.job, e.attempt),
            Some(Payload::JobRequeued(e)) => self.end_attempt(&env.build_id, &e.job, e.attempt),
            Some(Payload::InvoiceIssued(inv)) => self.receive_invoice(at, env, inv),
            _ => Effect::Nothing,
        }
    }

    /// Applies the event at `at` as [`crate::view::view`] read it: the same effect as
    /// [`MeteringState::apply`] on the decoded event.
    pub fn apply_view(&mut self, at: impl Into<Pos>, event: &View<'_>) -> Effect {
        let at = at.into();
        self.advance(at);
        let effect = match event {
            View::Tick(t) => self.apply_tick(at, t),
            View::Decoded(env) => self.apply_decoded(at, env),
            View::Skip => Effect::Nothing,
        };
        self.decide_pending();
        effect
    }

    /// A record at `at` that is skipped (malformed): the fold has read past it.
    pub fn skip(&mut self, at: Pos) {
        self.advance(at);
        self.decide_pending();
    }

    /// The next offset the fold reads in `partition`.
    pub fn position(&self, partition: u32) -> u64 {
        self.positions.get(partition as usize).copied().unwrap_or(0)
    }

    /// `(partition, next offset)` of every partition the fold has a position in.
    pub fn positions(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.positions
            .iter()
            .enumerate()
            .map(|(p, next)| (p as u32, *next))
    }

    /// Sets where the fold is in `partition` (a stored model loaded with its offsets).
    pub fn set_position(&mut self, partition: u32, next_offset: u64) {
        let i = partition as usize;
        if self.positions.len() <= i {
            self.positions.resize(i + 1, 0);
        }
        self.positions[i] = next_offset;
    }

    fn advance(&mut self, at: Pos) {
        let i = at.partition as usize;
        match self.positions.get_mut(i) {
            Some(p) => *p = (*p).max(at.offset + 1),
            None => self.set_position(at.partition, at.offset + 1),
        }
    }

    fn reached(&self, cut: &[tributary_proto::events::LogPosition]) -> bool {
        cut.iter()
            .all(|c| self.position(c.partition) >= c.next_offset)
    }

    /// An InvoiceIssued at `at` known before the fold reads it: by the issuer that just
    /// appended it, or found by a reader scanning ahead ([`crate::projector::Barriers`]).
    /// Queued (or decided, if the fold is at its cut) without moving the fold's position; when
    /// the record itself is read later it is a [`Effect::Duplicate`].
    pub fn expect_invoice(&mut self, at: Pos, env: &Envelope) -> Effect {
        let effect = match &env.payload {
            Some(Payload::InvoiceIssued(inv)) => self.receive_invoice(at, env, inv),
            _ => Effect::Nothing,
        };
        self.decide_pending();
        effect
    }

    /// For each partition, the offset the fold must not read past before the invoices waiting
    /// at the head of a tenant's queue are decided: their cuts.
    pub fn barriers(&self) -> BTreeMap<u32, u64> {
        let mut out: BTreeMap<u32, u64> = BTreeMap::new();
        for head in self.pending.values().filter_map(|q| q.front()) {
            for c in &head.event.cut {
                if self.position(c.partition) <= c.next_offset {
                    let b = out.entry(c.partition).or_insert(c.next_offset);
                    *b = (*b).min(c.next_offset);
                }
            }
        }
        out
    }

    /// An InvoiceIssued read at `at`: decided now if the fold reached its cut and no earlier
    /// invoice of the tenant waits, else queued.
    fn receive_invoice(&mut self, at: Pos, env: &Envelope, inv: &InvoiceIssued) -> Effect {
        let seen = self
            .issued
            .values()
            .any(|i| i.event_id == env.event_id && i.invoice.tenant == inv.tenant)
            || self
                .pending
                .get(&inv.tenant)
                .is_some_and(|q| q.iter().any(|p| p.event_id == env.event_id));
        if seen && !env.event_id.is_empty() {
            return Effect::Duplicate;
        }
        if !self.pending.contains_key(&inv.tenant) && self.reached(&inv.cut) {
            return self.apply_invoice(at, env.time_us, &env.event_id, inv);
        }
        self.pending
            .entry(inv.tenant.clone())
            .or_default()
            .push_back(PendingInvoice {
                event: inv.clone(),
                at,
                time_us: env.time_us,
                event_id: env.event_id.clone(),
            });
        if self.track {
            self.dirty.pending.insert(inv.tenant.clone());
        }
        Effect::Pending
    }

    /// Decides the pending invoices whose cut the fold has reached, each tenant's in order.
    fn decide_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let tenants: Vec<String> = self.pending.keys().cloned().collect();
        for tenant in tenants {
            while let Some(head) = self.pending.get(&tenant).and_then(|q| q.front()) {
                if !self.reached(&head.event.cut) {
                    break;
                }
                let Some(p) = self.pending.get_mut(&tenant).and_then(|q| q.pop_front()) else {
                    break;
                };
                if self.pending.get(&tenant).is_some_and(|q| q.is_empty()) {
                    self.pending.remove(&tenant);
                }
                if self.track {
                    self.dirty.pending.insert(tenant.clone());
                }
                let effect = self.apply_invoice(p.at, p.time_us, &p.event_id, &p.event);
                self.decided.push((p.at, effect));
            }
        }
    }

    fn end_attempt(&mut self, build_id: &str, job: &str, attempt: u32) -> Effect {
        let key = AttemptKey {
            build_id: build_id.to_owned(),
            job: job.to_owned(),
            attempt,
        };
        match self.attempts.get_mut(&key) {
            Some(a) if !a.ended => {
                a.ended = true;
                if self.track {
                    self.dirty.attempts.insert(key);
                }
                Effect::Ended
            }
            _ => Effect::Nothing,
        }
    }

    fn apply_tick(&mut self, at: Pos, t: &Tick<'_>) -> Effect {
        let sc = &mut self.scratch;
        set(&mut sc.attempt.build_id, t.build_id);
        set(&mut sc.attempt.job, t.job);
        sc.attempt.attempt = t.attempt;
        let a = match self.attempts.get_mut(&sc.attempt) {
            Some(a) => a,
            None => self
                .attempts
                .entry(sc.attempt.clone())
                .or_insert_with(|| AttemptUsage {
                    tenant: t.tenant.to_owned(),
                    project: t.project.to_owned(),
                    machine_class: t.machine_class.to_owned(),
                    ..AttemptUsage::default()
                }),
        };
        if !a.seqs.insert(t.seq, t.event_id) {
            return Effect::Duplicate;
        }
        a.millis = a.millis.saturating_add(t.millis);
        a.ticks += 1;
        a.complete |= t.last;
        a.last = at;
        if self.track && !self.dirty.attempts.contains(&sc.attempt) {
            self.dirty.attempts.insert(sc.attempt.clone());
        }
        let (start, end) = tick_interval(t);
        set(&mut sc.usage.tenant, t.tenant);
        set(&mut sc.usage.project, t.project);
        set(&mut sc.usage.machine_class, t.machine_class);
        set(&mut sc.part.tenant, t.tenant);
        set(&mut sc.part.build_id, t.build_id);
        set(&mut sc.part.job, t.job);
        sc.part.attempt = t.attempt;
        set(&mut sc.part.machine_class, t.machine_class);
        let (usage, parts, part_keys, dirty, track) = (
            &mut self.usage,
            &mut self.parts,
            &mut self.part_keys,
            &mut self.dirty,
            self.track,
        );
        for_each_day(start, end, t.millis, |day, ms| {
            sc.usage.day = day;
            let u = match usage.get_mut(&sc.usage) {
                Some(u) => u,
                None => usage.entry(sc.usage.clone()).or_default(),
            };
            u.millis = u.millis.saturating_add(ms);
            u.last = at;
            sc.part.period = day.period();
            let p = match parts.get_mut(&sc.part) {
                Some(p) => p,
                None => {
                    part_keys.insert(sc.part.clone());
                    parts.entry(sc.part.clone()).or_insert_with(|| Part {
                        project: t.project.to_owned(),
                        ..Part::default()
                    })
                }
            };
            p.millis = p.millis.saturating_add(ms);
            p.last = at;
            if track && !dirty.usage.contains(&sc.usage) {
                dirty.usage.insert(sc.usage.clone());
            }
            if track && !dirty.parts.contains(&sc.part) {
                dirty.parts.insert(sc.part.clone());
            }
        });
        Effect::Counted
    }

    fn apply_invoice(
        &mut self,
        at: Pos,
        time_us: i64,
        event_id: &str,
        inv: &InvoiceIssued,
    ) -> Effect {
        let rejected = |reason: String| Effect::Rejected {
            tenant: inv.tenant.clone(),
            period: inv.period.clone(),
            reason,
        };
        let period = match Period::parse(&inv.period) {
            Ok(p) => p,
            Err(e) => {
                self.rejected += 1;
                return rejected(e);
            }
        };
        if self.issued.contains_key(&(inv.tenant.clone(), period)) {
            self.rejected += 1;
            return rejected("this period's invoice was already issued".into());
        }
        let plan = match PricePlan::parse(&inv.plan_toml, "the invoice's plan") {
            Ok(p) => p,
            Err(e) => {
                self.rejected += 1;
                return rejected(e.to_string());
            }
        };
        let priced = match price(self, &inv.tenant, period, &plan) {
            Ok(p) => p,
            Err(e) => {
                self.rejected += 1;
                return rejected(e.to_string());
            }
        };
        let claimed = Invoice::from_event(inv);
        if priced.invoice != claimed {
            self.rejected += 1;
            return rejected(
                "usage changed between pricing and issuing; the metering service issues it again"
                    .into(),
            );
        }
        for (key, billed) in priced.billed {
            if let Some(p) = self.parts.get_mut(&key) {
                p.billed_millis = Some(billed);
                if self.track {
                    self.dirty.parts.insert(key);
                }
            }
        }
        let k = (inv.tenant.clone(), period);
        self.issued.insert(
            k.clone(),
            IssuedInvoice {
                invoice: claimed,
                at,
                time_us,
                event_id: event_id.to_owned(),
            },
        );
        if self.track {
            self.dirty.invoices.insert(k);
        }
        Effect::Accepted {
            tenant: inv.tenant.clone(),
            period,
        }
    }

    /// Whether `tenant`'s invoice of `period` was issued.
    pub fn is_issued(&self, tenant: &str, period: Period) -> bool {
        self.issued.contains_key(&(tenant.to_owned(), period))
    }

    /// Whether an invoice of `tenant` for `period` waits to be decided.
    pub fn is_pending(&self, tenant: &str, period: Period) -> bool {
        let text = period.to_string();
        self.pending
            .get(tenant)
            .is_some_and(|q| q.iter().any(|p| p.event.period == text))
    }

    /// The build's usage per job attempt, in job order.
    pub fn build_usage(&self, build_id: &str) -> Vec<(&AttemptKey, &AttemptUsage)> {
        let mut v: Vec<_> = self
            .attempts
            .iter()
            .filter(|(k, _)| k.build_id == build_id)
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }
}

/// The wall-clock interval a tick covers: its own, or (older agents) the `millis` before the
/// envelope's time.
pub fn interval(env: &Envelope, t: &UsageTick) -> (i64, i64) {
    tick_interval(&Tick::of(env, t))
}

fn tick_interval(t: &Tick<'_>) -> (i64, i64) {
    if t.end_us > 0 && t.end_us >= t.start_us {
        (t.start_us, t.end_us)
    } else {
        let len = i64::try_from(t.millis.saturating_mul(1000)).unwrap_or(i64::MAX);
        (t.time_us.saturating_sub(len), t.time_us)
    }
}
