//! The usage page: the signed-in tenant's machine time this period (per project, machine
//! class and day, in minutes and at list price), the period's invoice (live, or issued once
//! the month closed) and every invoice already issued, with their lines and adjustments.
//!
//! It reads the metering read model through [`MeteringReader`], the same queries as the gRPC
//! `Metering` service, and only for the session's tenant. A server without metering, or one
//! whose metering has not folded the log, says so on the page instead of showing zeros.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use maud::{html, Markup};
use serde::Deserialize;
use tributary_metering::{plan::format_money, Day, Period, PricePlan};
use tributary_proto::api::Invoice;
use tributary_proto::events::InvoiceLine;

use super::format::{minutes, utc};
use super::layout;
use super::session::Session;
use super::{page_session, urlencode, WebError};
use crate::metering::{Behind, MeteringReader, TenantUsage};
use crate::state::ApiState;

/// How long the page waits for metering to fold the latest events before showing what it has.
const CATCH_UP: Duration = Duration::from_secs(2);

/// The usage page's router state: the API's, and metering when this server runs it.
#[derive(Clone)]
pub struct UsageState {
    pub api: ApiState,
    pub metering: Option<MeteringReader>,
}

#[derive(Deserialize)]
pub struct Params {
    period: Option<String>,
}

/// One usage record as shown: a project's machine class on a day.
#[derive(Debug, PartialEq)]
pub struct DayRow {
    pub day: Day,
    pub project: String,
    pub machine_class: String,
    pub millis: u64,
    /// At list price per minute (no per-job rounding, no free minutes); None: the class has
    /// no price in the plan.
    pub list_micros: Option<i64>,
}

/// The day rows of `usage`, priced at `plan`'s list prices. Pure.
pub fn day_rows(days: &[(String, String, Day, u64)], plan: &PricePlan) -> Vec<DayRow> {
    days.iter()
        .map(|(project, class, day, millis)| DayRow {
            day: *day,
            project: project.clone(),
            machine_class: class.clone(),
            millis: *millis,
            list_micros: plan
                .price_micros(class)
                .ok()
                .map(|p| plan.amount_micros(*millis, p)),
        })
        .collect()
}

pub async fn page(
    State(state): State<UsageState>,
    Query(q): Query<Params>,
    headers: HeaderMap,
) -> Result<Markup, WebError> {
    let session = page_session(&state.api, &headers, "/ui/usage")?;
    let now = tributary_proto::now_us();
    let period = match q.period.as_deref() {
        None | Some("") => Period::of_us(now),
        Some(p) => Period::parse(p).map_err(|e| WebError::BadRequest(e).in_page(&session))?,
    };
    let Some(metering) = &state.metering else {
        return Ok(shell(&session, period, no_metering()));
    };
    let tenant = session.who.tenant.clone();
    let log = state.api.log.as_ref();
    // Show what metering has folded so far, saying how far behind it is.
    let behind = match metering.caught_up(log, CATCH_UP).await {
        Ok(()) => None,
        Err(_) => {
            if !metering
                .has_run()
                .await
                .map_err(|e| WebError::from(e).in_page(&session))?
            {
                // Behind and never wrote a position: no metering service folds this log.
                return Ok(shell(&session, period, no_metering()));
            }
            metering
                .behind(log)
                .await
                .map_err(|e| WebError::from(e).in_page(&session))?
        }
    };
    let usage = metering
        .tenant_usage(&tenant, period)
        .await
        .map_err(|e| WebError::from(e).in_page(&session))?;
    let rows = day_rows(&usage.days, &metering.plan);
    Ok(shell(
        &session,
        period,
        body(period, &rows, &usage, &metering.plan, behind),
    ))
}

