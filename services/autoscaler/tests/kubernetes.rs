//! The `kubernetes` provider against a real kube-apiserver (with etcd; no kubelet, so Pods stay
//! Pending): `scripts/setup-kube.sh` builds and starts it and writes its kubeconfig. Each test
//! works in a namespace of its own.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tributary_autoscaler::config::KubernetesConfig;
use tributary_autoscaler::provider::kubernetes::pod::{
    KIND_LABEL, MANAGED_BY, MANAGED_BY_LABEL, OWNER_LABEL, REQUEST_ANNOTATION, REQUEST_LABEL,
};
use tributary_autoscaler::provider::kubernetes::{cluster_client, KubernetesProvider};
use tributary_autoscaler::provider::{AgentHandle, AgentRequest, Provider};
use tributary_autoscaler::{Config, Decision};
use tributary_eventlog::EventLog;
use tributary_proto::events::envelope::Payload;

const TEMPLATE: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  labels:
    team: ci
spec:
  containers:
    - name: agent
      image: localhost/tributary-agent:test
      command: ["tributary", "agent"]
      args: ["--workdir", "/work"]
      env:
        - name: TRIBUTARY_ENROLLMENT_TOKEN
          valueFrom:
            secretKeyRef:
              name: tributary-enrollment
              key: token
"#;

async fn client() -> Client {
    let path = tributary_testkit::kubeconfig();
    let config = KubernetesConfig {
        kubeconfig: Some(path.clone()),
        ..KubernetesConfig::default()
    };
    let (client, _) = cluster_client(&config).await.unwrap();
    if let Err(e) = client.apiserver_version().await {
        panic!(
            "the Kubernetes API server of {} does not answer ({e}): run scripts/setup-kube.sh",
            path.display()
        );
    }
    client
}

/// A fresh namespace (left behind: without a controller manager a deleted namespace never
/// finishes terminating; the test server's etcd is scratch).
async fn namespace(client: &Client, test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let name = format!("t-{test}-{}", nanos % 1_000_000_000_000);
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({ "metadata": { "name": name } })).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    name
}

struct Fixture {
    dir: tempfile::TempDir,
    namespace: String,
    pods: Api<Pod>,
}

impl Fixture {
    async fn new(test: &str) -> Fixture {
        let client = client().await;
        let namespace = namespace(&client, test).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agent-pod.yaml"), TEMPLATE).unwrap();
        Fixture {
            dir,
            pods: Api::namespaced(client, &namespace),
            namespace,
        }
    }

    fn config(&self, owner: Option<&str>) -> KubernetesConfig {
        KubernetesConfig {
            template: "agent-pod.yaml".into(),
            namespace: Some(self.namespace.clone()),
            kubeconfig: Some(tributary_testkit::kubeconfig()),
            context: None,
            termination_grace_secs: Some(45),
            server: Some("http://tributary.ci.svc:7700".into()),
            owner: owner.map(str::to_owned),
        }
    }

    async fn provider(&self, owner: Option<&str>) -> KubernetesProvider {
        KubernetesProvider::connect(
            &self.config(owner),
            self.dir.path(),
            "http://127.0.0.1:7700".into(),
            "plain-token".into(),
        )
        .await
        .unwrap()
    }

    async fn names(&self) -> BTreeSet<String> {
        self.pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect()
    }
}

fn request(id: &str) -> AgentRequest {
    AgentRequest {
        id: id.into(),
        kind: "linux".into(),
        labels: vec!["linux".into(), "big".into()],
        capacity: 3,
    }
}

fn handle(id: &str, machine: &str) -> AgentHandle {
    AgentHandle {
        id: id.into(),
        agent_id: String::new(),
        kind: "linux".into(),
        machine: machine.into(),
    }
}

