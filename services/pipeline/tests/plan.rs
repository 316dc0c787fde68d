//! Valid pipelines and the plans they expand to.

mod common;

use common::{rejection, rejects};
use tributary_pipeline::load;
use tributary_proto::events::{EnvVar, JobPlan, MatrixValue, Plan, StepPlan};

#[track_caller]
fn plan(text: &str) -> Plan {
    load("p.yml", text).unwrap_or_else(|e| panic!("{e}"))
}

fn ids(plan: &Plan) -> Vec<&str> {
    plan.jobs.iter().map(|j| j.id.as_str()).collect()
}

fn env(pairs: &[(&str, &str)]) -> Vec<EnvVar> {
    pairs
        .iter()
        .map(|(n, v)| EnvVar {
            name: (*n).into(),
            value: (*v).into(),
        })
        .collect()
}

fn step(name: &str, lines: &[&str]) -> StepPlan {
    StepPlan {
        name: name.into(),
        lines: lines.iter().map(|l| (*l).into()).collect(),
    }
}

/// The example from the crate docs, in full.
const EXAMPLE: &str = r#"
env:                      # optional, pipeline-wide env (string -> scalar)
  RUST_LOG: info
jobs:                     # required, non-empty mapping; job keys match [A-Za-z0-9_-]+
  build:
    steps:                # required, non-empty list
      - name: compile     # optional; default "step N" (1-based)
        script:           # a list of strings: each entry is ONE line
          - cd src
          - make
      - name: package
        run: |            # one block = one line
          tar czf out.tgz build/
      - echo shorthand    # a plain string step == {run: "echo shorthand", name: "echo shorthand"}
  test:
    needs: build          # a string or a list of job keys
    matrix:               # mapping axis -> non-empty list of scalars; cartesian product
      os: [linux, bsd]
      rust: ["1.80", "1.81"]
    env: { TARGET: "${{ matrix.os }}" }
    timeout: 10m          # integer seconds, or a duration string "90s", "10m", "1h", "1h30m"
    runs-on: [linux, big] # a string or a list of labels
    image: localhost/ci-busybox
    retry: 2              # re-runs after failure, integer 0..=10
    steps:
      - script: ["cargo test --target ${{ matrix.os }}"]
"#;

#[test]
fn full_example() {
    let plan = plan(EXAMPLE);
    assert_eq!(
        ids(&plan),
        [
            "build",
            "test[os=linux,rust=1.80]",
            "test[os=linux,rust=1.81]",
            "test[os=bsd,rust=1.80]",
            "test[os=bsd,rust=1.81]",
        ]
    );
    assert_eq!(
        plan.jobs[0],
        JobPlan {
            id: "build".into(),
            name: "build".into(),
            matrix: vec![],
            needs: vec![],
            steps: vec![
                step("compile", &["cd src", "make"]),
                step("package", &["tar czf out.tgz build/"]),
                step("echo shorthand", &["echo shorthand"]),
            ],
            env: env(&[("RUST_LOG", "info")]),
            timeout_secs: 0,
            runs_on: vec![],
            image: String::new(),
            retry: 0,
            kept_from_build: String::new(),
            kept_artifacts: Vec::new(),
            runs_on_strict: false,
            artifacts: vec![],
            network: false,
            submodules: false,
            cache: Vec::new(),
            reuse: String::new(),
            secrets: vec![],
            image_build: None,
        }
    );
    assert_eq!(
        plan.jobs[3],
        JobPlan {
            id: "test[os=bsd,rust=1.80]".into(),
            name: "test".into(),
            matrix: vec![
                MatrixValue {
                    name: "os".into(),
                    value: "bsd".into()
                },
                MatrixValue {
                    name: "rust".into(),
                    value: "1.80".into()
                },
            ],
            needs: vec!["build".into()],
            steps: vec![step("step 1", &["cargo test --target bsd"])],
            env: env(&[("RUST_LOG", "info"), ("TARGET", "bsd")]),
            timeout_secs: 600,
            runs_on: vec!["linux".into(), "big".into()],
            image: "localhost/ci-busybox".into(),
            retry: 2,
            kept_from_build: String::new(),
            kept_artifacts: Vec::new(),
            runs_on_strict: false,
            artifacts: vec![],
            network: false,
            submodules: false,
            cache: Vec::new(),
            reuse: String::new(),
            secrets: vec![],
            image_build: None,
        }
    );
}

