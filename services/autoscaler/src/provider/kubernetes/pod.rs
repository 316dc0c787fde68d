//! The agent Pod, made from the user's template: pure functions, no I/O.
//!
//! [`Template::parse`] reads a YAML Pod (`apiVersion: v1`, `kind: Pod`) and finds the agent's
//! container (the one named `agent`, else the first). [`agent_pod`] makes the Pod of one
//! request from it:
//!
//! * name `<owner>-<request id>` (made a valid DNS label), in the configured namespace;
//! * labels `tributary.dev/owner`, `tributary.dev/request-id`, `tributary.dev/agent-kind`,
//!   `app.kubernetes.io/managed-by=tributary-autoscaler` added to the template's, and the exact
//!   request id in the `tributary.dev/request-id` annotation;
//! * the agent container's args get `--name <request id> --capacity N [--labels A,B]` appended
//!   (the template's `command`/`args` start `tributary agent`);
//! * its env gets `TRIBUTARY_SERVER` and `TRIBUTARY_ENROLLMENT_TOKEN` unless the template sets
//!   them (set the token from a Secret there: `valueFrom.secretKeyRef`), and always
//!   `TRIBUTARY_REQUEST_ID` and `TRIBUTARY_AGENT_KIND`;
//! * `terminationGracePeriodSeconds` from the configuration (else the template's, else 60):
//!   the agent drains on SIGTERM; `restartPolicy` `Never` unless the template says otherwise
//!   (a drained agent exits and must not come back).
//!
//! [`owned_request`] and [`sort_out`] decide, at start, which Pods labelled as ours the log
//! still knows (adopted) and which it does not (deleted).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{EnvVar, Pod};

use crate::provider::AgentRequest;

pub const OWNER_LABEL: &str = "tributary.dev/owner";
pub const REQUEST_LABEL: &str = "tributary.dev/request-id";
pub const KIND_LABEL: &str = "tributary.dev/agent-kind";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "tributary-autoscaler";
/// The exact request id (a label value may have had to be shortened).
pub const REQUEST_ANNOTATION: &str = "tributary.dev/request-id";
/// The container that runs `tributary agent`, when the template has several.
pub const AGENT_CONTAINER: &str = "agent";
pub const DEFAULT_GRACE_SECS: i64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{path}: not a Pod template: {message}; write a YAML Pod (apiVersion: v1, kind: Pod) whose container runs `tributary agent`")]
    Yaml { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// A parsed Pod template.
#[derive(Clone, Debug)]
pub struct Template {
    pod: Pod,
    /// Index of the agent's container.
    agent: usize,
}

impl Template {
    /// Parses the template's text; `path` names the file in errors.
    pub fn parse(text: &str, path: &str) -> Result<Template, TemplateError> {
        let pod: Pod = serde_saphyr::from_str(text).map_err(|e| {
            // The first line says where and what; the rest is a source snippet.
            let full = e.to_string();
            let first = full.lines().next().unwrap_or_default();
            TemplateError::Yaml {
                path: path.to_owned(),
                message: first.trim_start_matches("error: ").to_owned(),
            }
        })?;
        let invalid = |message: String| TemplateError::Invalid {
            path: path.to_owned(),
            message,
        };
        let Some(spec) = &pod.spec else {
            return Err(invalid(
                "the Pod has no spec: add `spec.containers` with the agent's container".into(),
            ));
        };
        if spec.containers.is_empty() {
            return Err(invalid(
                "spec.containers is empty: add the agent's container (image, and `command` or \
                 `args` starting `tributary agent`)"
                    .into(),
            ));
        }
        let agent = spec
            .containers
            .iter()
            .position(|c| c.name == AGENT_CONTAINER)
            .unwrap_or(0);
        let container = &spec.containers[agent];
        if container.image.as_deref().unwrap_or("").trim().is_empty() {
            return Err(invalid(format!(
                "container {:?} has no image: set the image that holds `tributary`",
                container.name
            )));
        }
        if let Some(grace) = spec.termination_grace_period_seconds {
            if grace < 0 {
                return Err(invalid(format!(
                    "terminationGracePeriodSeconds is {grace}: use 0 or more seconds"
                )));
            }
        }
        Ok(Template { pod, agent })
    }

    /// The name of the agent's container.
    pub fn agent_container(&self) -> &str {
        self.pod
            .spec
            .as_ref()
            .map(|s| s.containers[self.agent].name.as_str())
            .unwrap_or_default()
    }
}

/// What the Pods share beyond the template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSettings {
    pub namespace: String,
    /// The `tributary.dev/owner` label's value.
    pub owner: String,
    /// TRIBUTARY_SERVER, unless the template sets it.
    pub server: String,
    /// TRIBUTARY_ENROLLMENT_TOKEN, unless the template sets it.
    pub token: String,
    /// terminationGracePeriodSeconds (None: the template's, else [`DEFAULT_GRACE_SECS`]).
    pub termination_grace_secs: Option<i64>,
}

