//! Tests that need an engine which is not running: skipped visibly on a contributor's machine,
//! a failure where engines are required (`TRIBUTARY_REQUIRE_ENGINES=1`, set by
//! `scripts/test.sh`, which is what CI runs).
//!
//! A test that needs an engine starts with [`require!`](crate::require) (or calls
//! [`engine_or_skip`] and returns when it says `false`). When the engine does not answer:
//!
//! * with `TRIBUTARY_REQUIRE_ENGINES` set (to anything but `0`/empty): the test panics, naming the
//!   script that starts the engine — CI never skips;
//! * otherwise the test returns at once (it passes), a line `skipped <test>: no <engine> …` goes to
//!   stderr uncaptured (so it shows in `cargo test`'s output), and the test's name is appended to
//!   `target/<profile>/engine-skips/<cargo's pid>`. The last test binary of a `cargo test` run
//!   (`services/testkit/tests/zz_engine_skips.rs`) prints one line naming every skipped test of
//!   the run and the scripts that start their engines.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable that turns a missing engine into a failure.
pub const REQUIRE_ENGINES: &str = "TRIBUTARY_REQUIRE_ENGINES";

/// An engine some tests need, and what starts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Engine {
    /// The test Kafka broker (`TRIBUTARY_TEST_KAFKA`, default 127.0.0.1:19092).
    Kafka,
    /// The test PostgreSQL (`TRIBUTARY_TEST_DATABASE_URL`, default 127.0.0.1:5432).
    Postgres,
    /// The S3-compatible test server (`TRIBUTARY_TEST_S3_ENDPOINT`, default 127.0.0.1:9090).
    S3,
    /// A container engine's Docker API (`DOCKER_HOST`, default Podman's socket).
    Containers,
    /// The test Kubernetes API server (`TRIBUTARY_TEST_KUBECONFIG`).
    Kube,
    /// Headless chromium and chromedriver on the PATH.
    Browser,
    /// Mounting a small tmpfs (a full disk on demand): root, as CI runs the tests.
    SmallFs,
}

impl Engine {
    pub const ALL: [Engine; 7] = [
        Engine::Kafka,
        Engine::Postgres,
        Engine::S3,
        Engine::Containers,
        Engine::Kube,
        Engine::Browser,
        Engine::SmallFs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Engine::Kafka => "Kafka broker",
            Engine::Postgres => "PostgreSQL",
            Engine::S3 => "S3 server",
            Engine::Containers => "container engine",
            Engine::Kube => "Kubernetes API server",
            Engine::Browser => "chromium/chromedriver",
            Engine::SmallFs => "tmpfs mount",
        }
    }

    /// The script that starts (or installs) it.
    pub fn script(self) -> &'static str {
        match self {
            Engine::Kafka | Engine::Postgres => "scripts/setup-brokers.sh",
            Engine::S3 => "scripts/setup-s3.sh",
            Engine::Containers => "sudo scripts/setup-containers.sh",
            Engine::Kube => "sudo scripts/setup-kube.sh",
            Engine::Browser => "scripts/setup-browser.sh",
            Engine::SmallFs => "sudo cargo test (mounting a tmpfs needs root)",
        }
    }

    /// The short tag in the skip file (`kafka`, `postgres`, ...).
    pub fn tag(self) -> &'static str {
        match self {
            Engine::Kafka => "kafka",
            Engine::Postgres => "postgres",
            Engine::S3 => "s3",
            Engine::Containers => "containers",
            Engine::Kube => "kube",
            Engine::Browser => "browser",
            Engine::SmallFs => "smallfs",
        }
    }

    pub fn from_tag(tag: &str) -> Option<Engine> {
        Engine::ALL.into_iter().find(|e| e.tag() == tag)
    }

    /// Where the tests look for it, for messages.
    fn address(self) -> String {
        match self {
            Engine::Kafka => crate::kafka_address(),
            Engine::Postgres => host_port_of_url(&crate::postgres_admin_url())
                .unwrap_or_else(crate::postgres_admin_url),
            Engine::S3 => s3_endpoint(),
            Engine::Containers => docker_host(),
            Engine::Kube => crate::kubeconfig_path().display().to_string(),
            Engine::Browser => "the PATH".into(),
            Engine::SmallFs => "mount -t tmpfs".into(),
        }
    }

    /// Does it answer now? Cheap: a TCP or socket connect, a file, programs on the PATH.
    fn probe(self) -> bool {
        match self {
            Engine::Kafka => {
                tcp_answers(crate::kafka_address().split(',').next().unwrap_or_default())
            }
            Engine::Postgres => {
                host_port_of_url(&crate::postgres_admin_url()).is_some_and(|hp| tcp_answers(&hp))
            }
            Engine::S3 => host_port_of_url(&s3_endpoint()).is_some_and(|hp| tcp_answers(&hp)),
            Engine::Containers => {
                let host = docker_host();
                match host.strip_prefix("tcp://").or(host.strip_prefix("http://")) {
                    Some(hp) => tcp_answers(hp),
                    None => std::os::unix::net::UnixStream::connect(
                        host.strip_prefix("unix://").unwrap_or(&host),
                    )
                    .is_ok(),
                }
            }
            Engine::Kube => {
                let path = crate::kubeconfig_path();
                std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|text| {
                        text.lines()
                            .find_map(|l| l.trim().strip_prefix("server:").map(str::trim))
                            .and_then(host_port_of_url)
                    })
                    .is_some_and(|hp| tcp_answers(&hp))
            }
            Engine::Browser => on_path("chromium") && on_path("chromedriver"),
            Engine::SmallFs => crate::smallfs::SmallFs::mount(1).is_ok(),
        }
    }
}

