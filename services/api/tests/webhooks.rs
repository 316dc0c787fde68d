//! GitHub webhooks through the real axum router (driven with `oneshot`, no socket), on a real
//! SQLite log and a real git repository.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tower::ServiceExt;
use tributary_api::seal::ServerKey;
use tributary_api::ApiState;
use tributary_eventlog::{sqlite::SqliteLog, EventLog};
use tributary_proto::events::{envelope::Payload, Envelope, ProjectCreated, TenantCreated};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn setup(dir: &Path) -> (ApiState, String) {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(
        repo.join(".tributary.yml"),
        "jobs:\n  a:\n    steps:\n      - run: echo hi\n",
    )
    .unwrap();
    git(&repo, &["add", "."]);
    git(
        &repo,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "c1",
        ],
    );
    let commit = git(&repo, &["rev-parse", "HEAD"]);
    let log: Arc<dyn EventLog> = Arc::new(SqliteLog::open(&dir.join("events.db")).await.unwrap());
    let store = tributary_projections::BuildsStore::open(&dir.join("rm.db"))
        .await
        .unwrap();
    let key = ServerKey::generate();
    let t = |p| Envelope::new("acme", "", "", p);
    log.append(&[
        t(Payload::TenantCreated(TenantCreated {
            name: "acme".into(),
        })),
        t(Payload::ProjectCreated(ProjectCreated {
            tenant: "acme".into(),
            name: "web".into(),
            repository: repo.display().to_string(),
            sealed_webhook_secret: key.seal(b"topsecret"),
            max_concurrent_jobs: 0,
            // A local repository: only the admin may have one without --allow-local-repos.
            by_admin: true,
        })),
    ])
    .await
    .unwrap();
    let mirrors = tributary_repo::Mirrors::new(dir.join("mirrors"));
    let state = ApiState::start(log, store, mirrors, Some(key))
        .await
        .unwrap();
    (state, commit)
}

async fn triggered(state: &ApiState) -> Vec<(String, String)> {
    let records = state.log.read(0, 1000).await.unwrap();
    records
        .iter()
        .filter_map(|r| match r.decode().ok()?.payload? {
            Payload::BuildTriggered(t) => Some((t.commit, t.source)),
            _ => None,
        })
        .collect()
}

fn push(commit: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "ref": "refs/heads/main", "after": commit })).unwrap()
}

fn request(body: Vec<u8>, signature: Option<String>, event: &str) -> Request<Body> {
    let mut req = Request::post("/hooks/github/acme/web")
        .header("x-github-event", event)
        .header("content-type", "application/json");
    if let Some(sig) = signature {
        req = req.header("x-hub-signature-256", sig);
    }
    req.body(Body::from(body)).unwrap()
}

#[tokio::test]
async fn good_signature_triggers_at_the_pushed_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (state, commit) = setup(dir.path()).await;
    let body = push(&commit);
    let sig = sign("topsecret", &body);
    let resp = tributary_api::http::router(state.clone())
        .oneshot(request(body, Some(sig), "push"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(
        triggered(&state).await,
        vec![(commit, "webhook".to_owned())]
    );
}

#[tokio::test]
async fn bad_or_missing_signature_is_401_and_triggers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (state, commit) = setup(dir.path()).await;
    let body = push(&commit);
    let cases = [
        None,
        Some(sign("wrong", &body)),
        Some("sha256=zz".to_owned()),
        Some(sign("topsecret", b"another body")),
        Some(sign("topsecret", &body).replace("sha256=", "sha1=")),
    ];
    for sig in cases {
        let resp = tributary_api::http::router(state.clone())
            .oneshot(request(body.clone(), sig.clone(), "push"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{sig:?}");
    }
    // Unknown project: the same 401, nothing learned.
    let mut req = request(body.clone(), Some(sign("topsecret", &body)), "push");
    *req.uri_mut() = "/hooks/github/acme/nope".parse().unwrap();
    let resp = tributary_api::http::router(state.clone())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(triggered(&state).await.is_empty());
}

#[tokio::test]
async fn pull_request_builds_the_head_commit_and_metrics_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (state, commit) = setup(dir.path()).await;
    let body = serde_json::to_vec(&serde_json::json!({
        "action": "opened",
        "pull_request": { "head": { "ref": "feature", "sha": commit } }
    }))
    .unwrap();
    let sig = sign("topsecret", &body);
    let resp = tributary_api::http::router(state.clone())
        .oneshot(request(body, Some(sig), "pull_request"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(triggered(&state).await.len(), 1);

    let resp = tributary_api::http::router(state.clone())
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("tributary_events_appended_total "), "{text}");
    assert!(text.contains("tributary_queue_depth "), "{text}");
}
