//! Pipeline files (`.tributary.yml`): parsing with line/column errors, matrix and `needs`
//! expansion into a [`Plan`].
//!
//! [`load`] is the whole API: it parses and validates a pipeline and expands it into the
//! [`Plan`] that goes on the log in `BuildQueued`. Every problem is a [`PipelineError`] that
//! points (1-based line and column) at the offending key, value or list entry, says what is
//! wrong and what to do about it.
//!
//! # Syntax
//!
//! ```yaml
//! env:                      # optional, pipeline-wide env (NAME -> scalar)
//!   RUST_LOG: info
//! jobs:                     # required, non-empty mapping; job names match [A-Za-z0-9_-]+
//!   build:
//!     steps:                # required, non-empty list
//!       - name: compile     # optional; default "step N" (1-based)
//!         script:           # a list of strings: each entry is ONE line
//!           - cd src
//!           - make
//!       - name: package
//!         run: |            # one string (even a multi-line block) = one line; `sh -e`
//!           tar czf out.tgz build/
//!       - echo shorthand    # a plain string step == {run: "echo shorthand", name: "echo shorthand"}
//!   test:
//!     needs: build          # a job name or a list of job names
//!     matrix:               # axis -> non-empty list of scalars; cartesian product
//!       os: [linux, bsd]
//!       rust: ["1.80", "1.81"]
//!     env: { TARGET: "${{ matrix.os }}" }
//!     timeout: 10m          # whole seconds, or a duration "90s", "10m", "1h", "1h30m"
//!     runs-on: [linux, big] # an agent label or a list of labels
//!     image: localhost/ci-busybox  # or {build: ci/Dockerfile, context: ci}: built from the repo
//!     retry: 2              # re-runs after a failure, 0..=10
//!     artifacts: [dist/*.tar, "reports/${{ matrix.os }}"]  # kept when the job succeeds
//!     cache:                # one {key, paths} mapping, or a list of them
//!       key: "cargo-${{ hashFiles('Cargo.lock') }}"
//!       paths: [target]
//!     reuse: commit         # reuse a successful run of this job at the same commit
//!     secrets: [DEPLOY_TOKEN]  # project secrets given to this job as environment variables
//!     steps:
//!       - script: ["cargo test --target ${{ matrix.os }}"]
//! ```
//!
//! # Rules
//!
//! * **Keys.** Top level: `env`, `jobs`. Job: `steps`, `needs`, `matrix`, `env`, `timeout`,
//!   `runs-on`, `image`, `retry`, `artifacts`, `secrets`, `network`, `submodules` (both
//!   `true`/`false`; `network: true` only with an `image`), `cache`, `reuse`. Step: `name`, `script`, `run`. Any other key is an
//!   error at
//!   the key, with a "did you mean" suggestion when it is close to a valid one (or a well-known
//!   synonym such as `depends_on` for `needs`). Duplicate keys are errors.
//! * **Steps.** A step is a plain string (shorthand for `run`, named after the command) or a
//!   mapping with exactly one of `script` (a non-empty list of non-empty strings, one line each)
//!   or `run` (a non-empty string, trailing newlines dropped; a block is one line). Lines are
//!   otherwise passed through as written.
//! * **Types.** Where a string is expected (step names, `run`, `script` lines, `image`,
//!   `runs-on` labels, `needs` entries) the value must be a YAML string: an unquoted number,
//!   boolean or null is an error that says to quote it. Env values and matrix values may be any
//!   scalar but null and are taken as written in the file: `1.80` stays `"1.80"`, `10` stays
//!   `"10"`, `true` stays `"true"`. An empty value (`key:` with nothing) is an error, never `""`.
//! * **Substitution.** `${{ matrix.NAME }}` (spaces inside the braces optional) is replaced by
//!   the instance's value in step lines, step names, env values (pipeline and job), `image` and
//!   `runs-on` labels. A reference to an axis the job does not have, any other `${{ ... }}`
//!   expression, and an unterminated `${{` are errors at that string. Text without `${{`
//!   (shell `$VAR`, `${VAR}`) is left untouched.
//! * **Matrix.** Axis names match `[A-Za-z0-9_-]+`; each axis is a non-empty list of distinct,
//!   non-empty scalars; a job expands to at most 256 instances. Instances are the cartesian
//!   product, first axis varying slowest, expanded in place in `Plan.jobs`. An instance's id is
//!   `name[axis=value,axis2=value2]` (axes in declared order); a job without matrix has its key
//!   as id. `JobPlan.name` is the job key, `JobPlan.matrix` the instance's values.
//! * **Needs.** Entries are job keys (declared anywhere in `jobs`); needing a matrix job means
//!   needing every instance of it, so `JobPlan.needs` holds instance ids. Unknown targets,
//!   matrix instance ids, a job needing itself, duplicates and cycles are errors; a cycle is
//!   reported at the `needs` entry that closes it, with the path (`a -> b -> c -> a`).
//! * **Env.** Names match `[A-Za-z_][A-Za-z0-9_]*`. A job gets the pipeline env overridden by
//!   its own env, sorted by name.
//! * **Timeout** is whole seconds or `<h>h<m>m<s>s` with any of the parts (in that order), and
//!   must not be 0; absent means no timeout (`timeout_secs == 0`). **Retry** is a whole number
//!   from 0 to 10. **`runs-on`** labels and **`image`** must not be empty.
//! * **Image builds**: `image: {build: PATH, context: DIR}` builds the job's image from a
//!   Dockerfile of the repository (paths relative to its root, normalised; absolute paths, `..`
//!   and backslashes are errors; `context` defaults to the Dockerfile's directory; only those two
//!   keys). The plan has `image_build` set, `image` empty, and a first step named
//!   [`IMAGE_STEP`] with one line saying what is built: the agent builds (or reuses) the image
//!   in that step, then runs the job's own steps in it.
//! * **Artifacts**: a pattern, a list of patterns, or `{paths: [...]}` (GitLab's spelling);
//!   globs relative to the workspace where `*` does not cross `/` and `**` does, a directory
//!   keeps everything under it (see [`artifacts`]). Absolute patterns, `..` and backslashes are
//!   errors at the pattern; `${{ matrix.NAME }}` is substituted.
//! * **Cache**: a mapping with exactly `key` (a non-empty string) and `paths` (a pattern or a
//!   list, checked like artifact patterns), or a list of up to 8 such mappings with distinct
//!   keys. The key may use `${{ matrix.NAME }}` (substituted) and `${{ hashFiles('PATTERN',
//!   ...) }}` (kept in the plan, evaluated by the agent after checkout: see [`cache`]).
//!   **Reuse**: only `reuse: commit`.
//! * **Secrets**: a name or a list of names of the project's secrets (`tributary secret set`),
//!   each a valid environment variable name, each once. Only the names are in the plan: the
//!   server puts the values into the job's lease, the agent sets them as environment variables
//!   and masks them in the log. A job without `secrets` gets none. Whether each named secret
//!   exists is checked when the job is leased (the pipeline does not know the project).
//! * **File.** One YAML document whose top level is a mapping; an empty file, a second
//!   document, anchors/aliases and tags are errors. YAML syntax errors carry the parser's
//!   line and column.
//!
//! # Example
//!
//! ```
//! let text = r#"
//! jobs:
//!   build:
//!     steps:
//!       - make
//!   test:
//!     needs: build
//!     matrix:
//!       os: [linux, bsd]
//!     image: "ci-${{ matrix.os }}"
//!     steps:
//!       - script: ["cargo test --target ${{ matrix.os }}"]
//! "#;
//! let plan = tributary_pipeline::load(".tributary.yml", text).unwrap();
//! let ids: Vec<&str> = plan.jobs.iter().map(|j| j.id.as_str()).collect();
//! assert_eq!(ids, ["build", "test[os=linux]", "test[os=bsd]"]);
//! assert_eq!(plan.jobs[2].image, "ci-bsd");
//! assert_eq!(plan.jobs[2].steps[0].lines, ["cargo test --target bsd"]);
//! assert_eq!(plan.jobs[1].needs, ["build"]);
//!
//! let err = tributary_pipeline::load(".tributary.yml", "jobs:\n  build:\n    stesp: []\n")
//!     .unwrap_err();
//! assert_eq!((err.line, err.column), (3, 5));
//! assert!(err.to_string().starts_with(
//!     ".tributary.yml:3:5: unknown key \"stesp\" in job \"build\"; did you mean \"steps\"?"
//! ));
//! ```