/// What the page says on a server that does not run metering (or whose metering tables were
/// never written while the log has events).
fn no_metering() -> Markup {
    html! {
        p.notice #no-metering {
            "Metering is not running on this server, so there is no usage to show. "
            "It runs inside " code { "tributary up" } ", or on its own with "
            code { "tributary serve metering --data DIR" } " (or, on the scale-out backends, "
            code { "tributary serve metering --kafka BROKERS --database URL" } ")."
        }
    }
}

fn shell(session: &Session, period: Period, content: Markup) -> Markup {
    layout::page(
        &format!("Usage {period}"),
        Some(session),
        html! {
            h1 { "Usage " small { (period) } }
            nav.periods {
                a #prev href={"/ui/usage?period=" (urlencode(&prev(period).to_string()))} { "← " (prev(period)) }
                " "
                a #next href={"/ui/usage?period=" (urlencode(&period.next().to_string()))} { (period.next()) " →" }
            }
            (content)
        },
    )
}

fn prev(p: Period) -> Period {
    if p.month == 1 {
        Period {
            year: p.year - 1,
            month: 12,
        }
    } else {
        Period {
            year: p.year,
            month: p.month - 1,
        }
    }
}

fn body(
    period: Period,
    rows: &[DayRow],
    usage: &TenantUsage,
    plan: &PricePlan,
    behind: Option<Behind>,
) -> Markup {
    let money = |micros: i64, currency: &str| {
        format!(
            "{} {currency}",
            format_money(micros, plan.currency_decimals)
        )
    };
    let total_millis: u64 = rows.iter().map(|r| r.millis).sum();
    html! {
        @if let Some(b) = behind {
            p.notice #behind { (b) " The figures below may be incomplete." }
        }
        section.usage {
            h2 { "Machine time in " (period) }
            @if rows.is_empty() {
                p.empty #no-usage { "No machine time metered in " (period) "." }
            } @else {
                p.hint { "Per day, project and machine class, at list price per minute: before \
                          each job is rounded up and before free minutes. The invoice below is \
                          what is billed." }
                div.scroll {
                    table.list #usage {
                        thead { tr { th { "day" } th { "project" } th { "machine class" } th.num { "minutes" } th.num { "at list price" } } }
                        tbody {
                            @for r in rows {
                                tr data-project=(r.project) data-class=(r.machine_class) data-day=(r.day.to_string()) data-millis=(r.millis) {
                                    td { (r.day) }
                                    td { a href={"/ui/projects/" (urlencode(&r.project))} { (r.project) } }
                                    td.mono { (r.machine_class) }
                                    td.num { (minutes(r.millis)) }
                                    td.num { @match r.list_micros { Some(m) => (money(m, &plan.currency)), None => "no price" } }
                                }
                            }
                            tr.total { td colspan="3" { "total" } td.num #total-minutes data-millis=(total_millis) { (minutes(total_millis)) } td {} }
                        }
                    }
                }
            }
        }
        section.usage #current {
            h2 { "Invoice " (usage.current.period) " " span class={"badge inv-" (usage.current.status)} { (usage.current.status) } }
            @if usage.current.status == "live" {
                p.hint { "The month so far, priced with plan " (usage.current.plan_version) "; "
                    (minutes(usage.current.free_millis_used)) " of " (minutes(usage.current.free_millis))
                    " free used. It is issued once the month is over, and never changes after." }
            }
            (invoice_markup(&usage.current, plan))
        }
        @if !usage.issued.is_empty() {
            section.usage #issued {
                h2 { "Issued invoices" }
                @for inv in &usage.issued {
                    details.invoice data-period=(inv.period) {
                        summary { (inv.period) " · " (money(inv.total_micros, &inv.currency)) " · issued " (utc(inv.issued_us)) }
                        (invoice_markup(inv, plan))
                    }
                }
            }
        }
    }
}

