//! The harness of the end-to-end tests: a real `tributary up` process, the CLI against it,
//! real `tributary agent` processes, throwaway git repositories, and the log read back with
//! `tributary events --json`. Every test binary that starts a server uses this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tributary")
}

/// XDG_STATE_HOME for runs that use the default data directory (one per repository under it):
/// in target/, never the user's own.
pub fn state_home() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("state")
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, signal);
        }
    }

    /// Waits for the exit, failing the test after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "process did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub struct Server {
    proc: Option<Proc>,
    pub addr: String,
    pub token: String,
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    /// The `up` flags and environment it was started with, for [`Server::restart`].
    extra: Vec<String>,
    env: Vec<(String, String)>,
    /// Where [`Server::repo`] makes repositories.
    pub repos: PathBuf,
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
    start_with(&["--agents", &agents.to_string()])
}

/// `tributary up --data DIR --listen ADDR` plus `extra` flags. The server's stderr goes to
/// `ROOT/server.log`.
pub fn start_with(extra: &[&str]) -> Server {
    launch(extra, &[], false)
}

/// [`start_with`], the server process having `env` too (e.g. the test S3 server's `AWS_*`
/// variables: this process's own environment is never changed).
pub fn start_with_env(extra: &[&str], env: &[(&str, String)]) -> Server {
    launch(extra, env, false)
}

/// `tributary up --agents N --allow-local-repos ROOT/repos`: tenant users may then add the
/// local repositories [`Server::repo`] makes (under `ROOT/repos`).
pub fn start_allowing_local_repos(agents: usize) -> Server {
    launch(&["--agents", &agents.to_string()], &[], true)
}

fn launch(extra: &[&str], env: &[(&str, String)], allow_local_repos: bool) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let repos = if allow_local_repos {
        root.join("repos")
    } else {
        root.clone()
    };
    std::fs::create_dir_all(&repos).unwrap();
    let mut extra: Vec<&str> = extra.to_vec();
    let allow = repos.to_str().unwrap().to_owned();
    if allow_local_repos {
        extra.extend(["--allow-local-repos", &allow]);
    }
    let addr = format!("127.0.0.1:{}", free_port());
    let mut server = Server {
        proc: None,
        addr: format!("http://{addr}"),
        token: String::new(),
        _dir: dir,
        root,
        extra: extra.iter().map(|s| s.to_string()).collect(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        repos,
    };
    server.spawn();
    let token_file = server.root.join("data/admin.token");
    server.token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    server
}