#[test]
fn matrix_order_first_axis_slowest_and_substitution_everywhere() {
    let text = r#"
jobs:
  t:
    matrix:
      os: [linux, bsd, mac]
      arch: [x86, arm]
    env:
      TRIPLE: "${{ matrix.arch }}-${{matrix.os}}"
    image: "ci/${{ matrix.os }}:latest"
    runs-on: ["${{ matrix.arch }}", big]
    steps:
      - name: "build on ${{ matrix.os }}"
        script:
          - echo ${{ matrix.os }} ${{ matrix.arch }}
      - run: make ARCH=${{ matrix.arch }}
      - echo ${{ matrix.os }}
"#;
    let plan = plan(text);
    assert_eq!(
        ids(&plan),
        [
            "t[os=linux,arch=x86]",
            "t[os=linux,arch=arm]",
            "t[os=bsd,arch=x86]",
            "t[os=bsd,arch=arm]",
            "t[os=mac,arch=x86]",
            "t[os=mac,arch=arm]",
        ]
    );
    let j = &plan.jobs[3];
    assert_eq!(j.name, "t");
    assert_eq!(j.env, env(&[("TRIPLE", "arm-bsd")]));
    assert_eq!(j.image, "ci/bsd:latest");
    assert_eq!(j.runs_on, ["arm", "big"]);
    assert_eq!(
        j.steps,
        [
            step("build on bsd", &["echo bsd arm"]),
            step("step 2", &["make ARCH=arm"]),
            step("echo bsd", &["echo bsd"]),
        ]
    );
    let values: Vec<(&str, &str)> = j
        .matrix
        .iter()
        .map(|m| (m.name.as_str(), m.value.as_str()))
        .collect();
    assert_eq!(values, [("os", "bsd"), ("arch", "arm")]);
}

#[test]
fn pipeline_env_is_substituted_per_instance() {
    let text =
        "env:\n  OS: \"${{ matrix.os }}\"\njobs:\n  t:\n    matrix: {os: [a, b]}\n    steps: [x]\n";
    let plan = plan(text);
    assert_eq!(plan.jobs[0].env, env(&[("OS", "a")]));
    assert_eq!(plan.jobs[1].env, env(&[("OS", "b")]));
}

#[test]
fn shell_variables_pass_through() {
    let text = "jobs:\n  t:\n    env: {P: \"$HOME/${USER}/$${{ matrix.x }}\"}\n    matrix: {x: [1]}\n    steps:\n      - echo $HOME ${USER} \"${{ '{' }}\"\n";
    // `${{ '{' }}` is not a matrix reference: rejected.
    assert!(rejection(text).message.contains("unsupported expression"));
    let text = text.replace(" \"${{ '{' }}\"", "");
    let plan = plan(&text);
    assert_eq!(plan.jobs[0].env, env(&[("P", "$HOME/${USER}/$1")]));
    assert_eq!(plan.jobs[0].steps[0].lines, ["echo $HOME ${USER}"]);
}

#[test]
fn needs_expand_to_instances() {
    let text = r#"
jobs:
  deploy:
    needs: [test, lint]
    steps: [deploy]
  test:
    needs: build
    matrix: {os: [linux, bsd]}
    steps: [t]
  build:
    matrix: {os: [linux, bsd], opt: ["0", "3"]}
    steps: [b]
  lint:
    steps: [l]
"#;
    let plan = plan(text);
    assert_eq!(
        ids(&plan),
        [
            "deploy",
            "test[os=linux]",
            "test[os=bsd]",
            "build[os=linux,opt=0]",
            "build[os=linux,opt=3]",
            "build[os=bsd,opt=0]",
            "build[os=bsd,opt=3]",
            "lint",
        ]
    );
    assert_eq!(
        plan.jobs[0].needs,
        ["test[os=linux]", "test[os=bsd]", "lint"]
    );
    let all_builds = [
        "build[os=linux,opt=0]",
        "build[os=linux,opt=3]",
        "build[os=bsd,opt=0]",
        "build[os=bsd,opt=3]",
    ];
    assert_eq!(plan.jobs[1].needs, all_builds);
    assert_eq!(plan.jobs[2].needs, all_builds);
    assert!(plan.jobs[3].needs.is_empty());
}

#[test]
fn needs_forms() {
    let base = "jobs:\n  a:\n    steps: [x]\n  b:\n    steps: [x]\n  c:\n    steps: [x]\n";
    let p = plan(&format!("{base}    needs: a\n"));
    assert_eq!(p.jobs[2].needs, ["a"]);
    let p = plan(&format!("{base}    needs: [b, a]\n"));
    assert_eq!(p.jobs[2].needs, ["b", "a"]);
    let p = plan(&format!("{base}    needs:\n      - a\n"));
    assert_eq!(p.jobs[2].needs, ["a"]);
    let p = plan(&format!("{base}    needs: []\n"));
    assert!(p.jobs[2].needs.is_empty());
    // A diamond is not a cycle.
    let diamond = "jobs:\n  a: {steps: [x]}\n  b: {needs: a, steps: [x]}\n  c: {needs: a, steps: [x]}\n  d: {needs: [b, c], steps: [x]}\n";
    assert_eq!(plan(diamond).jobs[3].needs, ["b", "c"]);
}