fn invoice_markup(inv: &Invoice, plan: &PricePlan) -> Markup {
    // An issued invoice carries its own currency; its decimals are the plan's when the
    // currency matches, else all six.
    let decimals = if inv.currency == plan.currency {
        plan.currency_decimals
    } else {
        6
    };
    let money = |micros: i64| format!("{} {}", format_money(micros, decimals), inv.currency);
    html! {
        @if inv.lines.is_empty() {
            p.empty { "No lines: nothing billed." }
        } @else {
            div.scroll {
                table.list.invoice data-period=(inv.period) data-status=(inv.status) {
                    thead { tr { th { "kind" } th { "usage of" } th { "project" } th { "machine class" } th.num { "jobs" } th.num { "minutes" } th.num { "billed" } th.num { "free" } th.num { "per minute" } th.num { "amount" } } }
                    tbody {
                        @for l in &inv.lines { (line_markup(l, &money)) }
                        tr.total { td colspan="9" { "total" } td.num.total data-micros=(inv.total_micros) { (money(inv.total_micros)) } }
                    }
                }
            }
        }
    }
}

fn line_markup(l: &InvoiceLine, money: &dyn Fn(i64) -> String) -> Markup {
    html! {
        tr data-kind=(l.kind) data-project=(l.project) data-millis=(l.millis) {
            td { (l.kind) }
            td { (l.period) }
            td { (l.project) }
            td.mono { (l.machine_class) }
            td.num { (l.jobs) }
            td.num { (minutes(l.millis)) }
            td.num { (minutes(l.billed_millis)) }
            td.num { (minutes(l.free_millis)) }
            td.num { (money(l.price_per_minute_micros)) }
            td.num { (money(l.amount_micros)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_priced_at_list_price_and_unknown_classes_say_so() {
        let plan = PricePlan::parse(
            "version = \"t\"\ncurrency = \"USD\"\n[prices]\n\"small\" = \"0.010\"\n",
            "test",
        )
        .unwrap();
        let day = Day::parse("2026-11-25").unwrap();
        let rows = day_rows(
            &[
                ("web".into(), "small".into(), day, 90_000),
                ("web".into(), "huge".into(), day, 60_000),
            ],
            &plan,
        );
        assert_eq!(
            rows[0].list_micros,
            Some(20_000),
            "1.5 min at 0.010 = 0.015, in cents"
        );
        assert_eq!(rows[1].list_micros, None);
        assert_eq!(
            prev(Period::parse("2026-01").unwrap()).to_string(),
            "2025-12"
        );
    }

    #[test]
    fn missing_or_lagging_metering_is_said_plainly() {
        assert!(no_metering()
            .into_string()
            .contains("Metering is not running on this server"));
        let plan = PricePlan::builtin();
        let usage = TenantUsage {
            days: Vec::new(),
            current: Invoice {
                period: "2026-11".into(),
                status: "live".into(),
                ..Invoice::default()
            },
            issued: Vec::new(),
        };
        let period = Period::parse("2026-11").unwrap();
        let html = body(
            period,
            &[],
            &usage,
            &plan,
            Some(Behind {
                at: 10,
                end: 42,
                partitions: 0,
            }),
        )
        .into_string();
        assert!(
            html.contains("metering is behind the log (at offset 10 of 42)"),
            "{html}"
        );
        assert!(
            html.contains("No machine time metered in 2026-11"),
            "{html}"
        );
        let html = body(period, &[], &usage, &plan, None).into_string();
        assert!(!html.contains("behind"), "{html}");
        let behind = Behind::of(
            &[(0, 5), (1, 7), (3, 9)].into_iter().collect(),
            &[5, 8, 2, 9],
        );
        assert_eq!(
            behind,
            Some(Behind {
                at: 21,
                end: 24,
                partitions: 2
            })
        );
        let html = body(period, &[], &usage, &plan, behind).into_string();
        assert!(
            html.contains(
                "metering is behind the log (21 of 24 events folded; 2 partitions behind)"
            ),
            "{html}"
        );
        assert_eq!(Behind::of(&[(0, 5)].into_iter().collect(), &[5]), None);
    }
}
