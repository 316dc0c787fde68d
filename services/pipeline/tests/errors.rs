//! Every way a pipeline is rejected: the message says what is wrong and what to do, and the
//! line and column point at the offending node.

mod common;

use common::rejects;
use tributary_pipeline::load;

// ---- the file as a whole -------------------------------------------------------------------

#[test]
fn display_is_file_line_column_message() {
    let err = rejects("jobs:\n  b:\n    stesp: []\n", 3, 5, &[]);
    assert_eq!(
        err.to_string(),
        ".tributary.yml:3:5: unknown key \"stesp\" in job \"b\"; did you mean \"steps\"? \
         Valid keys: steps, needs, matrix, env, timeout, runs-on, image, retry, artifacts, \
         network, submodules, cache, reuse, secrets"
    );
}

#[test]
fn empty_file() {
    rejects("", 1, 1, &["pipeline file is empty", "jobs:"]);
    rejects("# just a comment\n\n", 1, 1, &["pipeline file is empty"]);
    rejects("---\n", 1, 1, &["pipeline file is empty"]);
}

#[test]
fn top_level_not_a_mapping() {
    rejects(
        "- build\n- test\n",
        1,
        1,
        &["top level", "must be a mapping", "`jobs`"],
    );
    rejects("# header\njust text\n", 2, 1, &["must be a mapping"]);
}

#[test]
fn yaml_syntax_error_has_location() {
    rejects(
        "jobs:\n  build:\n    steps: [make\n",
        4,
        1,
        &["invalid YAML", "expected ',' or ']'", "close the list"],
    );
    rejects(
        "jobs:\n  build:\n    steps:\n      - run: echo a: b\n",
        4,
        20,
        &["invalid YAML", "mapping values are not allowed", "quote"],
    );
    rejects(
        "jobs:\n  build:\n    steps:\n      - run: \"echo\n",
        4,
        14,
        &["invalid YAML", "close the quote"],
    );
}

#[test]
fn tabs_are_a_syntax_error() {
    rejects(
        "jobs:\n\tbuild: {}\n",
        2,
        2,
        &["invalid YAML", "tabs", "spaces"],
    );
}

#[test]
fn duplicate_keys() {
    rejects(
        "jobs:\n  build:\n    steps: [a]\n  build:\n    steps: [b]\n",
        4,
        3,
        &[
            "duplicate key \"build\"",
            "line 2, column 3",
            "remove or rename",
        ],
    );
    rejects(
        "jobs:\n  build:\n    steps:\n      - run: a\n        run: b\n",
        5,
        9,
        &["duplicate key \"run\"", "line 4, column 9"],
    );
}

#[test]
fn second_document() {
    rejects(
        "jobs:\n  build:\n    steps: [make]\n---\njobs: {}\n",
        4,
        1,
        &["single YAML document", "remove this line"],
    );
    rejects(
        "---\njobs:\n  build:\n    steps: [make]\n...\nenv: {}\n",
        6,
        1,
        &["single YAML document"],
    );
    rejects(
        "---\n---\njobs:\n  build:\n    steps: [make]\n",
        2,
        1,
        &["single YAML document"],
    );
}

#[test]
fn anchors_and_tags() {
    rejects(
        "env: &e {A: b}\njobs:\n  build:\n    steps: [make]\n",
        1,
        9,
        &["anchors and aliases", "write the value out"],
    );
    rejects(
        "jobs:\n  build:\n    steps: [!!str make]\n",
        3,
        19,
        &["tags", "remove the tag"],
    );
}

#[test]
fn unknown_top_level_key() {
    rejects(
        "job:\n  build:\n    steps: [make]\n",
        1,
        1,
        &[
            "unknown key \"job\" at the top level",
            "did you mean \"jobs\"?",
            "Valid keys: env, jobs",
        ],
    );
    rejects(
        "jobs:\n  build:\n    steps: [make]\nwhatever: 1\n",
        4,
        1,
        &[
            "unknown key \"whatever\"",
            "remove or rename it",
            "Valid keys: env, jobs",
        ],
    );
}

#[test]
fn missing_jobs() {
    rejects(
        "env:\n  A: b\n",
        1,
        1,
        &["no `jobs`", "add a `jobs:` mapping"],
    );
}

