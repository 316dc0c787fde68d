//! Tenant isolation for repositories (issue 22), on a real `tributary up` with two tenants:
//! tenant users reach no local repository, no other tenant's mirror, no protocol the operator
//! did not allow; the same URL used by two tenants gets two mirrors; the admin's local
//! repositories and `tributary run` keep working.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{bin, git, job, start, start_allowing_local_repos, Server};

const SECRET: &str = "acme-private-source-7f3a";

fn pipeline(run: &str) -> String {
    format!("jobs:\n  show:\n    steps:\n      - run: {run}\n")
}

/// `project add NAME --repo REPO` as `token`, which must fail: its stderr.
fn refused(s: &Server, token: &str, name: &str, repo: &str) -> String {
    let out = s.cli(token, &["project", "add", name, &format!("--repo={repo}")]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "project add {name} --repo {repo} was accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// The mirror directories under `mirrors/tenants/TENANT` (server or agent).
fn mirrors_of(mirrors: &Path, tenant: &str) -> Vec<PathBuf> {
    std::fs::read_dir(mirrors.join("tenants").join(tenant))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("HEAD").is_file())
                .collect()
        })
        .unwrap_or_default()
}

/// No event of tenant `tenant` names a build, and nothing on the log carries `SECRET`
/// outside the admin's own builds.
fn no_build_of(s: &Server, tenant: &str) {
    let events = s.events(None);
    let builds: Vec<_> = events
        .iter()
        .filter(|e| e["tenant"] == tenant && e["type"] == "build_triggered")
        .collect();
    assert!(builds.is_empty(), "{tenant} got builds: {builds:?}");
    let leaked: Vec<_> = events
        .iter()
        .filter(|e| e["tenant"] != "default" && e.to_string().contains(SECRET))
        .collect();
    assert!(leaked.is_empty(), "the secret reached: {leaked:?}");
}

/// Without --allow-local-repos: the admin's local repository works; a tenant user can name no
/// local repository (the admin's original, the admin's mirror in the data directory, through
/// `file://`, a symbolic link or `..`), no `git://` URL, no remote helper, no option.
#[test]
fn tenant_users_reach_no_local_repository_and_no_other_mirror() {
    let s = start(1);
    let evil = s.tenant("evil");
    let private = s.project("private", &pipeline("cat secret.txt"));
    std::fs::write(private.join("secret.txt"), SECRET).unwrap();
    common::commit_all(&private, "secret");
    let build = s.trigger("private");
    let b = s.finished(&build, Duration::from_secs(120));
    assert_eq!(b["status"], "succeeded", "{b}");
    let logs = s.admin(&["logs", &build]);
    assert!(logs.contains(SECRET), "{logs}");

    // The admin's mirror is the default tenant's, on the server and on the agent.
    let mirrors = s.data().join("mirrors");
    let server_mirror = mirrors_of(&mirrors, "default");
    assert_eq!(server_mirror.len(), 1, "{server_mirror:?}");
    let agent_mirrors = s.data().join("agents/embedded-0/mirrors");
    assert_eq!(mirrors_of(&agent_mirrors, "default").len(), 1);
    let mirror = server_mirror[0].to_str().unwrap().to_owned();

    let original = private.to_str().unwrap().to_owned();
    let link = s.root.join("innocent");
    std::os::unix::fs::symlink(&server_mirror[0], &link).unwrap();
    std::fs::create_dir_all(s.root.join("sub")).unwrap();
    let dotdot = format!("{}/sub/../private", s.root.display());
    let marker = s.root.join("pwned");
    let ext = format!("ext::sh -c touch% {}", marker.display());
    for (name, repo, needle) in [
        ("m", mirror.as_str(), "server's own data"),
        ("o", original.as_str(), "--allow-local-repos"),
        ("f", &format!("file://{original}"), "--allow-local-repos"),
        ("l", link.to_str().unwrap(), "server's own data"),
        ("d", dotdot.as_str(), "--allow-local-repos"),
        ("g", "git://127.0.0.1:9/acme.git", "--allow-protocols"),
        ("h", "http://127.0.0.1:9/acme.git", "--allow-protocols"),
        ("e", ext.as_str(), "never allowed"),
        ("u", "--upload-pack=touch /tmp/x", "git option"),
    ] {
        let err = refused(&s, &evil, name, repo);
        assert!(err.contains(needle), "{repo}: {err}");
    }
    assert!(!marker.exists(), "ext:: ran a command");
    assert_eq!(s.ok(&evil, &["project", "list"]), "");
    assert!(mirrors_of(&mirrors, "evil").is_empty());
    no_build_of(&s, "evil");

    // The admin too never reads the data directory, nor a protocol that is not allowed.
    let err = refused(&s, &s.token, "m", &mirror);
    assert!(err.contains("server's own data"), "{err}");
    let err = refused(&s, &s.token, "l", link.to_str().unwrap());
    assert!(err.contains("server's own data"), "{err}");
    let err = refused(&s, &s.token, "g", "git://127.0.0.1:9/x.git");
    assert!(err.contains("--allow-protocols"), "{err}");
}

