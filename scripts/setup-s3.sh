#!/usr/bin/env bash
# Builds (once, cached) and starts, idempotently, a real S3 server on loopback for the object
# storage tests: MinIO (the same server deploy/compose.yml ships), listening on
# http://127.0.0.1:${TRIBUTARY_TEST_S3_PORT:-9090} with fixed test credentials, and creates the
# test bucket. Quick when already running.
#
# MinIO is built from the Go module proxy: `go install github.com/minio/minio@$MINIO_VERSION`
# (the proxy serves it as a pseudo-version; "latest" resolves to one). The binary goes to
# $TRIBUTARY_MINIO_HOME/bin/minio (default /opt/tributary-minio); the build is skipped when it
# exists (several minutes of CPU on 2 cores the first time, nothing after).
#
# The tests read the same fixed values (services/testkit/src/s3.rs):
#   endpoint   http://127.0.0.1:9090      (TRIBUTARY_TEST_S3_PORT)
#   access key tributary-test             secret key tributary-test-secret
#   region     us-east-1                  bucket     tributary-test
# Each test works under its own key prefix (or its own bucket, for the tests that remove one).
#
#   scripts/setup-s3.sh          build if needed, start if not running, create the bucket
#   scripts/setup-s3.sh --build  only build
#   scripts/setup-s3.sh --stop   stop it
set -euo pipefail

MINIO_VERSION=${TRIBUTARY_MINIO_VERSION:-latest}
port=${TRIBUTARY_TEST_S3_PORT:-9090}
console_port=$((port + 1))
home=${TRIBUTARY_MINIO_HOME:-/opt/tributary-minio}
bin=$home/bin
run=$home/run
pidfile=$run/minio.pid
access_key=tributary-test
secret_key=tributary-test-secret
bucket=tributary-test

log() { echo "setup-s3: $*"; }
die() { echo "setup-s3: $*" >&2; exit 1; }

listening() { (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; }
ready() { curl -fs --max-time 5 "http://127.0.0.1:$port/minio/health/ready" >/dev/null 2>&1; }

stop() {
    if [ -f "$pidfile" ]; then
        local pid
        pid=$(cat "$pidfile")
        # Only our own binary: a stale pid file may name someone else's process by now.
        if { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -q "^$bin/minio "; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    fi
}

build() {
    [ -x "$bin/minio" ] && return 0
    command -v go >/dev/null 2>&1 || die "Go is missing: install Go 1.24 or newer (apt-get install golang is too old on Debian 12), then re-run"
    local start=$SECONDS
    mkdir -p "$bin"
    log "building MinIO ($MINIO_VERSION) from the Go module proxy into $bin (once; several minutes on 2 cores)"
    # GOBIN gets the binary; a temporary GOBIN and a rename keep a half-built one out of $bin.
    local tmp
    tmp=$(mktemp -d "$home/gobin.XXXXXX")
    # The module and build caches live in $tmp too and go with it: several GB the CI machine's
    # disk needs for the test binaries (-modcacherw lets rm remove them).
    CGO_ENABLED=0 GOTOOLCHAIN=local GOBIN=$tmp GOMODCACHE=$tmp/mod GOCACHE=$tmp/cache \
        GOFLAGS=-modcacherw \
        go install -trimpath -ldflags='-s -w' "github.com/minio/minio@$MINIO_VERSION"
    mv "$tmp/minio" "$bin/minio"
    rm -rf "$tmp"
    log "built MinIO in $((SECONDS - start)) s"
}

# Creates the test bucket with a signed PUT (curl's --aws-sigv4); 409 means it exists already.
create_bucket() {
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -X PUT \
        --user "$access_key:$secret_key" --aws-sigv4 "aws:amz:us-east-1:s3" \
        "http://127.0.0.1:$port/$bucket")
    case "$code" in
    200 | 409) ;;
    *) die "creating bucket $bucket answered HTTP $code; see $run/minio.log" ;;
    esac
}

case "${1:-}" in
--stop) stop; exit 0 ;;
--build) build; exit 0 ;;
"") ;;
*) die "unknown argument $1 (use --build or --stop)" ;;
esac

if ! command -v curl >/dev/null 2>&1; then
    log "installing curl"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
fi

if ready; then
    create_bucket
    log "MinIO already ready on http://127.0.0.1:$port (bucket $bucket)"
    exit 0
fi
if listening; then
    die "127.0.0.1:$port is taken by something that is not MinIO (an S3 server from an older setup-s3.sh? stop it, or set TRIBUTARY_TEST_S3_PORT)"
fi

build
mkdir -p "$run"
stop
# The data is scratch (each test uses its own prefix or bucket), so each start is fresh.
rm -rf "$run/data"
mkdir -p "$run/data"
MINIO_ROOT_USER=$access_key MINIO_ROOT_PASSWORD=$secret_key MINIO_BROWSER=off \
    MINIO_UPDATE=off MINIO_CI_CD=1 \
    nohup "$bin/minio" server "$run/data" --quiet \
    --address "127.0.0.1:$port" --console-address "127.0.0.1:$console_port" \
    >"$run/minio.log" 2>&1 &
echo $! >"$pidfile"

for _ in $(seq 1 300); do
    if ready; then
        create_bucket
        log "MinIO ready on http://127.0.0.1:$port (bucket $bucket)"
        exit 0
    fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        tail -20 "$run/minio.log" >&2
        die "MinIO exited; see $run/minio.log"
    fi
    sleep 0.2
done
tail -20 "$run/minio.log" >&2
die "MinIO did not become ready in 60 s; see $run/minio.log"
