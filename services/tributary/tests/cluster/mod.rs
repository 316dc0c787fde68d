//! Helpers shared by the end-to-end tests: the `tributary` binary, a server with remote agents.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tributary")
}

pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn events(data: &Path, build: &str) -> Vec<Value> {
    let out = Command::new(bin())
        .args(["events", "--json", "--build", build, "--data"])
        .arg(data)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub struct Cluster {
    _server: Proc,
    pub addr: String,
    pub token: String,
    pub dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    pub fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let server = Command::new(bin())
            .args([
                "up",
                "--agents",
                "0",
                "--lease-ttl",
                "3",
                "--listen",
                &addr,
                "--data",
            ])
            .arg(dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("server", 60, || std::net::TcpStream::connect(&addr).is_ok());
        let token = std::fs::read_to_string(dir.path().join("data/admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        Cluster {
            _server: Proc(server),
            addr: format!("http://{addr}"),
            token,
            dir,
        }
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out: Output = Command::new(bin())
            .args(args)
            .env("TRIBUTARY_SERVER", &self.addr)
            .env("TRIBUTARY_TOKEN", &self.token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn workdir(&self, name: &str) -> PathBuf {
        self.dir.path().join("agents").join(name)
    }

    /// An agent; with `engine`, one that runs container jobs.
    pub fn agent(&self, name: &str, engine: Option<&str>) -> Proc {
        self.agent_args(name, engine, &[])
    }

    /// An agent with more flags.
    pub fn agent_args(&self, name: &str, engine: Option<&str>, extra: &[&str]) -> Proc {
        let mut cmd = Command::new(bin());
        cmd.args([
            "agent",
            "--server",
            &self.addr,
            "--token",
            &self.token,
            "--name",
            name,
            "--cpus",
            "1",
            "--memory",
            "128m",
        ])
        .arg("--workdir")
        .arg(self.workdir(name))
        .env_remove("TRIBUTARY_ENGINE")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some(engine) = engine {
            cmd.args(["--engine", engine]);
        }
        cmd.args(extra);
        Proc(cmd.spawn().unwrap())
    }

    pub fn agent_id(&self, name: &str) -> String {
        let path = self.workdir(name).join("agent.json");
        wait_until("agent registration", 60, || path.exists());
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v["agent_id"].as_str().unwrap().to_owned()
    }

    pub fn project(&self, name: &str, pipeline: &str) {
        let repo = self.dir.path().join(name);
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
        self.ok(&["project", "add", name, "--repo", repo.to_str().unwrap()]);
    }

    pub fn get(&self, build: &str) -> Value {
        serde_json::from_str(&self.ok(&["get", build, "--json"])).unwrap()
    }

    pub fn events(&self, build: &str) -> Vec<Value> {
        events(&self.dir.path().join("data"), build)
    }
}

pub fn git(dir: &Path, args: &[&str]) {
    assert!(Command::new("git")
        .args(args)
        .current_dir(dir)
        .status()
        .unwrap()
        .success());
}

pub fn job<'a>(build: &'a Value, id: &str) -> &'a Value {
    build["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .unwrap()
}
