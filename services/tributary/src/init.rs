//! `tributary init`: a starter `.tributary.yml` from what the directory holds (Cargo.toml,
//! package.json, go.mod, pyproject.toml/requirements.txt, Makefile), checked by the pipeline
//! parser before it is written, never over an existing file.
//!
//! [`look`] reads the directory into [`Found`] (plain data); [`starter`] turns that into the
//! pipeline text (pure, unit-tested: every combination parses).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use crate::cli::InitArgs;

/// What `init` found in the repository's directory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Found {
    /// `Cargo.toml`; `Some(true)` when `Cargo.lock` is there too (then builds are `--locked`).
    pub cargo: Option<bool>,
    pub node: Option<Node>,
    /// `go.mod`.
    pub go: bool,
    pub python: Option<Python>,
    /// `Makefile` (or `makefile`, `GNUmakefile`), with whether it has a `test` target.
    pub make: Option<Make>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Node {
    /// `package-lock.json` is there: `npm ci` (else `npm install`).
    pub lock: bool,
    /// `scripts.build` is set.
    pub build: bool,
    /// `scripts.test` is set and is not npm's placeholder (`echo "Error: no test specified"`).
    pub test: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Python {
    pub requirements: bool,
    pub pyproject: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Make {
    pub file: String,
    pub test: bool,
}

impl Found {
    /// The marker files found, for messages.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.cargo.is_some() {
            names.push("Cargo.toml");
        }
        if self.node.is_some() {
            names.push("package.json");
        }
        if self.go {
            names.push("go.mod");
        }
        if let Some(p) = &self.python {
            if p.pyproject {
                names.push("pyproject.toml");
            }
            if p.requirements {
                names.push("requirements.txt");
            }
        }
        if self.make.is_some() {
            names.push("Makefile");
        }
        names
    }
}

