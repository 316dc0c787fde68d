//! Walks the YAML tree and validates it into a [`Pipeline`]: the file's content, every string
//! with its location, before matrix expansion and `${{ }}` substitution.

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode, MarkedSequenceNode, Node};

use crate::duration::{parse_duration, DurationError};
use crate::suggest::{closest, closest_key};
use crate::yaml::{describe, kind, Kind, Loc, Owner, Source};
use crate::PipelineError;

type Result<T> = std::result::Result<T, PipelineError>;

pub(crate) const TOP_KEYS: &[&str] = &["env", "jobs"];
pub(crate) const JOB_KEYS: &[&str] = &[
    "steps",
    "needs",
    "matrix",
    "env",
    "timeout",
    "runs-on",
    "image",
    "retry",
    "artifacts",
    "network",
    "submodules",
    "cache",
    "reuse",
    "secrets",
];
pub(crate) const STEP_KEYS: &[&str] = &["name", "script", "run"];
/// Keys of `image: {build: ..., context: ...}`.
pub(crate) const IMAGE_BUILD_KEYS: &[&str] = &["build", "context"];
const IMAGE_BUILD_ALIASES: &[(&str, &str)] = &[
    ("dockerfile", "build"),
    ("file", "build"),
    ("containerfile", "build"),
    ("path", "build"),
    ("dir", "context"),
    ("directory", "context"),
];

/// Well-known names from other CI systems, mapped to ours.
const TOP_ALIASES: &[(&str, &str)] = &[
    ("variables", "env"),
    ("environment", "env"),
    ("job", "jobs"),
    ("stages", "jobs"),
];
const JOB_ALIASES: &[(&str, &str)] = &[
    ("depends-on", "needs"),
    ("dependencies", "needs"),
    ("requires", "needs"),
    ("variables", "env"),
    ("environment", "env"),
    ("container", "image"),
    ("docker", "image"),
    ("strategy", "matrix"),
    ("timeout-minutes", "timeout"),
    ("retries", "retry"),
    ("networking", "network"),
    ("net", "network"),
    ("submodule", "submodules"),
    ("tags", "runs-on"),
    ("artifact", "artifacts"),
    ("upload", "artifacts"),
    ("caches", "cache"),
    ("reuse-commit", "reuse"),
    ("build-once", "reuse"),
    ("labels", "runs-on"),
    ("secret", "secrets"),
    ("credentials", "secrets"),
    ("script", "steps"),
    ("run", "steps"),
];
const STEP_ALIASES: &[(&str, &str)] = &[
    ("command", "run"),
    ("cmd", "run"),
    ("shell", "run"),
    ("sh", "run"),
    ("commands", "script"),
    ("lines", "script"),
    ("title", "name"),
];

/// Most matrix instances one job may expand to.
pub(crate) const MAX_INSTANCES: usize = 256;

/// A string from the file and where it was written.
#[derive(Debug, Clone)]
pub(crate) struct Text {
    pub value: String,
    pub loc: Loc,
}

pub(crate) struct Pipeline {
    pub env: Vec<EnvEntry>,
    pub jobs: Vec<Job>,
}

pub(crate) struct EnvEntry {
    pub name: String,
    pub value: Text,
}

pub(crate) struct Axis {
    pub name: String,
    pub values: Vec<String>,
}

pub(crate) struct Need {
    /// Index of the needed job in [`Pipeline::jobs`].
    pub job: usize,
    pub entry: Text,
}

pub(crate) struct Job {
    pub key: String,
    pub needs: Vec<Need>,
    pub matrix: Vec<Axis>,
    pub matrix_loc: Loc,
    pub env: Vec<EnvEntry>,
    pub timeout_secs: u64,
    pub runs_on: Vec<Text>,
    /// `runs-on: {labels: ..., fallback: false}`: only agents with every label.
    pub runs_on_strict: bool,
    pub image: Option<Text>,
    /// `image: {build: PATH, context: DIR}`: an image built from a Dockerfile of the repository.
    pub image_build: Option<ImageBuildSpec>,
    pub retry: u32,
    /// Container network for an `image` job.
    pub network: bool,
    pub submodules: bool,
    pub steps: Vec<Step>,
    /// `artifacts`: glob patterns of files to keep after the job.
    pub artifacts: Vec<Text>,
    /// `cache`: one entry, or a list of them.
    pub cache: Vec<CacheEntry>,
    /// `reuse: commit`.
    pub reuse: bool,
    /// `secrets`: names of the project's secrets the job gets as environment variables.
    pub secrets: Vec<String>,
}

/// `image: {build: PATH, context: DIR}`: workspace-relative, normalised (no `.`, `..`, empty
/// components); `context` absent means the Dockerfile's directory.
pub(crate) struct ImageBuildSpec {
    pub dockerfile: Text,
    pub context: Option<Text>,
}

/// One `cache:` entry: its key (may hold `${{ hashFiles(...) }}`) and path patterns.
pub(crate) struct CacheEntry {
    pub key: Text,
    pub paths: Vec<Text>,
}

pub(crate) enum StepName {
    Given(Text),
    /// `step N`.
    Default(String),
    /// A plain-string step is named after its command.
    FromCommand,
}

pub(crate) struct Step {
    pub name: StepName,
    pub lines: Vec<Text>,
}

