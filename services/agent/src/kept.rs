//! Workspaces of failed jobs, kept for a while so a person can look at them.
//!
//! A kept workspace `WORK/<build>/<job>-<attempt>` gets a marker file next to it,
//! `WORK/<build>/<job>-<attempt>.kept-until`, holding the Unix time (seconds) until which it is
//! kept. The agent does not delete a marked workspace when the attempt ends; [`sweep`] (run when
//! the agent starts and then periodically) deletes the expired ones with their markers.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SUFFIX: &str = ".kept-until";

/// The marker file of a workspace directory.
pub fn marker_of(workspace: &Path) -> PathBuf {
    let mut name = workspace.file_name().unwrap_or_default().to_os_string();
    name.push(SUFFIX);
    workspace.with_file_name(name)
}

/// Whether `workspace` is kept (has a marker).
pub fn is_kept(workspace: &Path) -> bool {
    marker_of(workspace).exists()
}

/// Marks `workspace` as kept until `now + keep`; returns that time.
pub fn keep(workspace: &Path, now: SystemTime, keep: Duration) -> std::io::Result<SystemTime> {
    let until = now + keep;
    let secs = until
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    std::fs::write(marker_of(workspace), format!("{secs}\n"))?;
    Ok(until)
}

/// The expiry a marker holds, if it is one of ours.
pub fn parse_marker(text: &str) -> Option<SystemTime> {
    let secs: u64 = text.trim().parse().ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Deletes every kept workspace under `work` (`work/<build>/<job>-<attempt>`) whose time is up,
/// with its marker, and build directories left empty. Returns the workspaces deleted.
pub fn sweep(work: &Path, now: SystemTime) -> Vec<PathBuf> {
    let mut deleted = Vec::new();
    let Ok(builds) = std::fs::read_dir(work) else {
        return deleted;
    };
    for build in builds.flatten() {
        let build_dir = build.path();
        let Ok(entries) = std::fs::read_dir(&build_dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let marker = entry.path();
            let Some(name) = marker.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(dir_name) = name.strip_suffix(SUFFIX) else {
                continue;
            };
            let until = std::fs::read_to_string(&marker)
                .ok()
                .and_then(|t| parse_marker(&t));
            // An unreadable marker is treated as expired: better than keeping forever.
            if until.is_some_and(|u| u > now) {
                continue;
            }
            let dir = build_dir.join(dir_name);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot delete a kept workspace");
                    continue;
                }
            }
            let _ = std::fs::remove_file(&marker);
            tracing::info!(dir = %dir.display(), "deleted a kept workspace whose time was up");
            deleted.push(dir);
        }
        let _ = std::fs::remove_dir(&build_dir); // only if empty
    }
    deleted
}

/// `24h`, `90m`, `45s`: the largest unit that divides `d`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (hours, minutes) = (s / 3600, s / 60);
    if hours > 0 && hours * 3600 == s {
        format!("{hours}h")
    } else if minutes > 0 && minutes * 60 == s {
        format!("{minutes}m")
    } else {
        format!("{s}s")
    }
}

/// `Fri, 15 May 2015 15:34:21 GMT`.
pub fn format_time(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_sit_next_to_the_workspace() {
        let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(parse_marker("1800000000\n"), Some(t));
        assert_eq!(parse_marker("soon"), None);
        assert_eq!(
            marker_of(Path::new("/w/work/b1/test_os_-2")),
            Path::new("/w/work/b1/test_os_-2.kept-until")
        );
        assert_eq!(format_time(t), "Fri, 15 Jan 2027 08:00:00 GMT");
        assert_eq!(human(Duration::from_secs(86400)), "24h");
        assert_eq!(human(Duration::from_secs(5400)), "90m");
        assert_eq!(human(Duration::from_secs(61)), "61s");
    }

    #[test]
    fn sweep_deletes_only_expired_kept_workspaces() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path();
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let make = |build: &str, job: &str| {
            let ws = work.join(build).join(job);
            std::fs::create_dir_all(ws.join("src")).unwrap();
            std::fs::write(ws.join("src/f"), "x").unwrap();
            ws
        };
        let expired = make("b1", "a-1");
        keep(
            &expired,
            now - Duration::from_secs(7200),
            Duration::from_secs(3600),
        )
        .unwrap();
        let fresh = make("b1", "b-1");
        keep(&fresh, now, Duration::from_secs(3600)).unwrap();
        let running = make("b2", "c-1"); // not kept: a running job's workspace
        let lonely = make("b3", "d-1");
        keep(
            &lonely,
            now - Duration::from_secs(10),
            Duration::from_secs(1),
        )
        .unwrap();

        let mut deleted = sweep(work, now);
        deleted.sort();
        assert_eq!(deleted, vec![expired.clone(), lonely.clone()]);
        assert!(!expired.exists() && !marker_of(&expired).exists());
        assert!(fresh.exists() && is_kept(&fresh));
        assert!(running.exists() && !is_kept(&running));
        assert!(!work.join("b3").exists(), "empty build directory removed");
        // Later, the fresh one expires too.
        assert_eq!(sweep(work, now + Duration::from_secs(3601)), vec![fresh]);
    }
}
