//! Metering commands: `invoice`, `audit`, and the price plan flags (`serve metering` is the
//! metering role, `crate::roles::metering`).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use tributary_metering::plan::format_money;
use tributary_metering::service::ServiceConfig;
use tributary_metering::{audit as maudit, InvoiceStatus, MeteringState, Period, PricePlan};
use tributary_projections::{replay, BuildsState};
use tributary_proto::api;

use crate::cli::{AuditArgs, InvoiceArgs, InvoiceFormat, MeteringArgs};
use crate::data_dir::DataDir;

/// The price plan of `--price-plan FILE`, or the built-in one.
pub fn load_plan(path: Option<&std::path::Path>) -> anyhow::Result<PricePlan> {
    let Some(path) = path else {
        return Ok(PricePlan::builtin());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the price plan {}", path.display()))?;
    Ok(PricePlan::parse(&text, &path.display().to_string())?)
}

/// The metering service's configuration from its flags.
pub fn service_config(args: &MeteringArgs) -> anyhow::Result<ServiceConfig> {
    let hours = args.close_after_hours;
    if !hours.is_finite() || hours < 0.0 {
        anyhow::bail!("--close-after-hours must be 0 or more, not {hours}");
    }
    Ok(ServiceConfig {
        plan: load_plan(args.price_plan.as_deref())?,
        close_after: Duration::from_secs_f64(hours * 3600.0),
        check_every: Duration::from_secs(5),
    })
}

pub async fn invoice(args: InvoiceArgs) -> anyhow::Result<ExitCode> {
    if args.print_default_plan {
        print!("{}", tributary_metering::plan::DEFAULT_PLAN);
        return Ok(ExitCode::SUCCESS);
    }
    let period = match &args.period {
        Some(p) => Period::parse(p).map_err(anyhow::Error::msg)?,
        None => Period::of_us(tributary_proto::now_us()),
    };
    let inv = match &args.server {
        Some(server) => {
            let server = crate::cli::ServerArgs {
                server: server.clone(),
                token: args.token.clone(),
            };
            let mut client = crate::client::metering(&server).await?;
            client
                .get_invoice(api::GetInvoiceRequest {
                    tenant: args.tenant.clone().unwrap_or_default(),
                    period: period.to_string(),
                })
                .await
                .map_err(crate::client::status)?
                .into_inner()
        }
        None => {
            let plan = load_plan(args.price_plan.as_deref())?;
            let data = DataDir::open(&args.data.dir()).await?;
            let mut projector =
                tributary_metering::MeteringProjector::open(data.metering.clone()).await?;
            projector.catch_up(data.log.as_ref()).await?;
            let tenant = args.tenant.clone().unwrap_or_else(|| "local".into());
            tributary_api::metering::MeteringReader::new(data.metering.clone(), plan)
                .invoice(&tenant, period)
                .await
                .map_err(crate::client::status)?
        }
    };
    // The status from this binary's clock too: a server from before `not_issued` says `live`.
    let mut inv = inv;
    let issued = inv.status == InvoiceStatus::Issued.as_str();
    inv.status = InvoiceStatus::of(period, issued, tributary_proto::now_us())
        .as_str()
        .to_owned();
    print_invoice(&inv, args.format)?;
    Ok(ExitCode::SUCCESS)
}

/// Milliseconds as minutes with two decimals (display only; amounts are exact).
fn minutes(ms: u64) -> String {
    let hundredths = (u128::from(ms) * 100 + 30_000) / 60_000;
    format!("{}.{:02}", hundredths / 100, hundredths % 100)
}

/// Prints `inv` in `format`; every format gives the same status (see [`InvoiceStatus`]).
fn print_invoice(inv: &api::Invoice, format: InvoiceFormat) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let money = |m: i64| format_money(m, 2);
    let price = |m: i64| format_money(m, 6).trim_end_matches('0').to_owned();
    match format {
        InvoiceFormat::Json => {
            writeln!(out, "{}", serde_json::to_string_pretty(inv)?)?;
        }
        InvoiceFormat::Csv => {
            writeln!(out, "tenant,period,status,kind,usage_period,project,machine_class,jobs,millis,billed_minutes,free_minutes,price_per_minute,amount,currency")?;
            for l in &inv.lines {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                    csv(&inv.tenant),
                    inv.period,
                    inv.status,
                    l.kind,
                    l.period,
                    csv(&l.project),
                    csv(&l.machine_class),
                    l.jobs,
                    l.millis,
                    minutes(l.billed_millis),
                    minutes(l.free_millis),
                    price(l.price_per_minute_micros),
                    money(l.amount_micros),
                    inv.currency
                )?;
            }
            writeln!(
                out,
                "{},{},{},total,,,,,,,,,{},{}",
                csv(&inv.tenant),
                inv.period,
                inv.status,
                money(inv.total_micros),
                inv.currency
            )?;
        }
        InvoiceFormat::Table => {
            let status = if inv.status == InvoiceStatus::Issued.as_str() {
                format!("issued (offset {})", inv.issued_offset)
            } else if inv.status == InvoiceStatus::NotIssued.as_str() {
                "not issued yet: the month is over (the metering service issues it after \
                 --close-after-hours)"
                    .to_owned()
            } else {
                "live: the month so far".to_owned()
            };
            writeln!(
                out,
                "invoice {} {}  {}  plan {}  {}",
                inv.tenant, inv.period, status, inv.plan_version, inv.currency
            )?;
            writeln!(
                out,
                "{:<10}  {:<7}  {:<16}  {:<18}  {:>5}  {:>10}  {:>8}  {:>9}  {:>10}",
                "KIND",
                "PERIOD",
                "PROJECT",
                "MACHINE CLASS",
                "JOBS",
                "MINUTES",
                "FREE",
                "PRICE/MIN",
                "AMOUNT"
            )?;
            for l in &inv.lines {
                writeln!(
                    out,
                    "{:<10}  {:<7}  {:<16}  {:<18}  {:>5}  {:>10}  {:>8}  {:>9}  {:>10}",
                    l.kind,
                    l.period,
                    l.project,
                    l.machine_class,
                    l.jobs,
                    minutes(l.billed_millis),
                    minutes(l.free_millis),
                    price(l.price_per_minute_micros),
                    money(l.amount_micros)
                )?;
            }
            if inv.lines.is_empty() {
                writeln!(out, "(no usage)")?;
            }
            writeln!(
                out,
                "{:>103}",
                format!("TOTAL {} {}", money(inv.total_micros), inv.currency)
            )?;
        }
    }
    Ok(())
}

