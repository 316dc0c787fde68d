//! Caches and build-once end to end, against a real `tributary up` with in-process agents and
//! the real object storage directory: a cache is missed then hit across builds (the second
//! build's job sees the restored files), a new Cargo.lock misses, a corrupted archive is a miss
//! with a warning (never a failure), the least recently used archive is evicted under a tiny
//! per-project limit, and `reuse: commit` skips a job that already succeeded at the commit.

use crate::common;

use std::time::Duration;

use common::{job, of_type, start, start_with};
use serde_json::Value;

const BUILD: Duration = Duration::from_secs(120);

const CACHED: &str = "jobs:\n  build:\n    cache:\n      key: \"deps-${{ hashFiles('Cargo.lock') }}\"\n      paths: [vendor]\n    steps:\n      - run: if [ -f vendor/fetched ]; then echo \"HIT $(cat vendor/fetched)\"; else mkdir -p vendor && echo \"from-$TRIBUTARY_BUILD_ID\" > vendor/fetched && echo MISS; fi\n";

#[test]
fn a_cache_is_missed_then_hit_a_new_lock_misses_and_a_corrupt_one_is_a_warned_miss() {
    let s = start(1);
    let repo = s.project("app", CACHED);
    s.commit(&repo, &[("Cargo.lock", "serde 1.0.0\n")]);

    // 1: a miss; the job succeeds and saves the cache.
    let b1 = s.trigger("app");
    let got = s.finished(&b1, BUILD);
    assert_eq!(got["status"], "succeeded", "{got}");
    let ev1 = s.events(Some(&b1));
    let restored = of_type(&ev1, "cache_restored");
    assert_eq!(restored.len(), 1, "{ev1:?}");
    assert_eq!(restored[0]["hit"], false);
    let key = restored[0]["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("deps-") && key.len() == 5 + 64, "{key}");
    let saved = of_type(&ev1, "cache_saved");
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0]["key"], key.as_str());
    assert_eq!(saved[0]["files"], 1);
    let size = saved[0]["size"].as_u64().unwrap();
    assert!(size > 0);
    let object = s
        .data()
        .join("objects")
        .join(saved[0]["object_key"].as_str().unwrap());
    assert_eq!(std::fs::metadata(&object).unwrap().len(), size);
    assert!(s.ok(&s.token, &["logs", &b1]).contains("MISS"));

    // 2: the same lock file: a hit, the job sees build 1's files; nothing saved again.
    let b2 = s.trigger("app");
    assert_eq!(s.finished(&b2, BUILD)["status"], "succeeded");
    let ev2 = s.events(Some(&b2));
    let restored = of_type(&ev2, "cache_restored");
    assert_eq!(restored[0]["hit"], true, "{ev2:?}");
    assert_eq!(restored[0]["key"], key.as_str());
    assert_eq!(restored[0]["size"].as_u64(), Some(size));
    assert_eq!(restored[0]["files"], 1);
    assert!(of_type(&ev2, "cache_saved").is_empty());
    let log2 = s.ok(&s.token, &["logs", &b2]);
    assert!(log2.contains(&format!("HIT from-{b1}")), "{log2}");
    assert!(log2.contains("restored: 1 files"), "{log2}");

    // 3: a new Cargo.lock: another key, a miss.
    s.commit(&repo, &[("Cargo.lock", "serde 1.0.1\n")]);
    let b3 = s.trigger("app");
    assert_eq!(s.finished(&b3, BUILD)["status"], "succeeded");
    let ev3 = s.events(Some(&b3));
    let restored = of_type(&ev3, "cache_restored");
    assert_eq!(restored[0]["hit"], false);
    assert_ne!(restored[0]["key"], key.as_str());
    assert!(s.ok(&s.token, &["logs", &b3]).contains("MISS"));
    let saved3 = of_type(&ev3, "cache_saved");
    let object3 = s
        .data()
        .join("objects")
        .join(saved3[0]["object_key"].as_str().unwrap());

    // 4: its archive is damaged in storage: a miss with a warning, the job still succeeds
    // and saves it again.
    std::fs::write(&object3, b"not a tar.gz at all").unwrap();
    let b4 = s.trigger("app");
    assert_eq!(s.finished(&b4, BUILD)["status"], "succeeded");
    let ev4 = s.events(Some(&b4));
    let restored = of_type(&ev4, "cache_restored");
    assert_eq!(restored[0]["hit"], false);
    let warning = restored[0]["warning"].as_str().unwrap();
    assert!(warning.contains("corrupt"), "{warning}");
    let log4 = s.ok(&s.token, &["logs", &b4]);
    assert!(
        log4.contains("warning: cache") && log4.contains("MISS"),
        "{log4}"
    );
    assert_eq!(of_type(&ev4, "cache_saved").len(), 1);
    // Healed: the next build hits again.
    let b5 = s.trigger("app");
    assert_eq!(s.finished(&b5, BUILD)["status"], "succeeded");
    assert_eq!(
        of_type(&s.events(Some(&b5)), "cache_restored")[0]["hit"],
        true
    );
}