#[test]
fn empty_jobs() {
    rejects(
        "jobs:\n",
        1,
        1,
        &["`jobs` is empty", "add at least one job"],
    );
    rejects("env: {}\njobs: {}\n", 2, 7, &["`jobs` is empty"]);
}

#[test]
fn jobs_not_a_mapping() {
    rejects(
        "jobs:\n  - build\n",
        2,
        3,
        &[
            "expected a mapping for `jobs`",
            "found a list",
            "write `name: value` entries",
        ],
    );
}

// ---- jobs ----------------------------------------------------------------------------------

#[test]
fn invalid_job_name() {
    rejects(
        "jobs:\n  \"my job\":\n    steps: [make]\n",
        2,
        3,
        &[
            "invalid job name \"my job\"",
            "letters, digits",
            "\"my-job\"",
        ],
    );
}

#[test]
fn job_without_definition() {
    rejects(
        "jobs:\n  build:\n  test:\n    steps: [make]\n",
        2,
        3,
        &["job \"build\" is empty", "`steps:`"],
    );
}

#[test]
fn job_without_steps() {
    rejects(
        "jobs:\n  build:\n    image: alpine\n",
        2,
        3,
        &["job \"build\" has no `steps`", "add a `steps:` list"],
    );
}

#[test]
fn job_with_empty_steps() {
    rejects(
        "jobs:\n  build:\n    steps: []\n",
        3,
        12,
        &["job \"build\" has no steps", "add at least one"],
    );
}

#[test]
fn unknown_job_key_with_suggestion() {
    rejects(
        "jobs:\n  build:\n    steps: [make]\n    timout: 10\n",
        4,
        5,
        &[
            "unknown key \"timout\" in job \"build\"",
            "did you mean \"timeout\"?",
        ],
    );
    rejects(
        "jobs:\n  build:\n    steps: [make]\n    depends_on: test\n  test:\n    steps: [t]\n",
        4,
        5,
        &["unknown key \"depends_on\"", "did you mean \"needs\"?"],
    );
}

#[test]
fn unknown_job_key_without_suggestion() {
    rejects(
        "jobs:\n  build:\n    steps: [make]\n    colour: blue\n",
        4,
        5,
        &[
            "unknown key \"colour\" in job \"build\"; remove or rename it",
            "Valid keys: steps, needs, matrix, env, timeout, runs-on, image, retry, artifacts, \
             network, submodules, cache, reuse, secrets",
        ],
    );
}

// ---- steps ---------------------------------------------------------------------------------

#[test]
fn step_with_both_script_and_run() {
    rejects(
        "jobs:\n  build:\n    steps:\n      - script: [a]\n        run: b\n",
        5,
        9,
        &[
            "step 1 of job \"build\" has both `script` and `run`",
            "keep only one",
        ],
    );
}

#[test]
fn step_with_neither_script_nor_run() {
    rejects(
        "jobs:\n  build:\n    steps:\n      - make\n      - name: x\n",
        5,
        9,
        &[
            "step 2 of job \"build\" has neither `run` nor `script`",
            "add `run: <command>`",
        ],
    );
}

#[test]
fn unknown_step_key() {
    rejects(
        "jobs:\n  build:\n    steps:\n      - nmae: x\n        run: make\n",
        4,
        9,
        &[
            "unknown key \"nmae\" in step 1 of job \"build\"",
            "did you mean \"name\"?",
            "Valid keys: name, script, run",
        ],
    );
    rejects(
        "jobs:\n  build:\n    steps:\n      - command: make\n",
        4,
        9,
        &["unknown key \"command\"", "did you mean \"run\"?"],
    );
}

#[test]
fn step_of_wrong_type() {
    rejects(
        "jobs:\n  build:\n    steps:\n      - [a, b]\n",
        4,
        9,
        &[
            "step 1 of job \"build\" must be a command string or a mapping",
            "found a list",
        ],
    );
    rejects(
        "jobs:\n  build:\n    steps:\n      - 42\n",
        4,
        9,
        &["found a number (42)"],
    );
}

#[test]
fn script_not_a_list() {
    rejects(
        "jobs:\n  build:\n    steps:\n      - script: make\n",
        4,
        17,
        &[
            "`script` of step 1 of job \"build\" must be a list of lines",
            "use `run:`",
        ],
    );
}

