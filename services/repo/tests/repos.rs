//! Against real git: throwaway repositories in temporary directories.

use std::path::{Path, PathBuf};
use std::process::Command;

use tributary_repo::{read_file, resolve, Access, Mirrors, RepoError};

/// Runs git in `dir` (as a test author would by hand) and returns its trimmed stdout.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "protocol.file.allow=always",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} in {dir:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

struct Fixture {
    tmp: tempfile::TempDir,
    /// A non-bare repository, branch `main`.
    src: PathBuf,
    mirrors: Mirrors,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        git(&src, &["init", "-q", "-b", "main"]);
        let mirrors = Mirrors::new(tmp.path().join("mirrors"));
        Fixture { tmp, src, mirrors }
    }

    fn repo(&self) -> &str {
        self.src.to_str().unwrap()
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Writes `files` (path, contents; None deletes) in the source and commits them all.
    fn commit(&self, files: &[(&str, Option<&str>)], message: &str) -> String {
        commit_in(&self.src, files, message)
    }

    /// Checks `commit` of the source out into `ws` (no submodules), which must succeed.
    async fn check_out(&self, commit: &str, ws: &Path) {
        self.mirrors
            .checkout(self.repo(), commit, ws, false)
            .await
            .unwrap();
    }
}

fn commit_in(repo: &Path, files: &[(&str, Option<&str>)], message: &str) -> String {
    for (path, contents) in files {
        let p = repo.join(path);
        match contents {
            Some(c) => {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, c).unwrap();
            }
            None => std::fs::remove_file(&p).unwrap(),
        }
    }
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-q", "--allow-empty", "-m", message]);
    git(repo, &["rev-parse", "HEAD"])
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// Every file under `dir` (relative, sorted), skipping `.git`.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() == ".git" {
                continue;
            }
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                walk(base, &path, out);
            } else {
                let rel = path.strip_prefix(base).unwrap();
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

// ---- resolve ----

#[tokio::test]
async fn resolves_a_branch() {
    let f = Fixture::new();
    let c1 = f.commit(&[("a", Some("1"))], "one");
    git(&f.src, &["checkout", "-q", "-b", "feature"]);
    let c2 = f.commit(&[("a", Some("2"))], "two");
    assert_eq!(resolve(f.repo(), "main", &f.mirrors).await.unwrap(), c1);
    assert_eq!(resolve(f.repo(), "feature", &f.mirrors).await.unwrap(), c2);
    assert_eq!(
        resolve(f.repo(), "refs/heads/feature", &f.mirrors)
            .await
            .unwrap(),
        c2
    );
}

#[tokio::test]
async fn resolves_annotated_and_lightweight_tags_to_commits() {
    let f = Fixture::new();
    let c1 = f.commit(&[("a", Some("1"))], "one");
    git(&f.src, &["tag", "-a", "-m", "release", "v1.0"]);
    git(&f.src, &["tag", "light"]);
    f.commit(&[("a", Some("2"))], "two");
    assert_eq!(resolve(f.repo(), "v1.0", &f.mirrors).await.unwrap(), c1);
    assert_eq!(
        resolve(f.repo(), "refs/tags/v1.0", &f.mirrors)
            .await
            .unwrap(),
        c1
    );
    assert_eq!(resolve(f.repo(), "light", &f.mirrors).await.unwrap(), c1);
}

#[tokio::test]
async fn resolves_short_and_full_shas() {
    let f = Fixture::new();
    let c1 = f.commit(&[("a", Some("1"))], "one");
    let c2 = f.commit(&[("a", Some("2"))], "two");
    assert_eq!(resolve(f.repo(), &c1[..8], &f.mirrors).await.unwrap(), c1);
    assert_eq!(resolve(f.repo(), &c1, &f.mirrors).await.unwrap(), c1);
    assert_eq!(resolve(f.repo(), &c2[..12], &f.mirrors).await.unwrap(), c2);
    assert_eq!(c1.len(), 40);
}

#[tokio::test]
async fn empty_ref_is_the_default_branch_and_follows_it_when_it_changes() {
    let f = Fixture::new();
    let c1 = f.commit(&[("a", Some("1"))], "one");
    git(&f.src, &["checkout", "-q", "-b", "develop"]);
    let c2 = f.commit(&[("a", Some("2"))], "two");
    git(&f.src, &["checkout", "-q", "main"]);
    assert_eq!(resolve(f.repo(), "", &f.mirrors).await.unwrap(), c1);
    // The remote's default branch changes after the mirror was made.
    git(&f.src, &["symbolic-ref", "HEAD", "refs/heads/develop"]);
    assert_eq!(resolve(f.repo(), "", &f.mirrors).await.unwrap(), c2);
}

#[tokio::test]
async fn resolve_sees_a_commit_pushed_after_the_mirror_was_made() {
    let f = Fixture::new();
    let c1 = f.commit(&[("a", Some("1"))], "one");
    f.mirrors.sync(f.repo()).await.unwrap();
    assert_eq!(resolve(f.repo(), "main", &f.mirrors).await.unwrap(), c1);
    let c2 = f.commit(&[("a", Some("2"))], "two");
    assert_eq!(resolve(f.repo(), "main", &f.mirrors).await.unwrap(), c2);
    // A branch deleted upstream disappears from the mirror too (fetch --prune).
    git(&f.src, &["branch", "gone"]);
    resolve(f.repo(), "gone", &f.mirrors).await.unwrap();
    git(&f.src, &["branch", "-D", "gone"]);
    let err = resolve(f.repo(), "gone", &f.mirrors).await.unwrap_err();
    assert!(matches!(err, RepoError::UnknownRef { .. }), "{err}");
}

#[tokio::test]
async fn unknown_ref_names_the_ref_and_the_repository() {
    let f = Fixture::new();
    f.commit(&[("a", Some("1"))], "one");
    let err = resolve(f.repo(), "no-such-branch", &f.mirrors)
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::UnknownRef { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("\"no-such-branch\""), "{msg}");
    assert!(msg.contains(f.repo()), "{msg}");
}

#[tokio::test]
async fn refs_paths_and_commits_that_look_like_options_are_rejected_before_git_runs() {
    let f = Fixture::new();
    let c1 = f.commit(&[("a", Some("1"))], "one");
    for bad in ["-x", "--upload-pack=touch /tmp/pwned", "main..HEAD"] {
        let err = resolve(f.repo(), bad, &f.mirrors).await.unwrap_err();
        assert!(matches!(err, RepoError::InvalidInput { .. }), "{err}");
        assert!(err.to_string().contains(bad), "{err}");
    }
    // Nothing ran: no mirror was made.
    assert!(!f.dir("mirrors").exists());

    for bad in ["-p", "../outside", "a/../../b", "/etc/passwd"] {
        let err = read_file(f.repo(), &c1, bad, &f.mirrors).await.unwrap_err();
        assert!(matches!(err, RepoError::InvalidInput { .. }), "{err}");
    }
    for bad in ["--detach", "main", "HEAD", "abc"] {
        let err = read_file(f.repo(), bad, "a", &f.mirrors).await.unwrap_err();
        assert!(matches!(err, RepoError::InvalidInput { .. }), "{err}");
        let err = f
            .mirrors
            .checkout(f.repo(), bad, &f.dir("ws"), false)
            .await
            .unwrap_err();
        assert!(matches!(err, RepoError::InvalidInput { .. }), "{err}");
    }
    let err = f.mirrors.sync("--upload-pack=x").await.unwrap_err();
    assert!(matches!(err, RepoError::InvalidInput { .. }), "{err}");
}

#[tokio::test]
async fn a_nonexistent_repository_path_is_named_in_the_error() {
    let f = Fixture::new();
    let missing = f.dir("no-such-repo");
    let missing = missing.to_str().unwrap();
    let err = resolve(missing, "main", &f.mirrors).await.unwrap_err();
    assert!(matches!(err, RepoError::RepositoryNotFound { .. }), "{err}");
    assert!(err.to_string().contains(missing), "{err}");

    // A file:// URL is a local path too: resolved (and found missing) before git runs.
    let url = format!("file://{missing}");
    let err = f.mirrors.sync(&url).await.unwrap_err();
    assert!(matches!(err, RepoError::RepositoryNotFound { .. }), "{err}");
    assert!(err.to_string().contains(&url), "{err}");

    // Through git itself: a directory that is not a repository.

    let not_a_repo = f.dir("plain");
    std::fs::create_dir(&not_a_repo).unwrap();
    let err = resolve(not_a_repo.to_str().unwrap(), "", &f.mirrors)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("plain"), "{err}");
    // The failed clones left nothing behind but lock files.
    for entry in std::fs::read_dir(f.dir("mirrors")).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(name.to_string_lossy().ends_with(".lock"), "{name:?}");
    }
}