/// Is `v` a valid label value (at most 63 characters, alphanumerics, `-`, `_`, `.`, starting
/// and ending alphanumeric)?
pub fn is_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && v.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && v.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// A label value for `s`: itself when valid, else shortened and cleaned (the annotation keeps
/// the exact value).
fn label_value(s: &str) -> String {
    if is_label_value(s) {
        return s.to_owned();
    }
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cut: String = cleaned.chars().take(54).collect();
    let cut = cut.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{cut}-{:08x}", fnv1a(s))
}

/// FNV-1a: a short, stable suffix that keeps shortened names distinct.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The Pod's name for a request: `<owner>-<request id>` as a DNS label (lowercase
/// alphanumerics and `-`, at most 63), with a hash suffix when it had to be changed.
pub fn pod_name(owner: &str, request_id: &str) -> String {
    let raw = format!("{owner}-{request_id}");
    let valid = raw.len() <= 63
        && raw
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !raw.starts_with('-')
        && !raw.ends_with('-');
    if valid {
        return raw;
    }
    let cleaned: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(54)
        .collect();
    let cleaned = cleaned.trim_matches('-');
    format!("{cleaned}-{:08x}", fnv1a(&raw))
}

fn set_env(env: &mut Vec<EnvVar>, name: &str, value: &str, keep_template: bool) {
    match env.iter_mut().find(|e| e.name == name) {
        Some(_) if keep_template => {}
        Some(e) => {
            e.value = Some(value.to_owned());
            e.value_from = None;
        }
        None => env.push(EnvVar {
            name: name.to_owned(),
            value: Some(value.to_owned()),
            value_from: None,
        }),
    }
}

/// The Pod that runs the agent of `request`.
pub fn agent_pod(template: &Template, request: &AgentRequest, settings: &PodSettings) -> Pod {
    let mut pod = template.pod.clone();
    let meta = &mut pod.metadata;
    meta.name = Some(pod_name(&settings.owner, &request.id));
    meta.generate_name = None;
    meta.namespace = Some(settings.namespace.clone());
    meta.resource_version = None;
    meta.uid = None;
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(OWNER_LABEL.into(), settings.owner.clone());
    labels.insert(REQUEST_LABEL.into(), label_value(&request.id));
    labels.insert(KIND_LABEL.into(), label_value(&request.kind));
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(REQUEST_ANNOTATION.into(), request.id.clone());

    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.termination_grace_period_seconds = Some(
        settings
            .termination_grace_secs
            .or(spec.termination_grace_period_seconds)
            .unwrap_or(DEFAULT_GRACE_SECS),
    );
    if spec.restart_policy.is_none() {
        spec.restart_policy = Some("Never".into());
    }
    let container = &mut spec.containers[template.agent];
    let args = container.args.get_or_insert_with(Vec::new);
    args.extend([
        "--name".to_owned(),
        request.id.clone(),
        "--capacity".to_owned(),
        request.capacity.max(1).to_string(),
    ]);
    if !request.labels.is_empty() {
        args.extend(["--labels".to_owned(), request.labels.join(",")]);
    }
    let env = container.env.get_or_insert_with(Vec::new);
    set_env(env, "TRIBUTARY_SERVER", &settings.server, true);
    set_env(env, "TRIBUTARY_ENROLLMENT_TOKEN", &settings.token, true);
    set_env(env, "TRIBUTARY_REQUEST_ID", &request.id, false);
    set_env(env, "TRIBUTARY_AGENT_KIND", &request.kind, false);
    pod
}

/// Does the template set the enrollment token itself (e.g. from a Secret)?
pub fn template_sets_token(template: &Template) -> bool {
    template.pod.spec.as_ref().is_some_and(|s| {
        s.containers[template.agent]
            .env
            .as_ref()
            .is_some_and(|env| env.iter().any(|e| e.name == "TRIBUTARY_ENROLLMENT_TOKEN"))
    })
}