#[test]
fn script_empty() {
    rejects(
        "jobs:\n  build:\n    steps:\n      - script: []\n",
        4,
        17,
        &[
            "`script` of step 1 of job \"build\" is empty",
            "add at least one line",
        ],
    );
}

#[test]
fn script_entry_empty_string() {
    rejects(
        "jobs:\n  build:\n    steps:\n      - script:\n          - make\n          - \"  \"\n",
        6,
        13,
        &[
            "line 2 of `script` of step 1 of job \"build\" is empty",
            "remove the line",
        ],
    );
}

#[test]
fn script_entry_missing_value_points_at_dash() {
    // marked-yaml places an empty entry at the next token; we point at its `-`.
    rejects(
        "jobs:\n  build:\n    steps:\n      - script:\n          - make\n          -\n\n          - test\n",
        6,
        11,
        &["expected a string for line 2 of `script`", "found an empty value"],
    );
    rejects(
        "jobs:\n  build:\n    steps:\n      - script:\n          - make\n          - # todo\n          - test\n",
        6,
        11,
        &["found an empty value"],
    );
}

#[test]
fn script_entry_not_a_string() {
    rejects(
        "jobs:\n  build:\n    steps:\n      - script: [make, true]\n",
        4,
        24,
        &[
            "expected a string for line 2",
            "found a boolean (true)",
            "quote it (\"true\")",
        ],
    );
}

#[test]
fn run_empty() {
    rejects(
        "jobs:\n  build:\n    steps:\n      - run: \"\"\n",
        4,
        14,
        &[
            "`run` of step 1 of job \"build\" is empty",
            "give it a command",
        ],
    );
    // `run:` with nothing: reported at the key, not at the next line.
    rejects(
        "jobs:\n  build:\n    steps:\n      - run:\n        name: x\n",
        4,
        9,
        &[
            "expected a string for `run` of step 1",
            "found an empty value (null)",
        ],
    );
}

#[test]
fn step_name_not_a_string() {
    rejects(
        "jobs:\n  build:\n    steps:\n      - name: [a]\n        run: make\n",
        4,
        15,
        &[
            "expected a string for `name` of step 1 of job \"build\"",
            "found a list",
        ],
    );
}

// ---- non-strings where strings are expected -------------------------------------------------

#[test]
fn image_not_a_string() {
    rejects(
        "jobs:\n  build:\n    image:\n      name: alpine\n    steps: [make]\n",
        4,
        7,
        &[
            "unknown key \"name\" in `image` of job \"build\"",
            "Valid keys: build, context",
        ],
    );
    rejects(
        "jobs:\n  build:\n    image: [alpine]\n    steps: [make]\n",
        3,
        12,
        &[
            "expected a string for `image` of job \"build\"",
            "found a list",
        ],
    );
    rejects(
        "jobs:\n  build:\n    image: 3.19\n    steps: [make]\n",
        3,
        12,
        &["found a number (3.19)", "quote it (\"3.19\")"],
    );
    rejects(
        "jobs:\n  build:\n    image: \"\"\n    steps: [make]\n",
        3,
        12,
        &[
            "`image` of job \"build\" is empty",
            "remove `image` to run on the host",
        ],
    );
}

// ---- needs ---------------------------------------------------------------------------------

const TWO_JOBS: &str = "jobs:\n  build:\n    steps: [make]\n  test:\n    steps: [t]\n";

#[test]
fn needs_unknown_target() {
    let text = format!("{TWO_JOBS}    needs: [biuld]\n");
    rejects(
        &text,
        6,
        13,
        &[
            "job \"test\" needs \"biuld\", which is not a job",
            "did you mean \"build\"?",
            "Other jobs: build",
        ],
    );
    let text = format!("{TWO_JOBS}    needs: deploy\n");
    rejects(
        &text,
        6,
        12,
        &["needs \"deploy\"", "use one of the other jobs: build"],
    );
}

#[test]
fn needs_unknown_target_in_single_job_pipeline() {
    rejects(
        "jobs:\n  a:\n    needs: nope\n    steps:\n      - run: echo\n",
        3,
        12,
        &[
            "job \"a\" needs \"nope\"",
            "it is the only job, so remove `needs`",
        ],
    );
}

#[test]
fn needs_instance_id() {
    let text = "jobs:\n  build:\n    matrix: {os: [a]}\n    steps: [make]\n  test:\n    needs: \"build[os=a]\"\n    steps: [t]\n";
    rejects(
        text,
        6,
        12,
        &["matrix instance \"build[os=a]\"", "write \"build\""],
    );
}

