//! `tributary get --at` and `tributary why`: a build's past, from the server (which folds it
//! from the build's own events).

use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use tributary_proto::api::{self, get_build_request::At};

use crate::cli::{GetBuildArgs, WhyArgs};
use crate::client::{builds, get_as_of, status};

/// What `--at` names, when it does not depend on the build.
#[derive(Debug, PartialEq, Eq)]
enum AtArg {
    At(At),
    /// `+DURATION`: after the build was triggered.
    AfterTrigger(Duration),
}

fn parse_at(text: &str) -> anyhow::Result<AtArg> {
    let text = text.trim();
    if let Ok(offset) = text.parse::<u64>() {
        return Ok(AtArg::At(At::AtOffset(offset)));
    }
    if let Some(after) = text.strip_prefix('+') {
        let d = humantime::parse_duration(after.trim()).with_context(|| {
            format!("--at {text}: not a duration after the trigger (try +90s or +2m 5s)")
        })?;
        return Ok(AtArg::AfterTrigger(d));
    }
    let time = humantime::parse_rfc3339_weak(text).with_context(|| {
        format!(
            "--at {text}: neither an offset (a number), an RFC 3339 UTC time \
             (2026-12-07T21:03:05Z) nor +DURATION after the trigger (+90s)"
        )
    })?;
    let us = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    Ok(AtArg::At(At::AtTimeUs(
        i64::try_from(us).unwrap_or(i64::MAX),
    )))
}

pub async fn get_at(args: GetBuildArgs) -> anyhow::Result<ExitCode> {
    let text = args.at.as_deref().unwrap_or_default();
    let at = match parse_at(text)? {
        AtArg::At(at) => at,
        AtArg::AfterTrigger(after) => {
            let now = builds(&args.get.server)
                .await?
                .get_build(api::GetBuildRequest {
                    build_id: args.get.build.clone(),
                    at: None,
                })
                .await
                .map_err(status)?
                .into_inner();
            let after = i64::try_from(after.as_micros()).unwrap_or(i64::MAX);
            At::AtTimeUs(now.triggered_us.saturating_add(after))
        }
    };
    get_as_of(args.get, Some(at)).await
}

/// The `as of` line of a time-travel answer.
pub fn as_of(b: &api::Build) -> String {
    let since = b.as_of_us.saturating_sub(b.triggered_us);
    format!(
        "as of offset {} ({}, {} after the trigger)",
        b.as_of_offset,
        utc(b.as_of_us),
        tributary_projections::why::duration(since)
    )
}

/// `2026-12-07T21:03:05.123Z`.
fn utc(us: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

pub async fn why(args: WhyArgs) -> anyhow::Result<ExitCode> {
    let answer = builds(&args.server)
        .await?
        .explain_build(api::ExplainBuildRequest {
            build_id: args.build.clone(),
            job: args.job.clone().unwrap_or_default(),
        })
        .await
        .map_err(status)?
        .into_inner();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", render(&answer));
    Ok(ExitCode::SUCCESS)
}

/// The text `why` prints: per job, one line per decision with its time, the time since the
/// job's previous decision, its kind, attempt and words.
fn render(answer: &api::ExplainBuildResponse) -> String {
    let mut out = String::new();
    for (i, job) in answer.jobs.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("job {}\n", job.job));
        if job.decisions.is_empty() {
            out.push_str("  nothing decided yet (its needs have not finished)\n");
        }
        let mut previous: Option<i64> = None;
        for d in &job.decisions {
            let since = previous
                .map(|p| format!("+{}", tributary_projections::why::duration(d.time_us - p)))
                .unwrap_or_default();
            previous = Some(d.time_us);
            let attempt = if d.attempt > 0 {
                format!("#{}", d.attempt)
            } else {
                String::new()
            };
            out.push_str(&format!(
                "  {}  {since:>8}  {:<9} {attempt:<3} {}  (offset {})\n",
                utc(d.time_us),
                d.kind,
                d.text,
                d.offset
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_is_an_offset_a_utc_time_or_a_duration_after_the_trigger() {
        assert_eq!(parse_at("42").unwrap(), AtArg::At(At::AtOffset(42)));
        assert_eq!(
            parse_at("2026-12-07T21:03:05.5Z").unwrap(),
            AtArg::At(At::AtTimeUs(1_796_677_385_500_000))
        );
        assert_eq!(
            parse_at("+2m 5s").unwrap(),
            AtArg::AfterTrigger(Duration::from_secs(125))
        );
        let e = parse_at("yesterday").unwrap_err().to_string();
        assert!(e.contains("neither an offset"), "{e}");
        assert!(parse_at("+soon").is_err());
    }

    #[test]
    fn why_prints_time_delta_kind_attempt_and_reason_per_job() {
        let d = |t: i64, kind: &str, attempt, text: &str| api::JobDecision {
            offset: t as u64,
            time_us: 1_796_677_385_000_000 + t * 1_000_000,
            kind: kind.into(),
            attempt,
            text: text.into(),
        };
        let answer = api::ExplainBuildResponse {
            jobs: vec![
                api::JobHistory {
                    job: "flaky".into(),
                    decisions: vec![
                        d(0, "queued", 1, "queued: it needs no other job"),
                        d(3, "failed", 1, "failed (exit 5)"),
                        d(4, "retried", 2, "retried after exit 5 on attempt 1"),
                    ],
                },
                api::JobHistory {
                    job: "later".into(),
                    decisions: vec![],
                },
            ],
        };
        let text = render(&answer);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "job flaky");
        assert!(lines[1].starts_with("  2026-12-07T21:03:05.000Z            queued    #1  queued"));
        assert!(
            lines[2].contains("+3.0s  failed    #1  failed (exit 5)  (offset 3)"),
            "{}",
            lines[2]
        );
        assert!(
            lines[3].contains("+1.0s  retried   #2  retried after exit 5"),
            "{}",
            lines[3]
        );
        assert_eq!(lines[5], "job later");
        assert!(lines[6].contains("nothing decided yet"));
    }
}
