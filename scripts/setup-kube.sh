#!/usr/bin/env bash
# Builds (once, cached) and starts, idempotently, a real Kubernetes API server on loopback for the
# autoscaler's `kubernetes` provider tests: etcd + kube-apiserver, no kubelet and no controllers
# (Pods stay Pending, which is all the tests need: create, label, delete, adopt).
#
# Both binaries are built from the Go module proxy (no other registry is needed):
#   - kube-apiserver from k8s.io/kubernetes v$K8S_VERSION. That module replaces its staging
#     modules (k8s.io/api, k8s.io/apiserver, ...) with ./staging/... paths, which a dependent
#     module cannot use, so a small go.mod here requires it and replaces every staging module
#     with its published v0.x.y twin;
#   - etcd from go.etcd.io/etcd/server/v3 (the version k8s.io/kubernetes itself requires), through
#     a four-line main calling etcdmain.Main, exactly what etcd's own main does.
# The binaries go to $TRIBUTARY_KUBE_HOME/bin (default /opt/tributary-kube/bin); the build is
# skipped when they exist.
#
# Then it starts etcd (127.0.0.1:${TRIBUTARY_TEST_ETCD_PORT:-23790}) and kube-apiserver
# (https://127.0.0.1:${TRIBUTARY_TEST_KUBE_PORT:-16443}) with a CA and serving cert made here
# by openssl, a static token (group system:masters), RBAC, and the ServiceAccount admission
# plugin disabled (it needs the controller manager), and writes $TRIBUTARY_KUBE_HOME/kubeconfig.
# It returns when /readyz answers ok.
#   scripts/setup-kube.sh           build if needed, start if not running
#   scripts/setup-kube.sh --build   only build
#   scripts/setup-kube.sh --stop    stop etcd and kube-apiserver
set -euo pipefail

K8S_VERSION=${TRIBUTARY_K8S_VERSION:-1.37.2}
home=${TRIBUTARY_KUBE_HOME:-/opt/tributary-kube}
kube_port=${TRIBUTARY_TEST_KUBE_PORT:-16443}
etcd_port=${TRIBUTARY_TEST_ETCD_PORT:-23790}
etcd_peer_port=$((etcd_port + 10))
bin=$home/bin
run=$home/run
kubeconfig=$home/kubeconfig
token=tributary-test-admin-token

log() { echo "setup-kube: $*"; }
die() { echo "setup-kube: $*" >&2; exit 1; }