#[tokio::test]
async fn bare_repositories_and_file_urls_work() {
    let f = Fixture::new();
    let c1 = f.commit(&[("a", Some("1"))], "one");
    let bare = f.dir("bare.git");
    git(
        f.tmp.path(),
        &["clone", "-q", "--bare", f.repo(), bare.to_str().unwrap()],
    );
    assert_eq!(
        resolve(bare.to_str().unwrap(), "main", &f.mirrors)
            .await
            .unwrap(),
        c1
    );
    let url = format!("file://{}", bare.display());
    assert_eq!(resolve(&url, "", &f.mirrors).await.unwrap(), c1);
    assert_eq!(read_file(&url, &c1, "a", &f.mirrors).await.unwrap(), "1");
    // Three locations, three mirrors, each one safe directory under the root.
    let paths = [
        f.mirrors.mirror_path(f.repo()).unwrap(),
        f.mirrors.mirror_path(bare.to_str().unwrap()).unwrap(),
        f.mirrors.mirror_path(&url).unwrap(),
    ];
    assert_ne!(paths[0], paths[1]);
    assert_ne!(paths[1], paths[2]);
    let name = paths[1].file_name().unwrap().to_str().unwrap();
    assert!(name.contains("bare-"), "{name}");
    assert_eq!(paths[1].parent().unwrap(), f.dir("mirrors"));
}