#[test]
fn needs_itself() {
    let text = format!("{TWO_JOBS}    needs:\n      - build\n      - test\n");
    rejects(
        &text,
        8,
        9,
        &["job \"test\" needs itself", "remove \"test\""],
    );
}

#[test]
fn needs_duplicate_entry() {
    let text = format!("{TWO_JOBS}    needs: [build, build]\n");
    rejects(
        &text,
        6,
        20,
        &["lists \"build\" twice", "remove the duplicate"],
    );
}

#[test]
fn needs_cycle_reports_closing_entry_and_path() {
    let text = "\
jobs:
  a:
    needs: b
    steps: [x]
  b:
    needs: [c]
    steps: [x]
  c:
    needs:
      - a
    steps: [x]
";
    rejects(
        text,
        10,
        9,
        &[
            "`needs` cycle: a -> b -> c -> a",
            "remove one of these `needs` entries",
        ],
    );
}

#[test]
fn needs_two_job_cycle() {
    let text = "jobs:\n  a:\n    steps: [x]\n    needs: b\n  b:\n    steps: [x]\n    needs: a\n";
    rejects(text, 7, 12, &["`needs` cycle: a -> b -> a"]);
}

#[test]
fn needs_wrong_type() {
    let text = format!("{TWO_JOBS}    needs: {{build: true}}\n");
    rejects(
        &text,
        6,
        13,
        &[
            "expected a job name or a list of job names",
            "found a mapping",
        ],
    );
    let text = format!("{TWO_JOBS}    needs: [1]\n");
    rejects(&text, 6, 13, &["found a number (1)", "quote it"]);
}

// ---- matrix --------------------------------------------------------------------------------

#[test]
fn matrix_empty_axis() {
    rejects(
        "jobs:\n  t:\n    matrix:\n      os: []\n    steps: [x]\n",
        4,
        11,
        &[
            "matrix axis \"os\" of job \"t\" is empty",
            "add at least one value",
        ],
    );
}

#[test]
fn matrix_without_axes() {
    rejects(
        "jobs:\n  t:\n    matrix: {}\n    steps: [x]\n",
        3,
        13,
        &["`matrix` of job \"t\" has no axes", "remove `matrix`"],
    );
}

#[test]
fn matrix_value_not_a_scalar() {
    rejects(
        "jobs:\n  t:\n    matrix:\n      os:\n        - linux\n        - {name: bsd}\n    steps: [x]\n",
        6,
        12,
        &["a value of matrix axis \"os\" of job \"t\"", "found a mapping"],
    );
    rejects(
        "jobs:\n  t:\n    matrix:\n      os: [linux, [a]]\n    steps: [x]\n",
        4,
        19,
        &["found a list"],
    );
    rejects(
        "jobs:\n  t:\n    matrix:\n      os: [linux, ~]\n    steps: [x]\n",
        4,
        19,
        &["has no value"],
    );
}

#[test]
fn matrix_axis_not_a_list() {
    rejects(
        "jobs:\n  t:\n    matrix:\n      os: linux\n    steps: [x]\n",
        4,
        11,
        &[
            "matrix axis \"os\" of job \"t\" must be a list of values",
            "write `os: [linux]`",
        ],
    );
}

#[test]
fn matrix_duplicate_value() {
    rejects(
        "jobs:\n  t:\n    matrix:\n      os: [linux, bsd, linux]\n    steps: [x]\n",
        4,
        24,
        &["duplicate value \"linux\"", "remove it"],
    );
}

#[test]
fn matrix_too_large() {
    let values: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    let list = values.join(", ");
    let text =
        format!("jobs:\n  t:\n    matrix:\n      a: [{list}]\n      b: [{list}]\n    steps: [x]\n");
    rejects(&text, 5, 7, &["more than 256 instances"]);
}

// ---- expressions ---------------------------------------------------------------------------

#[test]
fn expression_unknown_axis() {
    rejects(
        "jobs:\n  t:\n    matrix: {os: [linux]}\n    steps:\n      - run: echo ${{ matrix.arch }}\n",
        5,
        14,
        &[
            "\"${{ matrix.arch }}\" in line 1 of step 1 of job \"t\"",
            "matrix axis \"arch\", which job \"t\" does not have",
            "Its axes: os",
        ],
    );
}

