//! `load` never panics, whatever the input: arbitrary text, and small mutations of a valid
//! pipeline (which reach deep into the validation code).

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

#[test]
fn the_valid_pipeline_is_valid() {
    assert_eq!(load("p", VALID).unwrap().jobs.len(), 5);
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in "[ -~\n\t]{0,200}") {
        let _ = load("p", &text);
    }

    #[test]
    fn yaml_like_text_never_panics(
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
        let _ = load("p", &parts.concat());
    }

    #[test]
    fn mutated_pipelines_never_panic(
        at in 0usize..2000,
        len in 0usize..4,
        insert in prop_oneof![
            Just(""), Just(" "), Just("  "), Just("\n"), Just("-"), Just("- "), Just(":"),
            Just("["), Just("]"), Just("{"), Just("}"), Just("\""), Just("'"), Just("#"),
            Just("~"), Just("&x "), Just("*x"), Just("!!str "), Just("---\n"), Just("0"),
            Just("${{"), Just("}}"), Just("\t"), Just("é"), Just("|\n"),
        ],
    ) {
        let text = mutate(VALID, at, len, insert);
        if let Err(e) = load("p", &text) {
            prop_assert!(e.line >= 1 && e.column >= 1);
            prop_assert!(e.line as usize <= text.lines().count() + 1, "{} in\n{}", e, text);
        }
    }
}
