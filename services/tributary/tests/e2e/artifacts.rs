//! Artifacts end to end against a real `tributary up` with two in-process agents: a job's
//! artifacts reach the jobs that need it (in their own workspaces), a corrupted object is caught
//! by the hash check, and paths that leave the workspace are refused.

use crate::common;

use std::time::Duration;

use common::{http_get_as, job, start, wait_until};

const BUILD: Duration = Duration::from_secs(90);

#[test]
fn artifacts_pass_from_a_job_to_the_jobs_that_need_it() {
    let s = start(2);
    s.project(
        "app",
        "jobs:\n  build:\n    steps:\n      - run: mkdir -p dist/docs && echo 'built by build' > dist/app.txt && echo manual > dist/docs/readme && echo junk > junk.txt\n    artifacts: [dist]\n  \
         test:\n    needs: build\n    steps:\n      - run: test \"$(cat dist/app.txt)\" = 'built by build' && test \"$(cat dist/docs/readme)\" = manual && test ! -e junk.txt\n",
    );
    let id = s.trigger("app");
    let b = s.finished(&id, BUILD);
    assert_eq!(b["status"], "succeeded", "{b}");
    // The log records each artifact with its size and sha256.
    let events = s.ok(
        &s.token,
        &[
            "events",
            "--data",
            s.data().to_str().unwrap(),
            "--build",
            &id,
            "--json",
        ],
    );
    let uploads: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == "artifact_uploaded")
        .collect();
    let paths: Vec<&str> = uploads
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["dist/app.txt", "dist/docs/readme"]);
    assert_eq!(uploads[0]["size"], 15);
    let stored = s
        .data()
        .join("objects")
        .join(uploads[0]["object_key"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(&stored).unwrap(),
        "built by build\n"
    );
    let sum = std::process::Command::new("sha256sum")
        .arg(&stored)
        .output()
        .unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout);
    let sha = uploads[0]["sha256"].as_str().unwrap().to_owned();
    assert_eq!(Some(sha.as_str()), sum.split(' ').next());

    // The CLI lists them and downloads one, checked.
    let listed = s.ok(&s.token, &["artifacts", "list", &id]);
    assert!(
        listed.contains("dist/app.txt") && listed.contains(&sha),
        "{listed}"
    );
    let out = s.root.join("got/app.txt");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    s.ok(
        &s.token,
        &[
            "artifacts",
            "get",
            &id,
            "dist/app.txt",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "built by build\n");

    // Over HTTP with the token; nothing without it or with another tenant's token.
    let route = format!("/api/builds/{id}/artifacts/build/dist/app.txt");
    let get = |token: Option<&str>| http_get_as(&s.addr, &route, token).expect("GET the artifact");
    let reply = get(Some(s.token.as_str()));
    assert_eq!(reply.status, 200, "{}", reply.headers);
    assert!(reply
        .headers
        .to_ascii_lowercase()
        .contains(&format!("x-tributary-sha256: {sha}")));
    assert_eq!(reply.body, b"built by build\n");
    assert_eq!(get(None).status, 401);
    s.ok(&s.token, &["admin", "tenant-add", "other"]);
    let other = s
        .ok(&s.token, &["admin", "token-create", "--tenant", "other"])
        .trim()
        .to_owned();
    assert_eq!(get(Some(other.as_str())).status, 404);
    let out = s.cli(&other, &["artifacts", "list", &id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no build"));
}

#[test]
fn a_corrupted_artifact_fails_the_job_that_needs_it() {
    let s = start(2);
    let gate = s.root.join("go");
    s.project(
        "app",
        &format!(
            "jobs:\n  build:\n    steps:\n      - run: echo 'the real thing' > out.bin\n    artifacts: out.bin\n  \
             gate:\n    steps:\n      - run: while [ ! -e {} ]; do sleep 0.05; done\n  \
             use:\n    needs: [build, gate]\n    steps:\n      - run: cat out.bin\n",
            gate.display()
        ),
    );
    let id = s.trigger("app");
    let objects = s.data().join("objects/artifacts");
    let mut stored = None;
    wait_until("the artifact to be stored", BUILD, || {
        stored = find_file(&objects, "out.bin");
        stored.is_some()
    });
    // Same size, other bytes: only the hash can tell. Then let the build go on.
    let stored = stored.unwrap();
    wait_until("the build job to finish", BUILD, || {
        let v: serde_json::Value =
            serde_json::from_str(&s.ok(&s.token, &["get", &id, "--json"])).unwrap();
        job(&v, "build")["status"] == "succeeded"
    });
    std::fs::write(&stored, "the fake thing\n").unwrap();
    std::fs::write(&gate, "").unwrap();
    let b = s.finished(&id, BUILD);
    assert_eq!(b["status"], "failed", "{b}");
    let used = job(&b, "use");
    assert_eq!(used["status"], "failed");
    let reason = used["reason"].as_str().unwrap();
    assert!(
        reason.contains("out.bin") && reason.contains("is corrupt"),
        "{reason}"
    );
}

#[test]
fn a_symbolic_link_out_of_the_workspace_is_refused() {
    let s = start(1);
    let secret = s.root.join("secret.txt");
    std::fs::write(&secret, "do not upload").unwrap();
    s.project(
        "app",
        &format!(
            "jobs:\n  leak:\n    steps:\n      - run: mkdir -p out && ln -s {} out/secret.txt && echo fine > out/ok.txt\n    artifacts: [out]\n",
            secret.display()
        ),
    );
    let id = s.trigger("app");
    let b = s.finished(&id, BUILD);
    assert_eq!(b["status"], "failed", "{b}");
    let reason = job(&b, "leak")["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("out/secret.txt") && reason.contains("outside the workspace"),
        "{reason}"
    );
    // Nothing of the job was uploaded.
    assert!(find_file(&s.data().join("objects"), "ok.txt").is_none());
    assert!(find_file(&s.data().join("objects"), "secret.txt").is_none());
}

fn find_file(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}