// ---- read_file ----

#[tokio::test]
async fn read_file_at_an_older_commit_returns_the_old_contents() {
    let f = Fixture::new();
    let c1 = f.commit(
        &[(".tributary.yml", Some("old\n")), ("ci/x.yml", Some("x1"))],
        "one",
    );
    let c2 = f.commit(
        &[(".tributary.yml", Some("new\n")), ("ci/x.yml", Some("x2"))],
        "two",
    );
    let repo = f.repo();
    let m = &f.mirrors;
    assert_eq!(
        read_file(repo, &c2, ".tributary.yml", m).await.unwrap(),
        "new\n"
    );
    assert_eq!(
        read_file(repo, &c1, ".tributary.yml", m).await.unwrap(),
        "old\n"
    );
    assert_eq!(
        read_file(repo, &c1[..7], "ci/x.yml", m).await.unwrap(),
        "x1"
    );
    assert_eq!(read_file(repo, &c2, "./ci/x.yml", m).await.unwrap(), "x2");
}

#[tokio::test]
async fn a_missing_file_is_not_found() {
    let f = Fixture::new();
    let c1 = f.commit(&[("README", Some("hi"))], "one");
    let err = read_file(f.repo(), &c1, ".tributary.yml", &f.mirrors)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    let msg = err.to_string();
    assert_eq!(
        msg,
        format!("no .tributary.yml at commit {c1} in {}", f.repo())
    );

    // A later commit deletes the file: it is still there at the old commit only.
    let c2 = f.commit(&[("README", None), ("other", Some("x"))], "two");
    assert_eq!(
        read_file(f.repo(), &c1, "README", &f.mirrors)
            .await
            .unwrap(),
        "hi"
    );
    let err = read_file(f.repo(), &c2, "README", &f.mirrors)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
}

#[tokio::test]
async fn directories_and_binary_files_are_not_text_files() {
    let f = Fixture::new();
    let c1 = f.commit(&[("dir/file", Some("x"))], "one");
    std::fs::write(f.src.join("bin"), [0xff, 0xfe, 0x00, 0x01]).unwrap();
    let c2 = f.commit(&[], "binary");
    let err = read_file(f.repo(), &c1, "dir", &f.mirrors)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RepoError::NotAFile { ref kind, .. } if kind == "directory"),
        "{err}"
    );
    let err = read_file(f.repo(), &c2, "bin", &f.mirrors)
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::NotUtf8 { .. }), "{err}");
}

#[tokio::test]
async fn read_file_fetches_a_commit_the_mirror_does_not_have_yet() {
    let f = Fixture::new();
    f.commit(&[("a", Some("1"))], "one");
    f.mirrors.sync(f.repo()).await.unwrap();
    let c2 = f.commit(&[("a", Some("2"))], "two");
    assert_eq!(
        read_file(f.repo(), &c2, "a", &f.mirrors).await.unwrap(),
        "2"
    );

    // A commit that no ref reaches cannot be fetched: a clear error naming it.
    let c3 = f.commit(&[("a", Some("3"))], "three");
    git(&f.src, &["reset", "-q", "--hard", &c2]);
    let err = read_file(f.repo(), &c3, "a", &f.mirrors).await.unwrap_err();
    assert!(matches!(err, RepoError::UnknownCommit { .. }), "{err}");
    assert!(err.to_string().contains(&c3), "{err}");
}