#[test]
fn expression_in_job_without_matrix() {
    rejects(
        "jobs:\n  t:\n    image: \"ci-${{ matrix.os }}\"\n    steps: [x]\n",
        3,
        12,
        &[
            "`image` of job \"t\"",
            "job \"t\" has no `matrix`",
            "add `matrix: {os: [...]}`",
        ],
    );
}

#[test]
fn expression_in_pipeline_env_checked_per_job() {
    let text = "\
env:
  TARGET: ${{ matrix.os }}
jobs:
  a:
    matrix: {os: [linux]}
    steps: [x]
  b:
    steps: [x]
";
    rejects(
        text,
        2,
        11,
        &[
            "pipeline env \"TARGET\" (as used by job \"b\")",
            "job \"b\" has no `matrix`",
        ],
    );
    // A job that overrides the variable does not use the pipeline value.
    let ok = text.replace("  b:\n", "  b:\n    env: {TARGET: none}\n");
    load("p", &ok).unwrap();
}

#[test]
fn unsupported_expression() {
    rejects(
        "jobs:\n  t:\n    steps:\n      - name: build ${{ github.sha }}\n        run: make\n",
        4,
        15,
        &[
            "unsupported expression \"${{ github.sha }}\"",
            "only `${{ matrix.<axis> }}` is supported",
            "`$NAME`",
        ],
    );
    rejects(
        "jobs:\n  t:\n    runs-on: [\"${{ matrix.os\"]\n    steps: [x]\n",
        3,
        15,
        &["unterminated expression", "close it with `}}`"],
    );
}

// ---- env -----------------------------------------------------------------------------------

#[test]
fn env_invalid_name() {
    rejects(
        "env:\n  1ST: a\njobs:\n  t:\n    steps: [x]\n",
        2,
        3,
        &[
            "invalid environment variable name \"1ST\"",
            "start with a letter or `_`",
        ],
    );
    rejects(
        "jobs:\n  t:\n    env:\n      MY-VAR: a\n    steps: [x]\n",
        4,
        7,
        &["\"MY-VAR\" in `env` of job \"t\""],
    );
}

#[test]
fn env_value_not_a_scalar() {
    rejects(
        "jobs:\n  t:\n    env:\n      A: [1, 2]\n    steps: [x]\n",
        4,
        10,
        &["env \"A\" of job \"t\"", "found a list"],
    );
    rejects(
        "jobs:\n  t:\n    env:\n      A:\n      B: b\n    steps: [x]\n",
        4,
        7,
        &["env \"A\" of job \"t\" has no value", "write \"\""],
    );
}

#[test]
fn env_not_a_mapping() {
    rejects(
        "env: [A=b]\njobs:\n  t:\n    steps: [x]\n",
        1,
        6,
        &[
            "expected a mapping for `env` of the pipeline",
            "found a list",
        ],
    );
}

// ---- timeout, retry, runs-on ---------------------------------------------------------------

#[test]
fn timeout_unparseable() {
    rejects(
        "jobs:\n  t:\n    timeout: 10 minutes\n    steps: [x]\n",
        3,
        14,
        &[
            "`timeout` of job \"t\" is not a duration: \"10 minutes\"",
            "\"1h30m\"",
        ],
    );
    rejects(
        "jobs:\n  t:\n    timeout: 1.5\n    steps: [x]\n",
        3,
        14,
        &["is not a duration: \"1.5\""],
    );
    rejects(
        "jobs:\n  t:\n    timeout: [10]\n    steps: [x]\n",
        3,
        14,
        &["found a list", "write a single value"],
    );
    rejects(
        "jobs:\n  t:\n    timeout: true\n    steps: [x]\n",
        3,
        14,
        &["found a boolean (true)", "write seconds or a duration"],
    );
}

#[test]
fn timeout_zero() {
    rejects(
        "jobs:\n  t:\n    timeout: 0\n    steps: [x]\n",
        3,
        14,
        &[
            "`timeout` of job \"t\" is 0",
            "remove `timeout` for no timeout",
        ],
    );
    rejects(
        "jobs:\n  t:\n    timeout: 0m0s\n    steps: [x]\n",
        3,
        14,
        &["is 0"],
    );
}