stop() {
    for name in kube-apiserver etcd; do
        if [ -f "$run/$name.pid" ]; then
            local pid
            pid=$(cat "$run/$name.pid")
            # Only our own binary: a stale pid file may name someone else's process by now.
            if { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -q "^$bin/$name "; then
                kill "$pid" 2>/dev/null || true
                for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            fi
            rm -f "$run/$name.pid"
        fi
    done
}

build() {
    if [ -x "$bin/kube-apiserver" ] && [ -x "$bin/etcd" ]; then
        return 0
    fi
    command -v go >/dev/null 2>&1 || die "Go is missing: install Go 1.24 or newer (apt-get install golang is too old on Debian 12), then re-run"
    local src=$home/src
    local start=$SECONDS
    mkdir -p "$src/cmd/etcd" "$bin"
    log "building kube-apiserver v$K8S_VERSION and etcd into $bin (once; several minutes on 2 cores)"
    # This build's module and build caches live in a directory removed after it: several GB
    # the CI machine's disk needs for the test binaries (-modcacherw lets rm remove them).
    local gotmp
    gotmp=$(mktemp -d "$home/gotmp.XXXXXX")
    export CGO_ENABLED=0 GOFLAGS="-mod=mod -modcacherw" GOTOOLCHAIN=local \
        GOMODCACHE=$gotmp/mod GOCACHE=$gotmp/cache
    # The staging modules k8s.io/kubernetes replaces with local paths, from its own go.mod.
    local kgomod
    kgomod=$(cd "$src" && go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" \
        | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
    [ -f "$kgomod" ] || die "could not download k8s.io/kubernetes@v$K8S_VERSION from the Go module proxy"
    local staging
    staging=$(sed -n 's#^[[:space:]]*\(k8s.io/[A-Za-z0-9._-]*\) => ./staging/.*#\1#p' "$kgomod" | sort -u)
    [ -n "$staging" ] || die "no staging replace directives found in $kgomod"
    local minor=${K8S_VERSION#*.}
    {
        echo "module tributary.local/kube"
        echo
        echo "go 1.24"
        echo
        echo "require k8s.io/kubernetes v$K8S_VERSION"
        echo
        for m in $staging; do echo "replace $m => $m v0.$minor"; done
    } >"$src/go.mod"
    cat >"$src/cmd/etcd/main.go" <<'EOF'
// etcd's own main (go.etcd.io/etcd/v3/main.go) in four lines.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
    cat >"$src/tools.go" <<'EOF'
//go:build tools

package kube

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
EOF
    (
        cd "$src"
        go mod tidy
        go build -trimpath -ldflags='-s -w' -o "$bin/etcd.tmp" ./cmd/etcd
        go build -trimpath -ldflags='-s -w' -o "$bin/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
    )
    mv "$bin/etcd.tmp" "$bin/etcd"
    mv "$bin/kube-apiserver.tmp" "$bin/kube-apiserver"
    rm -rf "$gotmp"
    log "built kube-apiserver and etcd in $((SECONDS - start)) s"
}

ready() {
    curl -fsk --max-time 5 -H "Authorization: Bearer $token" \
        "https://127.0.0.1:$kube_port/readyz" >/dev/null 2>&1
}

certs() {
    local pki=$home/pki
    [ -f "$pki/apiserver.crt" ] && [ -f "$pki/sa.key" ] && return 0
    mkdir -p "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=tributary-test-ca" \
        -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
        -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' \
        >"$pki/apiserver.ext"
    openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
        -CAcreateserial -days 3650 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

write_kubeconfig() {
    local ca
    ca=$(base64 -w0 <"$home/pki/ca.crt")
    cat >"$kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tributary-test
  cluster:
    server: https://127.0.0.1:$kube_port
    certificate-authority-data: $ca
users:
- name: tributary-test-admin
  user:
    token: $token
contexts:
- name: tributary-test
  context:
    cluster: tributary-test
    user: tributary-test-admin
    namespace: default
current-context: tributary-test
EOF
    mv "$kubeconfig.tmp" "$kubeconfig"
}

case "${1:-}" in
--stop) stop; exit 0 ;;
--build) build; exit 0 ;;
"") ;;
*) die "unknown argument $1 (use --build or --stop)" ;;
esac

if ready; then
    log "kube-apiserver already ready on https://127.0.0.1:$kube_port (kubeconfig $kubeconfig)"
    exit 0
fi
if ! command -v curl >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
    log "installing curl and openssl"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl openssl >/dev/null
fi
build
certs
write_kubeconfig
mkdir -p "$run"
stop

# etcd: its data is scratch (the tests create their own namespaces), so each start is fresh.
rm -rf "$run/etcd-data"
nohup "$bin/etcd" --name default --data-dir "$run/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "default=http://127.0.0.1:$etcd_peer_port" \
    --unsafe-no-fsync --log-level warn >"$run/etcd.log" 2>&1 &
echo $! >"$run/etcd.pid"

echo "$token,tributary-test-admin,tributary-test-admin,system:masters" >"$run/tokens.csv"
nohup "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$kube_port" \
    --endpoint-reconciler-type none \
    --tls-cert-file "$home/pki/apiserver.crt" --tls-private-key-file "$home/pki/apiserver.key" \
    --cert-dir "$run/certs" \
    --token-auth-file "$run/tokens.csv" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$home/pki/sa.pub" \
    --service-account-signing-key-file "$home/pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/24 \
    --disable-admission-plugins ServiceAccount \
    --enable-priority-and-fairness=false \
    >"$run/kube-apiserver.log" 2>&1 &
echo $! >"$run/kube-apiserver.pid"

for _ in $(seq 1 300); do
    if ready; then
        log "kube-apiserver ready on https://127.0.0.1:$kube_port (kubeconfig $kubeconfig)"
        exit 0
    fi
    if ! kill -0 "$(cat "$run/kube-apiserver.pid")" 2>/dev/null; then
        tail -20 "$run/kube-apiserver.log" >&2
        die "kube-apiserver exited; see $run/kube-apiserver.log"
    fi
    sleep 0.5
done
tail -20 "$run/kube-apiserver.log" >&2
die "kube-apiserver did not become ready in 150 s; see $run/kube-apiserver.log and $run/etcd.log"
