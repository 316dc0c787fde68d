//! `tributary bench ui`: many viewers of one build's live log through the web UI's stream.
//!
//! It starts `tributary up` here, creates a throwaway git repository and project, and triggers
//! one build whose job first waits for a gate file, then prints L lines, each the wall-clock
//! time in µs when it was printed. V HTTP clients open `/ui/builds/<id>/events` (Server-Sent
//! Events, the stream the build page reads) while the job waits; once all are connected the
//! gate opens. Every viewer parses every `log` event; latency = parse time − printed time
//! (same machine, same clock), over every line and viewer. Memory: VmRSS of the server before
//! the viewers, with them connected (before the lines), after the run, and its peak.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use tokio::sync::Notify;

use crate::bench::server::{git, last_lines, memory, ms, pct, Spawned};

pub struct Options {
    pub viewers: usize,
    pub lines: usize,
    pub interval_ms: u64,
}

type Http = Client<HttpConnector, Empty<Bytes>>;

pub async fn bench_ui(opts: Options) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(opts.viewers > 0, "--viewers must be at least 1");
    anyhow::ensure!(opts.lines > 0, "--lines must be at least 1");
    let tmp = tempfile::tempdir()?;
    let gate = tmp.path().join("gate");
    let repo = tmp.path().join("repo");
    make_repo(&repo, &gate, &opts)?;
    let (server, url, token) = Spawned::start(tmp.path(), 1, 1).await?;
    let result = run(&opts, &server, &url, &token, &repo, &gate).await;
    if result.is_err() {
        eprintln!(
            "the server's last log lines:\n{}",
            last_lines(&server.log_path)
        );
    }
    match server.stop().await {
        Ok(took) => println!("  server stopped (SIGTERM) in {:.0} ms", ms(took)),
        Err(e) => eprintln!("warning: stopping the server: {e:#}"),
    }
    result
}

/// A repository whose pipeline waits for `gate`, then prints timestamps.
fn make_repo(dir: &Path, gate: &Path, opts: &Options) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    git(dir, &["init", "-q", "-b", "main"])?;
    let pipeline = format!(
        "jobs:\n  lines:\n    steps:\n      - script:\n          - 'while [ ! -e {} ]; do sleep 0.01; done'\n          - 'for i in $(seq {}); do date +%s%6N; sleep {}; done'\n",
        gate.display(),
        opts.lines,
        opts.interval_ms as f64 / 1000.0
    );
    std::fs::write(dir.join(".tributary.yml"), pipeline)?;
    git(dir, &["add", ".tributary.yml"])?;
    git(dir, &["commit", "-qm", "bench: timestamps after a gate"])?;
    Ok(())
}

/// Runs this executable as a client command against the server.
fn cli(url: &str, token: &str, args: &[&str]) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot find the tributary executable")?;
    let out = std::process::Command::new(exe)
        .args(args)
        .env("TRIBUTARY_SERVER", url)
        .env("TRIBUTARY_TOKEN", token)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "tributary {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What one viewer saw.
#[derive(Default)]
struct Seen {
    /// ms from printed to parsed, per line.
    latencies: Vec<f64>,
    ended: bool,
}