pub(crate) fn parse(src: &Source<'_>, root: &Node) -> Result<Pipeline> {
    let Some(top) = root.as_mapping() else {
        return Err(src.error(
            Loc::START,
            "the top level of a pipeline must be a mapping with a `jobs` key",
        ));
    };
    if top.is_empty() {
        return Err(src.empty_file());
    }
    let p = Parser { src };
    let mut env = Vec::new();
    let mut jobs = None;
    for (key, value) in top.iter() {
        match key.as_str() {
            "env" => env = p.env(key, value, "the pipeline")?,
            "jobs" => jobs = Some((key, value)),
            _ => return Err(p.unknown_key(key, "at the top level", TOP_KEYS, TOP_ALIASES)),
        }
    }
    let Some((key, value)) = jobs else {
        return Err(src.error(
            Loc::START,
            "the pipeline has no `jobs`; add a `jobs:` mapping of job name to job, e.g.\n\
             jobs:\n  build:\n    steps:\n      - make",
        ));
    };
    let jobs = p.jobs(key, value)?;
    Ok(Pipeline { env, jobs })
}

struct Parser<'s, 'a> {
    src: &'s Source<'a>,
}

impl Parser<'_, '_> {
    fn err(&self, loc: Loc, message: impl Into<String>) -> PipelineError {
        self.src.error(loc, message)
    }

    fn unknown_key(
        &self,
        key: &MarkedScalarNode,
        context: &str,
        valid: &[&str],
        aliases: &[(&str, &str)],
    ) -> PipelineError {
        let valid_list = valid.join(", ");
        let message = match closest_key(key.as_str(), valid, aliases) {
            Some(s) => format!(
                "unknown key {:?} {context}; did you mean {s:?}? Valid keys: {valid_list}",
                key.as_str()
            ),
            None => format!(
                "unknown key {:?} {context}; remove or rename it. Valid keys: {valid_list}",
                key.as_str()
            ),
        };
        self.err(self.src.key_loc(key), message)
    }

