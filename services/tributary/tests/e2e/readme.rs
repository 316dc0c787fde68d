//! The README's commands, run as written.
//!
//! The README marks the blocks a newcomer runs with `<!-- readme-test: NAME -->` on the line
//! before the fence. This module takes those blocks out of README.md and runs them line by line
//! in one shell session: `tributary` on the PATH is the binary under test, HOME is a fresh
//! directory, the repository is a throwaway git repository whose `.tributary.yml` is the README's
//! sample pipeline (the jobs the README says to add are appended to it when it says so). One
//! rewrite only: the server's address `127.0.0.1:7700` becomes a free port, since tests run in
//! parallel on a shared machine. A line ending with `&` (a server, an agent) runs in the
//! background and the session waits for its first line of output. Each line must exit 0 and
//! print what the README says it does, so a renamed flag or a changed output fails here.
//!
//! Every other `tributary …` in a `sh` block of the README and of its docs/ pages is checked
//! against `tributary … --help` (the command path exists, every `--flag` is one of its flags), as
//! `deploy.rs` does for `deploy/`: starting Kafka services or an autoscaler from prose is not
//! practical, a flag that no longer exists is caught all the same.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{self, Proc};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    let path = repo_root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The body of the fenced block right after the marker `<!-- readme-test: NAME -->`.
fn marked_block(text: &str, name: &str) -> Option<String> {
    let marker = format!("<!-- readme-test: {name} -->");
    let mut lines = text.lines().skip_while(|l| l.trim() != marker).skip(1);
    lines.next().filter(|l| l.starts_with("```"))?;
    Some(
        lines
            .take_while(|l| !l.starts_with("```"))
            .map(|l| format!("{l}\n"))
            .collect(),
    )
}

fn block(name: &str) -> String {
    marked_block(&read("README.md"), name).unwrap_or_else(|| {
        panic!("README.md has no ```-fenced block right after `<!-- readme-test: {name} -->`")
    })
}

/// Every fenced `sh` block of a Markdown text.
fn sh_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match current.as_mut() {
            Some(body) if line.starts_with("```") => {
                blocks.push(std::mem::take(body));
                current = None;
            }
            Some(body) => {
                body.push_str(line);
                body.push('\n');
            }
            None if line.trim_end() == "```sh" => current = Some(String::new()),
            None => {}
        }
    }
    blocks
}

/// `line` without its shell comment (a `#` after whitespace, outside quotes), trimmed.
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev_space => return line[..i].trim(),
            _ => {}
        }
        prev_space = c.is_whitespace();
    }
    line.trim()
}

/// One command line of a block: its text (comment removed) and whether it ends with `&`.
#[derive(Debug, PartialEq)]
struct Line {
    text: String,
    background: bool,
}

fn lines_of(block: &str) -> Vec<Line> {
    block
        .lines()
        .map(strip_comment)
        .filter(|l| !l.is_empty())
        .map(|l| match l.strip_suffix('&') {
            Some(rest) if !rest.ends_with('&') => Line {
                text: rest.trim().to_owned(),
                background: true,
            },
            _ => Line {
                text: l.to_owned(),
                background: false,
            },
        })
        .collect()
}

/// Every `tributary ARGS` invocation in a shell line (comments removed): the program name at the
/// start, after whitespace or `$(`; its arguments up to the next invocation, `; & | )` or a
/// redirection (` >`).
/// Brackets of optional parts (`[--tenant acme]`) are dropped.
fn invocations(line: &str) -> Vec<Vec<String>> {
    let line = strip_comment(line);
    let starts: Vec<usize> = line
        .match_indices("tributary ")
        .map(|(i, _)| i)
        .filter(|&i| {
            line[..i]
                .chars()
                .last()
                .is_none_or(|c| c.is_whitespace() || c == '(')
        })
        .collect();
    let mut found = Vec::new();
    for (n, &start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(line.len());
        let rest = &line[start + "tributary ".len()..end];
        let end = [rest.find([';', '&', '|', ')']), rest.find(" >")]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(rest.len());
        let rest = &rest[..end];
        let args: Vec<String> = rest
            .split_whitespace()
            .map(|a| a.trim_matches(['[', ']']).to_owned())
            .filter(|a| !a.is_empty())
            .collect();
        if args
            .first()
            .is_some_and(|a| a.starts_with(|c: char| c.is_ascii_lowercase()))
        {
            found.push(args);
        }
    }
    found
}

/// `tributary PATH --help`, cached.
struct Helps(HashMap<Vec<String>, String>);

