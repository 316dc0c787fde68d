//! What the pipeline tests share: loading a pipeline that must be rejected, and checking where
//! and why. Each test file compiles this module on its own (`mod common;`), so a helper one
//! file does not use is dead code there.
#![allow(dead_code)]

use tributary_pipeline::{load, PipelineError};

/// The file name every rejected pipeline is loaded as.
pub const FILE: &str = ".tributary.yml";

/// Loads `text` as [`FILE`], expecting an error; fails the test with the plan if it loads.
#[track_caller]
pub fn rejection(text: &str) -> PipelineError {
    match load(FILE, text) {
        Ok(plan) => panic!("expected an error, got a plan: {plan:?}"),
        Err(e) => e,
    }
}

/// Loads `text` expecting an error at `line:column` of [`FILE`] whose message contains every
/// `needle`.
#[track_caller]
pub fn rejects(text: &str, line: u32, column: u32, needles: &[&str]) -> PipelineError {
    let err = rejection(text);
    for needle in needles {
        assert!(
            err.message.contains(needle),
            "message {:?} lacks {needle:?}",
            err.message
        );
    }
    assert_eq!(
        (err.line, err.column),
        (line, column),
        "wrong location for: {}",
        err.message
    );
    assert_eq!(err.file, FILE);
    err
}