    /// "expected X for WHAT, found Y; FIX" at `node`.
    /// The entries of a value written as one item or a list of items (`needs: build` or
    /// `needs: [build, lint]`), each with who holds it. A single item is a scalar, or a mapping
    /// when `mapping_item`; the other kind is a [`Parser::wrong_type`] error saying `expected`.
    /// An empty list is returned as such (each caller says what to write instead).
    fn one_or_list<'n>(
        &self,
        key: &'n MarkedScalarNode,
        value: &'n Node,
        mapping_item: bool,
        expected: &str,
        what: &str,
    ) -> Result<Vec<(&'n Node, Owner<'n>)>> {
        match value {
            Node::Sequence(list) => Ok(list
                .iter()
                .enumerate()
                .map(|(i, n)| (n, Owner::Entry(list, i)))
                .collect()),
            Node::Mapping(_) if mapping_item => Ok(vec![(value, Owner::Key(key))]),
            Node::Scalar(_) if !mapping_item => Ok(vec![(value, Owner::Key(key))]),
            _ => Err(self.wrong_type(value, Owner::Key(key), expected, what)),
        }
    }

    fn wrong_type(
        &self,
        node: &Node,
        owner: Owner<'_>,
        expected: &str,
        what: &str,
    ) -> PipelineError {
        let found_kind = node.as_scalar().map(kind);
        let fix = if found_kind == Some(Kind::Null) {
            "give it a value, or remove the key".to_owned()
        } else if expected.starts_with("a mapping") {
            "write `name: value` entries indented below the key".to_owned()
        } else if expected.starts_with("a list") {
            "write `[a, b]`, or one `- a` entry per line".to_owned()
        } else if let Node::Sequence(_) = node {
            "write a single value, not a list".to_owned()
        } else if let Node::Mapping(_) = node {
            "write a single value, not a mapping (check the indentation, and quote values that \
             contain \": \")"
                .to_owned()
        } else if let (Some(Kind::Bool | Kind::Int | Kind::Float), Node::Scalar(s), true) = (
            found_kind,
            node,
            ["a string", "a job name", "a label"]
                .iter()
                .any(|e| expected.starts_with(e)),
        ) {
            format!("quote it (\"{}\") if you mean the text", s.as_str())
        } else {
            format!("write {expected}")
        };
        self.err(
            self.src.loc(node, owner),
            format!(
                "expected {expected} for {what}, found {}; {fix}",
                describe(node)
            ),
        )
    }

    /// A YAML string (quoted, block or plain text that is not a number, boolean or null).
    fn string(&self, node: &Node, owner: Owner<'_>, what: &str) -> Result<Text> {
        match node {
            Node::Scalar(s) if kind(s) == Kind::Str => Ok(Text {
                value: s.as_str().to_owned(),
                loc: self.src.loc(node, owner),
            }),
            _ => Err(self.wrong_type(node, owner, "a string", what)),
        }
    }

    /// A string that is not empty or blank.
    fn non_empty_string(
        &self,
        node: &Node,
        owner: Owner<'_>,
        what: &str,
        fix: &str,
    ) -> Result<Text> {
        let text = self.string(node, owner, what)?;
        if text.value.trim().is_empty() {
            return Err(self.err(text.loc, format!("{what} is empty; {fix}")));
        }
        Ok(text)
    }

    /// Any scalar but null, as written in the file: `1.80` stays `1.80`, `true` stays `true`.
    fn scalar_text(&self, node: &Node, owner: Owner<'_>, what: &str) -> Result<Text> {
        match node {
            Node::Scalar(s) if kind(s) != Kind::Null => Ok(Text {
                value: s.as_str().to_owned(),
                loc: self.src.loc(node, owner),
            }),
            Node::Scalar(_) => Err(self.err(
                self.src.loc(node, owner),
                format!(
                    "{what} has no value; give it one (write \"\" for an empty string), or remove it"
                ),
            )),
            _ => Err(self.wrong_type(node, owner, "a string, number or boolean", what)),
        }
    }

    fn mapping<'n>(
        &self,
        node: &'n Node,
        key: &MarkedScalarNode,
        what: &str,
    ) -> Result<&'n MarkedMappingNode> {
        node.as_mapping()
            .ok_or_else(|| self.wrong_type(node, Owner::Key(key), "a mapping", what))
    }

    fn sequence<'n>(
        &self,
        node: &'n Node,
        key: &MarkedScalarNode,
        what: &str,
    ) -> Result<&'n MarkedSequenceNode> {
        node.as_sequence()
            .ok_or_else(|| self.wrong_type(node, Owner::Key(key), "a list", what))
    }

    fn jobs(&self, key: &MarkedScalarNode, value: &Node) -> Result<Vec<Job>> {
        let map = match value {
            Node::Scalar(s) if kind(s) == Kind::Null => {
                return Err(self.err(
                    self.src.key_loc(key),
                    "`jobs` is empty; add at least one job, e.g. `build: {steps: [make]}`",
                ))
            }
            _ => self.mapping(value, key, "`jobs` (a mapping of job name to job)")?,
        };
        if map.is_empty() {
            return Err(self.err(
                self.src.loc(value, Owner::Key(key)),
                "`jobs` is empty; add at least one job, e.g. `build: {steps: [make]}`",
            ));
        }
        // First pass: the job names, so that `needs` can refer to jobs declared later.
        let mut names = Vec::with_capacity(map.len());
        for job_key in map.keys() {
            let name = job_key.as_str();
            if name.is_empty() || !name.chars().all(is_name_char) {
                let fixed: String = name
                    .chars()
                    .map(|c| if is_name_char(c) { c } else { '-' })
                    .collect();
                let hint = if fixed.chars().any(|c| c != '-') {
                    format!(" (e.g. {fixed:?})")
                } else {
                    String::new()
                };
                return Err(self.err(
                    self.src.key_loc(job_key),
                    format!(
                        "invalid job name {name:?}: job names may only contain letters, digits, \
                         `_` and `-`; rename it{hint}"
                    ),
                ));
            }
            names.push(name);
        }
        map.iter()
            .map(|(job_key, job)| self.job(&names, job_key, job))
            .collect()
    }

    fn job(&self, names: &[&str], key: &MarkedScalarNode, value: &Node) -> Result<Job> {
        let name = key.as_str();
        let map = match value {
            Node::Scalar(s) if kind(s) == Kind::Null => {
                return Err(self.err(
                    self.src.key_loc(key),
                    format!("job {name:?} is empty; give it a `steps:` list, e.g. `steps: [make]`"),
                ))
            }
            _ => self.mapping(value, key, &format!("job {name:?}"))?,
        };
        let mut job = Job {
            key: name.to_owned(),
            needs: Vec::new(),
            matrix: Vec::new(),
            matrix_loc: Loc::START,
            env: Vec::new(),
            timeout_secs: 0,
            runs_on: Vec::new(),
            runs_on_strict: false,
            image: None,
            image_build: None,
            retry: 0,
            network: false,
            submodules: false,
            steps: Vec::new(),
            artifacts: Vec::new(),
            cache: Vec::new(),
            reuse: false,
            secrets: Vec::new(),
        };
        let mut network_key = None;
        let mut has_steps = false;
        let context = format!("in job {name:?}");
        for (k, v) in map.iter() {
            match k.as_str() {
                "steps" => {
                    job.steps = self.steps(name, k, v)?;
                    has_steps = true;
                }
                "needs" => job.needs = self.needs(names, name, k, v)?,
                "matrix" => {
                    job.matrix = self.matrix(name, k, v)?;
                    job.matrix_loc = self.src.key_loc(k);
                }
                "env" => job.env = self.env(k, v, &format!("job {name:?}"))?,
                "timeout" => job.timeout_secs = self.timeout(name, k, v)?,
                "runs-on" => (job.runs_on, job.runs_on_strict) = self.runs_on(name, k, v)?,
                "image" => {
                    let what = format!("`image` of job {name:?}");
                    if let Node::Mapping(map) = v {
                        job.image_build = Some(self.image_build(&what, k, v, map)?);
                    } else {
                        job.image = Some(self.non_empty_string(
                            v,
                            Owner::Key(k),
                            &what,
                            "give an image name (or `{build: ci/Dockerfile}` to build one from \
                             the repository), or remove `image` to run on the host",
                        )?);
                    }
                }
                "retry" => job.retry = self.retry(name, k, v)?,
                "artifacts" => job.artifacts = self.artifacts(name, k, v)?,
                "cache" => job.cache = self.cache(name, k, v)?,
                "reuse" => job.reuse = self.reuse(name, k, v)?,
                "secrets" => job.secrets = self.secrets(name, k, v)?,
                "network" => {
                    let what = format!("`network` of job {name:?}");
                    job.network = self.boolean(k, v, &what)?;
                    network_key = Some(k);
                }
                "submodules" => {
                    let what = format!("`submodules` of job {name:?}");
                    job.submodules = self.boolean(k, v, &what)?;
                }
                _ => return Err(self.unknown_key(k, &context, JOB_KEYS, JOB_ALIASES)),
            }
        }
        let container = job.image.is_some() || job.image_build.is_some();
        if let (Some(k), false, true) = (network_key, container, job.network) {
            return Err(self.err(
                self.src.key_loc(k),
                format!(
                    "`network: true` of job {name:?} only applies to container jobs (jobs on \
                     the host always have the host's network); add an `image`, or remove \
                     `network`"
                ),
            ));
        }
        if !has_steps {
            return Err(self.err(
                self.src.key_loc(key),
                format!("job {name:?} has no `steps`; add a `steps:` list, e.g. `steps: [make]`"),
            ));
        }
        Ok(job)
    }

    fn steps(&self, job: &str, key: &MarkedScalarNode, value: &Node) -> Result<Vec<Step>> {
        let what = format!("`steps` of job {job:?}");
        let list = self.sequence(value, key, &what)?;
        if list.is_empty() {
            return Err(self.err(
                self.src.loc(value, Owner::Key(key)),
                format!("job {job:?} has no steps; add at least one, e.g. `- make`"),
            ));
        }
        list.iter()
            .enumerate()
            .map(|(i, entry)| self.step(job, i + 1, entry, Owner::Entry(list, i)))
            .collect()
    }

    fn step(&self, job: &str, n: usize, node: &Node, owner: Owner<'_>) -> Result<Step> {
        let what = format!("step {n} of job {job:?}");
        let map = match node {
            Node::Mapping(m) => m,
            Node::Scalar(s) if kind(s) == Kind::Str => {
                // Shorthand: `- make` is `- {name: make, run: make}`.
                let text = self.run(node, owner, &what)?;
                return Ok(Step {
                    name: StepName::FromCommand,
                    lines: vec![text],
                });
            }
            _ => {
                return Err(self.err(
                    self.src.loc(node, owner),
                    format!(
                        "{what} must be a command string or a mapping with `run` or `script`, \
                         found {}; write e.g. `- make` or `- run: make`",
                        describe(node)
                    ),
                ))
            }
        };
        let mut name = None;
        let mut lines: Option<(&str, Vec<Text>)> = None;
        let context = format!("in step {n} of job {job:?}");
        for (k, v) in map.iter() {
            match k.as_str() {
                "name" => {
                    name = Some(self.non_empty_string(
                        v,
                        Owner::Key(k),
                        &format!("`name` of {what}"),
                        "give the step a name, or remove `name` to use the default",
                    )?)
                }
                other @ ("run" | "script") => {
                    if let Some((first, _)) = lines {
                        return Err(self.err(
                            self.src.key_loc(k),
                            format!(
                                "{what} has both `{first}` and `{other}`; keep only one \
                                 (`run` for one command or block, `script` for a list of lines)"
                            ),
                        ));
                    }
                    let parsed = if other == "run" {
                        vec![self.run(v, Owner::Key(k), &format!("`run` of {what}"))?]
                    } else {
                        self.script(v, k, &what)?
                    };
                    lines = Some((other, parsed));
                }
                _ => return Err(self.unknown_key(k, &context, STEP_KEYS, STEP_ALIASES)),
            }
        }
        let Some((_, lines)) = lines else {
            return Err(self.err(
                self.src.loc(node, owner),
                format!(
                    "{what} has neither `run` nor `script`; add `run: <command>` or \
                     `script: [<line>, ...]`"
                ),
            ));
        };
        Ok(Step {
            name: name.map_or_else(|| StepName::Default(format!("step {n}")), StepName::Given),
            lines,
        })
    }

    /// A `run` command: one line, which may be a multi-line block (trailing newlines dropped).
    fn run(&self, node: &Node, owner: Owner<'_>, what: &str) -> Result<Text> {
        let mut text =
            self.non_empty_string(node, owner, what, "give it a command, or remove the step")?;
        let trimmed = text.value.trim_end_matches(['\n', '\r']).len();
        text.value.truncate(trimmed);
        Ok(text)
    }

    fn script(&self, value: &Node, key: &MarkedScalarNode, step: &str) -> Result<Vec<Text>> {
        let what = format!("`script` of {step}");
        let list = match value {
            Node::Sequence(list) => list,
            Node::Scalar(s) if kind(s) == Kind::Str => {
                return Err(self.err(
                    self.src.loc(value, Owner::Key(key)),
                    format!(
                        "{what} must be a list of lines, found a string; write `script: [...]` \
                         with one entry per line, or use `run:` for a single command"
                    ),
                ))
            }
            _ => return Err(self.wrong_type(value, Owner::Key(key), "a list of lines", &what)),
        };
        if list.is_empty() {
            return Err(self.err(
                self.src.loc(value, Owner::Key(key)),
                format!("{what} is empty; add at least one line, or remove the step"),
            ));
        }
        list.iter()
            .enumerate()
            .map(|(i, line)| {
                self.non_empty_string(
                    line,
                    Owner::Entry(list, i),
                    &format!("line {} of {what}", i + 1),
                    "write a command, or remove the line",
                )
            })
            .collect()
    }

    fn needs(
        &self,
        names: &[&str],
        job: &str,
        key: &MarkedScalarNode,
        value: &Node,
    ) -> Result<Vec<Need>> {
        let what = format!("`needs` of job {job:?}");
        let entries = self.one_or_list(
            key,
            value,
            false,
            "a job name or a list of job names",
            &what,
        )?;
        let mut needs: Vec<Need> = Vec::with_capacity(entries.len());
        for (node, owner) in entries {
            let entry = self.string(node, owner, &what)?;
            let target = entry.value.as_str();
            if target == job {
                return Err(self.err(
                    entry.loc,
                    format!("job {job:?} needs itself; remove {target:?} from its `needs`"),
                ));
            }
            let Some(index) = names.iter().position(|n| *n == target) else {
                return Err(self.err(entry.loc, unknown_need(names, job, target)));
            };
            if needs.iter().any(|n| n.job == index) {
                return Err(self.err(
                    entry.loc,
                    format!("job {job:?} lists {target:?} twice in `needs`; remove the duplicate"),
                ));
            }
            needs.push(Need { job: index, entry });
        }
        Ok(needs)
    }

    fn matrix(&self, job: &str, key: &MarkedScalarNode, value: &Node) -> Result<Vec<Axis>> {
        let what = format!("`matrix` of job {job:?}");
        let map = self.mapping(
            value,
            key,
            &format!("{what} (a mapping of axis name to list of values)"),
        )?;
        if map.is_empty() {
            return Err(self.err(
                self.src.loc(value, Owner::Key(key)),
                format!(
                    "{what} has no axes; add one (e.g. `os: [linux, bsd]`), or remove `matrix`"
                ),
            ));
        }
        let mut axes = Vec::with_capacity(map.len());
        let mut instances: usize = 1;
        for (axis_key, values) in map.iter() {
            let name = axis_key.as_str();
            if name.is_empty() || !name.chars().all(is_name_char) {
                return Err(self.err(
                    self.src.key_loc(axis_key),
                    format!(
                        "invalid matrix axis name {name:?} in job {job:?}: axis names may only \
                         contain letters, digits, `_` and `-`; rename it"
                    ),
                ));
            }
            let axis_what = format!("matrix axis {name:?} of job {job:?}");
            let list = match values {
                Node::Sequence(list) => list,
                Node::Scalar(s) if kind(s) != Kind::Null => {
                    return Err(self.err(
                        self.src.loc(values, Owner::Key(axis_key)),
                        format!(
                            "{axis_what} must be a list of values, found {}; write `{name}: [{}]`",
                            describe(values),
                            s.as_str()
                        ),
                    ))
                }
                _ => {
                    return Err(self.wrong_type(
                        values,
                        Owner::Key(axis_key),
                        "a list of values",
                        &axis_what,
                    ))
                }
            };
            if list.is_empty() {
                return Err(self.err(
                    self.src.loc(values, Owner::Key(axis_key)),
                    format!("{axis_what} is empty; add at least one value, or remove the axis"),
                ));
            }
            let mut seen: Vec<String> = Vec::with_capacity(list.len());
            for (i, entry) in list.iter().enumerate() {
                let text = self.scalar_text(
                    entry,
                    Owner::Entry(list, i),
                    &format!("a value of {axis_what}"),
                )?;
                if text.value.is_empty() {
                    return Err(self.err(
                        text.loc,
                        format!("empty value in {axis_what}; give it a name, or remove it"),
                    ));
                }
                if seen.contains(&text.value) {
                    return Err(self.err(
                        text.loc,
                        format!("duplicate value {:?} in {axis_what}; remove it", text.value),
                    ));
                }
                seen.push(text.value);
            }
            instances = instances.saturating_mul(seen.len());
            if instances > MAX_INSTANCES {
                return Err(self.err(
                    self.src.key_loc(axis_key),
                    format!(
                        "the matrix of job {job:?} expands to more than {MAX_INSTANCES} instances; \
                         remove axes or values, or split the job"
                    ),
                ));
            }
            axes.push(Axis {
                name: name.to_owned(),
                values: seen,
            });
        }
        Ok(axes)
    }

    fn env(&self, key: &MarkedScalarNode, value: &Node, owner: &str) -> Result<Vec<EnvEntry>> {
        let map = match value {
            Node::Scalar(s) if kind(s) == Kind::Null => {
                return Err(self.err(
                    self.src.key_loc(key),
                    format!(
                        "`env` of {owner} is empty; add `NAME: value` entries, or remove `env`"
                    ),
                ))
            }
            _ => self.mapping(
                value,
                key,
                &format!("`env` of {owner} (a mapping of NAME: value)"),
            )?,
        };
        let mut env = Vec::with_capacity(map.len());
        for (k, v) in map.iter() {
            let name = k.as_str();
            if !crate::valid_env_name(name) {
                return Err(self.err(
                    self.src.key_loc(k),
                    format!(
                        "invalid environment variable name {name:?} in `env` of {owner}: names \
                         must start with a letter or `_` and contain only letters, digits and `_`; \
                         rename it"
                    ),
                ));
            }
            let value = self.scalar_text(v, Owner::Key(k), &format!("env {name:?} of {owner}"))?;
            env.push(EnvEntry {
                name: name.to_owned(),
                value,
            });
        }
        Ok(env)
    }

    fn timeout(&self, job: &str, key: &MarkedScalarNode, value: &Node) -> Result<u64> {
        let what = format!("`timeout` of job {job:?}");
        let loc = self.src.loc(value, Owner::Key(key));
        let text = match value {
            Node::Scalar(s) if matches!(kind(s), Kind::Int | Kind::Str | Kind::Float) => s.as_str(),
            _ => {
                return Err(self.wrong_type(
                    value,
                    Owner::Key(key),
                    "seconds or a duration like \"90s\", \"10m\", \"1h30m\"",
                    &what,
                ))
            }
        };
        match parse_duration(text) {
            Ok(0) => Err(self.err(
                loc,
                format!(
                    "{what} is 0; give a positive duration, or remove `timeout` for no timeout"
                ),
            )),
            Ok(secs) => Ok(secs),
            Err(DurationError::TooLarge) => Err(self.err(
                loc,
                format!("{what} {text:?} is too large; give a shorter duration"),
            )),
            Err(DurationError::Invalid) => Err(self.err(
                loc,
                format!(
                    "{what} is not a duration: {text:?}; write whole seconds (`600`) or hours, \
                     minutes and seconds in that order: \"90s\", \"10m\", \"1h\", \"1h30m\""
                ),
            )),
        }
    }

    /// `true` or `false`.
    fn boolean(&self, key: &MarkedScalarNode, value: &Node, what: &str) -> Result<bool> {
        match value {
            Node::Scalar(s) if kind(s) == Kind::Bool => Ok(s.as_str().eq_ignore_ascii_case("true")),
            _ => Err(self.wrong_type(value, Owner::Key(key), "true or false", what)),
        }
    }

    fn retry(&self, job: &str, key: &MarkedScalarNode, value: &Node) -> Result<u32> {
        let what = format!("`retry` of job {job:?}");
        let loc = self.src.loc(value, Owner::Key(key));
        let range_error = |text: &str| {
            self.err(
                loc,
                format!(
                    "{what} must be a whole number from 0 to 10 (re-runs after a failure), \
                     found {text}; use a value in that range"
                ),
            )
        };
        match value {
            Node::Scalar(s) if matches!(kind(s), Kind::Int | Kind::Str) => {
                let text = s.as_str().trim();
                if !text.starts_with(['-', '+']) && !text.chars().all(|c| c.is_ascii_digit()) {
                    return Err(range_error(&format!("{text:?}")));
                }
                match text.parse::<i64>() {
                    Ok(n @ 0..=10) => Ok(n as u32),
                    _ => Err(range_error(text)),
                }
            }
            Node::Scalar(s) if kind(s) == Kind::Float => Err(range_error(s.as_str())),
            _ => Err(self.wrong_type(value, Owner::Key(key), "a whole number from 0 to 10", &what)),
        }
    }

    /// `runs-on: LABEL`, `runs-on: [LABELS]`, or `runs-on: {labels: LABELS, fallback: false}`:
    /// the labels, and whether they are required strictly (no generic agent as a fallback).
    fn runs_on(
        &self,
        job: &str,
        key: &MarkedScalarNode,
        value: &Node,
    ) -> Result<(Vec<Text>, bool)> {
        let what = format!("`runs-on` of job {job:?}");
        let Some(map) = value.as_mapping() else {
            return Ok((self.runs_on_labels(&what, key, value)?, false));
        };
        let example = "write e.g. `runs-on: {labels: [gpu], fallback: false}`";
        let mut labels = None;
        let mut fallback = true;
        for (k, v) in map.iter() {
            match k.as_str() {
                "labels" => labels = Some(self.runs_on_labels(&what, k, v)?),
                "fallback" => fallback = self.boolean(k, v, &format!("`fallback` of {what}"))?,
                other => {
                    return Err(self.err(
                        self.src.key_loc(k),
                        format!("unknown key {other:?} in {what}; Valid keys: labels, fallback"),
                    ))
                }
            }
        }
        let Some(labels) = labels else {
            return Err(self.err(
                self.src.loc(value, Owner::Key(key)),
                format!("{what} has no `labels`; {example}"),
            ));
        };
        Ok((labels, !fallback))
    }

    fn runs_on_labels(
        &self,
        what: &str,
        key: &MarkedScalarNode,
        value: &Node,
    ) -> Result<Vec<Text>> {
        let what = what.to_owned();
        let entries = self.one_or_list(key, value, false, "a label or a list of labels", &what)?;
        if entries.is_empty() {
            return Err(self.err(
                self.src.loc(value, Owner::Key(key)),
                format!(
                    "{what} is an empty list; add a label, or remove `runs-on` to run on any agent"
                ),
            ));
        }
        entries
            .into_iter()
            .map(|(node, owner)| {
                self.non_empty_string(
                    node,
                    owner,
                    &format!("a label in {what}"),
                    "give an agent label, or remove it",
                )
            })
            .collect()
    }
}

