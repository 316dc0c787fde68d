//! The CLI's server commands: thin gRPC clients that print what the API returns.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};
use tributary_proto::api::{
    self, admin_client::AdminClient, builds_client::BuildsClient, projects_client::ProjectsClient,
};
use tributary_proto::events::{envelope::Payload, Status as BuildStatus};

use crate::cli::{
    AdminCommand, AgentsArgs, BuildsArgs, GetArgs, LogsArgs, ProjectCommand, ServerArgs,
    TriggerArgs, WatchArgs,
};
use crate::render::Renderer;

pub(crate) type Auth = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;
pub(crate) type Svc = InterceptedService<Channel, Auth>;

pub(crate) async fn channel(server: &ServerArgs) -> anyhow::Result<(Channel, Auth)> {
    let token = server.token.clone().context(
        "no token: pass --token or set TRIBUTARY_TOKEN (the admin token is in <data>/admin.token)",
    )?;
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token.trim())
        .parse()
        .context("the token contains characters that cannot be sent")?;
    let channel = tonic::transport::Endpoint::from_shared(server.server.clone())
        .with_context(|| format!("bad server address {}", server.server))?
        .connect()
        .await
        .with_context(|| {
            format!(
                "cannot reach the server at {} (is `tributary up` running?)",
                server.server
            )
        })?;
    let auth: Auth = Box::new(move |mut req: Request<()>| {
        req.metadata_mut().insert("authorization", value.clone());
        Ok(req)
    });
    Ok((channel, auth))
}

pub async fn metering(
    server: &ServerArgs,
) -> anyhow::Result<api::metering_client::MeteringClient<Svc>> {
    let (ch, auth) = channel(server).await?;
    Ok(api::metering_client::MeteringClient::with_interceptor(
        ch, auth,
    ))
}

pub(crate) async fn builds(server: &ServerArgs) -> anyhow::Result<BuildsClient<Svc>> {
    let (ch, auth) = channel(server).await?;
    Ok(BuildsClient::with_interceptor(ch, auth))
}