/// Whether a missing engine fails the test (`TRIBUTARY_REQUIRE_ENGINES` set, not `0`).
pub fn engines_required() -> bool {
    std::env::var(REQUIRE_ENGINES).is_ok_and(|v| !v.trim().is_empty() && v.trim() != "0")
}

/// Whether `engine` answers (probed once per test process).
pub fn available(engine: Engine) -> bool {
    static PROBES: OnceLock<std::sync::Mutex<std::collections::HashMap<Engine, bool>>> =
        OnceLock::new();
    let probes = PROBES.get_or_init(Default::default);
    let known = probes.lock().ok().and_then(|m| m.get(&engine).copied());
    if let Some(up) = known {
        return up;
    }
    let up = engine.probe();
    if let Ok(mut m) = probes.lock() {
        m.insert(engine, up);
    }
    up
}

/// `true`: `engine` answers, go on. `false`: it does not and the test was recorded as skipped;
/// return at once. Panics instead when engines are required ([`engines_required`]).
pub fn engine_or_skip(engine: Engine) -> bool {
    if available(engine) {
        return true;
    }
    let what = format!(
        "no {} at {}: run {} to start it",
        engine.name(),
        engine.address(),
        engine.script()
    );
    assert!(
        !engines_required(),
        "{what} ({REQUIRE_ENGINES} is set, so a missing engine is a failure, not a skip)"
    );
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(str::to_owned)
        .unwrap_or_else(|| format!("a test of {}", binary_name()));
    let test = format!("{}::{test}", binary_name());
    // Straight to the file descriptor: libtest captures only the print macros, so this line
    // shows in `cargo test`'s output even for a passing test.
    let _ = writeln!(std::io::stderr().lock(), "skipped {test}: {what}");
    if let Some(file) = skip_file(std::os::unix::process::parent_id()) {
        if let Some(dir) = file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
        {
            let _ = writeln!(f, "{}\t{test}", engine.tag());
        }
    }
    false
}

/// Skips the calling test (returns from it) unless each named [`Engine`] answers; under
/// `TRIBUTARY_REQUIRE_ENGINES=1` a missing one fails it instead. `require!(Kafka, Postgres)`.
#[macro_export]
macro_rules! require {
    ($($engine:ident),+ $(,)?) => {
        $(
            if !$crate::engines::engine_or_skip($crate::engines::Engine::$engine) {
                return;
            }
        )+
    };
}

/// The skip file of the `cargo test` run whose cargo process is `cargo_pid`:
/// `target/<profile>/engine-skips/<pid>` (the test binaries live in `target/<profile>/deps`).
pub fn skip_file(cargo_pid: u32) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    Some(profile_dir.join("engine-skips").join(cargo_pid.to_string()))
}

/// The one summary line for the skip file's contents (`tag\ttest` lines). Pure.
pub fn summary(skip_file_text: &str) -> String {
    let mut by_engine: std::collections::BTreeMap<Engine, Vec<&str>> = Default::default();
    for line in skip_file_text.lines() {
        if let Some((tag, test)) = line.split_once('\t') {
            if let Some(engine) = Engine::from_tag(tag) {
                let tests = by_engine.entry(engine).or_default();
                if !tests.contains(&test) {
                    tests.push(test);
                }
            }
        }
    }
    if by_engine.is_empty() {
        return "engines: no test was skipped for want of an engine".to_owned();
    }
    let total: usize = by_engine.values().map(Vec::len).sum();
    let parts: Vec<String> = by_engine
        .iter()
        .map(|(engine, tests)| {
            format!(
                "no {} ({}): {}",
                engine.name(),
                engine.script(),
                tests.join(", ")
            )
        })
        .collect();
    format!(
        "engines: {total} test(s) SKIPPED for want of an engine — {}. Start them (or all: \
         scripts/setup.sh); {REQUIRE_ENGINES}=1 (scripts/test.sh, CI) fails them instead",
        parts.join("; ")
    )
}

fn binary_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .map(|n| match n.rsplit_once('-') {
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
            _ => n,
        })
        .unwrap_or_else(|| "?".into())
}

fn tcp_answers(host_port: &str) -> bool {
    host_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok())
}

/// `host:port` of `scheme://[user[:pw]@]host:port/...`.
fn host_port_of_url(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    if host_port.contains(':') {
        Some(host_port.to_owned())
    } else if url.starts_with("https://") {
        Some(format!("{host_port}:443"))
    } else {
        Some(format!("{host_port}:80"))
    }
}

fn s3_endpoint() -> String {
    std::env::var("TRIBUTARY_TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9090".into())
}

fn docker_host() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "unix:///run/podman/podman.sock".into())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            let p = dir.join(program);
            std::fs::metadata(&p).is_ok_and(|m| m.is_file())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_and_port() {
        assert_eq!(
            host_port_of_url("postgres://u:p@127.0.0.1:5432/db").as_deref(),
            Some("127.0.0.1:5432")
        );
        assert_eq!(
            host_port_of_url("https://127.0.0.1:16443").as_deref(),
            Some("127.0.0.1:16443")
        );
        assert_eq!(
            host_port_of_url("http://minio/bucket").as_deref(),
            Some("minio:80")
        );
    }

    #[test]
    fn the_summary_names_each_skipped_test_once_with_its_script() {
        assert_eq!(
            summary(""),
            "engines: no test was skipped for want of an engine"
        );
        let text = "kafka\tkafka::a\nkafka\tkafka::a\ncontainers\tcontainers::b\nbogus\tx\n";
        let line = summary(text);
        assert!(line.starts_with("engines: 2 test(s) SKIPPED"), "{line}");
        assert!(
            line.contains("no Kafka broker (scripts/setup-brokers.sh): kafka::a;"),
            "{line}"
        );
        assert!(
            line.contains("no container engine (sudo scripts/setup-containers.sh): containers::b"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }
}