fn csv(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// `tributary audit`: one replay of the log feeds a fresh builds fold and a fresh metering
/// fold, each up to the offset its stored read model reached; then both are compared.
pub async fn audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let backends = args.backends.resolve()?;
    if backends.kafka.is_some() || backends.database.is_some() {
        return audit_backends(&backends, args.tenant.as_deref()).await;
    }
    // An audit reads: a mistyped directory is an error, not an empty log that checks out.
    if !backends.data.join("events.db").is_file() {
        anyhow::bail!(
            "no event log in {} (no events.db there): give the data directory of a `tributary \
             run` (./.tributary by default) or `tributary up` with --data DIR",
            backends.data.display()
        );
    }
    let data = DataDir::open(&backends.data).await?;
    let tenant = args.tenant.as_deref();
    let builds_end = data.store.next_offset().await?;
    let mut stored_builds = data.store.load_all().await?;
    let stored_metering = data.metering.load_all().await?;
    let metering_end = stored_metering.position(0);
    let end = builds_end.max(metering_end);
    let started = Instant::now();
    let mut builds = BuildsState::default();
    let mut metering = MeteringState::default();
    let malformed = maudit::replay_log(data.log.clone(), end, |offset, env| {
        if offset < builds_end {
            builds.apply(offset, env);
        }
        if offset < metering_end {
            metering.apply(offset, env);
        }
    })
    .await?;
    let elapsed = started.elapsed();
    if let Some(t) = tenant {
        stored_builds.builds.retain(|_, b| b.tenant == t);
        builds.builds.retain(|_, b| b.tenant == t);
    }
    println!(
        "audit: replayed offsets 0..{end} in {:.3}s ({malformed} malformed records skipped){}",
        elapsed.as_secs_f64(),
        tenant.map_or(String::new(), |t| format!(", comparing tenant {t}"))
    );
    let mut first: BTreeMap<u64, String> = BTreeMap::new();
    match replay::compare(&stored_builds, &builds) {
        None => println!(
            "  builds:   {} builds match the replay up to offset {builds_end}",
            builds.builds.len()
        ),
        Some(d) => {
            println!("  builds:   DIFFERENT: {d}");
            first.insert(d.offset.unwrap_or(0), format!("builds read model: {d}"));
        }
    }
    let diffs = maudit::compare(&stored_metering, &metering, tenant);
    let issued = metering
        .issued
        .keys()
        .filter(|(t, _)| tenant.is_none_or(|x| x == t))
        .count();
    if diffs.is_empty() {
        println!(
            "  metering: {} usage records, {} job attempts and {issued} issued invoices match the \
             replay up to offset {metering_end}",
            metering
                .usage
                .keys()
                .filter(|k| tenant.is_none_or(|t| t == k.tenant))
                .count(),
            metering
                .attempts
                .values()
                .filter(|a| tenant.is_none_or(|t| t == a.tenant))
                .count(),
        );
    } else {
        println!("  metering: {} DIFFERENT rows; the first:", diffs.len());
        println!("    {}", diffs[0]);
        first.insert(diffs[0].at.offset, format!("metering: {}", diffs[0]));
    }
    match first.into_iter().next() {
        None => {
            println!("audit: OK");
            Ok(ExitCode::SUCCESS)
        }
        Some((offset, what)) => {
            println!("audit: FAILED: the first divergence starts at offset {offset}: {what}");
            Ok(ExitCode::from(1))
        }
    }
}