/// Reads what matters in `dir`. Unreadable or malformed files count as absent details (a
/// package.json that does not parse still gets `npm install`), never as an error.
pub fn look(dir: &Path) -> Found {
    let has = |name: &str| dir.join(name).is_file();
    let node = has("package.json").then(|| {
        let scripts = std::fs::read_to_string(dir.join("package.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|v| v["scripts"].clone())
            .unwrap_or_default();
        let script = |name: &str| scripts[name].as_str().map(str::to_owned);
        Node {
            lock: has("package-lock.json"),
            build: script("build").is_some(),
            test: script("test").is_some_and(|t| !t.contains("no test specified")),
        }
    });
    let python = (has("pyproject.toml") || has("requirements.txt")).then(|| Python {
        requirements: has("requirements.txt"),
        pyproject: has("pyproject.toml"),
    });
    let make = ["GNUmakefile", "makefile", "Makefile"]
        .into_iter()
        .find(|f| has(f))
        .map(|f| Make {
            file: f.to_owned(),
            test: std::fs::read_to_string(dir.join(f))
                .map(|t| t.lines().any(|l| l.starts_with("test:")))
                .unwrap_or(false),
        });
    Found {
        cargo: has("Cargo.toml").then(|| has("Cargo.lock")),
        node,
        go: has("go.mod"),
        python,
        make,
    }
}

/// The starter pipeline for what was found: one job per kind of project, each step a command
/// that needs nothing beyond the project's own tool (no network for a project without
/// dependencies). With nothing found, one job that says what to edit.
pub fn starter(found: &Found) -> String {
    let mut jobs: Vec<(&str, Vec<(&str, String)>)> = Vec::new();
    if let Some(locked) = found.cargo {
        let flag = if locked { " --locked" } else { "" };
        jobs.push((
            "rust",
            vec![
                ("build", format!("cargo build{flag}")),
                ("test", format!("cargo test{flag}")),
            ],
        ));
    }
    if let Some(node) = &found.node {
        let install = if node.lock { "npm ci" } else { "npm install" };
        let mut steps = vec![("install", install.to_owned())];
        if node.build {
            steps.push(("build", "npm run build".to_owned()));
        }
        if node.test {
            steps.push(("test", "npm test".to_owned()));
        }
        jobs.push(("node", steps));
    }
    if found.go {
        jobs.push((
            "go",
            vec![
                ("vet", "go vet ./...".to_owned()),
                ("test", "go test ./...".to_owned()),
            ],
        ));
    }
    if let Some(py) = &found.python {
        let mut steps = Vec::new();
        if py.requirements {
            steps.push((
                "install",
                "python3 -m pip install -r requirements.txt".to_owned(),
            ));
        }
        steps.push(("test", "python3 -m pytest".to_owned()));
        jobs.push(("python", steps));
    }
    if let Some(make) = &found.make {
        let file = if make.file == "Makefile" || make.file == "makefile" {
            String::new()
        } else {
            format!(" -f {}", make.file)
        };
        let mut steps = vec![("build", format!("make{file}"))];
        if make.test {
            steps.push(("test", format!("make{file} test")));
        }
        jobs.push(("make", steps));
    }
    let names = found.names();
    let mut text = String::new();
    if names.is_empty() {
        text.push_str(
            "# Written by `tributary init`, which found no Cargo.toml, package.json, go.mod,\n\
             # pyproject.toml, requirements.txt or Makefile here: replace the step with your own\n\
             # build and test commands.\n",
        );
        jobs.push((
            "build",
            vec![(
                "hello",
                "echo \"edit .tributary.yml to build and test this repository\"".to_owned(),
            )],
        ));
    } else {
        text.push_str(&format!(
            "# Written by `tributary init` from {}.\n",
            names.join(", ")
        ));
        if found.python.as_ref().is_some_and(|p| p.pyproject) {
            text.push_str(
                "# If the tests import the project, install it first: python3 -m pip install -e .\n",
            );
        }
    }
    text.push_str(
        "# Run it with `tributary run`; docs/PIPELINES.md shows the rest: needs,\n\
         # matrix, image (containers), cache, artifacts, secrets.\njobs:\n",
    );
    for (job, steps) in jobs {
        text.push_str(&format!("  {job}:\n    steps:\n"));
        for (name, command) in steps {
            text.push_str(&format!(
                "      - name: {name}\n        run: {}\n",
                yaml_scalar(&command)
            ));
        }
    }
    text
}

/// `s` as a YAML plain scalar when that reads back as itself, else double-quoted.
fn yaml_scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && !s.starts_with(|c: char| "!&*-?{}[],#|>@`\"'%: ".contains(c))
        && !s.contains(": ")
        && !s.contains(" #")
        && !s.ends_with(':');
    if plain {
        s.to_owned()
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// `tributary init`.
pub fn command(args: InitArgs) -> anyhow::Result<ExitCode> {
    let file = args.file;
    let dir = match file.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => p.to_path_buf(),
        None => std::path::PathBuf::from("."),
    };
    if file.exists() {
        anyhow::bail!(
            "{} already exists and was left as it is: remove it first, or write the starter \
             elsewhere with -f FILE",
            file.display()
        );
    }
    let found = look(&dir);
    let text = starter(&found);
    let shown = file.display().to_string();
    tributary_pipeline::load(&shown, &text)
        .with_context(|| format!("the starter pipeline for {} does not parse", dir.display()))?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&file)
        .with_context(|| format!("cannot create {shown}"))?;
    out.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {shown}"))?;
    let names = found.names();
    if names.is_empty() {
        println!(
            "wrote {shown}: found no Cargo.toml, package.json, go.mod, pyproject.toml, \
             requirements.txt or Makefile, so it has one placeholder job to edit"
        );
    } else {
        println!("wrote {shown} from {}", names.join(", "));
    }
    let run = if shown == ".tributary.yml" {
        "tributary run".to_owned()
    } else {
        format!(
            "tributary run -f {}",
            tributary_agent::recreate::shell_quote(&shown)
        )
    };
    println!("run it with `{run}`");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parses(text: &str) -> tributary_proto::events::Plan {
        tributary_pipeline::load(".tributary.yml", text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn commands(plan: &tributary_proto::events::Plan, job: &str) -> Vec<String> {
        let j = plan
            .jobs
            .iter()
            .find(|j| j.id == job)
            .unwrap_or_else(|| panic!("no job {job}"));
        j.steps.iter().flat_map(|s| s.lines.clone()).collect()
    }

    #[test]
    fn each_kind_of_project_gets_its_job() {
        let cargo = Found {
            cargo: Some(false),
            ..Found::default()
        };
        let plan = parses(&starter(&cargo));
        assert_eq!(commands(&plan, "rust"), ["cargo build", "cargo test"]);
        let locked = parses(&starter(&Found {
            cargo: Some(true),
            ..Found::default()
        }));
        assert_eq!(
            commands(&locked, "rust"),
            ["cargo build --locked", "cargo test --locked"]
        );

        let node = parses(&starter(&Found {
            node: Some(Node {
                lock: true,
                build: false,
                test: true,
            }),
            ..Found::default()
        }));
        assert_eq!(commands(&node, "node"), ["npm ci", "npm test"]);
        let bare_node = parses(&starter(&Found {
            node: Some(Node::default()),
            ..Found::default()
        }));
        assert_eq!(commands(&bare_node, "node"), ["npm install"]);

        let go = parses(&starter(&Found {
            go: true,
            ..Found::default()
        }));
        assert_eq!(commands(&go, "go"), ["go vet ./...", "go test ./..."]);

        let py = parses(&starter(&Found {
            python: Some(Python {
                requirements: true,
                pyproject: true,
            }),
            ..Found::default()
        }));
        assert_eq!(
            commands(&py, "python"),
            [
                "python3 -m pip install -r requirements.txt",
                "python3 -m pytest"
            ]
        );

        let make = parses(&starter(&Found {
            make: Some(Make {
                file: "GNUmakefile".into(),
                test: true,
            }),
            ..Found::default()
        }));
        assert_eq!(
            commands(&make, "make"),
            ["make -f GNUmakefile", "make -f GNUmakefile test"]
        );
    }

    #[test]
    fn everything_at_once_and_nothing_at_all_parse() {
        let all = Found {
            cargo: Some(true),
            node: Some(Node {
                lock: false,
                build: true,
                test: true,
            }),
            go: true,
            python: Some(Python {
                requirements: false,
                pyproject: true,
            }),
            make: Some(Make {
                file: "Makefile".into(),
                test: false,
            }),
        };
        let text = starter(&all);
        let plan = parses(&text);
        let ids: Vec<&str> = plan.jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["rust", "node", "go", "python", "make"]);
        assert!(text.starts_with(
            "# Written by `tributary init` from Cargo.toml, package.json, go.mod, \
             pyproject.toml, Makefile.\n"
        ));
        assert!(text.contains("pip install -e ."), "{text}");

        let none = starter(&Found::default());
        let plan = parses(&none);
        assert_eq!(plan.jobs.len(), 1);
        assert!(none.contains("found no Cargo.toml"), "{none}");
    }

    #[test]
    fn scalars_that_yaml_would_misread_are_quoted() {
        assert_eq!(yaml_scalar("cargo test"), "cargo test");
        assert_eq!(yaml_scalar("echo \"a: b\""), "\"echo \\\"a: b\\\"\"");
        assert_eq!(yaml_scalar("- x"), "\"- x\"");
    }

    #[test]
    fn look_reads_the_markers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        assert_eq!(look(p), Found::default());
        std::fs::write(p.join("Cargo.toml"), "[package]\n").unwrap();
        std::fs::write(
            p.join("package.json"),
            r#"{"scripts": {"test": "echo \"Error: no test specified\" && exit 1", "build": "tsc"}}"#,
        )
        .unwrap();
        std::fs::write(p.join("go.mod"), "module x\n").unwrap();
        std::fs::write(p.join("requirements.txt"), "").unwrap();
        std::fs::write(p.join("Makefile"), "all:\n\ttrue\ntest: all\n\ttrue\n").unwrap();
        let found = look(p);
        assert_eq!(found.cargo, Some(false));
        assert_eq!(
            found.node,
            Some(Node {
                lock: false,
                build: true,
                test: false,
            }),
            "npm's placeholder test script is no test"
        );
        assert!(found.go);
        assert_eq!(
            found.python,
            Some(Python {
                requirements: true,
                pyproject: false,
            })
        );
        assert_eq!(
            found.make,
            Some(Make {
                file: "Makefile".into(),
                test: true,
            })
        );
    }
}
