//! Pricing: a pure function from a tenant's metered usage and a price plan to an invoice.
//!
//! * **Usage lines** (one per project and machine class): every job attempt's time in the
//!   month is rounded up on its own to the plan's unit (`round_up_secs`, a minute like GitHub
//!   Actions); a job running across the end of a month is two parts, one per month, each
//!   rounded. The month's free minutes are used by the usage lines in line order (project,
//!   then machine class). Each line's amount is rounded half up to the currency's unit.
//! * **Adjustment lines**: time that reached an already invoiced month after its invoice
//!   (late ticks), billed at this plan's prices on the tenant's next invoice, without free
//!   minutes: per job attempt, rounded total now minus what was billed then.

use std::collections::BTreeMap;

use tributary_proto::events::{InvoiceIssued, InvoiceLine, LogPosition};

use crate::calendar::Period;
use crate::fold::{MeteringState, PartKey};
use crate::plan::{PlanError, PricePlan};

pub const USAGE: &str = "usage";
pub const ADJUSTMENT: &str = "adjustment";

/// An invoice: what InvoiceIssued carries (less the plan's text).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Invoice {
    pub tenant: String,
    pub period: String,
    pub plan_version: String,
    pub currency: String,
    pub lines: Vec<InvoiceLine>,
    pub total_micros: i64,
}

/// An invoice and, per job-attempt part, the billed time it settles (applied on acceptance).
#[derive(Clone, Debug)]
pub struct Priced {
    pub invoice: Invoice,
    pub billed: Vec<(PartKey, u64)>,
}

impl Invoice {
    pub fn from_event(e: &InvoiceIssued) -> Invoice {
        Invoice {
            tenant: e.tenant.clone(),
            period: e.period.clone(),
            plan_version: e.plan_version.clone(),
            currency: e.currency.clone(),
            lines: e.lines.clone(),
            total_micros: e.total_micros,
        }
    }

    /// The event to append; `cut` is where the issuer's fold was when it priced it.
    pub fn to_event(&self, plan: &PricePlan, cut: Vec<LogPosition>) -> InvoiceIssued {
        InvoiceIssued {
            cut,
            tenant: self.tenant.clone(),
            period: self.period.clone(),
            plan_version: self.plan_version.clone(),
            plan_toml: plan.text.clone(),
            currency: self.currency.clone(),
            lines: self.lines.clone(),
            total_micros: self.total_micros,
        }
    }

    /// Free time the usage lines used.
    pub fn free_millis_used(&self) -> u64 {
        self.lines.iter().map(|l| l.free_millis).sum()
    }
}

#[derive(Default)]
struct Acc {
    jobs: u64,
    millis: u64,
    billed: u64,
}

/// Prices `tenant`'s `period` from `state` with `plan`: the period's usage plus adjustments
/// for late usage of already issued periods before it.
pub fn price(
    state: &MeteringState,
    tenant: &str,
    period: Period,
    plan: &PricePlan,
) -> Result<Priced, PlanError> {
    let mut usage: BTreeMap<(String, String), Acc> = BTreeMap::new();
    let mut adjust: BTreeMap<(Period, String, String), Acc> = BTreeMap::new();
    let mut billed = Vec::new();
    let from = PartKey {
        tenant: tenant.to_owned(),
        period: Period {
            year: i32::MIN,
            month: 0,
        },
        build_id: String::new(),
        job: String::new(),
        attempt: 0,
        machine_class: String::new(),
    };
    for key in state.part_keys.range(from..) {
        if key.tenant != tenant || key.period > period {
            break;
        }
        let Some(part) = state.parts.get(key) else {
            continue;
        };
        let rounded = plan.billed_millis(part.millis);
        if key.period == period {
            let acc = usage
                .entry((part.project.clone(), key.machine_class.clone()))
                .or_default();
            acc.jobs += 1;
            acc.millis += part.millis;
            acc.billed += rounded;
            billed.push((key.clone(), rounded));
        } else if let Some(before) = part.billed_millis {
            // An issued month's part that grew after its invoice.
            if rounded > before && state.is_issued(tenant, key.period) {
                let acc = adjust
                    .entry((key.period, part.project.clone(), key.machine_class.clone()))
                    .or_default();
                acc.jobs += 1;
                acc.millis += part.millis;
                acc.billed += rounded - before;
                billed.push((key.clone(), rounded));
            }
        } else if state.is_issued(tenant, key.period) {
            // A part that first appeared after its month was invoiced.
            if rounded > 0 {
                let acc = adjust
                    .entry((key.period, part.project.clone(), key.machine_class.clone()))
                    .or_default();
                acc.jobs += 1;
                acc.millis += part.millis;
                acc.billed += rounded;
                billed.push((key.clone(), rounded));
            }
        }
    }
    let mut lines = Vec::new();
    let mut free_left = plan.free_millis();
    let period_text = period.to_string();
    for ((project, class), acc) in usage {
        let price = plan.price_micros(&class)?;
        let free = free_left.min(acc.billed);
        free_left -= free;
        lines.push(InvoiceLine {
            kind: USAGE.into(),
            period: period_text.clone(),
            project,
            machine_class: class,
            jobs: acc.jobs,
            millis: acc.millis,
            billed_millis: acc.billed,
            free_millis: free,
            price_per_minute_micros: price,
            amount_micros: plan.amount_micros(acc.billed - free, price),
        });
    }
    for ((p, project, class), acc) in adjust {
        let price = plan.price_micros(&class)?;
        lines.push(InvoiceLine {
            kind: ADJUSTMENT.into(),
            period: p.to_string(),
            project,
            machine_class: class,
            jobs: acc.jobs,
            millis: acc.millis,
            billed_millis: acc.billed,
            free_millis: 0,
            price_per_minute_micros: price,
            amount_micros: plan.amount_micros(acc.billed, price),
        });
    }
    let total_micros = lines.iter().map(|l| l.amount_micros).sum();
    Ok(Priced {
        invoice: Invoice {
            tenant: tenant.to_owned(),
            period: period_text,
            plan_version: plan.version.clone(),
            currency: plan.currency.clone(),
            lines,
            total_micros,
        },
        billed,
    })
}

/// Tenants and months whose invoice is due at `now_us` (`close_after_us` after the month
/// ended) and not issued: months with usage, and — for late usage of issued months — the
/// first due month after the latest such month. Sorted; the service issues them in order.
pub fn due(
    state: &MeteringState,
    plan: &PricePlan,
    now_us: i64,
    close_after_us: i64,
) -> Vec<(String, Period)> {
    let is_due = |p: Period| p.end_us().saturating_add(close_after_us) <= now_us;
    let mut out: BTreeMap<(String, Period), ()> = BTreeMap::new();
    for key in &state.part_keys {
        let Some(part) = state.parts.get(key) else {
            continue;
        };
        if !is_due(key.period) {
            continue;
        }
        if state.is_pending(&key.tenant, key.period) {
            continue;
        }
        if !state.is_issued(&key.tenant, key.period) {
            out.insert((key.tenant.clone(), key.period), ());
        } else if plan.billed_millis(part.millis) > part.billed_millis.unwrap_or(0) {
            // Late usage: it rides on the next invoice after its month. Find the first
            // not-yet-issued due month after it.
            let mut p = key.period.next();
            while is_due(p) && state.is_issued(&key.tenant, p) {
                p = p.next();
            }
            if is_due(p) {
                out.insert((key.tenant.clone(), p), ());
            }
        }
    }
    out.into_keys().collect()
}
