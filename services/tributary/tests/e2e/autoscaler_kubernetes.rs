//! The autoscaler's `kubernetes` provider end to end: a real `tributary up --autoscaler FILE
//! --autoscaler-provider kubernetes` against a real kube-apiserver (scripts/setup-kube.sh: etcd
//! and kube-apiserver, no kubelet). A burst of jobs makes it request agents, one Pod each, made
//! from the template and labelled with the request id; no kubelet runs them, so they never
//! connect: after startup_timeout_secs they are released and their Pods deleted.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{of_type, wait_for_async, wait_until_async};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use tributary_autoscaler::config::KubernetesConfig;
use tributary_autoscaler::provider::kubernetes::cluster_client;

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
    tributary_testkit::require!(Kube);
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
            tributary_testkit::kubeconfig().display()
        ),
    )
    .unwrap();

    let pool = dir.path().join("pool.toml");
    let s = common::start_with(&[
        "--agents",
        "0",
        "--autoscaler",
        pool.to_str().unwrap(),
        "--autoscaler-provider",
        "kubernetes",
    ]);

    // A burst of 6 jobs.
    let mut pipeline = String::from("jobs:\n");
    for i in 0..6 {
        pipeline.push_str(&format!("  j{i}:\n    steps:\n      - run: echo {i}\n"));
    }
    s.project("burst", &pipeline);
    let build = s.trigger("burst");

    // Agents are requested and each gets its Pod, with the request id as the agent's name.
    let mut seen: BTreeMap<String, (String, Pod)> = BTreeMap::new();
    wait_for_async(
        "AgentRequested events and their Pods",
        Duration::from_secs(120),
        async || {
            let events = s.events(None);
            for (id, pod) in pods(&api).await {
                seen.entry(id).or_insert(pod);
            }
            let requested: Vec<&str> = of_type(&events, "agent_requested")
                .iter()
                .map(|e| e["request_id"].as_str().unwrap())
                .collect();
            if requested.len() >= 2 && requested.iter().all(|id| seen.contains_key(*id)) {
                Ok(())
            } else {
                Err(format!(
                    "requested {requested:?}, Pods seen for {:?}",
                    seen.keys().collect::<Vec<_>>()
                ))
            }
        },
    )
    .await;
    let events = s.events(None);
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
        assert_eq!(env["TRIBUTARY_ENROLLMENT_TOKEN"], Some(s.token.as_str()));
    }
    // AgentProvisioned names each Pod.
    wait_until_async(
        "AgentProvisioned for every request",
        Duration::from_secs(60),
        async || {
            let events = s.events(None);
            of_type(&events, "agent_requested").iter().all(|r| {
                of_type(&events, "agent_provisioned").iter().any(|p| {
                    p["request_id"] == r["request_id"]
                        && p["machine"]
                            == format!("{namespace}/e2e-{}", r["request_id"].as_str().unwrap())
                                .as_str()
                })
            })
        },
    )
    .await;

    // No kubelet: the agents never connect; after startup_timeout_secs they are released and
    // their Pods deleted.
    wait_until_async(
        "a release for a Pod that never connected",
        Duration::from_secs(120),
        async || {
            let events = s.events(None);
            of_type(&events, "agent_released").iter().any(|e| {
                e["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("did not connect")
            })
        },
    )
    .await;
    // Jobs still wait, so the autoscaler would try again: cancel the build, then the pool
    // returns to zero and every Pod is gone.
    s.admin(&["cancel", &build]);
    wait_until_async(
        "every requested agent released and its Pod deleted",
        Duration::from_secs(120),
        async || {
            let events = s.events(None);
            let requested = of_type(&events, "agent_requested").len();
            let released = of_type(&events, "agent_released").len();
            requested == released && pods(&api).await.is_empty()
        },
    )
    .await;
    let log = s.log();
    assert!(
        !log.contains("could not release"),
        "a release failed: {log}"
    );
}
