#!/usr/bin/env bash
# Installs, idempotently, what building and testing Tributary needs on Debian 12.
# Safe to run again: it only installs what is missing.
set -euo pipefail

need_apt=()
for cmd in git:git cc:build-essential pkg-config:pkg-config cmake:cmake; do
    bin=${cmd%%:*}; pkg=${cmd##*:}
    command -v "$bin" >/dev/null 2>&1 || need_apt+=("$pkg")
done
# librdkafka 2.12 (built by rdkafka-sys with cmake) includes <curl/curl.h> even without curl.
[ -f /usr/include/x86_64-linux-gnu/curl/curl.h ] || [ -f /usr/include/curl/curl.h ] \
    || need_apt+=(libcurl4-openssl-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "setup: Rust is missing. Install Rust 1.85 or newer (https://rustup.rs), then re-run." >&2
        exit 1
    fi
fi
# MinIO (built once from the Go module proxy) on 127.0.0.1:9090 for the object storage tests.
"$(dirname "$0")/setup-s3.sh"
"$(dirname "$0")/setup-brokers.sh"   # Kafka and PostgreSQL on loopback for the integration tests
# Podman serving the Docker API on unix:///run/podman/podman.sock, image localhost/ci-busybox
# (container executor tests).
$( [ "$(id -u)" -eq 0 ] || echo sudo ) "$(dirname "$0")/setup-containers.sh"
# etcd + kube-apiserver (built once from the Go module proxy) on https://127.0.0.1:16443 for the
# autoscaler's kubernetes provider tests.
$( [ "$(id -u)" -eq 0 ] || echo sudo ) "$(dirname "$0")/setup-kube.sh"
# Headless chromium and chromedriver for the web UI's browser tests.
"$(dirname "$0")/setup-browser.sh"
echo "setup: ready ($(cargo --version))"
