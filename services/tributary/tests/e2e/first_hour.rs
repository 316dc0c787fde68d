//! A new user's first hour: `tributary run` with the default data directory (outside the
//! repository: jobs never see it) and with `--data` inside and outside the repository, for host
//! and container jobs; `tributary init` on sample repositories, each generated pipeline run for
//! real; `tributary completions`.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{bin, commit_all, git};

/// `tributary ARGS` in `dir`, with its default data directory under `state` (XDG_STATE_HOME).
fn tributary(dir: &Path, state: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .env("XDG_STATE_HOME", state)
        .env_remove("TRIBUTARY_DATA")
        .env("TRIBUTARY_LOG", "warn")
        .output()
        .expect("spawn tributary")
}

fn text(out: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The data directory a run printed (`build … log in DIR`).
fn log_dir(out: &Output) -> PathBuf {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .find_map(|l| l.split(", log in ").nth(1))
        .unwrap_or_else(|| panic!("no `log in` line: {}", text(out)));
    PathBuf::from(dir.trim())
}

/// A git repository (in `root/repo`) holding `pipeline`; `root/state` is the state home.
fn repo(root: &Path, pipeline: &str) -> (PathBuf, PathBuf) {
    let repo = root.join("repo");
    std::fs::create_dir_all(repo.join("sub")).unwrap();
    std::fs::write(repo.join(".tributary.yml"), pipeline).unwrap();
    std::fs::write(repo.join("sub/keep.txt"), "kept\n").unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    commit_all(&repo, "init");
    let state = root.join("state");
    std::fs::create_dir_all(&state).unwrap();
    (repo, state)
}

/// The listing a job wrote (one name per line).
fn listing(repo: &Path, file: &str) -> Vec<String> {
    std::fs::read_to_string(repo.join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .lines()
        .map(str::to_owned)
        .collect()
}

const HOST_PIPELINE: &str =
    "jobs:\n  host:\n    steps:\n      - ls -a > host-ls.txt\n      - echo on-host > host.txt\n";

#[test]
fn host_jobs_never_see_the_default_data_directory_and_every_command_finds_it() {
    let root = tempfile::tempdir().unwrap();
    let (repo, state) = repo(root.path(), HOST_PIPELINE);
    let out = tributary(&repo, &state, &["run", "--plain"]);
    assert!(out.status.success(), "{}", text(&out));
    let data = log_dir(&out);
    // Absolute, under the state home, outside the repository.
    assert!(data.is_absolute(), "{}", data.display());
    assert!(
        data.starts_with(state.canonicalize().unwrap().join("tributary")),
        "{}",
        data.display()
    );
    assert!(!data.starts_with(repo.canonicalize().unwrap()));
    assert!(data.join("events.db").is_file());
    let seen = listing(&repo, "host-ls.txt");
    assert!(
        !seen
            .iter()
            .any(|n| n.starts_with(".tributary") && n != ".tributary.yml"),
        "{seen:?}"
    );
    assert!(!repo.join(".tributary").exists());
    assert_eq!(
        std::fs::read_to_string(repo.join("host.txt")).unwrap(),
        "on-host\n"
    );
    // No "recreate" preamble in a local run's log: the user just ran that command.
    assert!(
        !text(&out).contains("to recreate this job"),
        "{}",
        text(&out)
    );

    // `builds` and `replay --check`, from a subdirectory of the repository, find the same log.
    let builds = tributary(&repo.join("sub"), &state, &["builds"]);
    assert!(builds.status.success(), "{}", text(&builds));
    assert!(
        String::from_utf8_lossy(&builds.stdout).contains("succeeded"),
        "{}",
        text(&builds)
    );
    let check = tributary(&repo.join("sub"), &state, &["replay", "--check"]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("matches a replay"),
        "{}",
        text(&check)
    );
}

#[test]
fn data_given_relative_inside_or_outside_the_repository_is_used_absolute() {
    let root = tempfile::tempdir().unwrap();
    let (repo, state) = repo(root.path(), HOST_PIPELINE);
    // Outside, relative: no note, nothing in the repository.
    let out = tributary(&repo, &state, &["run", "--plain", "--data", "../elsewhere"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        log_dir(&out),
        root.path().canonicalize().unwrap().join("elsewhere")
    );
    assert!(
        !text(&out).contains("note: the data directory"),
        "{}",
        text(&out)
    );
    assert!(!listing(&repo, "host-ls.txt").contains(&"elsewhere".to_owned()));
    // Inside, relative: it works, and the user is told host jobs see it.
    let out = tributary(
        &repo,
        &state,
        &["run", "--plain", "--data", "state-in-repo"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        log_dir(&out),
        repo.canonicalize().unwrap().join("state-in-repo")
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("note: the data directory") && stderr.contains("host jobs see"),
        "{stderr}"
    );
}

#[test]
fn container_jobs_get_absolute_mounts_and_never_the_data_directory() {
    tributary_testkit::require!(Containers);
    let root = tempfile::tempdir().unwrap();
    let pipeline = "jobs:\n  boxed:\n    image: localhost/ci-busybox\n    steps:\n      \
        - ls -a /workspace > box-ls.txt\n      - echo in-box > box.txt\n      \
        - if [ -d /workspace/state-in-repo ]; then ls -A /workspace/state-in-repo | wc -l > \
        inner-count.txt; touch /workspace/state-in-repo/x 2>/dev/null && echo writable > \
        inner-write.txt || echo read-only > inner-write.txt; fi\n  \
        host:\n    steps:\n      - ls -a > host-ls.txt\n";
    let (repo, state) = repo(root.path(), pipeline);
    let docker_host =
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///run/podman/podman.sock".into());
    let run = |args: &[&str]| {
        let out = Command::new(bin())
            .args(["run", "--plain"])
            .args(args)
            .current_dir(&repo)
            .env("XDG_STATE_HOME", &state)
            .env("DOCKER_HOST", &docker_host)
            .env_remove("TRIBUTARY_DATA")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        std::fs::remove_file(repo.join("box.txt")).unwrap();
        out
    };
    // The default data directory (the case that failed with a relative bind mount).
    run(&[]);
    let seen = listing(&repo, "box-ls.txt");
    assert!(seen.contains(&".tributary.yml".to_owned()), "{seen:?}");
    assert!(!seen.contains(&".tributary".to_owned()), "{seen:?}");
    // --data outside the repository, relative.
    run(&["--data", "../outside"]);
    assert!(!listing(&repo, "box-ls.txt").contains(&"outside".to_owned()));
    // --data inside the repository, relative: the container sees an empty, read-only directory.
    run(&["--data", "state-in-repo"]);
    assert!(repo.join("state-in-repo/events.db").is_file());
    assert_eq!(
        std::fs::read_to_string(repo.join("inner-count.txt"))
            .unwrap()
            .trim(),
        "0"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("inner-write.txt"))
            .unwrap()
            .trim(),
        "read-only"
    );
    // The host job of the same run: it does see it (and was told so on stderr).
    assert!(listing(&repo, "host-ls.txt").contains(&"state-in-repo".to_owned()));
}

/// A sample repository: files, committed.
fn sample(root: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = root.join(name);
    for (path, content) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    git(&dir, &["init", "-q", "-b", "main"]);
    commit_all(&dir, "sample");
    dir
}

/// `init` then `run` in `dir`: the generated pipeline holds `expect` and succeeds.
fn init_and_run(dir: &Path, state: &Path, expect: &[&str]) {
    let out = tributary(dir, state, &["init"]);
    assert!(out.status.success(), "init: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("tributary run"),
        "{}",
        text(&out)
    );
    let pipeline = std::fs::read_to_string(dir.join(".tributary.yml")).unwrap();
    for e in expect {
        assert!(pipeline.contains(e), "{e} in\n{pipeline}");
    }
    let run = tributary(dir, state, &["run", "--plain"]);
    assert!(run.status.success(), "{pipeline}\n{}", text(&run));
}

#[test]
fn init_writes_a_pipeline_that_runs_for_cargo_make_go_and_python_repositories() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    std::fs::create_dir_all(&state).unwrap();

    let cargo = sample(
        root.path(),
        "cargo",
        &[
            (
                "Cargo.toml",
                "[package]\nname = \"sample\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
            ),
            (
                "src/lib.rs",
                "pub fn two() -> u32 { 2 }\n#[cfg(test)]\nmod t { #[test] fn two() { assert_eq!(super::two(), 2); } }\n",
            ),
            (".gitignore", "target/\n"),
        ],
    );
    init_and_run(&cargo, &state, &["cargo build", "cargo test"]);

    let make = sample(
        root.path(),
        "make",
        &[(
            "Makefile",
            "all:\n\techo built > out.txt\n\ntest: all\n\tgrep -q built out.txt\n",
        )],
    );
    init_and_run(&make, &state, &["run: make\n", "make test"]);

    let go = sample(
        root.path(),
        "go",
        &[
            ("go.mod", "module example.com/sample\n\ngo 1.21\n"),
            ("two.go", "package sample\n\nfunc Two() int { return 2 }\n"),
            (
                "two_test.go",
                "package sample\n\nimport \"testing\"\n\nfunc TestTwo(t *testing.T) {\n\tif Two() != 2 {\n\t\tt.Fatal(\"not two\")\n\t}\n}\n",
            ),
        ],
    );
    init_and_run(&go, &state, &["go vet ./...", "go test ./..."]);

    let python = sample(
        root.path(),
        "python",
        &[
            // No requirements: installing them needs nothing from the network.
            ("requirements.txt", ""),
            ("test_two.py", "def test_two():\n    assert 1 + 1 == 2\n"),
        ],
    );
    init_and_run(
        &python,
        &state,
        &["pip install -r requirements.txt", "python3 -m pytest"],
    );
}

#[test]
fn init_never_overwrites_and_an_empty_directory_gets_a_placeholder_that_runs() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let empty = root.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    init_and_run(&empty, &state, &["found no Cargo.toml"]);
    let before = std::fs::read_to_string(empty.join(".tributary.yml")).unwrap();
    let again = tributary(&empty, &state, &["init"]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{}",
        text(&again)
    );
    assert_eq!(
        std::fs::read_to_string(empty.join(".tributary.yml")).unwrap(),
        before
    );
    // -f writes elsewhere.
    let other = tributary(&empty, &state, &["init", "-f", "ci.yml"]);
    assert!(other.status.success(), "{}", text(&other));
    assert!(String::from_utf8_lossy(&other.stdout).contains("tributary run -f ci.yml"));
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef tributary"),
        ("fish", "complete -c tributary"),
    ] {
        let out = tributary(dir.path(), dir.path(), &["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("init") && script.contains("run"), "{shell}");
    }
    let bad = tributary(dir.path(), dir.path(), &["completions", "tcsh"]);
    assert!(!bad.status.success());
}