async fn run(
    opts: &Options,
    server: &Spawned,
    url: &str,
    token: &str,
    repo: &Path,
    gate: &Path,
) -> anyhow::Result<ExitCode> {
    let project = format!("bench-ui-{}", std::process::id());
    cli(
        url,
        token,
        &[
            "project",
            "add",
            &project,
            "--repo",
            &repo.display().to_string(),
        ],
    )?;
    let build = cli(url, token, &["trigger", &project])?
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    anyhow::ensure!(!build.is_empty(), "the trigger printed no build id");
    println!(
        "bench ui: {} SSE viewers of one build printing {} lines {} ms apart (server at {url})",
        opts.viewers, opts.lines, opts.interval_ms
    );
    let idle = memory(server.pid());

    let client: Http =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build(HttpConnector::new());
    let connected = Arc::new(AtomicUsize::new(0));
    let all_in = Arc::new(Notify::new());
    let mut viewers = tokio::task::JoinSet::new();
    let stream_url = format!("{url}/ui/builds/{build}/events");
    for _ in 0..opts.viewers {
        let (client, url, token) = (client.clone(), stream_url.clone(), token.to_owned());
        let (connected, all_in, n) = (connected.clone(), all_in.clone(), opts.viewers);
        viewers.spawn(async move {
            let seen = view(&client, &url, &token, || {
                if connected.fetch_add(1, Ordering::SeqCst) + 1 == n {
                    all_in.notify_one();
                }
            })
            .await;
            if seen.is_err() && connected.load(Ordering::SeqCst) < n {
                all_in.notify_one(); // do not wait forever for a viewer that failed
            }
            seen
        });
    }
    let connect_start = Instant::now();
    tokio::time::timeout(Duration::from_secs(120), all_in.notified())
        .await
        .context("viewers did not all connect within 120 s")?;
    let took = connect_start.elapsed();
    let n = connected.load(Ordering::SeqCst);
    anyhow::ensure!(
        n == opts.viewers,
        "only {n} of {} viewers connected",
        opts.viewers
    );
    // Let the replay reach every viewer before measuring memory and opening the gate.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with_viewers = memory(server.pid());
    println!("  {} viewers connected in {:.0} ms", opts.viewers, ms(took));
    std::fs::write(gate, "go")?;

    let mut all = Vec::new();
    let mut ended = 0;
    let deadline = Duration::from_secs(120 + opts.lines as u64 * opts.interval_ms / 100);
    let collect = async {
        while let Some(joined) = viewers.join_next().await {
            match joined {
                Ok(Ok(seen)) => {
                    ended += usize::from(seen.ended);
                    all.extend(seen.latencies);
                }
                Ok(Err(e)) => eprintln!("  a viewer failed: {e:#}"),
                Err(e) => eprintln!("  a viewer panicked: {e}"),
            }
        }
    };
    tokio::time::timeout(deadline, collect)
        .await
        .context("viewers did not see the build end in time")?;
    let after = memory(server.pid());

    let expected = opts.viewers * opts.lines;
    println!(
        "  lines received: {} of {expected} ({} viewers saw the end)",
        all.len(),
        ended
    );
    println!(
        "  log line -> viewer: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        pct(&all, 50.0),
        pct(&all, 99.0),
        pct(&all, 100.0)
    );
    let mib = |m: &Option<crate::bench::server::Memory>| m.as_ref().map_or(f64::NAN, |m| m.rss_mib);
    println!(
        "  server RSS: idle {:.1} MiB, {} viewers connected {:.1} MiB, after {:.1} MiB, peak {:.1} MiB",
        mib(&idle),
        opts.viewers,
        mib(&with_viewers),
        mib(&after),
        after.as_ref().map_or(f64::NAN, |m| m.peak_mib)
    );
    Ok(if all.len() == expected && ended == opts.viewers {
        ExitCode::SUCCESS
    } else {
        eprintln!("some lines or ends were not delivered");
        ExitCode::from(1)
    })
}

/// One viewer: opens the stream (calling `on_connect` once the response starts), parses
/// events until `end`.
async fn view(
    client: &Http,
    url: &str,
    token: &str,
    on_connect: impl FnOnce(),
) -> anyhow::Result<Seen> {
    let req = http::Request::get(url)
        .header("authorization", format!("Bearer {token}"))
        .header("accept", "text/event-stream")
        .body(Empty::new())?;
    let resp = client.request(req).await?;
    anyhow::ensure!(
        resp.status() == 200,
        "the stream answered {}",
        resp.status()
    );
    on_connect();
    let mut body = resp.into_body();
    let mut seen = Seen::default();
    let mut buf = String::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buf.push_str(&String::from_utf8_lossy(&data));
        // SSE events end with an empty line.
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let mut name = "";
            let mut payload = String::new();
            for line in event.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim();
                } else if let Some(v) = line.strip_prefix("data:") {
                    payload.push_str(v.trim_start());
                }
            }
            match name {
                "log" => {
                    let now = tributary_proto::now_us();
                    let v: serde_json::Value = serde_json::from_str(&payload)?;
                    for line in v["t"].as_str().unwrap_or("").lines() {
                        if let Ok(printed) = line.trim().parse::<i64>() {
                            seen.latencies.push((now - printed) as f64 / 1000.0);
                        }
                    }
                }
                "end" => {
                    seen.ended = true;
                    return Ok(seen);
                }
                _ => {}
            }
        }
    }
    Ok(seen)
}
