//! What a job's container looks like: image, mounts, limits, network, labels. Pure: the
//! container's create request is a function of the job and the agent's configuration, tested
//! without an engine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::models::{ContainerCreateBody, HostConfig};

/// Where the job's workspace is mounted inside its container (and where lines start).
pub const WORKSPACE: &str = "/workspace";
/// Where the executor's wrapper scripts are mounted (read-only) inside the container.
pub const SCRIPTS: &str = "/tributary";

/// Label naming the agent that owns a container: a restarting agent removes its own
/// containers left over from a crash.
pub const LABEL_OWNER: &str = "tributary.agent";
pub const LABEL_BUILD: &str = "tributary.build";
pub const LABEL_JOB: &str = "tributary.job";
pub const LABEL_ATTEMPT: &str = "tributary.attempt";

/// The container's main process: it only keeps the container alive while the job's steps run
/// in it with `exec` (the container is killed and removed when the job ends). `sleep` is
/// restarted in a loop because not every image's `sleep` takes `infinity`.
pub const KEEPALIVE: &str = "while :; do sleep 3600; done";

/// Resource limits of every container an agent starts (0 = no limit).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ContainerLimits {
    /// CPUs (fractions allowed: 1.5 = one and a half cores).
    pub cpus: f64,
    /// Memory in bytes; swap is not allowed on top of it.
    pub memory_bytes: u64,
    /// Most processes (and threads) in the container.
    pub pids: u32,
    /// Images built from the repository (`image: {build: ...}`) kept per project: the newest
    /// keys; older ones are removed after a build (`--image-keep`; 0 = keep all).
    pub image_keep: u32,
}

/// Who a container belongs to, for its labels and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership<'a> {
    pub owner: &'a str,
    pub build_id: &'a str,
    pub job_id: &'a str,
    pub attempt: u32,
}

/// The create request of a job's container.
///
/// * `image` runs [`KEEPALIVE`] as its main process (whatever its own entrypoint), so the
///   steps can be `exec`ed into it one by one;
/// * `workspace` (host path) is bind-mounted read-write at [`WORKSPACE`], `scripts` read-only
///   at [`SCRIPTS`];
/// * no network unless `network`; limits from `limits`;
/// * labelled with its owner, build, job and attempt.
pub fn create_body(
    image: &str,
    workspace: &Path,
    scripts: &Path,
    limits: &ContainerLimits,
    network: bool,
    who: &Ownership<'_>,
) -> ContainerCreateBody {
    let labels = HashMap::from([
        (LABEL_OWNER.to_owned(), who.owner.to_owned()),
        (LABEL_BUILD.to_owned(), who.build_id.to_owned()),
        (LABEL_JOB.to_owned(), who.job_id.to_owned()),
        (LABEL_ATTEMPT.to_owned(), who.attempt.to_string()),
    ]);
    let memory =
        (limits.memory_bytes > 0).then(|| i64::try_from(limits.memory_bytes).unwrap_or(i64::MAX));
    let host_config = HostConfig {
        binds: Some(vec![
            format!("{}:{WORKSPACE}:rw", workspace.display()),
            format!("{}:{SCRIPTS}:ro", scripts.display()),
        ]),
        nano_cpus: (limits.cpus > 0.0).then(|| (limits.cpus * 1e9).round() as i64),
        memory,
        // The same as memory: no swap beyond the limit.
        memory_swap: memory,
        pids_limit: (limits.pids > 0).then_some(i64::from(limits.pids)),
        network_mode: Some(if network { "bridge" } else { "none" }.to_owned()),
        // Never AutoRemove: Podman's wait then reports wrong exit codes. The executor removes it.
        auto_remove: Some(false),
        ..HostConfig::default()
    };
    ContainerCreateBody {
        image: Some(image.to_owned()),
        entrypoint: Some(vec![
            "sh".to_owned(),
            "-c".to_owned(),
            KEEPALIVE.to_owned(),
            // $0 of the keep-alive shell; an image's CMD, appended by the engine, is ignored.
            "tributary-keepalive".to_owned(),
        ]),
        working_dir: Some(WORKSPACE.to_owned()),
        labels: Some(labels),
        network_disabled: Some(!network),
        host_config: Some(host_config),
        attach_stdin: Some(false),
        attach_stdout: Some(false),
        attach_stderr: Some(false),
        tty: Some(false),
        ..ContainerCreateBody::default()
    }
}