#[test]
fn the_least_recently_used_cache_is_evicted_under_the_project_limit() {
    // Archives of ~3 KiB of random bytes each; at most two fit under 7 KiB.
    let s = start_with(&["--agents", "1", "--cache-limit", "7k"]);
    let pipeline = "jobs:\n  build:\n    cache:\n      key: \"data-${{ hashFiles('key.txt') }}\"\n      paths: [blob]\n    steps:\n      - run: test -f blob || head -c 3000 /dev/urandom > blob\n";
    let repo = s.project("lru", pipeline);
    let run = |name: &str| -> Vec<Value> {
        s.commit(&repo, &[("key.txt", name)]);
        let b = s.trigger("lru");
        let got = s.finished(&b, BUILD);
        assert_eq!(got["status"], "succeeded", "{got}");
        s.events(Some(&b))
    };
    run("a");
    let b_events = run("b");
    let b_object = of_type(&b_events, "cache_saved")[0]["object_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let b_key = of_type(&b_events, "cache_saved")[0]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    // `a` is used again (a hit), so `b` is now the least recently used.
    let ev = run("a");
    assert_eq!(of_type(&ev, "cache_restored")[0]["hit"], true);
    assert!(of_type(&ev, "cache_evicted").is_empty());
    // `c` takes the project over the limit: `b` goes, `a` stays.
    let ev = run("c");
    let evicted = of_type(&ev, "cache_evicted");
    assert_eq!(evicted.len(), 1, "{ev:?}");
    assert_eq!(evicted[0]["key"], b_key.as_str());
    assert!(evicted[0]["reason"]
        .as_str()
        .unwrap()
        .contains("least recently used"));
    assert!(!s.data().join("objects").join(&b_object).exists());
    // Replay agrees: `a` still hits, `b` misses.
    let ev = run("a");
    assert_eq!(of_type(&ev, "cache_restored")[0]["hit"], true);
    let ev = run("b");
    assert_eq!(of_type(&ev, "cache_restored")[0]["hit"], false);
}

#[test]
fn reuse_commit_skips_a_job_that_already_succeeded_at_the_commit() {
    let s = start(1);
    let pipeline = "jobs:\n  build:\n    reuse: commit\n    artifacts: [dist]\n    steps:\n      - run: mkdir -p dist && echo \"built in $TRIBUTARY_BUILD_ID\" > dist/app.txt\n  test:\n    needs: build\n    steps:\n      - run: cat dist/app.txt\n";
    let repo = s.project("once", pipeline);
    let b1 = s.trigger("once");
    assert_eq!(s.finished(&b1, BUILD)["status"], "succeeded");
    let ev1 = s.events(Some(&b1));
    assert!(of_type(&ev1, "job_reused").is_empty());

    // Same commit: `build` is not run again; `test` gets build 1's artifact.
    let b2 = s.trigger("once");
    let got = s.finished(&b2, BUILD);
    assert_eq!(got["status"], "succeeded", "{got}");
    let ev2 = s.events(Some(&b2));
    let reused = of_type(&ev2, "job_reused");
    assert_eq!(reused.len(), 1, "{ev2:?}");
    assert_eq!(reused[0]["job"], "build");
    assert_eq!(reused[0]["from_build"], b1.as_str());
    assert_eq!(reused[0]["from_attempt"], 1);
    assert!(!ev2
        .iter()
        .any(|e| e["type"] == "job_started" && e["job"] == "build"));
    assert!(!ev2
        .iter()
        .any(|e| e["type"] == "job_queued" && e["job"] == "build"));
    let log2 = s.ok(&s.token, &["logs", &b2]);
    assert!(log2.contains(&format!("built in {b1}")), "{log2}");
    let build_job = job(&got, "build");
    assert_eq!(build_job["status"], "succeeded");
    assert!(
        build_job["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("reused from build {b1}, job build attempt 1")),
        "{build_job}"
    );
    let get = s.ok(&s.token, &["get", &b2]);
    assert!(get.contains("reused from build"), "{get}");

    // A new commit: it runs again.
    s.commit(&repo, &[("README", "x")]);
    let b3 = s.trigger("once");
    assert_eq!(s.finished(&b3, BUILD)["status"], "succeeded");
    let ev3 = s.events(Some(&b3));
    assert!(of_type(&ev3, "job_reused").is_empty());
    assert!(ev3
        .iter()
        .any(|e| e["type"] == "job_started" && e["job"] == "build"));
}

/// `tributary run` in a git checkout: the data directory holds the history, so a second run
/// at the same commit reuses the job; editing the job (same commit, uncommitted change)
/// defeats reuse.
#[test]
fn local_runs_reuse_by_commit_and_a_changed_job_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    let pipeline = |line: &str| {
        format!(
            "jobs:\n  build:\n    reuse: commit\n    artifacts: [dist]\n    steps:\n      - run: {line}\n  test:\n    needs: build\n    steps:\n      - run: cat dist/app.txt\n"
        )
    };
    common::git(repo, &["init", "-q", "-b", "main"]);
    std::fs::write(
        repo.join(".tributary.yml"),
        pipeline("mkdir -p dist && echo one > dist/app.txt"),
    )
    .unwrap();
    std::fs::write(repo.join(".gitignore"), "dist/\n").unwrap();
    common::commit_all(repo, "init");
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tributary"))
            .args(["run", "--plain"])
            .current_dir(repo)
            .env("TRIBUTARY_LOG", "warn")
            .env("XDG_STATE_HOME", common::state_home())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let first = run();
    assert!(!first.contains("reused"), "{first}");
    // The artifact is gone from the directory: the reused job's artifact comes from storage.
    std::fs::remove_dir_all(repo.join("dist")).unwrap();
    let second = run();
    assert!(second.contains("reused from build"), "{second}");
    assert!(second.contains("one"), "{second}");
    std::fs::write(
        repo.join(".tributary.yml"),
        pipeline("mkdir -p dist && echo two > dist/app.txt"),
    )
    .unwrap();
    let third = run();
    assert!(!third.contains("reused"), "{third}");
    assert!(third.contains("two"), "{third}");
}
