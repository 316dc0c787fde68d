#!/usr/bin/env bash
# Installs, idempotently, what building and testing Tributary needs on Debian 12: the build
# tools (scripts/setup-base.sh, all that scripts/demo.sh needs), then the engines the
# integration tests use. Safe to run again: it only installs what is missing.
set -euo pipefail
here=$(dirname "$0")
# shellcheck source=setup-base.sh
. "$here/setup-base.sh"   # sourced: a cargo it finds in ~/.cargo/bin stays on PATH
# MinIO (built once from the Go module proxy) on 127.0.0.1:9090 for the object storage tests.
"$here/setup-s3.sh"
"$here/setup-brokers.sh"   # Kafka and PostgreSQL on loopback for the integration tests
# Podman serving the Docker API on unix:///run/podman/podman.sock, image localhost/ci-busybox
# (container executor tests).
$( [ "$(id -u)" -eq 0 ] || echo sudo ) "$here/setup-containers.sh"
# etcd + kube-apiserver (built once from the Go module proxy) on https://127.0.0.1:16443 for the
# autoscaler's kubernetes provider tests.
$( [ "$(id -u)" -eq 0 ] || echo sudo ) "$here/setup-kube.sh"
# Headless chromium and chromedriver for the web UI's browser tests.
"$here/setup-browser.sh"
echo "setup: ready ($(cargo --version))"