impl Parser<'_, '_> {
    /// `secrets: NAME` or `secrets: [NAMES]`: environment variable names, each once.
    fn secrets(&self, job: &str, key: &MarkedScalarNode, value: &Node) -> Result<Vec<String>> {
        let what = format!("`secrets` of job {job:?}");
        let entries = self.one_or_list(
            key,
            value,
            false,
            "a secret name or a list of secret names",
            &what,
        )?;
        if entries.is_empty() {
            return Err(self.err(
                self.src.loc(value, Owner::Key(key)),
                format!("{what} is an empty list; name a secret, or remove `secrets`"),
            ));
        }
        let mut names: Vec<String> = Vec::with_capacity(entries.len());
        for (node, owner) in entries {
            let text = self.non_empty_string(
                node,
                owner,
                &format!("a name in {what}"),
                "give the name of a secret set with `tributary secret set PROJECT NAME`",
            )?;
            if !crate::valid_env_name(&text.value) {
                return Err(self.err(
                    text.loc,
                    format!(
                        "invalid secret name {:?} in {what}: a secret is an environment variable, \
                         so its name starts with a letter or `_` and has only letters, digits \
                         and `_`",
                        text.value
                    ),
                ));
            }
            if names.contains(&text.value) {
                return Err(self.err(
                    text.loc,
                    format!(
                        "secret {:?} is listed twice in {what}; remove one",
                        text.value
                    ),
                ));
            }
            names.push(text.value);
        }
        Ok(names)
    }

