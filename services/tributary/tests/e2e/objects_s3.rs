//! Object storage on a real S3 server end to end: a real `tributary up --objects s3://…` and
//! real `tributary agent --objects s3://…` processes on the MinIO of `scripts/setup-s3.sh`
//! (each process gets the test server's `AWS_*` variables; this process's environment is never
//! changed). The agents share no directory: an artifact and a cache pass from one job to the
//! next only through the bucket. A bucket that disappears mid-build fails the job with an error
//! that names it, promptly.

use crate::common;

use std::time::{Duration, Instant};

use common::{job, of_type, start_with_env, Server};
use tributary_objects::{Objects, S3Settings};
use tributary_testkit::TestS3;

const BUILD: Duration = Duration::from_secs(180);

/// The bucket through the library, to look at what the processes stored.
fn objects(s3: &TestS3, url: &str) -> Objects {
    let settings = S3Settings {
        endpoint: Some(s3.endpoint.clone()),
        access_key_id: Some(s3.access_key_id.clone()),
        secret_access_key: Some(s3.secret_access_key.clone()),
        region: Some(s3.region.clone()),
        allow_http: true,
    };
    Objects::open_with(url, &settings).expect("open the bucket")
}

/// `tributary up --agents 0 --objects URL` with the S3 server's variables.
fn server(s3: &TestS3, url: &str) -> Server {
    start_with_env(&["--agents", "0", "--objects", url], &s3.env())
}

/// A remote agent with `--objects URL`, labelled `name`, in a work directory of its own.
fn agent(s: &Server, s3: &TestS3, name: &str, url: &str) -> common::Proc {
    s.agent_with_env(name, &["--labels", name, "--objects", url], &s3.env())
}

const PIPELINE: &str = "jobs:\n  make:\n    runs-on: [a]\n    cache:\n      key: deps-v1\n      paths: [vendor]\n    steps:\n      - run: mkdir -p dist vendor && head -c 2000000 /dev/urandom > dist/big.bin && sha256sum dist/big.bin > dist/big.sha && echo \"from-$TRIBUTARY_BUILD_ID\" > vendor/fetched && echo \"made in $PWD\"\n    artifacts: [dist]\n  \
use:\n    needs: make\n    runs-on: [b]\n    cache:\n      key: deps-v1\n      paths: [vendor]\n    steps:\n      - run: sha256sum -c dist/big.sha && echo \"HIT $(cat vendor/fetched)\" && echo \"used in $PWD\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_and_remote_agents_on_s3_pass_an_artifact_and_a_cache_between_jobs() {
    let s3 = tributary_testkit::s3();
    let bucket = s3.fresh_bucket();
    let url = format!("s3://{bucket}/tributary");
    let s = server(&s3, &url);
    let _a = agent(&s, &s3, "a", &url);
    let _b = agent(&s, &s3, "b", &url);
    s.project("app", PIPELINE);
    let id = s.trigger("app");
    let b = s.finished(&id, BUILD);
    let logs = s.ok(&s.token, &["logs", &id]);
    assert_eq!(b["status"], "succeeded", "{b}\n{logs}");
    assert_eq!(job(&b, "use")["status"], "succeeded", "{b}");

    // Two work directories, nothing shared but the bucket.
    assert!(
        logs.contains(&format!("made in {}", s.agent_workdir("a").display())),
        "{logs}"
    );
    assert!(
        logs.contains(&format!("used in {}", s.agent_workdir("b").display())),
        "{logs}"
    );
    assert!(logs.contains("dist/big.bin: OK"), "{logs}");
    assert!(logs.contains(&format!("HIT from-{id}")), "{logs}");

    // The log records what the bucket holds: the artifact and the cache, sizes equal.
    let events = s.events(Some(&id));
    let store = objects(&s3, &url);
    let big = of_type(&events, "artifact_uploaded")
        .into_iter()
        .find(|e| e["path"] == "dist/big.bin")
        .unwrap_or_else(|| panic!("no artifact_uploaded for dist/big.bin: {events:?}"))
        .clone();
    assert_eq!(big["size"], 2_000_000);
    let key = big["object_key"].as_str().unwrap();
    assert_eq!(store.size(key).await.unwrap(), Some(2_000_000), "{key}");
    let saved = of_type(&events, "cache_saved");
    assert_eq!(saved.len(), 1, "{events:?}");
    let cache_key = saved[0]["object_key"].as_str().unwrap();
    assert_eq!(
        store.size(cache_key).await.unwrap(),
        saved[0]["size"].as_u64(),
        "{cache_key}"
    );
    let restored = of_type(&events, "cache_restored");
    assert!(
        restored
            .iter()
            .any(|r| r["job"] == "use" && r["hit"] == true),
        "{restored:?}"
    );
    // Under the prefix, and nothing in the server's data directory.
    let listed = objects(&s3, &format!("s3://{bucket}"))
        .list("tributary/")
        .await
        .unwrap();
    assert!(listed.len() >= 3, "{listed:?}");
    let local = s.data().join("objects");
    let local_files = walk(&local);
    assert!(local_files.is_empty(), "stored locally: {local_files:?}");

    // The server serves the artifact from the bucket.
    let out = s.root.join("got.bin");
    s.admin(&[
        "artifacts",
        "get",
        &id,
        "dist/big.bin",
        "-o",
        out.to_str().unwrap(),
    ]);
    let sum = std::process::Command::new("sha256sum")
        .arg(&out)
        .output()
        .unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout);
    assert_eq!(sum.split(' ').next(), big["sha256"].as_str());
}