// ---- checkout ----

#[tokio::test]
async fn checkout_gives_the_exact_tree_of_the_commit() {
    let f = Fixture::new();
    let c1 = f.commit(
        &[("a.txt", Some("one\n")), ("dir/b.txt", Some("bee\n"))],
        "one",
    );
    f.commit(&[("a.txt", Some("two\n")), ("c.txt", Some("c"))], "two");
    let ws = f.dir("ws");
    f.check_out(&c1, &ws).await;
    assert_eq!(tree(&ws), ["a.txt", "dir/b.txt"]);
    assert_eq!(read(&ws.join("a.txt")), "one\n");
    assert_eq!(read(&ws.join("dir/b.txt")), "bee\n");
    assert_eq!(git(&ws, &["rev-parse", "HEAD"]), c1);
    assert_eq!(git(&ws, &["status", "--porcelain"]), "");
    // Detached, and origin is the real repository, not the mirror.
    assert_eq!(git(&ws, &["rev-parse", "--abbrev-ref", "HEAD"]), "HEAD");
    assert_eq!(git(&ws, &["remote", "get-url", "origin"]), f.repo());
}

#[tokio::test]
async fn checkout_twice_into_one_workspace_replaces_the_first() {
    let f = Fixture::new();
    let c1 = f.commit(
        &[
            ("keep", Some("k1")),
            ("old-only", Some("o")),
            (".gitignore", Some("build/\n")),
        ],
        "one",
    );
    let ws = f.dir("ws");
    f.check_out(&c1, &ws).await;
    // A job dirties the workspace: edits, untracked and ignored files.
    std::fs::write(ws.join("keep"), "edited").unwrap();
    std::fs::write(ws.join("untracked"), "u").unwrap();
    std::fs::create_dir_all(ws.join("build")).unwrap();
    std::fs::write(ws.join("build/out.o"), "o").unwrap();

    // Pushed after the mirror was made: checkout fetches it.
    let c2 = f.commit(
        &[
            ("keep", Some("k2")),
            ("old-only", None),
            ("new-only", Some("n")),
        ],
        "two",
    );
    f.check_out(&c2, &ws).await;
    assert_eq!(tree(&ws), [".gitignore", "keep", "new-only"]);
    assert_eq!(read(&ws.join("keep")), "k2");
    assert_eq!(git(&ws, &["rev-parse", "HEAD"]), c2);

    // And back again.
    f.check_out(&c1, &ws).await;
    assert_eq!(tree(&ws), [".gitignore", "keep", "old-only"]);
    assert_eq!(read(&ws.join("keep")), "k1");
    assert_eq!(git(&ws, &["rev-parse", "HEAD"]), c1);
}

#[tokio::test]
async fn checkout_cleans_a_directory_that_is_not_one_of_its_workspaces() {
    let f = Fixture::new();
    let c1 = f.commit(&[("a", Some("1"))], "one");
    let ws = f.dir("ws");
    std::fs::create_dir_all(ws.join("leftover/deep")).unwrap();
    std::fs::write(ws.join("leftover/deep/x"), "x").unwrap();
    std::fs::write(ws.join("stale"), "s").unwrap();
    f.check_out(&c1, &ws).await;
    assert_eq!(tree(&ws), ["a"]);

    // A workspace of another repository is replaced too.
    let other = f.dir("other");
    std::fs::create_dir(&other).unwrap();
    git(&other, &["init", "-q"]);
    let o1 = commit_in(&other, &[("o", Some("o"))], "o");
    f.mirrors
        .checkout(other.to_str().unwrap(), &o1, &ws, false)
        .await
        .unwrap();
    assert_eq!(tree(&ws), ["o"]);
    assert_eq!(git(&ws, &["rev-parse", "HEAD"]), o1);

    // A broken workspace (a crashed git's lock file) is re-created.
    f.check_out(&c1, &ws).await;
    std::fs::write(ws.join(".git/index.lock"), "").unwrap();
    f.check_out(&c1, &ws).await;
    assert_eq!(tree(&ws), ["a"]);
    assert!(!ws.join(".git/index.lock").exists());

    // The mirrors root is never a workspace.
    let err = f
        .mirrors
        .checkout(f.repo(), &c1, f.tmp.path(), false)
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::InvalidInput { .. }), "{err}");
    assert!(f.dir("mirrors").exists());
}

