//! Metering: invoices and per-build usage from the metering read model (`metering.db`, or
//! the `metering` schema of the `--database` PostgreSQL that `serve metering` writes).
//!
//! Tenant isolation: a user token sees its own tenant only; the admin token may name any
//! tenant. Another tenant's build is NOT_FOUND, so its existence is not revealed.

use std::time::Duration;

use tonic::{Request, Response, Status};
use tributary_eventlog::EventLog;
use tributary_metering::fold::IssuedInvoice;
use tributary_metering::{
    price, Day, InvoiceStatus, MeteringState, MeteringStore, Period, PricePlan,
};
use tributary_projections::directory::TokenKind;
use tributary_proto::api::{metering_server::Metering, *};

use crate::auth::{authenticate, Principal};
use crate::state::{internal, ApiState};

/// How long a gRPC read waits for the metering projection to reach the end of the log.
const CATCH_UP: Duration = Duration::from_secs(10);

/// Why there is no usage when no metering service ever ran on this log.
pub const NOT_RUNNING: &str = "metering is not running: no metering service has written its \
     tables yet (start `tributary serve metering` with the same --kafka/--database, or use \
     `tributary up`)";

/// Reads of the metering read model shared by the gRPC `Metering` service and the web UI's
/// usage page: one set of queries, one tenant at a time.
#[derive(Clone)]
pub struct MeteringReader {
    pub store: MeteringStore,
    /// Prices live invoices (issued ones carry their own).
    pub plan: PricePlan,
}

/// How far the metering read model is behind the log, when it is: summed over the events
/// partitions that are behind (on the single-partition log, an offset of the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Behind {
    /// Events folded (the offset reached, on one partition).
    pub at: u64,
    /// Events on the log.
    pub end: u64,
    /// How many events partitions are behind (0 or 1 on the single-partition log).
    pub partitions: u32,
}

impl Behind {
    /// Where the read model is against `ends` (per events partition): None when caught up.
    pub fn of(positions: &std::collections::BTreeMap<u32, u64>, ends: &[u64]) -> Option<Behind> {
        let (mut at, mut end, mut partitions) = (0, 0, 0);
        for (p, &e) in ends.iter().enumerate() {
            let a = positions.get(&(p as u32)).copied().unwrap_or(0).min(e);
            at += a;
            end += e;
            if a < e {
                partitions += 1;
            }
        }
        (partitions > 0).then_some(Behind {
            at,
            end,
            partitions: if ends.len() > 1 { partitions } else { 0 },
        })
    }
}

impl std::fmt::Display for Behind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.partitions == 0 {
            write!(
                f,
                "metering is behind the log (at offset {} of {})",
                self.at, self.end
            )?;
        } else {
            write!(
                f,
                "metering is behind the log ({} of {} events folded; {} partitions behind)",
                self.at, self.end, self.partitions
            )?;
        }
        write!(
            f,
            "; is the metering service running (`tributary up` or `tributary serve metering`)?"
        )
    }
}

/// What a tenant's usage page shows: one consistent read of the metering read model.
pub struct TenantUsage {
    /// Usage records of `period`: (project, machine class, day, millis), ordered by day.
    pub days: Vec<(String, String, Day, u64)>,
    /// The period's invoice: issued if it was, else live (priced with the server's plan).
    pub current: Invoice,
    /// Every issued invoice of the tenant, newest period first.
    pub issued: Vec<Invoice>,
}

impl MeteringReader {
    pub fn new(store: MeteringStore, plan: PricePlan) -> Self {
        MeteringReader { store, plan }
    }

