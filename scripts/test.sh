#!/usr/bin/env bash
# Installs what the tests need, then runs formatting, lints and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Every engine setup.sh started must answer: a test that would skip without its engine on a
# contributor's `cargo test` fails here instead (services/testkit/src/engines.rs).
export TRIBUTARY_REQUIRE_ENGINES=1
# A clean machine builds once: no incremental state and no debug info keep the target directory
# (and the test binaries) a few GB smaller and the links faster; a failing test still prints its
# panic's file:line. Contributors iterating use plain `cargo test`, which keeps both.
export CARGO_INCREMENTAL=0 CARGO_PROFILE_DEV_DEBUG=false
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