/// With --allow-local-repos: everyone, the admin too, only inside the folder; a submodule
/// pointing at a mirror in the data directory is refused before git fetches it; the same
/// repository in two tenants has two mirrors on the server and on the agent.
#[test]
fn allowed_folders_submodules_and_one_mirror_per_tenant() {
    let s = start_allowing_local_repos(1);
    let acme = s.tenant("acme");
    let evil = s.tenant("evil");

    // acme's private project, inside the allowed folder.
    let private = s.repo(
        "acme-app",
        &pipeline("cat secret.txt"),
        &[("secret.txt", SECRET)],
    );
    s.ok(
        &acme,
        &["project", "add", "app", "--repo", private.to_str().unwrap()],
    );
    let b_acme_id = s.trigger_as(&acme, "app");
    let b = s.finished_as(&acme, &b_acme_id, Duration::from_secs(120));
    assert_eq!(b["status"], "succeeded", "{b}");
    let acme_mirror = mirrors_of(&s.data().join("mirrors"), "acme");
    assert_eq!(acme_mirror.len(), 1);

    // Outside the folder: refused for a tenant and for the admin alike.
    let outside = s.root.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    git(&outside, &["init", "-q", "-b", "main"]);
    let dotdot = format!("{}/../outside", s.repos.display());
    for token in [&evil, &s.token] {
        for repo in [outside.to_str().unwrap(), dotdot.as_str()] {
            let err = refused(&s, token, "x", repo);
            assert!(err.contains("outside the folders"), "{repo}: {err}");
        }
        let err = refused(&s, token, "x", acme_mirror[0].to_str().unwrap());
        assert!(err.contains("server's own data"), "{err}");
    }

    // evil's repository in the allowed folder, with a submodule that is acme's mirror.
    let sneaky = s.repo(
        "evil-app",
        "jobs:\n  show:\n    submodules: true\n    steps:\n      - run: cat stolen/secret.txt\n",
        &[],
    );
    let out = Command::new("git")
        .args(["-c", "protocol.file.allow=always", "submodule", "add", "-q"])
        .arg(&acme_mirror[0])
        .arg("stolen")
        .current_dir(&sneaky)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::commit_all(&sneaky, "submodule");
    s.ok(
        &evil,
        &[
            "project",
            "add",
            "sneaky",
            "--repo",
            sneaky.to_str().unwrap(),
        ],
    );
    let build = s.trigger_as(&evil, "sneaky");
    let b = s.finished_as(&evil, &build, Duration::from_secs(120));
    assert_eq!(b["status"], "failed", "{b}");
    let reason = job(&b, "show")["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("submodule") && reason.contains("server's own data"),
        "{reason}"
    );
    let logs = String::from_utf8_lossy(&s.cli(&evil, &["logs", &build]).stdout).into_owned();
    assert!(!logs.contains(SECRET), "{logs}");
    let acme_build = b_acme_id.clone();
    let agent_ws = s.data().join("agents/embedded-0");
    let grep = Command::new("grep")
        .args(["-rl", SECRET])
        .arg(&agent_ws)
        .output()
        .unwrap();
    let found = String::from_utf8_lossy(&grep.stdout).into_owned();
    assert!(
        found
            .lines()
            .all(|f| f.contains("/tenants/acme/") || f.contains(&acme_build)),
        "only acme's own files hold its secret: {found}"
    );

    // The same repository in both tenants: two mirrors, on the server and on the agent.
    let shared = s.repo("shared", &pipeline("echo shared"), &[]);
    for (token, name) in [(&acme, "shared"), (&evil, "shared")] {
        s.ok(
            token,
            &["project", "add", name, "--repo", shared.to_str().unwrap()],
        );
        let build = s.trigger_as(token, name);
        let b = s.finished_as(token, &build, Duration::from_secs(120));
        assert_eq!(b["status"], "succeeded", "{b}");
    }
    for root in [
        s.data().join("mirrors"),
        s.data().join("agents/embedded-0/mirrors"),
    ] {
        let name = |tenant| -> Vec<_> {
            mirrors_of(&root, tenant)
                .into_iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .filter(|n| n.contains("shared"))
                .collect()
        };
        assert_eq!(name("acme").len(), 1, "{root:?}");
        assert_eq!(name("acme"), name("evil"), "{root:?}");
    }
    // evil's mirrors hold none of acme's objects.
    let acme_head = git_out(&private, &["rev-parse", "HEAD"]);
    for m in mirrors_of(&s.data().join("mirrors"), "evil") {
        let has = Command::new("git")
            .args(["cat-file", "-e", &acme_head])
            .current_dir(&m)
            .status()
            .unwrap();
        assert!(!has.success(), "{m:?} has acme's commit");
    }
}