impl Server {
    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("the server is running").0.id()
    }

    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Starts `tributary up` on this server's data directory and address (stderr appended to
    /// `ROOT/server.log`) and waits until it listens.
    fn spawn(&mut self) {
        let addr = self.addr.trim_start_matches("http://").to_owned();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("server.log"))
            .unwrap();
        let child = Command::new(bin())
            .args(["up", "--data"])
            .arg(self.data())
            .args(["--listen", &addr])
            .args(&self.extra)
            .env("TRIBUTARY_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.proc = Some(Proc(child));
        let token_file = self.data().join("admin.token");
        let mut exited = None;
        wait_until("the server to start", Duration::from_secs(60), || {
            exited = self.proc.as_mut().and_then(|p| p.0.try_wait().unwrap());
            exited.is_some() || (std::net::TcpStream::connect(&addr).is_ok() && token_file.exists())
        });
        assert!(
            exited.is_none(),
            "the server exited ({exited:?}):\n{}",
            self.log()
        );
    }

    /// Kills the server (SIGKILL: a crash, nothing drained) and starts it again on the same
    /// data directory and address.
    pub fn crash_and_restart(&mut self) {
        if let Some(proc) = self.proc.take() {
            drop(proc); // SIGKILL and wait
        }
        self.spawn();
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }

    /// SIGTERM, and the exit status once the server has drained and stopped.
    pub fn stop(&mut self) -> ExitStatus {
        let mut proc = self.proc.take().expect("the server is running");
        proc.signal(libc::SIGTERM);
        proc.wait_exit(Duration::from_secs(60))
    }

    /// Stops the server (SIGTERM, drained) and starts `tributary up` again on the same data
    /// directory and address, with `extra` flags instead of the first start's.
    pub fn restart_with(&mut self, extra: &[&str]) {
        if self.proc.is_some() {
            assert!(self.stop().success(), "the server stops cleanly");
        }
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.spawn();
    }

    /// The CLI against this server, as `token`.
    pub fn cli(&self, token: &str, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("TRIBUTARY_SERVER", &self.addr)
            .env("TRIBUTARY_TOKEN", token)
            .env_remove("TRIBUTARY_DATA")
            .output()
            .unwrap()
    }

    /// [`Server::cli`], which must succeed; its stdout.
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

    /// [`Server::ok`] as the admin.
    pub fn admin(&self, args: &[&str]) -> String {
        self.ok(&self.token, args)
    }

    /// A git repository under the server's root with `.tributary.yml` = `pipeline` and
    /// `files` (path, content), committed on `main`.
    pub fn repo(&self, name: &str, pipeline: &str, files: &[(&str, &str)]) -> PathBuf {
        let repo = self.repos.join(name);
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join(".tributary.yml"), pipeline).unwrap();
        for (path, content) in files {
            let path = repo.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        commit_all(&repo, "init");
        repo
    }

    /// A repository (see [`Server::repo`]) added as project `name`.
    pub fn project(&self, name: &str, pipeline: &str) -> PathBuf {
        self.project_with(name, pipeline, &[])
    }

    /// [`Server::project`] with more `project add` flags.
    pub fn project_with(&self, name: &str, pipeline: &str, flags: &[&str]) -> PathBuf {
        let repo = self.repo(name, pipeline, &[]);
        let mut args = vec!["project", "add", name, "--repo", repo.to_str().unwrap()];
        args.extend_from_slice(flags);
        self.admin(&args);
        repo
    }

    /// Triggers a build of `project` and returns its id.
    pub fn trigger(&self, project: &str) -> String {
        let out = self.admin(&["trigger", project]);
        out.lines().next().unwrap().trim().to_owned()
    }

    /// A repository (see [`Server::repo`]) added as project `name` with `token` (to its
    /// tenant).
    pub fn project_as(&self, token: &str, name: &str, pipeline: &str) -> PathBuf {
        let repo = self.repo(name, pipeline, &[]);
        self.ok(
            token,
            &["project", "add", name, "--repo", repo.to_str().unwrap()],
        );
        repo
    }

    /// [`Server::trigger`] with `token`.
    pub fn trigger_as(&self, token: &str, project: &str) -> String {
        let out = self.ok(token, &["trigger", project]);
        out.lines().next().unwrap().trim().to_owned()
    }

    /// A build's status (`get --json`), read with `token`.
    pub fn status(&self, token: &str, build: &str) -> String {
        let v: Value = serde_json::from_str(&self.ok(token, &["get", build, "--json"])).unwrap();
        v["status"].as_str().unwrap().to_owned()
    }

    /// A new tenant `name` and a user token of it.
    pub fn tenant(&self, name: &str) -> String {
        self.admin(&["admin", "tenant-add", name]);
        self.admin(&["admin", "token-create", "--tenant", name, "--kind", "user"])
            .trim()
            .to_owned()
    }

    /// `get --json`.
    pub fn get(&self, build: &str) -> Value {
        serde_json::from_str(&self.admin(&["get", build, "--json"])).unwrap()
    }

    /// `get --json` once the build has finished.
    pub fn finished(&self, build: &str, within: Duration) -> Value {
        self.finished_as(&self.token, build, within)
    }

    /// [`Server::finished`], read with `token`.
    pub fn finished_as(&self, token: &str, build: &str, within: Duration) -> Value {
        let mut last = Value::Null;
        wait_until(&format!("build {build} to finish"), within, || {
            last = serde_json::from_str(&self.ok(token, &["get", build, "--json"])).unwrap();
            ["succeeded", "failed", "canceled"].contains(&last["status"].as_str().unwrap_or(""))
        });
        last
    }

    /// The log's events (of `build`, or all), read from the data directory.
    pub fn events(&self, build: Option<&str>) -> Vec<Value> {
        events_in(&self.data(), build)
    }

    /// The working directory of the agent named `name`.
    pub fn agent_workdir(&self, name: &str) -> PathBuf {
        self.root.join("agents").join(name)
    }

    /// A `tributary agent` process named `name`, enrolled with the admin token, with `extra`
    /// flags (e.g. `--labels gpu`, `--capacity 3`). Its stderr goes to `ROOT/agent-NAME.log`.
    pub fn agent(&self, name: &str, extra: &[&str]) -> Proc {
        self.agent_with_env(name, extra, &[])
    }

    /// [`Server::agent`], the agent process having `env` too.
    pub fn agent_with_env(&self, name: &str, extra: &[&str], env: &[(&str, String)]) -> Proc {
        let log = std::fs::File::create(self.root.join(format!("agent-{name}.log"))).unwrap();
        let child = Command::new(bin())
            .args(["agent", "--server", &self.addr, "--token", &self.token])
            .args(["--name", name])
            .arg("--workdir")
            .arg(self.agent_workdir(name))
            .args(extra)
            .env("TRIBUTARY_LOG", "info")
            .env_remove("TRIBUTARY_ENGINE")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc(child)
    }

    /// The id of agent `name` once it has registered.
    pub fn agent_id(&self, name: &str) -> String {
        let path = self.agent_workdir(name).join("agent.json");
        wait_until("the agent to register", Duration::from_secs(30), || {
            path.exists()
        });
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v["agent_id"].as_str().unwrap().to_owned()
    }
}