/// A gRPC error as a person reads it.
pub(crate) fn status(e: Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

pub async fn project(cmd: ProjectCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ProjectCommand::Add {
            name,
            repo,
            max_concurrent_jobs,
            webhook_secret,
            tenant,
            server,
        } => {
            let (ch, auth) = channel(&server).await?;
            let mut client = ProjectsClient::with_interceptor(ch, auth);
            // A local path is sent absolute: the server resolves it, not this shell.
            let repository = match std::path::Path::new(&repo).canonicalize() {
                Ok(p) if !repo.contains("://") => p.display().to_string(),
                _ => repo,
            };
            let p = client
                .create_project(api::CreateProjectRequest {
                    name,
                    repository,
                    webhook_secret: webhook_secret.unwrap_or_default(),
                    max_concurrent_jobs,
                    tenant: tenant.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("project {} ({}) created", p.name, p.repository);
        }
        ProjectCommand::List { server } => {
            let (ch, auth) = channel(&server).await?;
            let mut client = ProjectsClient::with_interceptor(ch, auth);
            let list = client
                .list_projects(api::ListProjectsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            for p in list.projects {
                println!("{:<24} {}", p.name, p.repository);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn trigger(args: TriggerArgs) -> anyhow::Result<ExitCode> {
    let mut client = builds(&args.server).await?;
    let resp = client
        .trigger_build(api::TriggerBuildRequest {
            project: args.project,
            git_ref: args.git_ref.unwrap_or_default(),
            commit: args.commit.unwrap_or_default(),
        })
        .await
        .map_err(status)?
        .into_inner();
    println!("{}", resp.build_id);
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    let request = api::WatchEventsRequest {
        // Per partition (any log); an older server ignores `from` and uses from_offset.
        from_offset: if resp.from.len() > 1 { 0 } else { resp.offset },
        from: resp.from.clone(),
        build_id: resp.build_id.clone(),
        ..Default::default()
    };
    render_watch(&mut client, request, &resp.build_id).await
}

/// Renders a build's events (`trigger --follow`, `logs`): its jobs' steps, `$ line`s and
/// output, why a queued job waits (polled from `GetBuild`, the reasons `get` shows) and, on
/// Ctrl-C, that the build keeps running. Exit code: 1 when the build ended unsuccessfully (or
/// the follower was interrupted), else 0 (also for a watch `until_end` of an unfinished build).
async fn render_watch(
    client: &mut BuildsClient<Svc>,
    request: api::WatchEventsRequest,
    build_id: &str,
) -> anyhow::Result<ExitCode> {
    let follow = !request.until_end;
    let mut stream = client
        .watch_events(request)
        .await
        .map_err(status)?
        .into_inner();
    if !follow {
        return render_finished(client, stream, build_id).await;
    }
    let mut renderer = Renderer::new(build_id, false);
    let mut waits = crate::waits::WaitNotes::default();
    let every = std::time::Duration::from_secs(1);
    let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            message = stream.message() => {
                let Some(ev) = message.map_err(status)? else {
                    if follow {
                        anyhow::bail!("the server closed the event stream before the build finished");
                    }
                    renderer.finish();
                    return Ok(ExitCode::SUCCESS);
                };
                let Some(env) = ev.event else { continue };
                if let Some(Payload::JobStarted(started)) = &env.payload {
                    if !renderer.knows_agent(&started.agent_id) {
                        let names = agent_names(client, build_id).await;
                        renderer.agent_names(names);
                    }
                }
                let finished = match &env.payload {
                    Some(Payload::BuildFinished(f)) => Some(f.status),
                    _ => None,
                };
                renderer.event(&env);
                if let Some(s) = finished {
                    renderer.finish();
                    let ok = BuildStatus::try_from(s) == Ok(BuildStatus::Succeeded);
                    return Ok(if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    });
                }
            }
            _ = poll.tick(), if follow => {
                let got = client
                    .get_build(api::GetBuildRequest {
                        build_id: build_id.to_owned(),
                        at: None,
                    })
                    .await;
                if let Ok(build) = got {
                    for (job, reason) in waits.update(&build.into_inner()) {
                        renderer.waiting(&job, &reason);
                    }
                }
            }
            _ = &mut ctrl_c, if follow => {
                renderer.finish();
                eprintln!("{}", crate::waits::left_running(build_id));
                return Ok(ExitCode::from(130));
            }
        }
    }
}

/// A build's events up to the log's end, rendered once all are read: on a log with a logs topic
/// a build's chunks are read after its state events (their order between topics is not kept),
/// so they are put in time order first, `BuildFinished` last.
async fn render_finished(
    client: &mut BuildsClient<Svc>,
    mut stream: tonic::Streaming<api::WatchedEvent>,
    build_id: &str,
) -> anyhow::Result<ExitCode> {
    let mut events = Vec::new();
    while let Some(ev) = stream.message().await.map_err(status)? {
        if let Some(env) = ev.event {
            events.push(env);
        }
    }
    let last = |e: &tributary_proto::events::Envelope| {
        matches!(e.payload, Some(Payload::BuildFinished(_)))
    };
    events.sort_by_key(|e| (last(e), e.time_us));
    let mut renderer = Renderer::new(build_id, false);
    renderer.agent_names(agent_names(client, build_id).await);
    let mut code = ExitCode::SUCCESS;
    for env in &events {
        if let Some(Payload::BuildFinished(f)) = &env.payload {
            if BuildStatus::try_from(f.status) != Ok(BuildStatus::Succeeded) {
                code = ExitCode::from(1);
            }
        }
        renderer.event(env);
    }
    renderer.finish();
    Ok(code)
}

/// Agent id → name of the build's jobs' agents (from `GetBuild`); empty when unknown.
async fn agent_names(
    client: &mut BuildsClient<Svc>,
    build_id: &str,
) -> std::collections::HashMap<String, String> {
    let got = client
        .get_build(api::GetBuildRequest {
            build_id: build_id.to_owned(),
            at: None,
        })
        .await;
    got.map(|b| {
        b.into_inner()
            .jobs
            .into_iter()
            .filter(|j| !j.agent_id.is_empty() && !j.agent_name.is_empty())
            .map(|j| (j.agent_id, j.agent_name))
            .collect()
    })
    .unwrap_or_default()
}

pub async fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let mut client = builds(&args.server).await?;
    // The build (a unique prefix of its id will do): NOT_FOUND for a wrong id, before any
    // stream starts.
    let build = client
        .get_build(api::GetBuildRequest {
            build_id: args.build.clone(),
            at: None,
        })
        .await
        .map_err(status)?
        .into_inner();
    if args.job.is_none() && !args.raw {
        // As `trigger --follow` renders it: `[job]` prefixes, steps, `$ line`s.
        let request = api::WatchEventsRequest {
            build_id: build.id.clone(),
            until_end: !args.follow,
            ..Default::default()
        };
        return render_watch(&mut client, request, &build.id).await;
    }
    let mut stream = client
        .tail_logs(api::TailLogsRequest {
            build_id: build.id.clone(),
            job: args.job.unwrap_or_default(),
            follow: args.follow,
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(line) = stream.message().await.map_err(status)? {
        if !line.build_status.is_empty() {
            out.flush()?;
            return Ok(if line.build_status == "succeeded" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        out.write_all(&line.data)?;
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    get_as_of(args, None).await
}

/// `get`, or with `at` the build as it stood then (`get --at`; no usage then: it is today's).
pub async fn get_as_of(
    args: GetArgs,
    at: Option<api::get_build_request::At>,
) -> anyhow::Result<ExitCode> {
    let mut client = builds(&args.server).await?;
    let past = at.is_some();
    let request = api::GetBuildRequest {
        build_id: args.build.clone(),
        at,
    };
    // The usage (printed, not in --json) is asked for alongside the build.
    let usage = async {
        if args.json || past {
            None
        } else {
            build_usage(&args.server, &args.build).await
        }
    };
    let (b, usage) = tokio::join!(client.get_build(request), usage);
    let b = b.map_err(status)?.into_inner();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&b)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "build {}  {}  project {}  commit {}",
        b.id, b.status, b.project, b.commit
    );
    if past {
        println!("  {}", crate::history::as_of(&b));
    }
    if !b.reason.is_empty() {
        println!("  {}", b.reason);
    }
    let mut used: u64 = 0;
    for j in &b.jobs {
        println!("  job {:<28} {:<10} {}", j.id, j.status, j.reason);
        for u in usage.iter().flat_map(|u| &u.jobs).filter(|u| u.job == j.id) {
            used += u.millis;
            println!(
                "    usage: attempt {} on {}: {} machine time in {} ticks{}",
                u.attempt,
                u.machine_class,
                duration(u.millis),
                u.ticks,
                if u.complete {
                    ""
                } else {
                    " (no final tick yet: billed to the last tick)"
                }
            );
        }
        if !j.waiting_for.is_empty() {
            println!("    waiting: {}", j.waiting_for);
        }
        if !j.runs_on_note.is_empty() {
            println!("    runs-on: {}", j.runs_on_note);
        }
        // A finished job's steps that have no events did not run in this build: a kept or
        // reused job's ran in the build its reason names.
        let over = matches!(
            j.status.as_str(),
            "succeeded" | "failed" | "skipped" | "canceled" | "timed_out"
        );
        if over && !j.steps.is_empty() && j.steps.iter().all(|s| s.status == "pending") {
            let n = j.steps.len();
            let plural = if n == 1 { "" } else { "s" };
            println!("    {n} step{plural}: not run in this build");
            continue;
        }
        for s in &j.steps {
            let shown = if over && s.status == "pending" {
                "not run"
            } else {
                s.status.as_str()
            };
            println!("    step {:<24} {shown}", s.name);
            for l in &s.lines {
                let code = exit_column(&l.status, l.exit_code);
                println!(
                    "      {:<9} {:<8} {}",
                    l.status,
                    code,
                    l.text.lines().next().unwrap_or("")
                );
            }
        }
    }
    if usage.is_some() {
        println!("  usage: {} machine time in all", duration(used));
    }
    Ok(ExitCode::SUCCESS)
}

/// The build's metered usage, or None when the server does not meter (or says no).
async fn build_usage(server: &ServerArgs, build: &str) -> Option<api::BuildUsage> {
    let mut client = metering(server).await.ok()?;
    match client
        .get_build_usage(api::GetBuildUsageRequest {
            build_id: build.to_owned(),
        })
        .await
    {
        Ok(r) => Some(r.into_inner()),
        Err(e) => {
            tracing::debug!(error = %e.message(), "no usage for the build");
            None
        }
    }
}

/// The exit column of a line in `get`: its exit code once it has one (a pending, running or
/// skipped line has none yet, whatever the default in the message says).
fn exit_column(status: &str, exit_code: i32) -> String {
    match status {
        "succeeded" | "failed" | "timed_out" | "canceled" => format!("exit {exit_code}"),
        _ => String::new(),
    }
}

/// `1m 05.2s`.
fn duration(ms: u64) -> String {
    let (m, rest) = (ms / 60_000, ms % 60_000);
    format!("{m}m {:02}.{}s", rest / 1000, (rest % 1000) / 100)
}

pub async fn cancel(args: GetArgs) -> anyhow::Result<ExitCode> {
    let mut client = builds(&args.server).await?;
    client
        .cancel_build(api::CancelBuildRequest {
            build_id: args.build.clone(),
            reason: String::new(),
        })
        .await
        .map_err(status)?;
    println!("cancel requested for {}", args.build);
    Ok(ExitCode::SUCCESS)
}

pub async fn watch(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let mut client = builds(&args.server).await?;
    let mut stream = client
        .watch_events(api::WatchEventsRequest {
            from_offset: args.from,
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    while let Some(ev) = stream.message().await.map_err(status)? {
        let Some(env) = ev.event else { continue };
        if args.json {
            println!("{}", tributary_proto::json::event_json(ev.offset, &env));
        } else {
            println!("{:>8}  {}  {}", ev.offset, env.build_id, env.type_name());
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn admin(cmd: AdminCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AdminCommand::TenantAdd { name, server } => {
            let (ch, auth) = channel(&server).await?;
            let t = AdminClient::with_interceptor(ch, auth)
                .create_tenant(api::CreateTenantRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            println!("tenant {} created", t.name);
        }
        AdminCommand::TokenCreate {
            tenant,
            kind,
            name,
            server,
        } => {
            let (ch, auth) = channel(&server).await?;
            let t = AdminClient::with_interceptor(ch, auth)
                .create_token(api::CreateTokenRequest { tenant, kind, name })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", t.token);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn builds_list(args: BuildsArgs, server: String) -> anyhow::Result<ExitCode> {
    let mut client = builds(&ServerArgs {
        server,
        token: args.token.clone(),
    })
    .await?;
    let list = client
        .list_builds(api::ListBuildsRequest {
            project: args.project.unwrap_or_default(),
            status: args.status.unwrap_or_default(),
            limit: args.limit,
        })
        .await
        .map_err(status)?
        .into_inner();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list.builds)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<36}  {:<10}  {:<16}  {:<12}  REASON",
        "BUILD", "STATUS", "PROJECT", "COMMIT"
    );
    for b in &list.builds {
        println!(
            "{:<36}  {:<10}  {:<16}  {:<12}  {}",
            b.id,
            b.status,
            b.project,
            b.commit.get(..12).unwrap_or(&b.commit),
            b.reason.lines().next().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn agents(args: AgentsArgs) -> anyhow::Result<ExitCode> {
    let (ch, auth) = channel(&args.server).await?;
    let mut client = AdminClient::with_interceptor(ch, auth);
    if let Some(agent_id) = args.revoke {
        client
            .revoke_agent(api::RevokeAgentRequest {
                agent_id: agent_id.clone(),
            })
            .await
            .map_err(status)?;
        println!("agent {agent_id} revoked");
        return Ok(ExitCode::SUCCESS);
    }
    let list = client
        .list_agents(api::ListAgentsRequest {})
        .await
        .map_err(status)?
        .into_inner();
    println!(
        "{:<36}  {:<16}  {:<12}  {:>4}  {:<12}  RUNNING",
        "AGENT", "NAME", "STATE", "CAP", "LABELS"
    );
    for a in list.agents {
        let state = if a.revoked {
            "revoked"
        } else if a.connected {
            "connected"
        } else {
            "gone"
        };
        println!(
            "{:<36}  {:<16}  {:<12}  {:>4}  {:<12}  {}",
            a.id,
            a.name,
            state,
            a.capacity,
            a.labels.join(","),
            a.running.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn rerun(args: GetArgs) -> anyhow::Result<ExitCode> {
    let mut client = builds(&args.server).await?;
    let resp = client
        .rerun_failed(api::RerunFailedRequest {
            build_id: args.build,
        })
        .await
        .map_err(status)?
        .into_inner();
    println!("{}", resp.build_id);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::exit_column;

    #[test]
    fn only_finished_lines_show_an_exit_code() {
        assert_eq!(exit_column("running", 0), "");
        assert_eq!(exit_column("pending", 0), "");
        assert_eq!(exit_column("skipped", 0), "");
        assert_eq!(exit_column("succeeded", 0), "exit 0");
        assert_eq!(exit_column("failed", 7), "exit 7");
    }
}
