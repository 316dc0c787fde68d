//! The commands that recreate a job locally with `tributary run`, printed at the start of every
//! job log. Pure text.

use tributary_proto::events::JobPlan;

use crate::attempt::Source;

/// `s` quoted for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@+,%".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The log's first lines: how to run this job again on one's own machine.
///
/// * With a `source` (a server build): clone the repository, check out the exact commit (and
///   its submodules when the job uses them), then run the job from `.tributary.yml`.
/// * Without (a local run): run the job again from the same pipeline file (`pipeline_file`).
///
/// `tributary run --job` runs that one job (its `needs` are taken as done); `image:` jobs run
/// in a container there too.
pub fn recreate_commands(
    source: Option<&Source>,
    job: &JobPlan,
    pipeline_file: Option<&str>,
) -> String {
    let mut lines = vec!["tributary: to recreate this job locally, run:".to_owned()];
    let run = |file: &str| {
        format!(
            "  tributary run -f {} --job {}",
            shell_quote(file),
            shell_quote(&job.id)
        )
    };
    match source {
        Some(src) if !src.repository.is_empty() => {
            let dir = format!("tributary-{}", short(&src.commit));
            lines.push(format!(
                "  git clone {} {dir} && cd {dir} && git checkout --detach {}",
                shell_quote(&src.repository),
                shell_quote(&src.commit)
            ));
            if job.submodules {
                lines.push("  git submodule update --init --recursive".to_owned());
            }
            lines.push(run(pipeline_file.unwrap_or(".tributary.yml")));
        }
        _ => lines.push(run(pipeline_file.unwrap_or(".tributary.yml"))),
    }
    lines.join("\n") + "\n"
}

fn short(commit: &str) -> String {
    let s: String = commit.chars().take(12).collect();
    if s.is_empty() {
        "checkout".to_owned()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("build"), "build");
        assert_eq!(shell_quote("/a/b.yml"), "/a/b.yml");
        assert_eq!(
            shell_quote("test[os=linux,rust=1.80]"),
            "'test[os=linux,rust=1.80]'"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn server_builds_clone_the_exact_commit() {
        let job = JobPlan {
            id: "test[os=linux]".into(),
            submodules: true,
            ..JobPlan::default()
        };
        let src = Source {
            repository: "https://git.example/acme/web.git".into(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            tenant: "acme".into(),
        };
        assert_eq!(
            recreate_commands(Some(&src), &job, None),
            "tributary: to recreate this job locally, run:\n  \
             git clone https://git.example/acme/web.git tributary-0123456789ab && cd \
             tributary-0123456789ab && git checkout --detach \
             0123456789abcdef0123456789abcdef01234567\n  \
             git submodule update --init --recursive\n  \
             tributary run -f .tributary.yml --job 'test[os=linux]'\n"
        );
    }

    #[test]
    fn local_runs_name_their_pipeline_file() {
        let job = JobPlan {
            id: "build".into(),
            ..JobPlan::default()
        };
        assert_eq!(
            recreate_commands(None, &job, Some("/home/me/my repo/.tributary.yml")),
            "tributary: to recreate this job locally, run:\n  \
             tributary run -f '/home/me/my repo/.tributary.yml' --job build\n"
        );
    }
}
