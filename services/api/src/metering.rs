//! Metering: invoices and per-build usage from the metering read model (`metering.db`).
//!
//! Tenant isolation: a user token sees its own tenant only; the admin token may name any
//! tenant. Another tenant's build is NOT_FOUND, so its existence is not revealed.

use std::time::Duration;

use tonic::{Request, Response, Status};
use tributary_metering::{price, MeteringStore, Period, PricePlan};
use tributary_projections::directory::TokenKind;
use tributary_proto::api::{metering_server::Metering, *};

use crate::auth::{authenticate, Principal};
use crate::state::{internal, ApiState};

/// How long a read waits for the metering projection to reach the end of the log.
const CATCH_UP: Duration = Duration::from_secs(10);

pub struct MeteringApi {
    state: ApiState,
    store: MeteringStore,
    plan: PricePlan,
}

impl MeteringApi {
    /// `plan` prices live invoices (issued ones carry their own).
    pub fn new(state: ApiState, store: MeteringStore, plan: PricePlan) -> Self {
        MeteringApi { state, store, plan }
    }

    fn who<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let who = self.state.directory(|d| authenticate(d, request))??;
        who.require_user()?;
        Ok(who)
    }

    /// Waits until the metering read model has folded the whole log as of now.
    async fn caught_up(&self) -> Result<(), Status> {
        // The metering store keeps one consumer offset, that of a one-partition log; on a
        // partitioned log (no partition-aware metering service yet) this does not wait.
        let layout = self.state.log.layout();
        if layout.partitions() > 1 {
            return Ok(());
        }
        let end = self.state.log_end().await?.0.first().map_or(0, |(_, o)| *o);
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        loop {
            let at = self.store.next_offset().await.map_err(internal)?;
            if at >= end {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "metering is behind the log (at offset {at} of {end}); is the metering \
                     service running (`tributary up` or `tributary serve metering`)?"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An invoice for the API: the issued one, else the live one priced with `plan`.
pub async fn invoice(
    store: &MeteringStore,
    plan: &PricePlan,
    tenant: &str,
    period: Period,
) -> Result<Invoice, Status> {
    if let Some(issued) = store.issued(tenant, period).await.map_err(internal)? {
        let inv = issued.invoice;
        return Ok(Invoice {
            free_millis_used: inv.free_millis_used(),
            tenant: inv.tenant,
            period: inv.period,
            status: "issued".into(),
            plan_version: inv.plan_version,
            currency: inv.currency,
            lines: inv.lines,
            total_micros: inv.total_micros,
            issued_offset: issued.offset,
            issued_us: issued.time_us,
            free_millis: 0,
        });
    }
    let state = store.load_tenant(tenant).await.map_err(internal)?;
    let priced = price(&state, tenant, period, plan)
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    let inv = priced.invoice;
    Ok(Invoice {
        free_millis_used: inv.free_millis_used(),
        tenant: inv.tenant,
        period: inv.period,
        status: "live".into(),
        plan_version: inv.plan_version,
        currency: inv.currency,
        lines: inv.lines,
        total_micros: inv.total_micros,
        issued_offset: 0,
        issued_us: 0,
        free_millis: plan.free_millis(),
    })
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
        Ok(Response::new(
            invoice(&self.store, &self.plan, &tenant, period).await?,
        ))
    }

    async fn get_build_usage(
        &self,
        request: Request<GetBuildUsageRequest>,
    ) -> Result<Response<BuildUsage>, Status> {
        let who = self.who(&request)?;
        let id = request.into_inner().build_id;
        let end = self.state.log_end().await?;
        self.state.wait_builds(&end).await?;
        match self.state.store.load_build(&id).await.map_err(internal)? {
            Some(b) if b.tenant == who.tenant || who.kind == TokenKind::Admin => {}
            _ => return Err(Status::not_found(format!("no build {id}"))),
        }
        self.caught_up().await?;
        let attempts = self.store.build_usage(&id).await.map_err(internal)?;
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
