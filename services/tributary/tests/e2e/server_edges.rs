//! Behaviours of a real `tributary up` reached over a real socket that no other test covered:
//! a webhook secret given to `project add` (through its environment variable) verifies a
//! signed GitHub webhook and refuses a bad one; the sign-in cookie is `Secure` behind a proxy
//! that says `X-Forwarded-Proto: https` (and only then); `watch --json` prints the tenant's
//! events live, one JSON object per line.

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{start, Proc, Server};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// A raw HTTP/1.0 request to the server: (status, headers, body).
fn request(s: &Server, head: &str, body: &[u8]) -> (u16, String, String) {
    let host = s.addr.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "{head}\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, headers.to_owned(), body.to_owned())
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[test]
fn a_webhook_secret_from_project_add_verifies_a_real_signed_webhook() {
    const SECRET: &str = "whsec-5d8c1f0a9e";
    let s = start(1);
    let repo = s.repo(
        "hooked",
        "jobs:\n  a:\n    steps:\n      - run: echo hooked\n",
        &[],
    );
    let out = Command::new(common::bin())
        .args(["project", "add", "hooked", "--repo", repo.to_str().unwrap()])
        .env("TRIBUTARY_SERVER", &s.addr)
        .env("TRIBUTARY_TOKEN", &s.token)
        .env("TRIBUTARY_WEBHOOK_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let commit = String::from_utf8_lossy(
        &Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(&repo)
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_owned();
    let body =
        serde_json::to_vec(&serde_json::json!({ "ref": "refs/heads/main", "after": commit }))
            .unwrap();
    let post = |signature: &str| {
        request(
            &s,
            &format!(
                "POST /hooks/github/default/hooked HTTP/1.0\r\nX-GitHub-Event: push\r\n\
                 Content-Type: application/json\r\nX-Hub-Signature-256: {signature}"
            ),
            &body,
        )
    };

    // Signed with another secret: refused, nothing triggered.
    let (status, _, text) = post(&sign("not-the-secret", &body));
    assert_eq!(status, 401, "{text}");
    assert!(s.admin(&["builds", "--project", "hooked"]).lines().count() <= 1);

    // Signed with the project's secret: a build at the pushed commit, which runs.
    let (status, _, text) = post(&sign(SECRET, &body));
    assert_eq!(status, 202, "{text}");
    let reply: Value = serde_json::from_str(&text).unwrap();
    let build = reply["build_id"].as_str().unwrap().to_owned();
    let b = s.finished(&build, Duration::from_secs(60));
    assert_eq!(b["status"], "succeeded", "{b}");
    assert_eq!(b["commit"], commit.as_str(), "{b}");
    // The secret is sealed on the log, never in clear.
    let events = serde_json::to_string(&s.events(None)).unwrap();
    assert!(!events.contains(SECRET), "the webhook secret on the log");
}

#[test]
fn the_session_cookie_is_secure_behind_a_tls_proxy_only() {
    let s = start(0);
    let body = format!("token={}&next=%2Fui%2F", s.token);
    let host = s.addr.trim_start_matches("http://").to_owned();
    let sign_in = |extra: &str| {
        request(
            &s,
            &format!(
                "POST /ui/login HTTP/1.0\r\nContent-Type: application/x-www-form-urlencoded\r\n\
                 Origin: http://{host}{extra}"
            ),
            body.as_bytes(),
        )
    };
    let cookie = |headers: &str| -> String {
        headers
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
            .unwrap_or_else(|| panic!("no Set-Cookie in {headers}"))
            .to_owned()
    };

    let (status, headers, _) = sign_in("");
    assert_eq!(status, 303, "{headers}");
    let plain = cookie(&headers);
    assert!(plain.contains("HttpOnly"), "{plain}");
    assert!(!plain.contains("Secure"), "plain HTTP: no Secure: {plain}");

    let (status, headers, _) = sign_in("\r\nX-Forwarded-Proto: https");
    assert_eq!(status, 303, "{headers}");
    let secure = cookie(&headers);
    assert!(
        secure.contains("Secure") && secure.contains("HttpOnly"),
        "{secure}"
    );
}

#[test]
fn watch_json_prints_the_tenant_s_events_live_one_object_per_line() {
    let s = start(1);
    s.project(
        "watched",
        "jobs:\n  a:\n    steps:\n      - run: echo watched\n",
    );
    let mut watch = Command::new(common::bin())
        .args(["watch", "--json"])
        .env("TRIBUTARY_SERVER", &s.addr)
        .env("TRIBUTARY_TOKEN", &s.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let _watch = Proc(watch);
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Triggered after the watch started: its events arrive live.
    let build = s.trigger("watched");
    let mut seen: Vec<Value> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !seen
        .iter()
        .any(|e| e["type"] == "build_finished" && e["build_id"] == build.as_str())
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line.unwrap(),
            Err(_) => panic!(
                "timed out waiting for build {build} to finish in `watch --json`; saw {} \
                 events, the last: {:?}",
                seen.len(),
                seen.last()
            ),
        };
        let event: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line:?}"));
        seen.push(event);
    }
    let types: Vec<&str> = seen
        .iter()
        .filter(|e| e["build_id"] == build.as_str())
        .filter_map(|e| e["type"].as_str())
        .collect();
    for ty in [
        "build_triggered",
        "job_started",
        "job_finished",
        "build_finished",
    ] {
        assert!(types.contains(&ty), "no {ty} in {types:?}");
    }
    // The offsets only grow.
    let offsets: Vec<u64> = seen.iter().filter_map(|e| e["offset"].as_u64()).collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
}
