#!/usr/bin/env bash
# Installs, idempotently, what building Tributary needs on Debian 12 and nothing else: a C
# compiler, cmake, git, pkg-config and the curl headers (librdkafka is built from source by
# rdkafka-sys), then checks that Rust is there. `scripts/demo.sh` runs only this;
# `scripts/setup.sh` (tests) runs it, then starts the engines the integration tests use.
set -euo pipefail

need_apt=()
for cmd in git:git cc:build-essential c++:build-essential pkg-config:pkg-config cmake:cmake; do
    bin=${cmd%%:*}; pkg=${cmd##*:}
    command -v "$bin" >/dev/null 2>&1 || need_apt+=("$pkg")
done
# librdkafka 2.12 (built by rdkafka-sys with cmake) includes <curl/curl.h> even without curl.
[ -f /usr/include/x86_64-linux-gnu/curl/curl.h ] || [ -f /usr/include/curl/curl.h ] \
    || need_apt+=(libcurl4-openssl-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
    # One package once, even when two commands come from it.
    mapfile -t need_apt < <(printf '%s\n' "${need_apt[@]}" | sort -u)
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
echo "setup: build tools ready ($(cargo --version))"