/// A project from before the rules whose repository they refuse keeps its events, gets no
/// new build (with the reason and the fix), until an admin fixes it.
#[test]
fn a_project_the_rules_now_refuse_fails_until_an_admin_fixes_it() {
    let mut s = start_allowing_local_repos(1);
    let acme = s.tenant("acme");
    let repo = s.repo("app", &pipeline("echo built"), &[]);
    s.ok(
        &acme,
        &["project", "add", "app", "--repo", repo.to_str().unwrap()],
    );
    let first = s.trigger_as(&acme, "app");
    assert_eq!(
        s.finished_as(&acme, &first, Duration::from_secs(120))["status"],
        "succeeded"
    );

    // The operator drops --allow-local-repos: tenant users get no local repository.
    s.restart_with(&["--agents", "1"]);
    assert!(s.ok(&acme, &["project", "list"]).contains("app"));
    assert_eq!(s.status(&acme, &first), "succeeded");
    let out = s.cli(&acme, &["trigger", "app"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains("cannot build") && err.contains("tributary project add app"),
        "{err}"
    );
    // The same repository again is refused to the tenant, and a working project is not
    // replaced by a second `project add`.
    let err = refused(&s, &acme, "app", repo.to_str().unwrap());
    assert!(err.contains("--allow-local-repos"), "{err}");

    // The admin fixes it (its repository set with the admin token), and builds work again.
    s.admin(&[
        "project",
        "add",
        "app",
        "--tenant",
        "acme",
        "--repo",
        repo.to_str().unwrap(),
    ]);
    let changed: Vec<_> = s
        .events(None)
        .into_iter()
        .filter(|e| e["type"] == "project_repository_changed")
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    let again = s.trigger_as(&acme, "app");
    assert_eq!(
        s.finished_as(&acme, &again, Duration::from_secs(120))["status"],
        "succeeded"
    );
    let out = s.cli(
        &s.token,
        &["project", "add", "app", "--tenant", "acme", "--repo", "x"],
    );
    assert!(!out.status.success());
    // A tenant user cannot name another tenant.
    let out = s.cli(
        &acme,
        &["project", "add", "z", "--tenant", "default", "--repo", "x"],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin token"));
}

/// `tributary run` (a local run) keeps building the local repository it is run in.
#[test]
fn tributary_run_still_builds_the_local_repository() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join(".tributary.yml"), pipeline("echo local-run-ok")).unwrap();
    common::commit_all(&repo, "init");
    let data = dir.path().join("data");
    let out = Command::new(bin())
        .args(["run", "--data"])
        .arg(&data)
        .current_dir(&repo)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("local-run-ok"), "{text}");
}

fn git_out(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