#[tokio::test]
async fn acquire_creates_the_agent_pod_from_the_template_and_release_deletes_it() {
    tributary_testkit::require!(Kube);
    let f = Fixture::new("acquire").await;
    let p = f.provider(None).await;
    assert_eq!(p.name(), "kubernetes");

    let machine = p.acquire(&request("as-linux-1")).await.unwrap();
    assert_eq!(machine, format!("{}/tributary-as-linux-1", f.namespace));

    // What the API server stored.
    let pod = f.pods.get("tributary-as-linux-1").await.unwrap();
    let labels = pod.metadata.labels.as_ref().unwrap();
    assert_eq!(labels[OWNER_LABEL], "tributary");
    assert_eq!(labels[REQUEST_LABEL], "as-linux-1");
    assert_eq!(labels[KIND_LABEL], "linux");
    assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
    assert_eq!(labels["team"], "ci");
    assert_eq!(
        pod.metadata.annotations.as_ref().unwrap()[REQUEST_ANNOTATION],
        "as-linux-1"
    );
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.termination_grace_period_seconds, Some(45));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let c = &spec.containers[0];
    assert_eq!(c.image.as_deref(), Some("localhost/tributary-agent:test"));
    assert_eq!(c.command.as_ref().unwrap(), &["tributary", "agent"]);
    assert_eq!(
        c.args.as_ref().unwrap(),
        &[
            "--workdir",
            "/work",
            "--name",
            "as-linux-1",
            "--capacity",
            "3",
            "--labels",
            "linux,big"
        ]
    );
    let env = c.env.as_ref().unwrap();
    let var = |name: &str| env.iter().find(|e| e.name == name).unwrap().clone();
    assert_eq!(
        var("TRIBUTARY_SERVER").value.as_deref(),
        Some("http://tributary.ci.svc:7700")
    );
    let token = var("TRIBUTARY_ENROLLMENT_TOKEN");
    assert_eq!(token.value, None, "the Secret reference is kept");
    let secret = token.value_from.unwrap().secret_key_ref.unwrap();
    assert_eq!(
        (secret.name.as_str(), secret.key.as_str()),
        ("tributary-enrollment", "token")
    );
    assert_eq!(
        var("TRIBUTARY_REQUEST_ID").value.as_deref(),
        Some("as-linux-1")
    );
    assert_eq!(var("TRIBUTARY_AGENT_KIND").value.as_deref(), Some("linux"));
    // No kubelet: the Pod waits to be scheduled.
    assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Pending"));

    // Acquire again (a retry after a crash before AgentProvisioned): the same Pod is taken.
    assert_eq!(p.acquire(&request("as-linux-1")).await.unwrap(), machine);
    // A second request is a second Pod.
    let second = p.acquire(&request("as-linux-2")).await.unwrap();
    assert_eq!(
        f.names().await,
        BTreeSet::from(["tributary-as-linux-1".into(), "tributary-as-linux-2".into()])
    );

    p.drain(&handle("as-linux-1", &machine)).await.unwrap();
    p.release(&handle("as-linux-1", &machine)).await.unwrap();
    assert_eq!(
        f.names().await,
        BTreeSet::from(["tributary-as-linux-2".into()])
    );
    // Releasing what is gone is fine; a handle without a machine finds the Pod by request id.
    p.release(&handle("as-linux-1", &machine)).await.unwrap();
    p.release(&handle("as-linux-2", "")).await.unwrap();
    assert!(f.names().await.is_empty(), "{second} was not deleted");
}

#[tokio::test]
async fn a_pod_of_another_owner_with_the_same_name_is_an_error_not_adopted() {
    tributary_testkit::require!(Kube);
    let f = Fixture::new("clash").await;
    let other = f.provider(None).await;
    // A Pod with the name this request's would have, that is not ours.
    let mut pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "tributary-as-linux-1", "labels": { "app": "something-else" } },
        "spec": { "containers": [ { "name": "x", "image": "x" } ] }
    }))
    .unwrap();
    pod.metadata.namespace = Some(f.namespace.clone());
    f.pods.create(&PostParams::default(), &pod).await.unwrap();
    let e = other
        .acquire(&request("as-linux-1"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("exists and is not this request's"), "{e}");
}