/// Hides `hidden` (directories of the workspace, as host paths) from the job: `empty`, an empty
/// host directory, is bind-mounted read-only over each at its place under [`WORKSPACE`], so the
/// job sees an empty directory there and can neither read nor change what the host keeps in it
/// (a local run's data directory inside the repository). Engines mount the nested path after
/// the workspace. Paths outside `workspace` are ignored: they are not mounted at all. (Not a
/// tmpfs: Podman copies a directory's content into a tmpfs mounted over it.)
pub fn hide_paths(
    body: &mut ContainerCreateBody,
    workspace: &Path,
    hidden: &[PathBuf],
    empty: &Path,
) {
    let binds: Vec<String> = hidden
        .iter()
        .filter_map(|h| h.strip_prefix(workspace).ok())
        .filter(|rel| !rel.as_os_str().is_empty())
        .map(|rel| format!("{}:{WORKSPACE}/{}:ro", empty.display(), rel.display()))
        .collect();
    if binds.is_empty() {
        return;
    }
    let host = body.host_config.get_or_insert_with(HostConfig::default);
    host.binds.get_or_insert_with(Vec::new).extend(binds);
}

/// A readable, unique container name: `trib-<build prefix>-<job>-<attempt>-<random>`, made of
/// the characters engines accept (`[a-zA-Z0-9_.-]`, starting with a letter or digit).
pub fn container_name(who: &Ownership<'_>, random: u32) -> String {
    let clean = |s: &str, max: usize| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(max)
            .collect()
    };
    format!(
        "trib-{}-{}-{}-{random:08x}",
        clean(who.build_id, 8),
        clean(who.job_id, 40),
        who.attempt
    )
}

/// `KEY=value` pairs for an exec, later entries winning like in a shell.
pub fn env_list(env: &[(String, String)]) -> Vec<String> {
    env.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Ownership<'static> {
        Ownership {
            owner: "agent-1",
            build_id: "0193a1b2-c3d4",
            job_id: "test[os=linux]",
            attempt: 2,
        }
    }

    #[test]
    fn limits_network_mounts_and_labels() {
        let limits = ContainerLimits {
            cpus: 1.5,
            memory_bytes: 256 << 20,
            pids: 512,
            image_keep: 0,
        };
        let body = create_body(
            "localhost/ci-busybox",
            Path::new("/w/job"),
            Path::new("/s/job"),
            &limits,
            false,
            &who(),
        );
        let host = body.host_config.clone().unwrap();
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.memory, Some(256 << 20));
        assert_eq!(host.memory_swap, Some(256 << 20));
        assert_eq!(host.pids_limit, Some(512));
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(body.network_disabled, Some(true));
        assert_eq!(host.auto_remove, Some(false));
        assert_eq!(
            host.binds.unwrap(),
            vec![
                "/w/job:/workspace:rw".to_owned(),
                "/s/job:/tributary:ro".to_owned()
            ]
        );
        let labels = body.labels.unwrap();
        assert_eq!(labels[LABEL_OWNER], "agent-1");
        assert_eq!(labels[LABEL_JOB], "test[os=linux]");
        assert_eq!(labels[LABEL_ATTEMPT], "2");
        assert_eq!(body.working_dir.as_deref(), Some(WORKSPACE));
        assert_eq!(body.entrypoint.unwrap()[2], KEEPALIVE);
    }

    #[test]
    fn no_limits_and_network_when_asked() {
        let body = create_body(
            "img",
            Path::new("/w"),
            Path::new("/s"),
            &ContainerLimits::default(),
            true,
            &who(),
        );
        let host = body.host_config.unwrap();
        assert_eq!(host.nano_cpus, None);
        assert_eq!(host.memory, None);
        assert_eq!(host.pids_limit, None);
        assert_eq!(host.network_mode.as_deref(), Some("bridge"));
        assert_eq!(body.network_disabled, Some(false));
    }

    #[test]
    fn hidden_directories_get_an_empty_read_only_directory() {
        let mut body = create_body(
            "img",
            Path::new("/repo"),
            Path::new("/s"),
            &ContainerLimits::default(),
            false,
            &who(),
        );
        hide_paths(
            &mut body,
            Path::new("/repo"),
            &[
                PathBuf::from("/repo/state"),
                PathBuf::from("/elsewhere/data"),
                PathBuf::from("/repo"),
            ],
            Path::new("/s/empty"),
        );
        assert_eq!(
            body.host_config.unwrap().binds.unwrap(),
            vec![
                "/repo:/workspace:rw".to_owned(),
                "/s:/tributary:ro".to_owned(),
                "/s/empty:/workspace/state:ro".to_owned(),
            ]
        );
    }

    #[test]
    fn names_are_engine_safe() {
        let name = container_name(&who(), 0xabc);
        assert_eq!(name, "trib-0193a1b2-test_os_linux_-2-00000abc");
        assert!(name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }
}
