//! Images built from the repository (`image: {build: ...}`) end to end, on the real Podman
//! Docker API socket (`scripts/setup-containers.sh`; or DOCKER_HOST): `tributary run` builds
//! once and reuses the image at a later commit of the same context; a remote agent with
//! `--engine` under `tributary up` computes the same key for the same commit, and `get` shows
//! the image build as the job's first step.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{bin, commit_all, events_in, git, job, of_type};
use serde_json::Value;
use tributary_executor::container::{engine_from_env, Engine};

const PIPELINE: &str =
    "jobs:\n  t:\n    image: {build: ci/Dockerfile}\n    steps: [\"cat /tool-version\"]\n";

fn engine(rt: &tokio::runtime::Runtime) -> Engine {
    rt.block_on(Engine::connect(&engine_from_env()))
        .unwrap_or_else(|e| {
            panic!(
                "these tests need a container engine with localhost/ci-busybox: run \
                 `sudo scripts/setup-containers.sh` (or set DOCKER_HOST): {e}"
            )
        })
}

/// `tributary run` of `repo` with the data directory `data`; its build id.
fn run(repo: &Path, data: &Path) -> String {
    let out = Command::new(bin())
        .args(["run", "--plain", "-f"])
        .arg(repo.join(".tributary.yml"))
        .arg("--data")
        .arg(data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("build "))
        .and_then(|l| l.split_whitespace().next())
        .expect("build id")
        .to_owned()
}

/// (type, key, image) of the build's image events.
fn images(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .filter(|e| e["type"].as_str().is_some_and(|t| t.starts_with("image_")))
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["key"].as_str().unwrap().to_owned(),
                e["image"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn stdout_of(events: &[Value], step: u64) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "log_chunk" && e["step"] == step && e["stream"] == "stdout")
        .map(|e| e["data"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn run_and_up_agree_on_keys_and_reuse_across_commits() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let engine = engine(&rt);
    let dir = tempfile::tempdir().unwrap();
    let name = format!("images{}", &tributary_proto::new_id()[24..]);
    let repo = dir.path().join(&name);
    std::fs::create_dir_all(repo.join("ci")).unwrap();
    std::fs::write(repo.join(".tributary.yml"), PIPELINE).unwrap();
    std::fs::write(
        repo.join("ci/Dockerfile"),
        "FROM localhost/ci-busybox\nRUN echo tool-v1 > /tool-version\n",
    )
    .unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    commit_all(&repo, "one");
    let data = dir.path().join("data");

    // Local run: built once, the job ran in it; the next commit (context unchanged) reuses it.
    let first = run(&repo, &data);
    let events = events_in(&data, Some(&first));
    let built = images(&events);
    assert_eq!(built.len(), 1, "{built:?}");
    let (kind, key, local_tag) = built[0].clone();
    assert_eq!(kind, "image_built");
    assert_eq!(stdout_of(&events, 1), "tool-v1\n");
    assert!(stdout_of(&events, 0).contains("RUN echo tool-v1"));
    std::fs::write(repo.join("README"), "x\n").unwrap();
    commit_all(&repo, "two");
    let second = run(&repo, &data);
    let events = events_in(&data, Some(&second));
    assert_eq!(
        images(&events),
        [("image_reused".into(), key.clone(), local_tag.clone())]
    );
    assert_eq!(stdout_of(&events, 0), "", "no builder output when reused");

    // The server: a remote agent with an engine builds the same commit under the same key.
    let c = common::start_with(&["--agents", "0"]);
    let _agent = c.agent("boxer", &["--engine", &engine_from_env()]);
    c.admin(&["project", "add", &name, "--repo", repo.to_str().unwrap()]);
    let build = c.trigger(&name);
    let b = c.finished(&build, Duration::from_secs(180));
    assert_eq!(b["status"], "succeeded", "{b:#}");
    let t = job(&b, "t");
    assert_eq!(t["steps"][0]["name"], "image", "{t:#}");
    let server = images(&c.events(Some(&build)));
    assert_eq!(server.len(), 1, "{server:?}");
    assert_eq!(server[0].1, key, "run and up computed different keys");
    assert_ne!(server[0].2, local_tag, "tenants have their own tags");
    assert_eq!(stdout_of(&c.events(Some(&build)), 1), "tool-v1\n");
    // A second build of the server, same commit: reused.
    let again = c.trigger(&name);
    let b = c.finished(&again, Duration::from_secs(180));
    assert_eq!(b["status"], "succeeded", "{b:#}");
    let reused = of_type(&c.events(Some(&again)), "image_reused").len();
    assert_eq!(reused, 1);

    for tag in [local_tag, server[0].2.clone()] {
        let _ = rt.block_on(engine.remove_image(&tag));
    }
}
