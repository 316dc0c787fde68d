#!/usr/bin/env bash
# Installs and starts, idempotently, an S3-compatible server on loopback for the object storage
# tests: moto's server mode (PyPI) in a virtualenv under ~/.cache/tributary/moto, listening on
# 127.0.0.1:${TRIBUTARY_TEST_S3_PORT:-9090}. Quick when already running.
#   scripts/setup-s3.sh          install if needed, start if not running
#   scripts/setup-s3.sh --stop   stop it
set -euo pipefail

port=${TRIBUTARY_TEST_S3_PORT:-9090}
home=${TRIBUTARY_CACHE:-$HOME/.cache/tributary}/moto
pidfile=$home/server.pid

running() { (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; }

if [ "${1:-}" = "--stop" ]; then
    if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; fi
    exit 0
fi

if running; then
    echo "setup-s3: S3-compatible server already listening on 127.0.0.1:$port"
    exit 0
fi

if [ ! -x "$home/venv/bin/moto_server" ]; then
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv
    fi
    echo "setup-s3: installing moto (S3-compatible test server) into $home/venv"
    mkdir -p "$home"
    rm -rf "$home/venv"
    python3 -m venv "$home/venv"
    "$home/venv/bin/pip" install -q 'moto[server]>=5,<6'
fi

mkdir -p "$home"
nohup "$home/venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$home/server.log" 2>&1 &
echo $! >"$pidfile"
for _ in $(seq 1 100); do
    if running; then
        echo "setup-s3: S3-compatible server (moto) started on 127.0.0.1:$port"
        exit 0
    fi
    sleep 0.2
done
echo "setup-s3: the server did not start; see $home/server.log" >&2
exit 1