#[test]
fn shorthand_steps() {
    let text = "jobs:\n  t:\n    steps:\n      - make all\n      - 'echo \"quoted: yes\"'\n      - |\n        set -e\n        make\n";
    let plan = plan(text);
    assert_eq!(
        plan.jobs[0].steps,
        [
            step("make all", &["make all"]),
            step("echo \"quoted: yes\"", &["echo \"quoted: yes\""]),
            step("set -e", &["set -e\nmake"]),
        ]
    );
}

#[test]
fn run_block_is_one_line_and_script_entries_are_lines() {
    let text = "jobs:\n  t:\n    steps:\n      - run: |\n          a\n          b\n      - script:\n          - a\n          - b\n";
    let plan = plan(text);
    assert_eq!(plan.jobs[0].steps[0].lines, ["a\nb"]);
    assert_eq!(plan.jobs[0].steps[1].lines, ["a", "b"]);
    assert_eq!(plan.jobs[0].steps[1].name, "step 2");
}

#[test]
fn durations() {
    for (written, secs) in [
        ("600", 600),
        ("\"600\"", 600),
        ("90s", 90),
        ("10m", 600),
        ("1h", 3600),
        ("1h30m", 5400),
        ("2h0m5s", 7205),
    ] {
        let text = format!("jobs:\n  t:\n    timeout: {written}\n    steps: [x]\n");
        assert_eq!(plan(&text).jobs[0].timeout_secs, secs, "{written}");
    }
}

#[test]
fn retry_values() {
    for (written, n) in [("0", 0), ("10", 10), ("3", 3), ("\"2\"", 2)] {
        let text = format!("jobs:\n  t:\n    retry: {written}\n    steps: [x]\n");
        assert_eq!(plan(&text).jobs[0].retry, n);
    }
}

#[test]
fn yaml_numbers_keep_their_source_text() {
    let text = r#"
env:
  RUST: 1.80
  COUNT: 10
  FLAG: true
  HEX: 0x1F
  OFF: False
  QUOTED: "1.80"
jobs:
  t:
    matrix:
      rust: [1.80, 1.10, "1.81"]
      n: [10, 007]
    steps:
      - run: echo ${{ matrix.rust }}
"#;
    let plan = plan(text);
    assert_eq!(
        plan.jobs[0].env,
        env(&[
            ("COUNT", "10"),
            ("FLAG", "true"),
            ("HEX", "0x1F"),
            ("OFF", "False"),
            ("QUOTED", "1.80"),
            ("RUST", "1.80"),
        ])
    );
    assert_eq!(
        ids(&plan),
        [
            "t[rust=1.80,n=10]",
            "t[rust=1.80,n=007]",
            "t[rust=1.10,n=10]",
            "t[rust=1.10,n=007]",
            "t[rust=1.81,n=10]",
            "t[rust=1.81,n=007]",
        ]
    );
    assert_eq!(plan.jobs[2].steps[0].lines, ["echo 1.10"]);
}

#[test]
fn quoted_numbers_are_strings() {
    let text = "jobs:\n  \"1\":\n    image: \"3.19\"\n    steps: ['true', \"42\"]\n  b:\n    needs: \"1\"\n    steps:\n      - name: '2'\n        run: 'false'\n";
    let plan = plan(text);
    assert_eq!(plan.jobs[0].image, "3.19");
    assert_eq!(plan.jobs[0].steps[0], step("true", &["true"]));
    assert_eq!(plan.jobs[1].needs, ["1"]);
    assert_eq!(plan.jobs[1].steps[0], step("2", &["false"]));
}

#[test]
fn job_env_overrides_pipeline_env_and_is_sorted() {
    let text = "env:\n  Z: 1\n  A: pipeline\njobs:\n  t:\n    env:\n      A: job\n      M: m\n    steps: [x]\n  u:\n    steps: [x]\n";
    let plan = plan(text);
    assert_eq!(
        plan.jobs[0].env,
        env(&[("A", "job"), ("M", "m"), ("Z", "1")])
    );
    assert_eq!(plan.jobs[1].env, env(&[("A", "pipeline"), ("Z", "1")]));
}

