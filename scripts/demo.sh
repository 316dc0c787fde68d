#!/usr/bin/env bash
# Installs only what building needs (scripts/setup-base.sh: compiler, cmake, git, pkg-config,
# curl headers, a Rust check — none of the test engines), builds Tributary and runs the example
# pipeline on the embedded default (an SQLite log in the default data directory, outside the
# repository), then shows the builds and checks the read models against a replay of the log.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=setup-base.sh
. ./scripts/setup-base.sh
cargo build --release --locked --bin tributary
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
exit $status