    /// Waits (at most `within`) until the read model has folded the whole log as of now.
    pub async fn caught_up(&self, log: &dyn EventLog, within: Duration) -> Result<(), Status> {
        let ends = events_ends(log).await?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let positions = self.store.positions().await.map_err(internal)?;
            if positions.is_empty() {
                // Nothing to wait for: no metering service ever wrote these tables.
                return Err(Status::unavailable(NOT_RUNNING));
            }
            let Some(behind) = Behind::of(&positions, &ends) else {
                return Ok(());
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(behind.to_string()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether a metering service ever wrote these tables (a position of some partition).
    pub async fn has_run(&self) -> Result<bool, Status> {
        Ok(!self.store.positions().await.map_err(internal)?.is_empty())
    }

    /// How far behind the log the read model is now (None: caught up).
    pub async fn behind(&self, log: &dyn EventLog) -> Result<Option<Behind>, Status> {
        let ends = events_ends(log).await?;
        let positions = self.store.positions().await.map_err(internal)?;
        Ok(Behind::of(&positions, &ends))
    }

    /// `tenant`'s invoice for `period`: the issued one, else the live one.
    pub async fn invoice(&self, tenant: &str, period: Period) -> Result<Invoice, Status> {
        if let Some(issued) = self.store.issued(tenant, period).await.map_err(internal)? {
            return Ok(issued_invoice(issued));
        }
        let state = self.store.load_tenant(tenant).await.map_err(internal)?;
        live_invoice(&state, &self.plan, tenant, period)
    }

    /// `tenant`'s usage of `period` by project, machine class and day, its invoice and its
    /// issued invoices.
    pub async fn tenant_usage(&self, tenant: &str, period: Period) -> Result<TenantUsage, Status> {
        let days = self
            .store
            .usage_records(tenant)
            .await
            .map_err(internal)?
            .into_iter()
            .filter(|(k, _)| k.day.period() == period)
            .map(|(k, millis)| (k.project, k.machine_class, k.day, millis))
            .collect();
        let state = self.store.load_tenant(tenant).await.map_err(internal)?;
        let mut issued: Vec<Invoice> = state
            .issued
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .rev()
            .map(|(_, i)| issued_invoice(i.clone()))
            .collect();
        let current = match issued.iter().position(|i| i.period == period.to_string()) {
            Some(i) => issued[i].clone(),
            None => live_invoice(&state, &self.plan, tenant, period)?,
        };
        issued.retain(|i| {
            i.period != current.period || current.status != InvoiceStatus::Issued.as_str()
        });
        Ok(TenantUsage {
            days,
            current,
            issued,
        })
    }
}

/// The end offset of every events partition (metering does not read the logs topic).
async fn events_ends(log: &dyn EventLog) -> Result<Vec<u64>, Status> {
    let mut ends = log.end_offsets().await.map_err(internal)?;
    ends.truncate(tributary_metering::projector::partitions(log).len());
    Ok(ends)
}

/// An issued invoice for the API.
fn issued_invoice(issued: IssuedInvoice) -> Invoice {
    let inv = issued.invoice;
    Invoice {
        free_millis_used: inv.free_millis_used(),
        tenant: inv.tenant,
        period: inv.period,
        status: InvoiceStatus::Issued.as_str().into(),
        plan_version: inv.plan_version,
        currency: inv.currency,
        lines: inv.lines,
        total_micros: inv.total_micros,
        issued_offset: issued.at.offset,
        issued_partition: issued.at.partition,
        issued_us: issued.time_us,
        free_millis: 0,
    }
}

/// The live invoice of `tenant`'s `period`, priced from `state` with `plan`.
fn live_invoice(
    state: &MeteringState,
    plan: &PricePlan,
    tenant: &str,
    period: Period,
) -> Result<Invoice, Status> {
    let priced = price(state, tenant, period, plan)
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    let inv = priced.invoice;
    Ok(Invoice {
        free_millis_used: inv.free_millis_used(),
        tenant: inv.tenant,
        period: inv.period,
        status: InvoiceStatus::of(period, false, tributary_proto::now_us())
            .as_str()
            .into(),
        plan_version: inv.plan_version,
        currency: inv.currency,
        lines: inv.lines,
        total_micros: inv.total_micros,
        issued_offset: 0,
        issued_partition: 0,
        issued_us: 0,
        free_millis: plan.free_millis(),
    })
}

pub struct MeteringApi {
    state: ApiState,
    reader: MeteringReader,
}

impl MeteringApi {
    pub fn new(state: ApiState, reader: MeteringReader) -> Self {
        MeteringApi { state, reader }
    }

    /// The reader this service answers from (the web UI's usage page shares it).
    pub fn reader(&self) -> &MeteringReader {
        &self.reader
    }

    fn who<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let who = self.state.directory(|d| authenticate(d, request))??;
        who.require_user()?;
        Ok(who)
    }

    /// Waits until the metering read model has folded the whole log as of now.
    async fn caught_up(&self) -> Result<(), Status> {
        self.reader
            .caught_up(self.state.log.as_ref(), CATCH_UP)
            .await
    }
}

#[tonic::async_trait]
impl Metering for MeteringApi {
    async fn get_invoice(
        &self,
        request: Request<GetInvoiceRequest>,
    ) -> Result<Response<Invoice>, Status> {
        let who = self.who(&request)?;
        let req = request.into_inner();
        let tenant = if req.tenant.is_empty() {
            who.tenant.clone()
        } else {
            req.tenant.clone()
        };
        if tenant != who.tenant && who.kind != TokenKind::Admin {
            return Err(Status::permission_denied(format!(
                "your token belongs to tenant {}; only the admin token can read another \
                 tenant's invoices",
                who.tenant
            )));
        }
        let period = Period::parse(&req.period).map_err(Status::invalid_argument)?;
        self.caught_up().await?;
        Ok(Response::new(self.reader.invoice(&tenant, period).await?))
    }

    async fn get_build_usage(
        &self,
        request: Request<GetBuildUsageRequest>,
    ) -> Result<Response<BuildUsage>, Status> {
        let who = self.who(&request)?;
        let id = request.into_inner().build_id;
        let Some(start) = self.state.build_start(&id).await? else {
            return Err(Status::not_found(format!("no build {id}")));
        };
        self.state.wait_builds(&start.seen()).await?;
        match self.state.store.load_build(&id).await.map_err(internal)? {
            Some(b) if b.tenant == who.tenant || who.kind == TokenKind::Admin => {}
            _ => return Err(Status::not_found(format!("no build {id}"))),
        }
        self.caught_up().await?;
        let attempts = self.reader.store.build_usage(&id).await.map_err(internal)?;
        let jobs: Vec<JobUsage> = attempts
            .into_iter()
            .map(|(k, a)| JobUsage {
                job: k.job,
                attempt: k.attempt,
                machine_class: a.machine_class,
                millis: a.millis,
                ticks: a.ticks,
                complete: a.complete,
            })
            .collect();
        Ok(Response::new(BuildUsage {
            build_id: id,
            millis: jobs.iter().map(|j| j.millis).sum(),
            jobs,
        }))
    }
}
