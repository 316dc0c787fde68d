#!/usr/bin/env bash
# Installs only what building needs (scripts/setup-base.sh: compiler, cmake, git, pkg-config,
# curl headers, a Rust check — none of the test engines), builds Tributary and runs the example
# pipeline on the embedded default (an SQLite log in the default data directory, outside the
# repository), then shows the builds and checks the read models against a replay of the log.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
# shellcheck source=setup-base.sh
. ./scripts/setup-base.sh
setup_secs=$((SECONDS - started))
cargo build --release --locked --bin tributary
build_secs=$((SECONDS - started - setup_secs))
bin=$PWD/target/release/tributary
cd examples/demo
"$bin" run && status=0 || status=$?
echo
echo "== the builds read model (tributary builds) =="
"$bin" builds --limit 5
echo
echo "== replay check (tributary replay --check) =="
"$bin" replay --check
echo
total=$((SECONDS - started))
# The demo's own cost beside the build (target: at most one minute, docs/PERFORMANCE.md).
echo "demo.sh: ${total} s in all: set-up ${setup_secs} s, release build ${build_secs} s, the rest $((total - setup_secs - build_secs)) s (set-up and the rest: $((total - build_secs)) s)"
exit $status