use tributary_proto::events::Plan;

/// An environment variable name (also what a secret may be called): `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub use plan::IMAGE_STEP;

pub mod artifacts;
pub mod cache;
pub mod duration;
mod parse;
mod plan;
pub mod runs_on;
mod suggest;
mod template;
mod yaml;

/// Parses and validates a pipeline, expands matrices, resolves needs.
///
/// `file` is only used in errors (the path as the user gave it); `text` is the pipeline.
pub fn load(file: &str, text: &str) -> Result<Plan, PipelineError> {
    let src = yaml::Source { file, text };
    let root = src.parse()?;
    let pipeline = parse::parse(&src, &root)?;
    plan::build(&src, &pipeline)
}

/// Why a pipeline was rejected, and where: `file:line:column: message`, 1-based.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct PipelineError {
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub message: String,
}

/// The events that start a build: `BuildTriggered` (as given), then either `BuildQueued` with
/// the plan, or `PipelineRejected` and `BuildFinished(failed)` when the pipeline in
/// `triggered.pipeline_text` is invalid. Pure; the CLI's local run and the API both use it, so
/// a build starts the same way everywhere.
pub fn start_build(
    triggered: tributary_proto::events::BuildTriggered,
) -> (
    Vec<tributary_proto::events::envelope::Payload>,
    Result<Plan, PipelineError>,
) {
    use tributary_proto::events::{
        envelope::Payload, BuildFinished, BuildQueued, PipelineRejected, Status,
    };
    let loaded = load(&triggered.pipeline_path, &triggered.pipeline_text);
    let mut payloads = vec![Payload::BuildTriggered(triggered)];
    match &loaded {
        Ok(plan) => payloads.push(Payload::BuildQueued(BuildQueued {
            plan: Some(plan.clone()),
        })),
        Err(err) => {
            payloads.push(Payload::PipelineRejected(PipelineRejected {
                file: err.file.clone(),
                line: err.line,
                column: err.column,
                message: err.message.clone(),
            }));
            payloads.push(Payload::BuildFinished(BuildFinished {
                status: Status::Failed as i32,
                duration_us: 0,
                reason: format!("invalid pipeline: {err}"),
            }));
        }
    }
    (payloads, loaded)
}
