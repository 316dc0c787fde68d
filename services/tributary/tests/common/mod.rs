//! A real `tributary up` process, the CLI against it, and throwaway git repositories: the
//! harness of the end-to-end tests that use it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub addr: String,
    pub token: String,
    _dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `tributary up --agents N` on a fresh data directory and a free port.
pub fn start(agents: usize) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(root.join("server.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["up", "--data"])
        .arg(root.join("data"))
        .args(["--listen", &addr, "--agents", &agents.to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let token_file = root.join("data/admin.token");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&addr).is_err() || !token_file.exists() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    Server {
        child,
        addr: format!("http://{addr}"),
        token,
        _dir: dir,
        root,
    }
}

impl Server {
    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn cli(&self, token: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tributary"))
            .args(args)
            .env("TRIBUTARY_SERVER", &self.addr)
            .env("TRIBUTARY_TOKEN", token)
            .output()
            .unwrap()
    }

    pub fn ok(&self, token: &str, args: &[&str]) -> String {
        let out = self.cli(token, args);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A git repository with `.tributary.yml` = `pipeline`, committed on `main`, added as
    /// project `name`.
    pub fn project(&self, name: &str, pipeline: &str) -> PathBuf {
        let repo = self.root.join(name);
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join(".tributary.yml"), pipeline).unwrap();
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
                "init",
            ],
        );
        self.ok(
            &self.token,
            &["project", "add", name, "--repo", repo.to_str().unwrap()],
        );
        repo
    }

    /// Triggers a build of `project` and returns its id.
    pub fn trigger(&self, project: &str) -> String {
        let out = self.ok(&self.token, &["trigger", project]);
        out.lines().next().unwrap().trim().to_owned()
    }

    /// `get --json` once the build has finished.
    pub fn finished(&self, build: &str, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let v: serde_json::Value =
                serde_json::from_str(&self.ok(&self.token, &["get", build, "--json"])).unwrap();
            if ["succeeded", "failed", "canceled"].contains(&v["status"].as_str().unwrap_or("")) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "build {build} did not finish: {v}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn job(build: &serde_json::Value, id: &str) -> serde_json::Value {
    build["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .unwrap_or_else(|| panic!("no job {id} in {build}"))
        .clone()
}

pub fn git(dir: &Path, args: &[&str]) {
    let st = Command::new("git")
        .args(args)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success(), "git {args:?}");
}

/// Waits until `what` holds.
pub fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