    /// `artifacts: PATTERN`, `artifacts: [PATTERNS]` or GitLab's `artifacts: {paths: [...]}`.
    fn artifacts(&self, job: &str, key: &MarkedScalarNode, value: &Node) -> Result<Vec<Text>> {
        let what = format!("`artifacts` of job {job:?}");
        let (list_owner_key, value) = match value {
            Node::Mapping(map) => {
                let mut paths = None;
                for (k, v) in map.iter() {
                    match k.as_str() {
                        "paths" => paths = Some((k, v)),
                        _ => {
                            return Err(self.err(
                                self.src.key_loc(k),
                                format!(
                                    "{what} has an unknown key `{}`; only `paths` is supported \
                                     (artifacts are kept when the job succeeds)",
                                    k.as_str()
                                ),
                            ))
                        }
                    }
                }
                let Some((k, v)) = paths else {
                    return Err(self.err(
                        self.src.loc(value, Owner::Key(key)),
                        format!("{what} has no `paths`; write e.g. `artifacts: [dist/*.tar.gz]`"),
                    ));
                };
                (k, v)
            }
            _ => (key, value),
        };
        self.patterns(
            value,
            list_owner_key,
            &Patterns {
                list: &what,
                noun: "pattern",
                expected: "a file pattern or a list of file patterns",
                add: "add a file pattern, or remove `artifacts`",
                hint: "give a file pattern relative to the workspace, e.g. `dist/*.tar.gz`",
            },
        )
    }
}

