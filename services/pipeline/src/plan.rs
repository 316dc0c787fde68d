//! From a validated [`Pipeline`] to a [`Plan`]: `${{ }}` checks, `needs` cycles, matrix
//! expansion.

use std::collections::BTreeMap;

use tributary_proto::events::{
    CacheSpec, EnvVar, ImageBuild, JobPlan, MatrixValue, Plan, StepPlan,
};

use crate::parse::{Job, Pipeline, StepName};
use crate::template::Template;
use crate::yaml::{Loc, Source};
use crate::PipelineError;

enum NameTemplate {
    Given(Template),
    Default(String),
    FromCommand,
}

struct CompiledStep {
    name: NameTemplate,
    lines: Vec<Template>,
}

/// `image: {build, context}`: the Dockerfile's path, and the context's (absent: the
/// Dockerfile's directory), with where each was written.
type CompiledImageBuild = (Template, Loc, Option<(Template, Loc)>);

/// A job's strings with their matrix references resolved.
struct CompiledJob {
    steps: Vec<CompiledStep>,
    /// Pipeline env overridden by job env, by name.
    env: BTreeMap<String, Template>,
    runs_on: Vec<Template>,
    image: Option<Template>,
    image_build: Option<CompiledImageBuild>,
    artifacts: Vec<Template>,
    /// (key, paths) of each `cache` entry.
    cache: Vec<(Template, Vec<Template>)>,
}

pub(crate) fn build(src: &Source<'_>, pipeline: &Pipeline) -> Result<Plan, PipelineError> {
    let compiled = pipeline
        .jobs
        .iter()
        .map(|job| compile(src, pipeline, job))
        .collect::<Result<Vec<_>, _>>()?;
    check_cycles(src, &pipeline.jobs)?;

    let instances: Vec<Vec<Vec<&str>>> = pipeline.jobs.iter().map(instances).collect();
    let ids: Vec<Vec<String>> = pipeline
        .jobs
        .iter()
        .zip(&instances)
        .map(|(job, inst)| inst.iter().map(|values| instance_id(job, values)).collect())
        .collect();
    for (job, job_ids) in pipeline.jobs.iter().zip(&ids) {
        // Values containing `,` or `=` could make two ids equal; ids must be unique.
        for (i, id) in job_ids.iter().enumerate() {
            if job_ids[..i].contains(id) {
                return Err(src.error(
                    job.matrix_loc,
                    format!(
                        "the matrix of job {:?} gives two instances the same id {id:?}; \
                         avoid `,` and `=` in matrix values",
                        job.key
                    ),
                ));
            }
        }
    }

    let mut plan = Plan::default();
    for (j, (job, compiled)) in pipeline.jobs.iter().zip(&compiled).enumerate() {
        let needs: Vec<String> = job
            .needs
            .iter()
            .flat_map(|n| ids[n.job].iter().cloned())
            .collect();
        for (values, id) in instances[j].iter().zip(&ids[j]) {
            let image_build = compiled
                .image_build
                .as_ref()
                .map(|b| render_image_build(src, &job.key, b, values))
                .transpose()?;
            let mut steps: Vec<StepPlan> = compiled
                .steps
                .iter()
                .map(|step| render_step(step, values))
                .collect();
            if let Some(b) = &image_build {
                steps.insert(0, image_step(b));
            }
            plan.jobs.push(JobPlan {
                id: id.clone(),
                name: job.key.clone(),
                matrix: job
                    .matrix
                    .iter()
                    .zip(values)
                    .map(|(axis, value)| MatrixValue {
                        name: axis.name.clone(),
                        value: (*value).to_owned(),
                    })
                    .collect(),
                needs: needs.clone(),
                steps,
                env: compiled
                    .env
                    .iter()
                    .map(|(name, value)| EnvVar {
                        name: name.clone(),
                        value: value.render(values),
                    })
                    .collect(),
                timeout_secs: job.timeout_secs,
                runs_on: compiled.runs_on.iter().map(|t| t.render(values)).collect(),
                runs_on_strict: job.runs_on_strict,
                image: compiled
                    .image
                    .as_ref()
                    .map_or_else(String::new, |t| t.render(values)),
                retry: job.retry,
                kept_from_build: String::new(),
                kept_artifacts: Vec::new(),
                artifacts: compiled
                    .artifacts
                    .iter()
                    .map(|t| t.render(values))
                    .collect(),
                network: job.network,
                submodules: job.submodules,
                cache: compiled
                    .cache
                    .iter()
                    .map(|(key, paths)| CacheSpec {
                        key: key.render(values),
                        paths: paths.iter().map(|p| p.render(values)).collect(),
                    })
                    .collect(),
                reuse: if job.reuse {
                    "commit".to_owned()
                } else {
                    String::new()
                },
                secrets: job.secrets.clone(),
                image_build,
            });
        }
    }
    Ok(plan)
}

