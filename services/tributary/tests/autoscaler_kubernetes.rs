//! The autoscaler's `kubernetes` provider end to end: a real `tributary up --autoscaler FILE
//! --autoscaler-provider kubernetes` against a real kube-apiserver (scripts/setup-kube.sh: etcd
//! and kube-apiserver, no kubelet). A burst of jobs makes it request agents, one Pod each, made
//! from the template and labelled with the request id; no kubelet runs them, so they never
//! connect: after startup_timeout_secs they are released and their Pods deleted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde_json::Value;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tributary")
}

fn kubeconfig() -> PathBuf {
    let path = std::env::var_os("TRIBUTARY_TEST_KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/tributary-kube/kubeconfig"));
    assert!(
        path.exists(),
        "no Kubernetes API server for the tests: {} is missing; run scripts/setup-kube.sh \
         (it builds and starts etcd + kube-apiserver on 127.0.0.1:16443) or set \
         TRIBUTARY_TEST_KUBECONFIG",
        path.display()
    );
    path
}

async fn client() -> Client {
    // ring and aws-lc-rs are both compiled into this test: kube's TLS needs one chosen.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let path = kubeconfig();
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let client = Client::try_from(config).unwrap();
    if let Err(e) = client.apiserver_version().await {
        panic!(
            "the Kubernetes API server of {} does not answer ({e}): run scripts/setup-kube.sh",
            path.display()
        );
    }
    client
}

