#!/usr/bin/env bash
# Installs what the tests need, then runs formatting, lints and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Every engine setup.sh started must answer: a test that would skip without its engine on a
# contributor's `cargo test` fails here instead (services/testkit/src/engines.rs).
export TRIBUTARY_REQUIRE_ENGINES=1
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