#[test]
fn runs_on_forms() {
    let p = plan("jobs:\n  t:\n    runs-on: linux\n    steps: [x]\n");
    assert_eq!(p.jobs[0].runs_on, ["linux"]);
    let p = plan("jobs:\n  t:\n    runs-on:\n      - linux\n      - big\n    steps: [x]\n");
    assert_eq!(p.jobs[0].runs_on, ["linux", "big"]);
}

#[test]
fn declaration_order_is_kept() {
    let text = "jobs:\n  zeta: {steps: [x]}\n  alpha: {steps: [x]}\n  mid: {steps: [x], matrix: {v: [b, a]}}\n  beta: {steps: [x]}\n";
    assert_eq!(
        ids(&plan(text)),
        ["zeta", "alpha", "mid[v=b]", "mid[v=a]", "beta"]
    );
}

#[test]
fn flow_style_and_document_markers_are_fine() {
    let text = "%YAML 1.2\n---\n{jobs: {build: {steps: [make]}}}\n...\n# trailing comment\n";
    assert_eq!(ids(&plan(text)), ["build"]);
}

#[test]
fn windows_line_endings() {
    let text = "jobs:\r\n  build:\r\n    steps:\r\n      - make\r\n";
    assert_eq!(plan(text).jobs[0].steps[0].lines, ["make"]);
    rejects("jobs:\r\n  build:\r\n    stesp: []\r\n", 3, 5, &[]);
}

#[test]
fn artifacts_in_every_spelling_with_matrix_values() {
    let p = plan(
        "jobs:\n  a:\n    steps: [make]\n    artifacts: dist/app.tar\n  \
         b:\n    steps: [make]\n    artifacts:\n      paths: [out, '**/*.log']\n  \
         c:\n    matrix: {os: [linux, bsd]}\n    steps: [make]\n    artifacts: ['bin/${{ matrix.os }}/*']\n",
    );
    assert_eq!(p.jobs[0].artifacts, ["dist/app.tar"]);
    assert_eq!(p.jobs[1].artifacts, ["out", "**/*.log"]);
    assert_eq!(p.jobs[2].artifacts, ["bin/linux/*"]);
    assert_eq!(p.jobs[3].artifacts, ["bin/bsd/*"]);
}

#[test]
fn network_and_submodules() {
    let plan = plan(
        "jobs:\n  a:\n    image: localhost/ci-busybox\n    network: true\n    submodules: true\n    steps: [make]\n  b:\n    network: false\n    steps: [make]\n",
    );
    assert!(plan.jobs[0].network);
    assert!(plan.jobs[0].submodules);
    assert!(!plan.jobs[1].network);
    assert!(!plan.jobs[1].submodules);
}

#[test]
fn secrets_are_names_in_the_plan() {
    let plan = plan(
        "jobs:\n  a:\n    secrets: [DEPLOY_TOKEN, _X]\n    matrix: {os: [l, b]}\n    steps: [make]\n  b:\n    secrets: ONE\n    steps: [make]\n  c:\n    steps: [make]\n",
    );
    assert_eq!(plan.jobs[0].secrets, ["DEPLOY_TOKEN", "_X"]);
    assert_eq!(
        plan.jobs[1].secrets,
        ["DEPLOY_TOKEN", "_X"],
        "every matrix instance"
    );
    assert_eq!(plan.jobs[2].secrets, ["ONE"]);
    assert!(plan.jobs[3].secrets.is_empty());
}

#[test]
fn runs_on_in_its_strict_form() {
    let p = plan(
        "jobs:\n  a:\n    runs-on: {labels: [gpu, arm], fallback: false}\n    steps: [x]\n  b:\n    runs-on: {labels: gpu}\n    steps: [x]\n  c:\n    runs-on: [gpu]\n    steps: [x]\n",
    );
    let strict: Vec<(Vec<String>, bool)> = p
        .jobs
        .iter()
        .map(|j| (j.runs_on.clone(), j.runs_on_strict))
        .collect();
    assert_eq!(
        strict,
        [
            (vec!["gpu".to_owned(), "arm".to_owned()], true),
            (vec!["gpu".to_owned()], false),
            (vec!["gpu".to_owned()], false),
        ]
    );
    rejects(
        "jobs:\n  t:\n    runs-on: {fallback: false}\n    steps: [x]\n",
        3,
        15,
        &["`runs-on` of job \"t\" has no `labels`", "fallback: false}"],
    );
    rejects(
        "jobs:\n  t:\n    runs-on: {labels: [gpu], strict: true}\n    steps: [x]\n",
        3,
        30,
        &["unknown key \"strict\"", "labels, fallback"],
    );
}