/// The request id of a Pod carrying `owner`'s label (None: not ours, or no request id).
pub fn owned_request(pod: &Pod, owner: &str) -> Option<String> {
    let meta = &pod.metadata;
    let labels = meta.labels.as_ref()?;
    if labels.get(OWNER_LABEL).map(String::as_str) != Some(owner)
        || labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY)
    {
        return None;
    }
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(REQUEST_ANNOTATION))
        .or_else(|| labels.get(REQUEST_LABEL))
        .cloned()
}

/// At start: which of our Pods (name, request id) the log knows as live (adopt) and which it
/// does not (delete).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SortedOut {
    /// (request id, Pod name)
    pub adopt: Vec<(String, String)>,
    /// (request id, Pod name)
    pub delete: Vec<(String, String)>,
}

pub fn sort_out(pods: &[(String, String)], live: &BTreeSet<String>) -> SortedOut {
    let mut out = SortedOut::default();
    for (name, request) in pods {
        let entry = (request.clone(), name.clone());
        if live.contains(request) {
            out.adopt.push(entry);
        } else {
            out.delete.push(entry);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  labels:
    team: ci
spec:
  containers:
    - name: sidecar
      image: busybox
    - name: agent
      image: registry.example/tributary:1
      args: ["agent", "--workdir", "/work"]
      env:
        - name: TRIBUTARY_ENROLLMENT_TOKEN
          valueFrom:
            secretKeyRef: { name: tributary-enrollment, key: token }
"#;

    fn settings() -> PodSettings {
        PodSettings {
            namespace: "ci".into(),
            owner: "tributary".into(),
            server: "http://tributary.ci.svc:7700".into(),
            token: "plain-token".into(),
            termination_grace_secs: Some(900),
        }
    }

    fn request() -> AgentRequest {
        AgentRequest {
            id: "as-big_GPU-7".into(),
            kind: "big_GPU".into(),
            labels: vec!["gpu".into(), "linux".into()],
            capacity: 2,
        }
    }

    fn env<'a>(pod: &'a Pod, name: &str) -> &'a EnvVar {
        let c = &pod.spec.as_ref().unwrap().containers[1];
        c.env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn the_pod_is_the_template_plus_the_request() {
        let t = Template::parse(TEMPLATE, "agent-pod.yaml").unwrap();
        assert_eq!(t.agent_container(), "agent");
        assert!(template_sets_token(&t));
        let pod = agent_pod(&t, &request(), &settings());
        let name = pod.metadata.name.clone().unwrap();
        assert!(name.starts_with("tributary-as-big-gpu-7-"), "{name}");
        assert!(name.len() <= 63);
        assert_eq!(pod.metadata.namespace.as_deref(), Some("ci"));
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "ci");
        assert_eq!(labels[OWNER_LABEL], "tributary");
        assert_eq!(labels[REQUEST_LABEL], "as-big_GPU-7");
        assert_eq!(labels[KIND_LABEL], "big_GPU");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()[REQUEST_ANNOTATION],
            "as-big_GPU-7"
        );
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.termination_grace_period_seconds, Some(900));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        // The sidecar is untouched.
        assert!(spec.containers[0].args.is_none());
        assert!(spec.containers[0].env.is_none());
        let agent = &spec.containers[1];
        assert_eq!(
            agent.args.as_ref().unwrap(),
            &[
                "agent",
                "--workdir",
                "/work",
                "--name",
                "as-big_GPU-7",
                "--capacity",
                "2",
                "--labels",
                "gpu,linux"
            ]
        );
        // The template's Secret reference wins over the plain token.
        let token = env(&pod, "TRIBUTARY_ENROLLMENT_TOKEN");
        assert_eq!(token.value, None);
        assert_eq!(
            token
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name,
            "tributary-enrollment"
        );
        assert_eq!(
            env(&pod, "TRIBUTARY_SERVER").value.as_deref(),
            Some("http://tributary.ci.svc:7700")
        );
        assert_eq!(
            env(&pod, "TRIBUTARY_REQUEST_ID").value.as_deref(),
            Some("as-big_GPU-7")
        );
        assert_eq!(
            owned_request(&pod, "tributary").as_deref(),
            Some("as-big_GPU-7")
        );
        assert_eq!(owned_request(&pod, "someone-else"), None);
    }

    #[test]
    fn without_a_secret_reference_the_token_is_set_and_the_template_grace_is_kept() {
        let text = "apiVersion: v1\nkind: Pod\nspec:\n  terminationGracePeriodSeconds: 30\n  \
                    restartPolicy: OnFailure\n  containers:\n    - name: main\n      image: t:1\n      \
                    command: [tributary, agent]\n";
        let t = Template::parse(text, "p.yaml").unwrap();
        assert_eq!(t.agent_container(), "main");
        assert!(!template_sets_token(&t));
        let s = PodSettings {
            termination_grace_secs: None,
            ..settings()
        };
        let r = AgentRequest {
            id: "as-local-0".into(),
            kind: "local".into(),
            labels: vec![],
            capacity: 0,
        };
        let pod = agent_pod(&t, &r, &s);
        assert_eq!(pod.metadata.name.as_deref(), Some("tributary-as-local-0"));
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.termination_grace_period_seconds, Some(30));
        assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
        let c = &spec.containers[0];
        assert_eq!(
            c.args.as_ref().unwrap(),
            &["--name", "as-local-0", "--capacity", "1"]
        );
        let token = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "TRIBUTARY_ENROLLMENT_TOKEN")
            .unwrap();
        assert_eq!(token.value.as_deref(), Some("plain-token"));
    }

    #[test]
    fn a_bad_template_says_which_file_and_what_to_fix() {
        let e = Template::parse(
            "apiVersion: v1\nkind: Pod\nspec:\n  containers: []\n",
            "t.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("t.yaml: spec.containers is empty"), "{e}");
        let e = Template::parse(
            "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n    - name: agent\n",
            "t.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("has no image"), "{e}");
        let e = Template::parse("apiVersion: v1\nkind: Service\nspec: {}\n", "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.yaml: not a Pod template"), "{e}");
        let e = Template::parse(
            "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n    - name: agent\n      image: [x\n",
            "t.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("t.yaml: not a Pod template: line 6 column"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn the_shipped_example_template_and_pool_parse() {
        let t = Template::parse(
            include_str!("../../../../../deploy/kubernetes/autoscaler/agent-pod.yaml"),
            "deploy/kubernetes/autoscaler/agent-pod.yaml",
        )
        .unwrap();
        assert_eq!(t.agent_container(), "agent");
        assert!(template_sets_token(&t));
        let c = crate::Config::from_toml(
            include_str!("../../../../../deploy/kubernetes/autoscaler/autoscaler.toml"),
            "deploy/kubernetes/autoscaler/autoscaler.toml",
        )
        .unwrap();
        let k = c.kubernetes.unwrap();
        assert_eq!(k.template, std::path::Path::new("agent-pod.yaml"));
        assert_eq!(k.namespace.as_deref(), Some("tributary"));
    }

    #[test]
    fn names_and_label_values_are_valid_and_distinct() {
        assert_eq!(pod_name("tributary", "as-small-3"), "tributary-as-small-3");
        let a = pod_name("tributary", "as-A-1");
        let b = pod_name("tributary", "as-a-1");
        assert_ne!(a, b);
        let long = "k".repeat(100);
        for name in [a, b, pod_name("tributary", &format!("as-{long}-1"))] {
            assert!(name.len() <= 63, "{name}");
            assert!(name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        }
        let v = label_value(&format!("as-{long}-1"));
        assert!(is_label_value(&v), "{v}");
        assert!(is_label_value("as-gpu-1"));
        assert!(!is_label_value("-x"));
    }

    #[test]
    fn start_adopts_what_the_log_knows_and_deletes_the_rest() {
        let pods = vec![
            ("tributary-as-a-1".to_owned(), "as-a-1".to_owned()),
            ("tributary-as-a-2".to_owned(), "as-a-2".to_owned()),
        ];
        let live: BTreeSet<String> = ["as-a-2".to_owned(), "as-a-9".to_owned()].into();
        let out = sort_out(&pods, &live);
        assert_eq!(
            out.adopt,
            vec![("as-a-2".to_owned(), "tributary-as-a-2".to_owned())]
        );
        assert_eq!(
            out.delete,
            vec![("as-a-1".to_owned(), "tributary-as-a-1".to_owned())]
        );
    }
}