#[tokio::test]
async fn submodules_are_checked_out_only_when_asked() {
    let f = Fixture::new();
    let sub = f.dir("sub");
    std::fs::create_dir(&sub).unwrap();
    git(&sub, &["init", "-q", "-b", "main"]);
    commit_in(&sub, &[("inner.txt", Some("inside\n"))], "sub");
    git(
        &f.src,
        &["submodule", "add", "-q", sub.to_str().unwrap(), "libs/sub"],
    );
    let c1 = f.commit(&[("top.txt", Some("top"))], "with submodule");

    let plain = f.dir("plain");
    f.check_out(&c1, &plain).await;
    assert!(plain.join("libs/sub").is_dir());
    assert!(!plain.join("libs/sub/inner.txt").exists());
    assert_eq!(tree(&plain), [".gitmodules", "top.txt"]);

    let full = f.dir("full");
    f.mirrors
        .checkout(f.repo(), &c1, &full, true)
        .await
        .unwrap();
    assert_eq!(read(&full.join("libs/sub/inner.txt")), "inside\n");
    assert_eq!(git(&full, &["rev-parse", "HEAD"]), c1);

    // The same workspace without submodules again: they are emptied.
    f.check_out(&c1, &full).await;
    assert!(!full.join("libs/sub/inner.txt").exists());
    assert_eq!(tree(&full), [".gitmodules", "top.txt"]);
}