impl Parser<'_, '_> {
    /// `image: {build: PATH, context: DIR}`.
    fn image_build(
        &self,
        what: &str,
        key: &MarkedScalarNode,
        value: &Node,
        map: &MarkedMappingNode,
    ) -> Result<ImageBuildSpec> {
        let mut dockerfile = None;
        let mut context = None;
        let context_what = format!("in {what}");
        for (k, v) in map.iter() {
            match k.as_str() {
                "build" => {
                    let text = self.repo_path(
                        v,
                        Owner::Key(k),
                        &format!("`build` of {what}"),
                        "give the path of a Dockerfile in the repository, e.g. \
                         `build: ci/Dockerfile`",
                    )?;
                    if text.value == "." {
                        return Err(self.err(
                            text.loc,
                            format!(
                                "`build` of {what} names the repository's root; give the path \
                                 of the Dockerfile itself, e.g. `build: Dockerfile`"
                            ),
                        ));
                    }
                    dockerfile = Some(text);
                }
                "context" => {
                    context = Some(self.repo_path(
                        v,
                        Owner::Key(k),
                        &format!("`context` of {what}"),
                        "give a directory of the repository (`.` for all of it), or remove \
                         `context` to use the Dockerfile's directory",
                    )?)
                }
                _ => {
                    return Err(self.unknown_key(
                        k,
                        &context_what,
                        IMAGE_BUILD_KEYS,
                        IMAGE_BUILD_ALIASES,
                    ))
                }
            }
        }
        let Some(dockerfile) = dockerfile else {
            return Err(self.err(
                self.src.loc(value, Owner::Key(key)),
                format!(
                    "{what} has no `build`; write `image: {{build: ci/Dockerfile}}` to build the \
                     job's image from a Dockerfile of the repository, or `image: NAME` to use an \
                     existing image"
                ),
            ));
        };
        Ok(ImageBuildSpec {
            dockerfile,
            context,
        })
    }