fn compile(src: &Source<'_>, pipeline: &Pipeline, job: &Job) -> Result<CompiledJob, PipelineError> {
    let key = job.key.as_str();
    let axes = job.matrix.as_slice();
    let tpl = |text, what: String| Template::compile(src, text, axes, key, &what);

    let mut steps = Vec::with_capacity(job.steps.len());
    for (i, step) in job.steps.iter().enumerate() {
        let n = i + 1;
        let name = match &step.name {
            StepName::Given(text) => {
                NameTemplate::Given(tpl(text, format!("the name of step {n} of job {key:?}"))?)
            }
            StepName::Default(name) => NameTemplate::Default(name.clone()),
            StepName::FromCommand => NameTemplate::FromCommand,
        };
        let lines = step
            .lines
            .iter()
            .enumerate()
            .map(|(l, text)| tpl(text, format!("line {} of step {n} of job {key:?}", l + 1)))
            .collect::<Result<_, _>>()?;
        steps.push(CompiledStep { name, lines });
    }

    let mut env = BTreeMap::new();
    for var in &pipeline.env {
        // A pipeline variable the job overrides is not used by it, so not checked against it.
        if job.env.iter().any(|e| e.name == var.name) {
            continue;
        }
        let what = format!("pipeline env {:?} (as used by job {key:?})", var.name);
        env.insert(var.name.clone(), tpl(&var.value, what)?);
    }
    for var in &job.env {
        let what = format!("env {:?} of job {key:?}", var.name);
        env.insert(var.name.clone(), tpl(&var.value, what)?);
    }

    let runs_on = job
        .runs_on
        .iter()
        .map(|label| tpl(label, format!("`runs-on` of job {key:?}")))
        .collect::<Result<_, _>>()?;
    let image = job
        .image
        .as_ref()
        .map(|image| tpl(image, format!("`image` of job {key:?}")))
        .transpose()?;
    let image_build = match &job.image_build {
        None => None,
        Some(b) => {
            let dockerfile = tpl(&b.dockerfile, format!("`build` of `image` of job {key:?}"))?;
            let context = match &b.context {
                None => None,
                Some(c) => Some((
                    tpl(c, format!("`context` of `image` of job {key:?}"))?,
                    c.loc,
                )),
            };
            Some((dockerfile, b.dockerfile.loc, context))
        }
    };
    let artifacts = job
        .artifacts
        .iter()
        .map(|p| tpl(p, format!("`artifacts` of job {key:?}")))
        .collect::<Result<_, _>>()?;
    let mut cache = Vec::with_capacity(job.cache.len());
    for (i, entry) in job.cache.iter().enumerate() {
        let what = format!("`key` of cache entry {} of job {key:?}", i + 1);
        let k = Template::compile_cache_key(src, &entry.key, axes, key, &what)?;
        let paths = entry
            .paths
            .iter()
            .map(|p| {
                tpl(
                    p,
                    format!("`paths` of cache entry {} of job {key:?}", i + 1),
                )
            })
            .collect::<Result<_, _>>()?;
        cache.push((k, paths));
    }
    Ok(CompiledJob {
        steps,
        env,
        runs_on,
        image,
        image_build,
        artifacts,
        cache,
    })
}

/// The name of the step that stands for a job's image build (`steps[0]` of such a job).
pub const IMAGE_STEP: &str = "image";

/// The plan's step for an image build: one line saying what is built.
fn image_step(build: &ImageBuild) -> StepPlan {
    StepPlan {
        name: IMAGE_STEP.to_owned(),
        lines: vec![format!(
            "build {} (context {})",
            build.dockerfile, build.context
        )],
    }
}

