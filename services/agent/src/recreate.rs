//! The commands that recreate a job locally with `tributary run`: printed at the start of a
//! server build's job log, and at the end of a failed local job's. Pure text.

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

/// A server build's first log lines: how to run this job again on one's own machine — clone
/// the repository, check out the exact commit (and its submodules when the job uses them), then
/// run the job from `.tributary.yml` (`pipeline_file` when given). `tributary run --job` runs
/// that one job (its `needs` are taken as done); `image:` jobs run in a container there too.
///
/// Empty for a local run (no repository to clone): its user just ran the command that would
/// be printed; [`run_alone`] is what a failed local job's log ends with instead.
pub fn recreate_commands(
    source: Option<&Source>,
    job: &JobPlan,
    pipeline_file: Option<&str>,
) -> String {
    let Some(src) = source.filter(|s| !s.repository.is_empty()) else {
        return String::new();
    };
    let mut lines = vec!["tributary: to recreate this job locally, run:".to_owned()];
    let dir = format!("tributary-{}", short(&src.commit));
    lines.push(format!(
        "  git clone {} {dir} && cd {dir} && git checkout --detach {}",
        shell_quote(&src.repository),
        shell_quote(&src.commit)
    ));
    if job.submodules {
        lines.push("  git submodule update --init --recursive".to_owned());
    }
    lines.push(format!(
        "  {}",
        run_command(pipeline_file.unwrap_or(".tributary.yml"), job)
    ));
    lines.join("\n") + "\n"
}

/// The note a failed job of a local run ends with: the command that runs only this job again
/// (its `needs` taken as done), which is shorter than the whole pipeline.
pub fn run_alone(job: &JobPlan, pipeline_file: Option<&str>) -> String {
    format!(
        "tributary: to run only this job again: {}",
        run_command(pipeline_file.unwrap_or(".tributary.yml"), job)
    )
}

fn run_command(file: &str, job: &JobPlan) -> String {
    format!(
        "tributary run -f {} --job {}",
        shell_quote(file),
        shell_quote(&job.id)
    )
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
    fn local_runs_print_nothing_first_and_name_their_pipeline_file_on_failure() {
        let job = JobPlan {
            id: "build".into(),
            ..JobPlan::default()
        };
        let file = Some("/home/me/my repo/.tributary.yml");
        assert_eq!(recreate_commands(None, &job, file), "");
        let no_repository = Source {
            repository: String::new(),
            commit: "0123".into(),
            tenant: "default".into(),
        };
        assert_eq!(recreate_commands(Some(&no_repository), &job, file), "");
        assert_eq!(
            run_alone(&job, file),
            "tributary: to run only this job again: \
             tributary run -f '/home/me/my repo/.tributary.yml' --job build"
        );
    }
}