// ---- concurrency ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_syncs_of_one_mirror_all_succeed() {
    let f = Fixture::new();
    let c1 = f.commit(&[("a", Some("1"))], "one");
    let root = f.dir("mirrors");
    let mut tasks = Vec::new();
    for i in 0..10 {
        // Half share one Mirrors, half have their own: the locks are per mirror path.
        let mirrors = if i % 2 == 0 {
            f.mirrors.clone()
        } else {
            Mirrors::new(&root)
        };
        let repo = f.repo().to_owned();
        tasks.push(tokio::spawn(async move {
            let path = mirrors.sync(&repo).await?;
            let sha = resolve(&repo, "main", &mirrors).await?;
            Ok::<_, RepoError>((path, sha))
        }));
    }
    let mut paths = Vec::new();
    for t in tasks {
        let (path, sha) = t.await.unwrap().unwrap();
        assert_eq!(sha, c1);
        paths.push(path);
    }
    paths.dedup();
    assert_eq!(paths.len(), 1, "{paths:?}");
    assert_eq!(git(&paths[0], &["rev-parse", "main"]), c1);
    git(&paths[0], &["fsck", "--no-progress"]);

    // Concurrent checkouts into separate workspaces while a push is being synced.
    let c2 = f.commit(&[("a", Some("2"))], "two");
    let mut tasks = Vec::new();
    for i in 0..4 {
        let mirrors = f.mirrors.clone();
        let repo = f.repo().to_owned();
        let ws = f.dir(&format!("ws{i}"));
        let commit = if i % 2 == 0 { c1.clone() } else { c2.clone() };
        tasks.push(tokio::spawn(async move {
            mirrors.checkout(&repo, &commit, &ws, false).await?;
            Ok::<_, RepoError>(read(&ws.join("a")))
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let want = if i % 2 == 0 { "1" } else { "2" };
        assert_eq!(t.await.unwrap().unwrap(), want);
    }
}

// ---- what is remembered: later jobs of a commit need no git ----

/// The second workspace of a commit is a copy of the first checkout: it is made even with the
/// mirror gone (so no git ran against it), and it is a complete, clean git checkout with
/// executable bits and symbolic links intact.
#[tokio::test]
async fn a_second_workspace_of_a_commit_is_copied_without_git() {
    let f = Fixture::new();
    std::fs::write(f.src.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    let exec = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(f.src.join("run.sh"), exec).unwrap();
    std::os::unix::fs::symlink("run.sh", f.src.join("link")).unwrap();
    let c1 = f.commit(&[("dir/a.txt", Some("one\n"))], "one");
    f.check_out(&c1, &f.dir("ws1")).await;
    std::fs::remove_dir_all(f.mirrors.mirror_path(f.repo()).unwrap()).unwrap();

    let ws = f.dir("ws2");
    let again = Mirrors::new(f.mirrors.root());
    again.checkout(f.repo(), &c1, &ws, false).await.unwrap();
    assert_eq!(tree(&ws), ["dir/a.txt", "link", "run.sh"]);
    assert_eq!(read(&ws.join("dir/a.txt")), "one\n");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(ws.join("run.sh")).unwrap().permissions(),
    );
    assert_ne!(mode & 0o111, 0, "run.sh lost its executable bit");
    assert_eq!(
        std::fs::read_link(ws.join("link")).unwrap(),
        Path::new("run.sh")
    );
    assert_eq!(git(&ws, &["rev-parse", "HEAD"]), c1);
    assert_eq!(git(&ws, &["status", "--porcelain"]), "");
    assert_eq!(git(&ws, &["log", "--format=%s", "-1"]), "one");
    // A change in one workspace is not seen by the next copy.
    std::fs::write(ws.join("dir/a.txt"), "changed\n").unwrap();
    let ws3 = f.dir("ws3");
    again.checkout(f.repo(), &c1, &ws3, false).await.unwrap();
    assert_eq!(read(&ws3.join("dir/a.txt")), "one\n");
}

/// A file read at a commit is remembered (commits never change): it is served with the mirror
/// gone, and so is "no such file".
#[tokio::test]
async fn files_read_at_a_commit_are_remembered() {
    let f = Fixture::new();
    let c1 = f.commit(&[(".tributary.yml", Some("jobs: {}\n"))], "one");
    let sha = resolve(f.repo(), &c1, &f.mirrors).await.unwrap();
    assert_eq!(
        read_file(f.repo(), &sha, ".tributary.yml", &f.mirrors)
            .await
            .unwrap(),
        "jobs: {}\n"
    );
    assert!(read_file(f.repo(), &sha, "missing.yml", &f.mirrors)
        .await
        .unwrap_err()
        .is_not_found());
    std::fs::remove_dir_all(f.mirrors.mirror_path(f.repo()).unwrap()).unwrap();
    assert_eq!(resolve(f.repo(), &sha, &f.mirrors).await.unwrap(), sha);
    assert_eq!(
        read_file(f.repo(), &sha, ".tributary.yml", &f.mirrors)
            .await
            .unwrap(),
        "jobs: {}\n"
    );
    assert!(read_file(f.repo(), &sha, "missing.yml", &f.mirrors)
        .await
        .unwrap_err()
        .is_not_found());
}

/// A reused workspace (an earlier job's, with its leftovers) is made exactly the commit's
/// checkout from the template: extra files go, changed files are restored, and a symbolic link a
/// job planted where the commit has a directory is removed, never followed.
#[tokio::test]
async fn a_reused_workspace_becomes_exactly_the_commit() {
    let f = Fixture::new();
    let c1 = f.commit(
        &[("a.txt", Some("one\n")), ("dir/b.txt", Some("bee\n"))],
        "one",
    );
    let c2 = f.commit(&[("a.txt", Some("two\n")), ("c.txt", Some("sea\n"))], "two");
    let (ws1, ws2) = (f.dir("ws1"), f.dir("ws2"));
    f.check_out(&c1, &ws1).await;
    f.check_out(&c2, &ws2).await;

    // What a job may leave behind in ws2.
    let outside = f.dir("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(ws2.join("build.out"), "artifact").unwrap();
    std::fs::write(ws2.join("a.txt"), "changed by the job\n").unwrap();
    std::fs::remove_file(ws2.join("c.txt")).unwrap();
    std::fs::remove_dir_all(ws2.join("dir")).unwrap();
    std::os::unix::fs::symlink(&outside, ws2.join("dir")).unwrap();

    // The next job, of c1, gets that workspace.
    f.check_out(&c1, &ws2).await;
    assert_eq!(tree(&ws2), ["a.txt", "dir/b.txt"]);
    assert_eq!(read(&ws2.join("a.txt")), "one\n");
    assert!(!ws2.join("dir").symlink_metadata().unwrap().is_symlink());
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "wrote through a symlink"
    );
    assert_eq!(git(&ws2, &["rev-parse", "HEAD"]), c1);
    assert_eq!(git(&ws2, &["status", "--porcelain", "--ignored"]), "");

    // A change that keeps the size and puts the time back is still undone.
    let a = ws2.join("a.txt");
    let before = std::fs::metadata(&a).unwrap().modified().unwrap();
    std::fs::write(&a, "ONE\n").unwrap();
    std::fs::File::open(&a)
        .unwrap()
        .set_modified(before)
        .unwrap();
    f.check_out(&c1, &ws2).await;
    assert_eq!(read(&a), "one\n");

    // And back to c2.
    f.check_out(&c2, &ws2).await;
    assert_eq!(tree(&ws2), ["a.txt", "c.txt", "dir/b.txt"]);
    assert_eq!(read(&ws2.join("a.txt")), "two\n");
    assert_eq!(git(&ws2, &["rev-parse", "HEAD"]), c2);
    assert_eq!(git(&ws2, &["status", "--porcelain", "--ignored"]), "");
}

/// Each template's tree is kept in memory once read; a template removed and saved again at the
/// same path (pruned, then checked out anew) is read again, never answered from the old one.
#[tokio::test]
async fn a_template_saved_again_is_read_again() {
    let f = Fixture::new();
    let c1 = f.commit(&[("a.txt", Some("one\n"))], "one");
    let (ws1, ws2) = (f.dir("ws1"), f.dir("ws2"));
    f.check_out(&c1, &ws1).await;
    f.check_out(&c1, &ws2).await;
    assert_eq!(read(&ws2.join("a.txt")), "one\n");

    // Another directory takes the template's place, with other contents.
    let templates: Vec<PathBuf> = std::fs::read_dir(f.mirrors.root().join(".checkouts"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy() == c1)
        .collect();
    let [template] = &templates[..] else {
        panic!("one template of {c1} expected: {templates:?}")
    };
    let old = template.with_extension("old");
    std::fs::rename(template, &old).unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&old)
        .arg(template)
        .status()
        .unwrap();
    assert!(copied.success());
    std::fs::write(template.join("a.txt"), "from the new template\n").unwrap();

    f.check_out(&c1, &ws2).await;
    assert_eq!(read(&ws2.join("a.txt")), "from the new template\n");
}

// ---- access rules and tenants ----

#[tokio::test]
async fn each_tenant_gets_its_own_mirror_of_the_same_repository() {
    let f = Fixture::new();
    let c1 = f.commit(&[("a", Some("1"))], "one");
    let acme = f.mirrors.for_tenant("acme");
    let evil = f.mirrors.for_tenant("evil");
    let a = acme.sync(f.repo()).await.unwrap();
    let e = evil.sync(f.repo()).await.unwrap();
    assert_ne!(a, e);
    assert_eq!(a.file_name(), e.file_name());
    assert!(a.starts_with(f.dir("mirrors/tenants/acme")), "{a:?}");
    assert!(e.starts_with(f.dir("mirrors/tenants/evil")), "{e:?}");
    // A private ref fetched into acme's mirror is not in evil's.
    git(&f.src, &["update-ref", "refs/heads/private", &c1]);
    let c2 = f.commit(&[("b", Some("2"))], "two");
    git(&f.src, &["branch", "-f", "private", &c2]);
    git(&f.src, &["reset", "-q", "--hard", &c1]);
    assert_eq!(resolve(f.repo(), "private", &acme).await.unwrap(), c2);
    let in_evil = std::process::Command::new("git")
        .args(["cat-file", "-e", &c2])
        .current_dir(&e)
        .status()
        .unwrap();
    assert!(!in_evil.success(), "evil's mirror has acme's commit");
    // Each tenant's checkouts come from its own mirror (and template).
    let ws = f.dir("ws-evil");
    evil.checkout(f.repo(), &c1, &ws, false).await.unwrap();
    assert_eq!(read(&ws.join("a")), "1");
    let alternates = ws.join(".git/objects/info/alternates");
    if alternates.exists() {
        assert!(!read(&alternates).contains("acme"));
    }
}

#[tokio::test]
async fn a_mirror_is_never_a_repository_even_through_a_link_or_dot_dot() {
    let f = Fixture::new();
    f.commit(&[("a", Some("1"))], "one");
    let mirror = f.mirrors.for_tenant("acme").sync(f.repo()).await.unwrap();
    let link = f.dir("link");
    std::os::unix::fs::symlink(&mirror, &link).unwrap();
    let dotdot = format!("{}/../mirrors/tenants/acme", f.src.display());
    let url = format!("file://{}", mirror.display());
    for repo in [mirror.to_str().unwrap(), link.to_str().unwrap(), &url] {
        let err = f.mirrors.for_tenant("evil").sync(repo).await.unwrap_err();
        assert!(err.is_refused(), "{repo}: {err}");
        assert!(err.to_string().contains("server's own data"), "{err}");
    }
    let err = resolve(&dotdot, "", &f.mirrors.for_tenant("evil"))
        .await
        .unwrap_err();
    assert!(err.is_refused(), "{err}");
    assert!(!f.dir("mirrors/tenants/evil").exists());
}

#[tokio::test]
async fn protocols_and_remote_helpers_are_refused_before_git_runs() {
    let f = Fixture::new();
    let marker = f.dir("pwned");
    let ext = format!("ext::sh -c touch% {}", marker.display());
    for repo in [
        ext.as_str(),
        "git://127.0.0.1:9/x.git",
        "http://127.0.0.1:9/x.git",
        "fd::7",
    ] {
        let err = resolve(repo, "", &f.mirrors).await.unwrap_err();
        assert!(err.is_refused(), "{repo}: {err}");
    }
    assert!(!marker.exists());
    assert!(!f.dir("mirrors").exists(), "no git ran");
    // Allowed by the operator: http is then tried (and fails to connect, with git's words).
    let mirrors = Mirrors::new(f.dir("m2")).with_access(Access {
        protocols: vec!["https".into(), "http".into()],
        ..Access::default()
    });
    let err = resolve("http://127.0.0.1:9/x.git", "", &mirrors)
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::Git { .. }), "{err}");
}

