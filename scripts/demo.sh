#!/usr/bin/env bash
# Installs what is needed, builds Tributary and runs the example pipeline on the embedded
# default (SQLite log in examples/demo/.tributary/), then shows the events and builds.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --locked --bin tributary
bin=$PWD/target/release/tributary
cd examples/demo
"$bin" run --data .tributary && status=0 || status=$?
echo
echo "== the builds read model (tributary builds) =="
"$bin" builds --data .tributary --limit 5
echo
echo "== replay check (tributary replay --check) =="
"$bin" replay --data .tributary --check
echo
exit $status