#[test]
fn retry_out_of_range() {
    rejects(
        "jobs:\n  t:\n    retry: 11\n    steps: [x]\n",
        3,
        12,
        &[
            "`retry` of job \"t\" must be a whole number from 0 to 10",
            "found 11",
        ],
    );
    rejects(
        "jobs:\n  t:\n    retry: -1\n    steps: [x]\n",
        3,
        12,
        &["found -1"],
    );
    rejects(
        "jobs:\n  t:\n    retry: 1.5\n    steps: [x]\n",
        3,
        12,
        &["found 1.5"],
    );
    rejects(
        "jobs:\n  t:\n    retry: twice\n    steps: [x]\n",
        3,
        12,
        &["found \"twice\""],
    );
}

#[test]
fn runs_on_empty_label() {
    rejects(
        "jobs:\n  t:\n    runs-on: [linux, \"\"]\n    steps: [x]\n",
        3,
        22,
        &["a label in `runs-on` of job \"t\" is empty", "remove it"],
    );
    rejects(
        "jobs:\n  t:\n    runs-on: []\n    steps: [x]\n",
        3,
        14,
        &[
            "`runs-on` of job \"t\" is an empty list",
            "remove `runs-on`",
        ],
    );
    rejects(
        "jobs:\n  t:\n    runs-on:\n    steps: [x]\n",
        3,
        5,
        &["found an empty value"],
    );
}

// ---- artifacts -------------------------------------------------------------------------------

#[test]
fn artifact_patterns_that_escape_or_do_not_parse() {
    let text = "jobs:\n  b:\n    steps: [make]\n    artifacts: [dist/*.tar, ../secret]\n";
    rejects(
        text,
        4,
        29,
        &["\"../secret\"", "`..`", "inside the workspace"],
    );
    let text = "jobs:\n  b:\n    steps: [make]\n    artifacts:\n      - /etc/passwd\n";
    rejects(text, 5, 9, &["absolute", "relative to the workspace"]);
    let text = "jobs:\n  b:\n    steps: [make]\n    artifacts: 'dist/[a-'\n";
    rejects(text, 4, 16, &["not a valid pattern"]);
    let text = "jobs:\n  b:\n    steps: [make]\n    artifacts: []\n";
    rejects(text, 4, 16, &["empty list", "remove `artifacts`"]);
    let text = "jobs:\n  b:\n    steps: [make]\n    artifacts:\n      when: always\n";
    rejects(text, 5, 7, &["unknown key `when`", "`paths`"]);
    let text = "jobs:\n  b:\n    steps: [make]\n    artifact: [x]\n";
    rejects(text, 4, 5, &["artifacts"]);
}

// ---- container network and submodules -------------------------------------------------------

#[test]
fn network_and_submodules_take_booleans() {
    rejects(
        "jobs:\n  b:\n    image: localhost/x\n    network: yes\n    steps: [make]\n",
        4,
        14,
        &["`network` of job \"b\"", "true or false"],
    );
    rejects(
        "jobs:\n  b:\n    submodules: [a]\n    steps: [make]\n",
        3,
        17,
        &["`submodules` of job \"b\"", "true or false"],
    );
}

#[test]
fn network_without_an_image_is_rejected() {
    rejects(
        "jobs:\n  b:\n    network: true\n    steps: [make]\n",
        3,
        5,
        &["only applies to container jobs", "add an `image`"],
    );
}

// ---- secrets -----------------------------------------------------------------------------------

#[test]
fn secrets_are_environment_variable_names() {
    let text = "jobs:\n  b:\n    steps: [make]\n    secrets: []\n";
    rejects(text, 4, 14, &["empty list", "remove `secrets`"]);
    let text = "jobs:\n  b:\n    steps: [make]\n    secrets: [GOOD, 1BAD]\n";
    rejects(
        text,
        4,
        21,
        &["invalid secret name \"1BAD\"", "environment variable"],
    );
    let text = "jobs:\n  b:\n    steps: [make]\n    secrets: [A_B, A_B]\n";
    rejects(text, 4, 20, &["listed twice"]);
    let text = "jobs:\n  b:\n    steps: [make]\n    secrets: {A: b}\n";
    rejects(text, 4, 15, &["a secret name or a list of secret names"]);
    let text = "jobs:\n  b:\n    steps: [make]\n    secret: [A]\n";
    rejects(text, 4, 5, &["did you mean \"secrets\""]);
}
