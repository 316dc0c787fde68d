//! `cache:` and `reuse:` on a job: what the plan holds, and every rejection with its
//! file:line:column.

mod common;

use common::rejects;
use tributary_pipeline::load;

#[test]
fn one_cache_a_list_of_caches_and_reuse_go_into_the_plan() {
    let text = r#"
jobs:
  build:
    matrix:
      os: [linux]
    reuse: commit
    cache:
      key: "cargo-${{ matrix.os }}-${{ hashFiles('Cargo.lock', '**/Cargo.toml') }}"
      paths: [target, "out/${{ matrix.os }}"]
    steps: [make]
  test:
    cache:
      - {key: a, paths: x}
      - key: b
        paths: [y/**/*.o]
    steps: [make test]
"#;
    let plan = load(".tributary.yml", text).unwrap();
    let build = &plan.jobs[0];
    assert_eq!(build.reuse, "commit");
    assert_eq!(build.cache.len(), 1);
    assert_eq!(
        build.cache[0].key,
        "cargo-linux-${{ hashFiles('Cargo.lock', '**/Cargo.toml') }}"
    );
    assert_eq!(build.cache[0].paths, ["target", "out/linux"]);
    let test = &plan.jobs[1];
    assert_eq!(test.reuse, "");
    let keys: Vec<_> = test.cache.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["a", "b"]);
    assert_eq!(test.cache[0].paths, ["x"]);
}

#[test]
fn bad_cache_entries_are_refused_where_they_are() {
    let job = "jobs:\n  b:\n    steps: [make]\n";
    rejects(
        &format!("{job}    cache: target\n"),
        4,
        12,
        &["`cache` of job \"b\"", "a mapping with `key` and `paths`"],
    );
    rejects(
        &format!("{job}    cache: []\n"),
        4,
        12,
        &["empty list", "hashFiles('Cargo.lock')"],
    );
    rejects(
        &format!("{job}    cache:\n      paths: [target]\n"),
        5,
        7,
        &["has no `key`"],
    );
    rejects(
        &format!("{job}    cache:\n      key: k\n"),
        5,
        7,
        &["has no `paths`"],
    );
    rejects(
        &format!("{job}    cache:\n      key: k\n      path: [x]\n"),
        6,
        7,
        &["unknown key \"path\"", "did you mean `paths`?"],
    );
    rejects(
        &format!("{job}    cache:\n      key: k\n      policy: pull\n"),
        6,
        7,
        &["not supported"],
    );
    rejects(
        &format!("{job}    cache:\n      key: k\n      paths: [../outside]\n"),
        6,
        15,
        &["`..`"],
    );
    rejects(
        &format!("{job}    cache:\n      key: k\n      paths: /abs\n"),
        6,
        14,
        &["absolute"],
    );
    rejects(
        &format!("{job}    cache:\n      key: \"\"\n      paths: x\n"),
        5,
        12,
        &["`key` of `cache` of job \"b\" is empty"],
    );
    rejects(
        &format!("{job}    cache:\n      - {{key: k, paths: x}}\n      - {{key: k, paths: y}}\n"),
        6,
        15,
        &["entry 2 of `cache`", "same key \"k\"", "line 5"],
    );
    rejects(
        &format!("{job}    cache:\n      - target\n"),
        5,
        9,
        &["entry 1 of `cache`"],
    );
    rejects(
        &format!("{job}    caches: {{key: k, paths: x}}\n"),
        4,
        5,
        &["did you mean \"cache\""],
    );
}

#[test]
fn bad_cache_key_expressions_are_refused() {
    let job = "jobs:\n  b:\n    steps: [make]\n";
    rejects(
        &format!("{job}    cache:\n      key: \"k-${{{{ github.sha }}}}\"\n      paths: x\n"),
        5,
        12,
        &["unsupported expression", "hashFiles"],
    );
    rejects(
        &format!("{job}    cache:\n      key: \"k-${{{{ hashFiles() }}}}\"\n      paths: x\n"),
        5,
        12,
        &["at least one pattern"],
    );
    rejects(
        &format!(
            "{job}    cache:\n      key: \"k-${{{{ hashFiles('../x') }}}}\"\n      paths: x\n"
        ),
        5,
        12,
        &["`..`"],
    );
    rejects(
        &format!("{job}    cache:\n      key: \"k-${{{{ matrix.os }}}}\"\n      paths: x\n"),
        5,
        12,
        &["has no `matrix`"],
    );
}

#[test]
fn reuse_takes_only_commit() {
    let job = "jobs:\n  b:\n    steps: [make]\n";
    rejects(
        &format!("{job}    reuse: always\n"),
        4,
        12,
        &[
            "`reuse` of job \"b\" is \"always\"",
            "only value is `commit`",
        ],
    );
    rejects(&format!("{job}    reuse: true\n"), 4, 12, &["a string"]);
    rejects(
        &format!("{job}    build-once: commit\n"),
        4,
        5,
        &["did you mean \"reuse\""],
    );
}