struct Up {
    child: Child,
    addr: String,
    token: String,
    data: PathBuf,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Up {
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(bin())
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

    fn events(&self) -> Vec<Value> {
        let out = Command::new(bin())
            .args(["events", "--json", "--data"])
            .arg(&self.data)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn of_type<'a>(events: &'a [Value], ty: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == ty).collect()
}

fn git(dir: &Path, args: &[&str]) {
    assert!(Command::new("git")
        .args(args)
        .current_dir(dir)
        .status()
        .unwrap()
        .success());
}

async fn wait_until<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Our Pods: request id (annotation) → (Pod name, Pod).
async fn pods(api: &Api<Pod>) -> BTreeMap<String, (String, Pod)> {
    api.list(&ListParams::default().labels("tributary.dev/owner=e2e"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| {
            let id = p
                .metadata
                .annotations
                .as_ref()?
                .get("tributary.dev/request-id")?
                .clone();
            Some((id, (p.metadata.name.clone()?, p)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_the_kubernetes_provider_makes_a_pod_per_requested_agent_and_deletes_it() {
    let client = client().await;
    let dir = tempfile::tempdir().unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let namespace = format!("t-up-{}", nanos % 1_000_000_000_000);
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({ "metadata": { "name": namespace } })).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let api: Api<Pod> = Api::namespaced(client, &namespace);

    std::fs::write(
        dir.path().join("agent-pod.yaml"),
        "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n    - name: agent\n      \
         image: localhost/tributary:e2e\n      command: [tributary, agent]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("pool.toml"),
        format!(
            r#"
budget_per_hour = 100.0
grace_secs = 3
renewal_margin_secs = 1
target_wait_secs = 4
default_job_secs = 2
startup_timeout_secs = 15
drain_settle_secs = 0.5
tick_secs = 0.2
queue_delay_secs = 0

[[kind]]
name = "pod"
capacity = 1
price_per_hour = 3.60
billing = "second"
max_agents = 3

[kubernetes]
template = "agent-pod.yaml"
namespace = "{namespace}"
kubeconfig = "{}"
server = "http://tributary.example:7700"
termination_grace_secs = 5
owner = "e2e"
"#,
            kubeconfig().display()
        ),
    )
    .unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let data = dir.path().join("data");
    let child = Command::new(bin())
        .args(["up", "--agents", "0", "--listen", &addr, "--autoscaler"])
        .arg(dir.path().join("pool.toml"))
        .args(["--autoscaler-provider", "kubernetes", "--data"])
        .arg(&data)
        .env("TRIBUTARY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("server.log")).unwrap())
        .spawn()
        .unwrap();
    let mut up = Up {
        child,
        addr: format!("http://{addr}"),
        token: String::new(),
        data: data.clone(),
    };
    let server_log = dir.path().join("server.log");
    wait_until("the server", 60, || {
        let ok = std::net::TcpStream::connect(&addr).is_ok();
        async move { ok }
    })
    .await;
    up.token = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();

    // A burst of 6 jobs.
    let repo = dir.path().join("burst");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let mut pipeline = String::from("jobs:\n");
    for i in 0..6 {
        pipeline.push_str(&format!("  j{i}:\n    steps:\n      - run: echo {i}\n"));
    }
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
    up.cli(&["project", "add", "burst", "--repo", repo.to_str().unwrap()]);
    let build = up.cli(&["trigger", "burst"]).trim().to_owned();

    // Agents are requested and each gets its Pod, with the request id as the agent's name.
    let mut seen: BTreeMap<String, (String, Pod)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let events = up.events();
        for (id, pod) in pods(&api).await {
            seen.entry(id).or_insert(pod);
        }
        let requested: Vec<&str> = of_type(&events, "agent_requested")
            .iter()
            .map(|e| e["request_id"].as_str().unwrap())
            .collect();
        if requested.len() >= 2 && requested.iter().all(|id| seen.contains_key(*id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for AgentRequested events and their Pods: requested \
             {requested:?}, Pods seen for {:?}",
            seen.keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let events = up.events();
    let requested = of_type(&events, "agent_requested");
    assert!(requested.len() <= 3, "max_agents is 3: {requested:?}");
    for r in &requested {
        assert_eq!(r["provider"], "kubernetes");
        let id = r["request_id"].as_str().unwrap();
        let (name, pod) = &seen[id];
        assert_eq!(name, &format!("e2e-{id}"));
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["tributary.dev/request-id"], id);
        assert_eq!(labels["tributary.dev/agent-kind"], "pod");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.termination_grace_period_seconds, Some(5));
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("localhost/tributary:e2e"));
        assert_eq!(c.args.as_ref().unwrap(), &["--name", id, "--capacity", "1"]);
        let env: BTreeMap<&str, Option<&str>> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_deref()))
            .collect();
        assert_eq!(
            env["TRIBUTARY_SERVER"],
            Some("http://tributary.example:7700")
        );
        assert_eq!(env["TRIBUTARY_ENROLLMENT_TOKEN"], Some(up.token.as_str()));
    }
    // AgentProvisioned names each Pod.
    wait_until("AgentProvisioned for every request", 60, || {
        let events = up.events();
        let ok = of_type(&events, "agent_requested").iter().all(|r| {
            of_type(&events, "agent_provisioned").iter().any(|p| {
                p["request_id"] == r["request_id"]
                    && p["machine"]
                        == format!("{namespace}/e2e-{}", r["request_id"].as_str().unwrap()).as_str()
            })
        });
        async move { ok }
    })
    .await;

    // No kubelet: the agents never connect; after startup_timeout_secs they are released and
    // their Pods deleted.
    wait_until("a release for a Pod that never connected", 120, || {
        let events = up.events();
        let ok = of_type(&events, "agent_released").iter().any(|e| {
            e["reason"]
                .as_str()
                .unwrap_or("")
                .contains("did not connect")
        });
        async move { ok }
    })
    .await;
    // Jobs still wait, so the autoscaler would try again: cancel the build, then the pool
    // returns to zero and every Pod is gone.
    up.cli(&["cancel", &build]);
    wait_until(
        "every requested agent released and its Pod deleted",
        120,
        || {
            let events = up.events();
            let api = api.clone();
            async move {
                let requested = of_type(&events, "agent_requested").len();
                let released = of_type(&events, "agent_released").len();
                requested == released && pods(&api).await.is_empty()
            }
        },
    )
    .await;
    let log = std::fs::read_to_string(&server_log).unwrap_or_default();
    assert!(
        !log.contains("could not release"),
        "a release failed: {log}"
    );
}