/// `image: {build, context}` of one instance: paths with the matrix values in, checked again
/// (a value may have brought `..` in), the context defaulting to the Dockerfile's directory.
fn render_image_build(
    src: &Source<'_>,
    job: &str,
    (dockerfile, loc, context): &(Template, Loc, Option<(Template, Loc)>),
    values: &[&str],
) -> Result<ImageBuild, PipelineError> {
    let checked = |text: String, loc: Loc, what: &str| match normalize(&text) {
        Some(path) => Ok(path),
        None => Err(src.error(
            loc,
            format!(
                "{what} of `image` of job {job:?} is {text:?} with the matrix values in: write a \
                 path inside the repository, without `..`"
            ),
        )),
    };
    let dockerfile = checked(dockerfile.render(values), *loc, "`build`")?;
    if dockerfile == "." {
        return Err(src.error(
            *loc,
            format!("`build` of `image` of job {job:?} names no file; give a Dockerfile's path"),
        ));
    }
    let context = match context {
        Some((t, loc)) => checked(t.render(values), *loc, "`context`")?,
        None => dockerfile
            .rsplit_once('/')
            .map_or_else(|| ".".to_owned(), |(dir, _)| dir.to_owned()),
    };
    Ok(ImageBuild {
        dockerfile,
        context,
    })
}

/// `path` relative to the repository, normalised (`.` for the root); `None` if it leaves it.
fn normalize(path: &str) -> Option<String> {
    let path = path.trim();
    if path.starts_with('/') || path.contains('\\') || path.split('/').any(|c| c == "..") {
        return None;
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    Some(if parts.is_empty() {
        ".".to_owned()
    } else {
        parts.join("/")
    })
}

fn render_step(step: &CompiledStep, values: &[&str]) -> StepPlan {
    let lines: Vec<String> = step.lines.iter().map(|t| t.render(values)).collect();
    let name = match &step.name {
        NameTemplate::Given(t) => t.render(values),
        NameTemplate::Default(name) => name.clone(),
        // A plain-string step is named after its command (its first non-blank line).
        NameTemplate::FromCommand => lines
            .first()
            .and_then(|l| l.lines().map(str::trim).find(|l| !l.is_empty()))
            .unwrap_or_default()
            .to_owned(),
    };
    StepPlan { name, lines }
}

/// The matrix value combinations of a job, first axis varying slowest; one empty combination
/// for a job without a matrix.
fn instances(job: &Job) -> Vec<Vec<&str>> {
    let mut out: Vec<Vec<&str>> = vec![Vec::new()];
    for axis in &job.matrix {
        out = out
            .iter()
            .flat_map(|prefix| {
                axis.values.iter().map(move |v| {
                    let mut combo = prefix.clone();
                    combo.push(v.as_str());
                    combo
                })
            })
            .collect();
    }
    out
}

fn instance_id(job: &Job, values: &[&str]) -> String {
    if job.matrix.is_empty() {
        return job.key.clone();
    }
    let pairs: Vec<String> = job
        .matrix
        .iter()
        .zip(values)
        .map(|(axis, value)| format!("{}={value}", axis.name))
        .collect();
    format!("{}[{}]", job.key, pairs.join(","))
}

/// Depth-first search over `needs` in declaration order; the first edge that reaches a job
/// still on the path closes a cycle and is reported.
fn check_cycles(src: &Source<'_>, jobs: &[Job]) -> Result<(), PipelineError> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        New,
        OnPath,
        Done,
    }
    let mut state = vec![State::New; jobs.len()];
    for start in 0..jobs.len() {
        if state[start] != State::New {
            continue;
        }
        // (job, index of the next `needs` entry to follow)
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        state[start] = State::OnPath;
        while let Some(&mut (job, ref mut next)) = path.last_mut() {
            let Some(need) = jobs[job].needs.get(*next) else {
                state[job] = State::Done;
                path.pop();
                continue;
            };
            *next += 1;
            match state[need.job] {
                State::New => {
                    state[need.job] = State::OnPath;
                    path.push((need.job, 0));
                }
                State::OnPath => {
                    let from = path.iter().position(|(j, _)| *j == need.job).unwrap_or(0);
                    let cycle: Vec<&str> = path[from..]
                        .iter()
                        .map(|(j, _)| jobs[*j].key.as_str())
                        .chain([jobs[need.job].key.as_str()])
                        .collect();
                    return Err(src.error(
                        need.entry.loc,
                        format!(
                            "`needs` cycle: {} (each job needs the next); a job cannot wait for \
                             itself, remove one of these `needs` entries",
                            cycle.join(" -> ")
                        ),
                    ));
                }
                State::Done => {}
            }
        }
    }
    Ok(())
}