impl Helps {
    fn get(&mut self, path: &[String]) -> &str {
        self.0.entry(path.to_vec()).or_insert_with(|| {
            let out = Command::new(common::bin())
                .args(path)
                .arg("--help")
                .output()
                .expect("run tributary --help");
            assert!(
                out.status.success(),
                "`tributary {} --help` failed: {}",
                path.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    }
}

/// The subcommands a help text lists under `Commands:`.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("     "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Checks one invocation against the binary: the longest run of leading words that are
/// subcommands must be a command (its `--help` works), and every `--flag` must be in its help.
fn check(helps: &mut Helps, source: &str, args: &[String]) {
    let mut path: Vec<String> = Vec::new();
    for arg in args {
        if subcommands(helps.get(&path)).contains(arg) {
            path.push(arg.clone());
        } else {
            break;
        }
    }
    assert!(
        !path.is_empty(),
        "{source}: `tributary {}`: no such command",
        args.join(" ")
    );
    let help = helps.get(&path).to_owned();
    let known: Vec<&str> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .filter(|t| t.starts_with("--"))
        .collect();
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        let flag = arg.split('=').next().unwrap_or(arg);
        assert!(
            known.contains(&flag),
            "{source}: `tributary {}` has no flag {flag} (in `tributary {}`)",
            path.join(" "),
            args.join(" ")
        );
    }
}

/// What one line of a session printed.
struct Ran {
    line: String,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn shows(&self, text: &str) -> &Self {
        assert!(
            self.stdout.contains(text),
            "`{}` did not print {text:?}:\n{}{}",
            self.line,
            self.stdout,
            self.stderr
        );
        self
    }

    fn hides(&self, text: &str) -> &Self {
        assert!(
            !self.stdout.contains(text) && !self.stderr.contains(text),
            "`{}` printed {text:?}:\n{}{}",
            self.line,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A newcomer's shell: HOME, the repository as working directory, `tributary` on the PATH, the
/// variables earlier lines exported, and the processes started with `&`.
struct Session {
    dir: tempfile::TempDir,
    home: PathBuf,
    repo: PathBuf,
    addr: String,
    env: BTreeMap<String, String>,
    background: Vec<(Proc, PathBuf)>,
}

impl Session {
    fn new() -> Session {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let repo = home.join("hello");
        std::fs::create_dir_all(&repo).unwrap();
        let bin_dir = Path::new(common::bin()).parent().unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
        );
        let mut env = BTreeMap::from([
            ("PATH".to_owned(), path),
            ("HOME".to_owned(), home.display().to_string()),
            ("GIT_AUTHOR_NAME".to_owned(), "New User".to_owned()),
            ("GIT_AUTHOR_EMAIL".to_owned(), "new@example.com".to_owned()),
            ("GIT_COMMITTER_NAME".to_owned(), "New User".to_owned()),
            (
                "GIT_COMMITTER_EMAIL".to_owned(),
                "new@example.com".to_owned(),
            ),
        ]);
        // The container engine the machine has, as a user's shell would.
        if let Ok(host) = std::env::var("DOCKER_HOST") {
            env.insert("DOCKER_HOST".into(), host);
        }
        Session {
            addr: format!("127.0.0.1:{}", common::free_port()),
            dir,
            home,
            repo,
            env,
            background: Vec::new(),
        }
    }

    /// The README's line as this session runs it (the server on a free port).
    fn text(&self, line: &str) -> String {
        line.replace("127.0.0.1:7700", &self.addr)
    }

    /// Runs one foreground line in bash (allexport, pipefail) and keeps what it exported.
    fn run_line(&mut self, line: &str) -> Ran {
        let state = self.dir.path().join("env");
        let script = format!(
            "set -a -o pipefail\n{}\n__status=$?\nenv -0 > '{}'\nexit $__status\n",
            self.text(line),
            state.display()
        );
        let out = Command::new("bash")
            .args(["-c", &script])
            .current_dir(&self.repo)
            .env_clear()
            .envs(&self.env)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let ran = Ran {
            line: line.to_owned(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(
            out.status.success(),
            "README line `{line}` failed ({}):\n{}{}",
            out.status,
            ran.stdout,
            ran.stderr
        );
        let vars = std::fs::read(&state).unwrap();
        self.env = vars
            .split(|&b| b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                let (k, v) = kv.split_once('=')?;
                (!k.is_empty() && !["_", "SHLVL", "PWD", "OLDPWD", "__status"].contains(&k))
                    .then(|| (k.to_owned(), v.to_owned()))
            })
            .collect();
        ran
    }

    /// Starts a `&` line; waits until its output shows `ready`.
    fn start(&mut self, line: &str, ready: &str) {
        let log = self
            .dir
            .path()
            .join(format!("background-{}.log", self.background.len()));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new("bash")
            .args(["-c", &format!("set -a\nexec {}", self.text(line))])
            .current_dir(&self.repo)
            .env_clear()
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut proc = Proc(child);
        let mut seen = String::new();
        let mut exited = None;
        common::wait_until(
            &format!("`{line}` to print {ready:?}"),
            Duration::from_secs(90),
            || {
                seen = std::fs::read_to_string(&log).unwrap_or_default();
                exited = proc.0.try_wait().unwrap();
                seen.contains(ready) || exited.is_some()
            },
        );
        assert!(
            exited.is_none(),
            "README line `{line}` exited ({exited:?}):\n{seen}"
        );
        self.background.push((proc, log));
    }

    /// Runs a README block: its foreground lines' results, in order. The `&` lines wait for
    /// `ready[i]` (the i-th `&` line of the block).
    fn block(&mut self, name: &str, ready: &[&str]) -> Vec<Ran> {
        let lines = lines_of(&block(name));
        assert_eq!(
            lines.iter().filter(|l| l.background).count(),
            ready.len(),
            "README block {name}: {lines:?}"
        );
        let mut ready = ready.iter();
        let mut ran = Vec::new();
        for line in lines {
            if line.background {
                self.start(&line.text, ready.next().unwrap());
            } else {
                ran.push(self.run_line(&line.text));
            }
        }
        ran
    }

    /// Appends a README pipeline snippet (jobs to add under `jobs:`) to `.tributary.yml`.
    fn add_jobs(&self, name: &str) {
        let file = self.repo.join(".tributary.yml");
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push('\n');
        text.push_str(&block(name));
        std::fs::write(file, text).unwrap();
    }

    fn git_status(&self) -> String {
        let out = Command::new("git")
            .args(["status", "--porcelain"])
            .current_dir(&self.repo)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The README from "a local run" to "scale-out and billing", as a newcomer types it.
#[test]
fn the_readme_commands_work_as_written() {
    let mut s = Session::new();
    std::fs::write(s.repo.join(".tributary.yml"), block("pipeline")).unwrap();
    common::git(&s.repo, &["init", "-q", "-b", "main"]);
    common::commit_all(&s.repo, "the README's pipeline");

    // A local run: the data directory outside the repository, under the state home.
    let ran = s.block("local-run", &[]);
    let state = s.home.join(".local/state/tributary");
    ran[0]
        .shows(&format!("log in {}/hello-", state.display()))
        .shows("[build] built")
        .shows("[test[shell=bash]] testing with bash")
        .shows("succeeded");
    let data = std::fs::read_dir(&state)
        .unwrap()
        .next()
        .expect("a data directory under the state home")
        .unwrap()
        .path();
    assert_eq!(
        std::fs::read_to_string(data.join(".gitignore")).unwrap(),
        "*\n"
    );
    assert!(
        !s.git_status().contains(".local"),
        "the data directory is outside the repository: {}",
        s.git_status()
    );
    let ran = s.block("local-after", &[]);
    ran[0].shows("succeeded");
    let last: serde_json::Value = serde_json::from_str(ran[1].stdout.trim()).unwrap();
    assert!(
        last["type"].is_string() && last["offset"].is_u64(),
        "{last}"
    );
    ran[2]
        .shows("(2 jobs)")
        .shows("[test[shell=sh]] testing with sh")
        .hides("[build]");
    // The README's claim about `--data` inside the repository: git ignores it.
    let inside = s.run_line("tributary run --data .tributary --job build");
    inside.shows("succeeded");
    assert_eq!(
        std::fs::read_to_string(s.repo.join(".tributary/.gitignore")).unwrap(),
        "*\n"
    );
    let status = s.git_status();
    assert!(
        !status.contains(".tributary"),
        "git ignores .tributary/: {status}"
    );

    // A server build in four commands.
    let ran = s.block("server", &["tributary is up"]);
    assert!(s.env["TRIBUTARY_TOKEN"].starts_with("trib_"), "{:?}", s.env);
    ran[1].shows("project hello");
    ran[2]
        .shows("[test[shell=sh]] testing with sh")
        .shows("succeeded");

    // Agents: tenants, tokens, an agent enrolled with an enrollment token.
    let ran = s.block("agents", &["tributary agent "]);
    ran[0].shows("tenant acme created");
    assert!(
        ran[1].stdout.trim().starts_with("trib_"),
        "{}",
        ran[1].stdout
    );
    assert!(s.env["TRIBUTARY_ENROLLMENT_TOKEN"].starts_with("trib_"));
    ran[3].shows("builder-1").shows("linux");

    // Secrets: the job the README adds, on the labelled agent, masked on the server and locally.
    s.add_jobs("secrets-pipeline");
    let ran = s.block("secrets", &[]);
    ran[0].shows("secret DEPLOY_TOKEN of project hello set");
    ran[1].shows("DEPLOY_TOKEN").hides("s3cr3t-value");
    ran[2]
        .shows("[deploy] started on agent builder-1")
        .shows("[deploy] deploying with ***")
        .hides("s3cr3t-value");
    ran[3]
        .shows("[deploy] deploying with ***")
        .shows("succeeded")
        .hides("s3cr3t-value");

    // Billing: the live invoice, an ended month's (not issued), and the audit.
    let ran = s.block("billing", &[]);
    ran[0].shows("live: the month so far");
    let ended: serde_json::Value = serde_json::from_str(&ran[1].stdout).unwrap();
    assert_eq!(ended["status"], "not_issued", "{ended}");
    ran[2].shows("audit: OK");

    // Containers, caches, artifacts.
    if !tributary_testkit::engines::engine_or_skip(tributary_testkit::engines::Engine::Containers) {
        return;
    }
    s.add_jobs("containers-pipeline");
    let ran = s.block("containers", &["tributary agent "]);
    ran[0].shows("[package] started").shows("succeeded");
    ran[2]
        .shows("[package] started on agent podman-1")
        .shows("not found; it is saved if the job succeeds")
        .shows("succeeded");
    ran[3].shows("[package] stamp").shows("succeeded");
    ran[4].shows("package").shows("dist/app.txt");
    ran[5].shows("packaged on Linux");
}

/// Every `tributary` command of a `sh` block in the README and its docs/ pages exists with the
/// flags it is given.
#[test]
fn every_documented_command_and_flag_exists() {
    let mut helps = Helps(HashMap::new());
    let mut checked = 0;
    for page in [
        "README.md",
        "docs/PIPELINES.md",
        "docs/OPERATIONS.md",
        "docs/SCALING.md",
        "docs/TESTING.md",
    ] {
        for block in sh_blocks(&read(page)) {
            for line in block.lines() {
                for args in invocations(line) {
                    check(&mut helps, &format!("{page}: {}", line.trim()), &args);
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 60, "only {checked} commands found in the docs");
}

/// The two set-up commands exist and `.ci/run` runs the test one; the install command names the
/// package of this binary, locked (building a release binary here would take too long: the
/// command's parts are checked instead).
#[test]
fn the_setup_and_install_commands_name_what_exists() {
    let root = repo_root();
    let setup = lines_of(&block("two-commands"));
    assert_eq!(setup.len(), 2, "{setup:?}");
    for line in &setup {
        let script = root.join(line.text.trim_start_matches("./"));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&script)
                .unwrap_or_else(|e| panic!("README runs {}: {e}", line.text))
                .permissions(),
        );
        assert!(mode & 0o111 != 0, "{} is not executable", line.text);
    }
    assert_eq!(setup[1].text, "./scripts/test.sh");
    assert!(read(".ci/run").contains("exec ./scripts/test.sh"));
    let install = lines_of(&block("install"));
    let words: Vec<&str> = install[0].text.split_whitespace().collect();
    assert_eq!(words[..2], ["cargo", "install"], "{words:?}");
    assert!(words.contains(&"--locked"), "{words:?}");
    let path = words[words.iter().position(|w| *w == "--path").unwrap() + 1];
    let manifest = read(&format!("{path}/Cargo.toml"));
    assert!(
        manifest.contains("[[bin]]\nname = \"tributary\""),
        "{manifest}"
    );
    assert!(root.join("Cargo.lock").is_file());
}

#[test]
fn blocks_lines_and_invocations_are_read_as_a_shell_would() {
    let text = "x\n<!-- readme-test: a -->\n```sh\ntributary run   # go\n```\n```sh\nb\n```\n";
    assert_eq!(
        marked_block(text, "a").as_deref(),
        Some("tributary run   # go\n")
    );
    assert_eq!(marked_block(text, "b"), None);
    assert_eq!(sh_blocks(text).len(), 2);
    assert_eq!(
        lines_of(
            "# only a comment\ntributary up --data ~/t &   # keeps running\necho 'a # b' && x\n"
        ),
        [
            Line {
                text: "tributary up --data ~/t".into(),
                background: true
            },
            Line {
                text: "echo 'a # b' && x".into(),
                background: false
            }
        ]
    );
    assert_eq!(
        invocations("X=$(tributary admin token-create --kind user) tributary get <B>  tributary logs <B> -f > f # tributary no"),
        [
            vec!["admin", "token-create", "--kind", "user"],
            vec!["get", "<B>"],
            vec!["logs", "<B>", "-f"],
        ]
    );
    assert_eq!(
        invocations("cat ~/tributary/admin.token; tributary audit [--tenant acme]"),
        [vec!["audit", "--tenant", "acme"]]
    );
    // A flag the binary does not have is caught.
    let mut helps = Helps(HashMap::new());
    let bad = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check(&mut helps, "t", &["trigger".into(), "--folow".into()])
    }));
    assert!(bad.is_err());
    check(
        &mut helps,
        "t",
        &["trigger".into(), "x".into(), "--follow".into()],
    );
}