/// `tributary events --json` of the data directory `data` (of `build`, or all).
pub fn events_in(data: &Path, build: Option<&str>) -> Vec<Value> {
    let mut cmd = Command::new(bin());
    cmd.args(["events", "--json", "--data"]).arg(data);
    if let Some(build) = build {
        cmd.args(["--build", build]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "events: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `GET path` over plain HTTP/1.0: the status code and body, or None if nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    http_get_as(addr, path, None).map(|reply| (reply.status, reply.text()))
}

/// A response read by [`http_get_as`].
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// The status line and the headers, as sent.
    pub headers: String,
    pub body: Vec<u8>,
}

impl HttpReply {
    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` over plain HTTP/1.0 (a body never chunked) to `addr` (`host:port`, with or
/// without `http://`), with `Authorization: Bearer TOKEN` when there is one; None if nothing
/// answers or the response does not parse.
pub fn http_get_as(addr: &str, path: &str, token: Option<&str>) -> Option<HttpReply> {
    use std::io::{Read, Write};
    let host = addr.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n{auth}\r\n").ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let headers = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = headers.split_whitespace().nth(1)?.parse().ok()?;
    Some(HttpReply {
        status,
        headers,
        body: response[split + 4..].to_vec(),
    })
}

/// The API over `log` and `store` (git mirrors under `dir`), served in this process on a free
/// port until `stop` fires: its `http://` address and its task. For tests that assemble the
/// services themselves (on Kafka) instead of starting `tributary up`.
pub async fn serve_api(
    log: std::sync::Arc<dyn tributary_eventlog::EventLog>,
    store: tributary_projections::BuildsStore,
    dir: &Path,
    stop: &tokio_util::sync::CancellationToken,
) -> (String, tokio::task::JoinHandle<()>) {
    let mirrors = tributary_repo::Mirrors::new(dir.join("mirrors"));
    let state = tributary_api::ApiState::start(log, store, mirrors, None)
        .await
        .expect("API state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = format!("http://{}", listener.local_addr().expect("addr"));
    let stop = stop.clone();
    let task = tokio::spawn(async move {
        let _ = tributary_api::serve(state, listener, async move { stop.cancelled().await }).await;
    });
    (addr, task)
}

/// Job `id` of a `get --json` build.
pub fn job(build: &Value, id: &str) -> Value {
    build["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .unwrap_or_else(|| panic!("no job {id} in {build}"))
        .clone()
}

/// The events of type `ty` (`job_assigned`, ...).
pub fn of_type<'a>(events: &'a [Value], ty: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == ty).collect()
}

pub fn git(dir: &Path, args: &[&str]) {
    let st = Command::new("git")
        .args(args)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success(), "git {args:?}");
}

/// `git add . && git commit` with a throwaway identity.
pub fn commit_all(dir: &Path, message: &str) {
    git(dir, &["add", "."]);
    git(
        dir,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            message,
        ],
    );
}

/// Waits until something listens on `addr` (a process we started).
pub fn wait_for_port(addr: &str, what: &str) {
    wait_until(
        &format!("{what} to listen on {addr}"),
        Duration::from_secs(60),
        || std::net::TcpStream::connect(addr).is_ok(),
    );
}

/// Runs one SQL statement on a SQLite file (tampering with a read model, to prove a check
/// notices) and asserts it changed a row.
pub fn sql(path: &Path, statement: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        let done = sqlx::query(statement).execute(&pool).await.unwrap();
        assert!(done.rows_affected() > 0, "{statement} changed nothing");
        pool.close().await;
    });
}

/// Waits until `what` holds.
pub fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`wait_until`] in async code: polls `done` every 200 ms without blocking the runtime.
pub async fn wait_until_async(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
    wait_for_async(what, within, async || {
        if done().await {
            Ok(())
        } else {
            Err(String::new())
        }
    })
    .await
}

/// Polls `probe` every 200 ms until it returns `Ok(value)`; after `within`, fails the test
/// with `what` and the last `Err` (what was seen instead).
pub async fn wait_for_async<T>(
    what: &str,
    within: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let seen = match probe().await {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}{}{seen}",
            if seen.is_empty() { "" } else { ": " }
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// [`wait_until`] with a timeout in seconds.
pub fn wait_secs(what: &str, secs: u64, f: impl FnMut() -> bool) {
    wait_until(what, Duration::from_secs(secs), f)
}

impl Server {
    /// Writes `files` into the repository `repo` and commits them.
    pub fn commit(&self, repo: &Path, files: &[(&str, &str)]) {
        for (path, content) in files {
            std::fs::write(repo.join(path), content).unwrap();
        }
        commit_all(repo, "change");
    }
}