    /// A path inside the repository (relative to the workspace), normalised: `./ci//x/` is
    /// `ci/x`, the root is `.`. Absolute paths, `..` and backslashes are errors.
    fn repo_path(&self, node: &Node, owner: Owner<'_>, what: &str, fix: &str) -> Result<Text> {
        let mut text = self.non_empty_string(node, owner, what, fix)?;
        let raw = text.value.trim();
        let problem = if raw.starts_with('/') {
            Some("is absolute; write it relative to the repository's root")
        } else if raw.contains('\\') {
            Some("contains a backslash; use / between directories")
        } else if raw.split('/').any(|c| c == "..") {
            Some("contains `..`: images are built from inside the repository")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(self.err(text.loc, format!("{what} {:?} {problem}", text.value)));
        }
        let parts: Vec<&str> = raw
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        text.value = if parts.is_empty() {
            ".".to_owned()
        } else {
            parts.join("/")
        };
        Ok(text)
    }
}

/// Most `cache` entries one job may have.
const MAX_CACHES: usize = 8;

impl Parser<'_, '_> {
    /// `cache: {key: K, paths: [...]}` or a list of such mappings (GitLab's spelling).
    fn cache(&self, job: &str, key: &MarkedScalarNode, value: &Node) -> Result<Vec<CacheEntry>> {
        let what = format!("`cache` of job {job:?}");
        let example = "write e.g. `cache: {key: \"cargo-${{ hashFiles('Cargo.lock') }}\", \
                       paths: [target]}`";
        let entries = self.one_or_list(
            key,
            value,
            true,
            "a mapping with `key` and `paths`, or a list of them",
            &what,
        )?;
        if entries.is_empty() {
            return Err(self.err(
                self.src.loc(value, Owner::Key(key)),
                format!("{what} is an empty list; {example}, or remove `cache`"),
            ));
        }
        if entries.len() > MAX_CACHES {
            return Err(self.err(
                self.src.loc(value, Owner::Key(key)),
                format!(
                    "{what} has {} entries, more than {MAX_CACHES}; merge their paths under \
                     fewer keys",
                    entries.len()
                ),
            ));
        }
        let mut out: Vec<CacheEntry> = Vec::with_capacity(entries.len());
        for (n, (node, owner)) in entries.into_iter().enumerate() {
            let entry_what = if n == 0 && out.is_empty() && !matches!(value, Node::Sequence(_)) {
                what.clone()
            } else {
                format!("entry {} of {what}", n + 1)
            };
            let Some(map) = node.as_mapping() else {
                return Err(self.wrong_type(
                    node,
                    owner,
                    "a mapping with `key` and `paths`",
                    &entry_what,
                ));
            };
            let mut cache_key = None;
            let mut paths = None;
            for (k, v) in map.iter() {
                match k.as_str() {
                    "key" => {
                        cache_key = Some(self.non_empty_string(
                            v,
                            Owner::Key(k),
                            &format!("`key` of {entry_what}"),
                            example,
                        )?)
                    }
                    "paths" => paths = Some(self.cache_paths(&entry_what, k, v)?),
                    other => {
                        let hint = match other {
                            "path" => "did you mean `paths`? ",
                            "policy" | "when" | "untracked" | "restore-keys" => {
                                "it is not supported: a cache is restored before the job and \
                                 saved after it succeeded when its key was missed. "
                            }
                            _ => "",
                        };
                        return Err(self.err(
                            self.src.key_loc(k),
                            format!(
                                "unknown key {other:?} in {entry_what}; {hint}Valid keys: key, \
                                 paths"
                            ),
                        ));
                    }
                }
            }
            let loc = self.src.loc(node, owner);
            let Some(cache_key) = cache_key else {
                return Err(self.err(loc, format!("{entry_what} has no `key`; {example}")));
            };
            let Some(paths) = paths else {
                return Err(self.err(loc, format!("{entry_what} has no `paths`; {example}")));
            };
            if let Some(first) = out.iter().find(|e| e.key.value == cache_key.value) {
                return Err(self.err(
                    cache_key.loc,
                    format!(
                        "{entry_what} has the same key {:?} as the entry at line {}; give each \
                         cache its own key",
                        cache_key.value, first.key.loc.line
                    ),
                ));
            }
            out.push(CacheEntry {
                key: cache_key,
                paths,
            });
        }
        Ok(out)
    }

