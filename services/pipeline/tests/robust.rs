//! `load` never panics, whatever the input (arbitrary text, YAML-like fragments, and small
//! mutations of a valid pipeline, which reach deep into the validation code), and its result
//! is always usable: a plan whose jobs have unique ids and whose `needs` name jobs of the plan,
//! or an error that names the file and points inside the text.

use proptest::prelude::*;
use tributary_pipeline::load;

const VALID: &str = r#"env:
  RUST_LOG: info
jobs:
  build:
    steps:
      - name: compile
        script:
          - cd src
          - make
      - run: |
          tar czf out.tgz build/
      - echo shorthand
  test:
    needs: [build]
    matrix:
      os: [linux, bsd]
      rust: ["1.80", 1.81]
    env: { TARGET: "${{ matrix.os }}" }
    timeout: 1h30m
    runs-on: [linux, "${{ matrix.rust }}"]
    image: localhost/ci-busybox
    retry: 2
    steps:
      - script: ["cargo test --target ${{ matrix.os }}"]
"#;

/// Replaces `len` chars at `at` (modulo the text length) by `insert`.
fn mutate(text: &str, at: usize, len: usize, insert: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let at = at % (chars.len() + 1);
    let end = (at + len).min(chars.len());
    chars[..at]
        .iter()
        .copied()
        .chain(insert.chars())
        .chain(chars[end..].iter().copied())
        .collect()
}

/// What `load` returned is usable: a consistent plan, or an error inside the text.
fn check(text: &str) -> Result<(), TestCaseError> {
    match load("p", text) {
        Ok(plan) => {
            prop_assert!(!plan.jobs.is_empty(), "a plan without jobs from\n{}", text);
            let ids: std::collections::BTreeSet<&str> =
                plan.jobs.iter().map(|j| j.id.as_str()).collect();
            prop_assert_eq!(
                ids.len(),
                plan.jobs.len(),
                "duplicate job ids from\n{}",
                text
            );
            for job in &plan.jobs {
                for need in &job.needs {
                    prop_assert!(
                        ids.contains(need.as_str()) && need != &job.id,
                        "job {} needs {} in a plan of {:?}, from\n{}",
                        job.id,
                        need,
                        ids,
                        text
                    );
                }
            }
        }
        Err(e) => {
            prop_assert_eq!(&e.file, "p");
            prop_assert!(!e.message.trim().is_empty(), "an error without a message");
            let lines: Vec<&str> = text.split('\n').collect();
            // The end of the text (an unclosed flow, a missing value) is the line after the
            // last one, column 1, as the YAML parser reports it.
            let at_end = e.line as usize == lines.len() + 1 && e.column == 1;
            prop_assert!(
                at_end || (e.line >= 1 && e.line as usize <= lines.len()),
                "{} points at line {} of a text of {} lines:\n{}",
                e,
                e.line,
                lines.len(),
                text
            );
            if !at_end {
                let width = lines[e.line as usize - 1].chars().count();
                prop_assert!(
                    e.column >= 1 && e.column as usize <= width + 1,
                    "{} points at column {} of a line of {} characters:\n{}",
                    e,
                    e.column,
                    width,
                    text
                );
            }
        }
    }
    Ok(())
}

#[test]
fn the_valid_pipeline_is_valid() {
    assert_eq!(load("p", VALID).unwrap().jobs.len(), 5);
}

proptest! {
    #[test]
    fn arbitrary_text_gives_a_plan_or_an_error_inside_it(text in "[ -~\n\t]{0,200}") {
        check(&text)?;
    }

    #[test]
    fn yaml_like_text_gives_a_plan_or_an_error_inside_it(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("jobs:"), Just("\n"), Just("  "), Just("- "), Just("-"), Just(": "),
                Just("["), Just("]"), Just("{"), Just("}"), Just(","), Just("\""), Just("'"),
                Just("|"), Just(">"), Just("&a "), Just("*a"), Just("!t "), Just("? "),
                Just("---\n"), Just("...\n"), Just("#c"), Just("steps"), Just("b"), Just("~"),
                Just("${{ matrix.b }}"), Just("needs: b"), Just("1.80"), Just("%YAML 1.2\n"),
            ],
            0..40,
        )
    ) {
        check(&parts.concat())?;
    }

    #[test]
    fn mutated_pipelines_give_a_plan_or_an_error_inside_them(
        at in 0usize..2000,
        len in 0usize..4,
        insert in prop_oneof![
            Just(""), Just(" "), Just("  "), Just("\n"), Just("-"), Just("- "), Just(":"),
            Just("["), Just("]"), Just("{"), Just("}"), Just("\""), Just("'"), Just("#"),
            Just("~"), Just("&x "), Just("*x"), Just("!!str "), Just("---\n"), Just("0"),
            Just("${{"), Just("}}"), Just("\t"), Just("é"), Just("|\n"),
        ],
    ) {
        check(&mutate(VALID, at, len, insert))?;
    }
}