/// `tributary audit --kafka … --database …`: the builds read model through the projections'
/// replay check, and a fresh metering state from every events partition up to the offsets the
/// live metering tables reached, compared row by row with them and every issued invoice.
async fn audit_backends(
    backends: &crate::backends::Backends,
    tenant: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let log = backends.open_log().await?;
    let store = backends.open_store().await?;
    let metering = backends.open_metering().await?;
    let started = Instant::now();
    let mut failed = false;
    println!(
        "audit: replaying {} (builds read model and {}){}",
        backends.log_location(),
        backends.metering_location(),
        tenant.map_or(String::new(), |t| format!(", comparing tenant {t}"))
    );
    match replay::check(log.as_ref(), &store).await? {
        None => println!("  builds:   match the replay up to the stored offsets"),
        Some(d) => {
            println!("  builds:   DIFFERENT: {d}");
            failed = true;
        }
    }
    let (diffs, ends, replayed) = maudit::check(log.clone(), &metering, tenant)
        .await
        .context("cannot replay the log into a metering state")?;
    let ends: Vec<String> = ends.iter().map(|(p, o)| format!("{p}:{o}")).collect();
    if diffs.is_empty() {
        let issued = replayed
            .issued
            .keys()
            .filter(|(t, _)| tenant.is_none_or(|x| x == t))
            .count();
        println!(
            "  metering: {} usage records, {} job attempts and {issued} issued invoices match \
             the replay up to offsets (partition:next) {}",
            replayed
                .usage
                .keys()
                .filter(|k| tenant.is_none_or(|t| t == k.tenant))
                .count(),
            replayed
                .attempts
                .values()
                .filter(|a| tenant.is_none_or(|t| t == a.tenant))
                .count(),
            ends.join(" ")
        );
    } else {
        println!("  metering: {} DIFFERENT rows; the first:", diffs.len());
        println!("    {}", diffs[0]);
        failed = true;
    }
    println!("audit: replayed in {:.3}s", started.elapsed().as_secs_f64());
    if failed {
        println!("audit: FAILED");
        Ok(ExitCode::from(1))
    } else {
        println!("audit: OK");
        Ok(ExitCode::SUCCESS)
    }
}