#[tokio::test]
async fn at_start_pods_the_log_does_not_know_are_deleted_and_the_others_adopted() {
    tributary_testkit::require!(Kube);
    let f = Fixture::new("recover").await;
    let p = f.provider(Some("ci-a")).await;
    let other_owner = f.provider(Some("ci-b")).await;
    for id in ["as-linux-1", "as-linux-2", "as-linux-3"] {
        p.acquire(&request(id)).await.unwrap();
    }
    other_owner.acquire(&request("as-linux-1")).await.unwrap();
    // A Pod nobody labelled.
    let foreign: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "unrelated", "namespace": f.namespace },
        "spec": { "containers": [ { "name": "x", "image": "x" } ] }
    }))
    .unwrap();
    f.pods
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();

    let live: BTreeSet<String> = ["as-linux-2".into(), "as-linux-9".into()].into();
    let r = p.recover(&live).await.unwrap();
    assert_eq!(
        r.adopted,
        vec![(
            "as-linux-2".into(),
            format!("{}/ci-a-as-linux-2", f.namespace)
        )]
    );
    let deleted: BTreeSet<String> = r.deleted.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(
        deleted,
        BTreeSet::from(["as-linux-1".into(), "as-linux-3".into()])
    );
    assert_eq!(
        f.names().await,
        BTreeSet::from([
            "ci-a-as-linux-2".into(),
            "ci-b-as-linux-1".into(),
            "unrelated".into()
        ])
    );
}

/// The service at start: with a request on the log whose AgentProvisioned is missing and a
/// Pod the log never heard of, it adopts the first (recording AgentProvisioned) and deletes
/// the second before deciding anything.
#[tokio::test]
async fn the_service_recovers_pods_at_start() {
    tributary_testkit::require!(Kube);
    let f = Fixture::new("service").await;
    let p = Arc::new(f.provider(None).await);
    p.acquire(&request("as-linux-1")).await.unwrap();
    p.acquire(&request("as-linux-7")).await.unwrap();

    let log = tributary_eventlog::sqlite::SqliteLog::open(&f.dir.path().join("events.db"))
        .await
        .unwrap();
    let log: Arc<dyn EventLog> = Arc::new(log);
    let acquire = Decision::Acquire {
        kind: "linux".into(),
        ids: vec!["as-linux-1".into()],
        labels: vec!["linux".into(), "big".into()],
        capacity: 3,
        price_per_hour_micros: 1_000_000,
        billing_granularity_secs: 1,
        reason: "test".into(),
        cost_micros: 1,
    };
    log.append(&tributary_autoscaler::events::envelopes(
        &acquire,
        "kubernetes",
        tributary_proto::now_us(),
    ))
    .await
    .unwrap();

    let config = Config::from_toml(
        "budget_per_hour = 10\nstartup_timeout_secs = 3600\n[[kind]]\nname = \"linux\"\n\
         labels = [\"linux\", \"big\"]\nprice_per_hour = 1\nmax_agents = 2\n",
        "pool.toml",
    )
    .unwrap();
    let stop = CancellationToken::new();
    let service = tokio::spawn(tributary_autoscaler::service::run(
        log.clone(),
        config,
        p.clone(),
        tributary_autoscaler::service::Replicas::Alone,
        stop.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    let provisioned = loop {
        let records = log.read(0, 1000).await.unwrap();
        let found: Vec<_> = records
            .iter()
            .filter_map(|r| match r.decode().ok()?.payload? {
                Payload::AgentProvisioned(e) => Some(e),
                _ => None,
            })
            .collect();
        if !found.is_empty() {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no AgentProvisioned for the adopted Pod"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(provisioned.len(), 1);
    assert_eq!(provisioned[0].request_id, "as-linux-1");
    assert_eq!(
        provisioned[0].machine,
        format!("{}/tributary-as-linux-1", f.namespace)
    );
    // Recovery runs before the first decision, so by now the unknown Pod is gone.
    assert_eq!(
        f.names().await,
        BTreeSet::from(["tributary-as-linux-1".into()])
    );
    stop.cancel();
    service.await.unwrap().unwrap();
    // Stopping leaves the Pods to the next start (their agents keep working).
    assert_eq!(
        f.names().await,
        BTreeSet::from(["tributary-as-linux-1".into()])
    );
}