    fn cache_paths(&self, what: &str, key: &MarkedScalarNode, value: &Node) -> Result<Vec<Text>> {
        self.patterns(
            value,
            key,
            &Patterns {
                list: &format!("`paths` of {what}"),
                noun: "path",
                expected: "a path pattern or a list of them",
                add: "add a path, e.g. `paths: [target]`",
                hint: "give a path relative to the workspace, e.g. `target`",
            },
        )
    }

    /// A pattern or a non-empty list of patterns relative to the workspace (`artifacts`, a
    /// cache's `paths`), each checked by [`crate::artifacts::pattern_problem`].
    fn patterns(
        &self,
        value: &Node,
        key: &MarkedScalarNode,
        words: &Patterns<'_>,
    ) -> Result<Vec<Text>> {
        let Patterns {
            list,
            noun,
            expected,
            add,
            hint,
        } = words;
        let entries = self.one_or_list(key, value, false, expected, list)?;
        if entries.is_empty() {
            return Err(self.err(
                self.src.loc(value, Owner::Key(key)),
                format!("{list} is an empty list; {add}"),
            ));
        }
        let mut patterns = Vec::with_capacity(entries.len());
        for (node, owner) in entries {
            let text = self.non_empty_string(node, owner, &format!("a {noun} in {list}"), hint)?;
            if let Some(problem) = crate::artifacts::pattern_problem(&text.value) {
                return Err(self.err(
                    text.loc,
                    format!("{noun} {:?} in {list} {problem}", text.value),
                ));
            }
            patterns.push(text);
        }
        Ok(patterns)
    }

    /// `reuse: commit`.
    fn reuse(&self, job: &str, key: &MarkedScalarNode, value: &Node) -> Result<bool> {
        let what = format!("`reuse` of job {job:?}");
        let text = self.string(value, Owner::Key(key), &what)?;
        if text.value != "commit" {
            return Err(self.err(
                text.loc,
                format!(
                    "{what} is {:?}; the only value is `commit` (reuse a successful run of this \
                     same job at the same commit instead of running it again), or remove `reuse`",
                    text.value
                ),
            ));
        }
        Ok(true)
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn unknown_need(names: &[&str], job: &str, target: &str) -> String {
    if let Some((base, _)) = target.split_once('[') {
        if names.contains(&base) {
            return format!(
                "`needs` of job {job:?} names a matrix instance {target:?}; `needs` takes job \
                 names: write {base:?} to wait for every instance of it"
            );
        }
    }
    let others: Vec<&str> = names.iter().copied().filter(|n| *n != job).collect();
    let unknown = format!("job {job:?} needs {target:?}, which is not a job in this pipeline");
    if others.is_empty() {
        return format!("{unknown}; it is the only job, so remove `needs`");
    }
    let jobs = others.join(", ");
    match closest(target, others.iter().copied()) {
        Some(s) => format!("{unknown}; did you mean {s:?}? Other jobs: {jobs}"),
        None => format!("{unknown}; use one of the other jobs: {jobs}"),
    }
}

/// How errors name a list of patterns ([`Parser::patterns`]).
struct Patterns<'a> {
    /// The list, e.g. "`artifacts` of job \"build\"".
    list: &'a str,
    /// One entry: "pattern" or "path".
    noun: &'a str,
    /// The expected type, for a wrong one.
    expected: &'a str,
    /// What to do about an empty list.
    add: &'a str,
    /// What to do about an empty entry.
    hint: &'a str,
}
