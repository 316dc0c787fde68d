//! `deploy/`: the Dockerfile, the compose file and the Kubernetes manifests parse, and every
//! `tributary` command, flag and `TRIBUTARY_*` variable they use exists in this binary (checked
//! against its `--help`), so the manifests cannot drift from the CLI unnoticed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

/// One `tributary ...` invocation found in a manifest.
#[derive(Debug)]
struct Invocation {
    source: String,
    args: Vec<String>,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn load_yaml(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

/// `map[key]`, looking through compose's `<<` merge keys too.
fn get<'a>(map: &'a Yaml, key: &str) -> Option<&'a Yaml> {
    let hash = map.as_hash()?;
    if let Some(v) = hash.get(&Yaml::String(key.to_owned())) {
        return Some(v);
    }
    match hash.get(&Yaml::String("<<".to_owned())) {
        Some(Yaml::Array(parents)) => parents.iter().find_map(|p| get(p, key)),
        Some(parent) => get(parent, key),
        None => None,
    }
}

fn strings(value: &Yaml) -> Vec<String> {
    match value {
        Yaml::Array(items) => items
            .iter()
            .filter_map(|i| match i {
                Yaml::String(s) => Some(s.clone()),
                Yaml::Integer(n) => Some(n.to_string()),
                _ => None,
            })
            .collect(),
        Yaml::String(s) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// Every `tributary WORDS...` inside a shell script line.
fn invocations_in_shell(source: &str, script: &str) -> Vec<Invocation> {
    let mut found = Vec::new();
    for (i, _) in script.match_indices("tributary ") {
        // Only the program name: not `localhost/tributary:latest`, `/var/lib/tributary/...`.
        let before = script[..i].chars().last();
        if matches!(before, Some(c) if !c.is_whitespace()) {
            continue;
        }
        let rest = &script[i + "tributary ".len()..];
        let end = rest.find([';', '&', '|', '\n']).unwrap_or(rest.len());
        let args: Vec<String> = rest[..end].split_whitespace().map(str::to_owned).collect();
        // A subcommand follows the program name (not `chown tributary /dir`).
        if args
            .first()
            .is_some_and(|a| a.starts_with(|c: char| c.is_ascii_lowercase()))
        {
            found.push(Invocation {
                source: source.to_owned(),
                args,
            });
        }
    }
    found
}

fn keys_named_tributary(map: &Yaml, into: &mut BTreeSet<String>) {
    if let Some(hash) = map.as_hash() {
        for (k, _) in hash {
            if let Some(k) = k.as_str() {
                if k.starts_with("TRIBUTARY_") {
                    into.insert(k.to_owned());
                }
            }
        }
    }
}

fn compose() -> (Vec<Invocation>, BTreeSet<String>) {
    let path = deploy_dir().join("compose.yml");
    let docs = load_yaml(&path);
    let services = get(&docs[0], "services")
        .and_then(Yaml::as_hash)
        .expect("compose.yml has services");
    let mut invocations = Vec::new();
    let mut env = BTreeSet::new();
    for (name, service) in services {
        let name = name.as_str().unwrap_or("?");
        let source = format!("compose.yml service {name}");
        if let Some(e) = get(service, "environment") {
            keys_named_tributary(e, &mut env);
        }
        let image = get(service, "image").and_then(Yaml::as_str).unwrap_or("");
        if !image.contains("tributary") {
            continue;
        }
        let command = get(service, "command").map(strings).unwrap_or_default();
        let entrypoint = get(service, "entrypoint").map(strings).unwrap_or_default();
        if entrypoint.is_empty() {
            assert!(!command.is_empty(), "{source}: no command");
            invocations.push(Invocation {
                source,
                args: command,
            });
        } else {
            for script in command {
                invocations.extend(invocations_in_shell(&source, &script));
            }
        }
    }
    (invocations, env)
}

fn kubernetes() -> (Vec<Invocation>, BTreeSet<String>) {
    let dir = deploy_dir().join("kubernetes");
    let mut invocations = Vec::new();
    let mut env = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    // The base and the autoscaler's overlay (kubernetes/autoscaler/).
    let mut files: Vec<_> = ["", "autoscaler"]
        .iter()
        .flat_map(|sub| {
            std::fs::read_dir(dir.join(sub))
                .unwrap_or_else(|e| panic!("deploy/kubernetes/{sub}: {e}"))
                .map(|e| e.expect("directory entry").path())
        })
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for path in files {
        let file = path
            .strip_prefix(&dir)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        for doc in load_yaml(&path) {
            let kind = get(&doc, "kind").and_then(Yaml::as_str).unwrap_or("");
            if kind.is_empty() {
                continue;
            }
            kinds.insert(kind.to_owned());
            if kind == "ConfigMap" {
                if let Some(data) = get(&doc, "data") {
                    keys_named_tributary(data, &mut env);
                }
            }
            if kind != "Deployment" {
                continue;
            }
            let containers = get(&doc, "spec")
                .and_then(|s| get(s, "template"))
                .and_then(|t| get(t, "spec"))
                .and_then(|s| get(s, "containers"))
                .and_then(Yaml::as_vec)
                .unwrap_or_else(|| panic!("{file}: a Deployment without containers"));
            for container in containers {
                let image = get(container, "image").and_then(Yaml::as_str).unwrap_or("");
                if !image.starts_with("tributary") {
                    continue;
                }
                for e in get(container, "env")
                    .and_then(Yaml::as_vec)
                    .unwrap_or(&Vec::new())
                {
                    if let Some(n) = get(e, "name").and_then(Yaml::as_str) {
                        if n.starts_with("TRIBUTARY_") {
                            env.insert(n.to_owned());
                        }
                    }
                }
                let args = get(container, "args").map(strings).unwrap_or_default();
                assert!(!args.is_empty(), "{file}: container without args");
                invocations.push(Invocation {
                    source: format!("kubernetes/{file}"),
                    args,
                });
            }
        }
    }
    for kind in ["Deployment", "Service", "ConfigMap"] {
        assert!(kinds.contains(kind), "deploy/kubernetes has no {kind}");
    }
    (invocations, env)
}

fn dockerfile() -> (Vec<Invocation>, BTreeSet<String>) {
    let path = deploy_dir().join("Dockerfile");
    let text = std::fs::read_to_string(&path).expect("deploy/Dockerfile exists");
    assert!(
        text.lines().filter(|l| l.starts_with("FROM ")).count() >= 2,
        "the Dockerfile is multi-stage"
    );
    let mut invocations = Vec::new();
    let mut env = BTreeSet::new();
    for line in text.lines() {
        if let Some(json) = line.strip_prefix("CMD ") {
            let args: Vec<String> =
                serde_json::from_str(json).expect("CMD is an exec-form JSON array");
            invocations.push(Invocation {
                source: "Dockerfile CMD".into(),
                args,
            });
        }
        if let Some(rest) = line.strip_prefix("ENV ") {
            if let Some((name, _)) = rest.split_once('=') {
                if name.starts_with("TRIBUTARY_") {
                    env.insert(name.to_owned());
                }
            }
        }
    }
    assert!(!invocations.is_empty(), "the Dockerfile has a CMD");
    (invocations, env)
}

/// `tributary <path> --help`, failing the test with clap's message if the command is unknown.
fn help(path: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(path)
        .arg("--help")
        .output()
        .expect("run tributary");
    assert!(
        out.status.success(),
        "`tributary {} --help` failed: {}",
        path.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tokens(help: &str) -> BTreeSet<&str> {
    help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .filter(|t| !t.is_empty())
        .collect()
}

/// Checks one invocation; returns its help text.
fn check(invocation: &Invocation) -> String {
    let path: Vec<String> = invocation
        .args
        .iter()
        .take_while(|a| !a.starts_with('-'))
        .cloned()
        .collect();
    assert!(!path.is_empty(), "{invocation:?}: no subcommand");
    let text = help(&path);
    let known = tokens(&text);
    for arg in invocation.args.iter().filter(|a| a.starts_with("--")) {
        let flag = arg.split('=').next().unwrap_or(arg);
        assert!(
            known.contains(flag),
            "{}: `tributary {}` has no flag {flag}",
            invocation.source,
            path.join(" ")
        );
    }
    text
}

#[test]
fn manifests_use_only_commands_flags_and_variables_the_binary_has() {
    let mut invocations = Vec::new();
    let mut env = BTreeSet::new();
    for (i, e) in [compose(), kubernetes(), dockerfile()] {
        invocations.extend(i);
        env.extend(e);
    }
    let commands: BTreeSet<String> = invocations
        .iter()
        .map(|i| {
            i.args
                .iter()
                .take_while(|a| !a.starts_with('-'))
                .cloned()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    for expected in [
        "serve api",
        "serve scheduler",
        "serve projector",
        "serve metering",
        "serve autoscaler",
        "agent",
    ] {
        assert!(
            commands.contains(expected),
            "the manifests never run `tributary {expected}` (they run: {commands:?})"
        );
    }
    let mut helps = String::new();
    for invocation in &invocations {
        helps.push_str(&check(invocation));
    }
    let known = tokens(&helps);
    for name in &env {
        assert!(
            known.contains(name.as_str()),
            "{name} is set by a manifest but no command they run reads it"
        );
    }
}

#[test]
fn shell_invocations_are_found_only_as_commands() {
    let found = invocations_in_shell(
        "x",
        "TOKEN=$(cat /var/lib/tributary/t) exec tini -- tributary agent --capacity 2; echo",
    );
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].args, ["agent", "--capacity", "2"]);
}