/// The files under `dir` (none if it does not exist).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The bucket is removed while a job runs: its artifact upload fails, the job fails with an
/// error naming the bucket and the build ends (no hang, no retry loop); the agent takes the
/// next job.
#[test]
fn a_bucket_removed_mid_build_fails_the_job_with_an_error_that_names_it() {
    let s3 = tributary_testkit::s3();
    let bucket = s3.fresh_bucket();
    let url = format!("s3://{bucket}");
    let s = server(&s3, &url);
    let _a = agent(&s, &s3, "a", &url);
    let go = s.root.join("go");
    let pipeline = format!(
        "jobs:\n  make:\n    runs-on: [a]\n    steps:\n      - run: mkdir -p dist && echo made > dist/out.txt && for i in $(seq 1 1200); do [ -f {go} ] && break; sleep 0.1; done\n    artifacts: [dist]\n",
        go = go.display()
    );
    s.project("app", &pipeline);
    let id = s.trigger("app");
    common::wait_secs("the job to run", 60, || {
        job(&s.get(&id), "make")["status"] == "running"
    });
    s3.remove_bucket(&bucket);
    assert!(!s3.bucket_exists(&bucket), "the bucket is gone");
    std::fs::write(&go, "").unwrap();
    let released = Instant::now();
    let b = s.finished(&id, Duration::from_secs(120));
    let took = released.elapsed();
    println!("the build ended {took:?} after the bucket was removed");
    assert_eq!(b["status"], "failed", "{b}");
    let make = job(&b, "make");
    assert_eq!(make["status"], "failed", "{b}");
    let reason = make["reason"].as_str().unwrap_or_default();
    println!("the job's reason: {reason}");
    // What failed, where, why and what to do, on one line without S3's XML body.
    assert!(
        reason.contains("cannot upload artifact dist/out.txt")
            && reason.contains(&format!("s3://{bucket}"))
            && reason.contains("the bucket is not there")
            && reason.contains("create it again"),
        "the reason names what failed, where and what to do: {reason}"
    );
    assert!(
        !reason.contains("<?xml") && !reason.contains('\n'),
        "{reason}"
    );
    // `logs` of a failed build exits 1; its output still names the bucket.
    let out = s.cli(&s.token, &["logs", &id]);
    let logs = String::from_utf8_lossy(&out.stdout);
    assert!(logs.contains(&bucket), "{logs}");
}