#[tokio::test]
async fn local_repositories_only_under_the_allowed_folders() {
    let f = Fixture::new();
    f.commit(&[("a", Some("1"))], "one");
    let allowed = f.dir("allowed");
    std::fs::create_dir(&allowed).unwrap();
    let mirrors = Mirrors::new(f.dir("mirrors")).with_access(
        Access::default()
            .local_under(std::slice::from_ref(&allowed))
            .unwrap(),
    );
    let err = mirrors.sync(f.repo()).await.unwrap_err();
    assert!(err.is_refused(), "{err}");
    assert!(err.to_string().contains("outside the folders"), "{err}");
    let inside = allowed.join("app");
    git(
        f.tmp.path(),
        &["clone", "-q", f.repo(), inside.to_str().unwrap()],
    );
    mirrors.sync(inside.to_str().unwrap()).await.unwrap();
    // `..` out of the allowed folder resolves outside it.
    let escape = format!("{}/../src", allowed.display());
    assert!(mirrors.sync(&escape).await.unwrap_err().is_refused());
}

#[tokio::test]
async fn submodules_are_checked_before_git_fetches_them() {
    let f = Fixture::new();
    let allowed = f.dir("allowed");
    std::fs::create_dir(&allowed).unwrap();
    let outside = f.dir("outside");
    std::fs::create_dir(&outside).unwrap();
    git(&outside, &["init", "-q", "-b", "main"]);
    commit_in(&outside, &[("secret.txt", Some("outside secret\n"))], "s");
    let inside = allowed.join("lib");
    std::fs::create_dir(&inside).unwrap();
    git(&inside, &["init", "-q", "-b", "main"]);
    commit_in(&inside, &[("lib.txt", Some("lib\n"))], "l");
    let top = allowed.join("top");
    std::fs::create_dir(&top).unwrap();
    git(&top, &["init", "-q", "-b", "main"]);
    git(
        &top,
        &["submodule", "add", "-q", inside.to_str().unwrap(), "lib"],
    );
    let good = commit_in(&top, &[("top.txt", Some("top"))], "good");
    git(
        &top,
        &[
            "submodule",
            "add",
            "-q",
            outside.to_str().unwrap(),
            "stolen",
        ],
    );
    let bad = commit_in(&top, &[], "bad");

    let mirrors = Mirrors::new(f.dir("mirrors")).with_access(
        Access::default()
            .local_under(std::slice::from_ref(&allowed))
            .unwrap(),
    );
    let repo = top.to_str().unwrap();
    let ws = f.dir("ws");
    mirrors.checkout(repo, &good, &ws, true).await.unwrap();
    assert_eq!(read(&ws.join("lib/lib.txt")), "lib\n");

    let ws2 = f.dir("ws2");
    let err = mirrors.checkout(repo, &bad, &ws2, true).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("submodule") && msg.contains("stolen"), "{msg}");
    assert!(msg.contains("outside the folders"), "{msg}");
    assert!(!ws2.join("stolen/secret.txt").exists());
}
