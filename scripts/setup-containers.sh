#!/usr/bin/env bash
# setup-containers.sh — Podman serving the Docker Engine API, for Tributary's container executor
# and its tests, on Debian 12 (root). Idempotent: a few seconds when everything is already there.
#
# What it does (each step is skipped when already done):
#   1. apt-installs podman, runc, busybox-static, curl (+ debootstrap for the Debian image)
#   2. writes /etc/containers/containers.conf.d/50-ci-local.conf:
#        runtime = runc   (Debian's crun 1.8 refuses this kernel's hybrid cgroup v1/v2 layout)
#        default_ulimits  (podman's rootful defaults, nofile=1048576, fail without CAP_SYS_RESOURCE)
#   3. builds local images without any registry:
#        localhost/ci-busybox  (static busybox, ~2 MB)
#        localhost/ci-debian   (debootstrap --variant=minbase, ~120 MB; only with --debian:
#                               it takes minutes and no test needs it)
#   4. smoke-tests `podman run`, then starts the Docker-Engine-compatible API
#      (`podman system service`) on unix://$CI_PODMAN_SOCK (default /run/podman/podman.sock)
#      and checks GET /_ping.
#
# Usage: setup-containers.sh [--debian] [--no-service] [--link-docker-sock] [--rebuild]
#        setup-containers.sh --stop        # stop the API service started by this script
# Env:   CI_PODMAN_SOCK (socket path), CI_DEBIAN_MIRROR (default: from apt sources),
#        CI_DEBIAN_SUITE (default: host's codename)
# Then:  export DOCKER_HOST=unix:///run/podman/podman.sock   (bollard / docker CLI; Tributary's
#        tests and `tributary agent --engine` use this socket by default)
set -Eeuo pipefail

SOCK=${CI_PODMAN_SOCK:-/run/podman/podman.sock}
PIDFILE=${SOCK%.sock}.ci-service.pid
LOGFILE=${SOCK%.sock}.ci-service.log
CONF=/etc/containers/containers.conf.d/50-ci-local.conf
BUSYBOX_IMAGE=localhost/ci-busybox
DEBIAN_IMAGE=localhost/ci-debian
WITH_DEBIAN=0 WITH_SERVICE=1 LINK_DOCKER=0 REBUILD=0 STOP=0

log()  { printf '[setup-containers +%ss] %s\n' "$SECONDS" "$*" >&2; }
fail() { printf '[setup-containers] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'fail "command failed (line $LINENO, exit $?): $BASH_COMMAND"' ERR

for arg in "$@"; do
  case $arg in
    --debian) WITH_DEBIAN=1 ;;
    --no-debian) WITH_DEBIAN=0 ;;
    --no-service) WITH_SERVICE=0 ;;
    --link-docker-sock) LINK_DOCKER=1 ;;
    --rebuild) REBUILD=1 ;;
    --stop) STOP=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) fail "unknown argument: $arg (see --help)" ;;
  esac
done

[ "$(id -u)" = 0 ] || fail "must run as root"

service_pid() {  # prints the PID of our running API service, if any
  local pid
  [ -f "$PIDFILE" ] || return 1
  pid=$(cat "$PIDFILE")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "system service" || return 1
  echo "$pid"
}

if [ "$STOP" = 1 ]; then
  if pid=$(service_pid); then
    kill "$pid"
    for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
    [ -d "/proc/$pid" ] && fail "podman service (pid $pid) did not stop after 10 s"
    log "stopped podman API service (pid $pid)"
  else
    log "no podman API service started by this script is running"
  fi
  rm -f "$PIDFILE" "$SOCK"
  exit 0
fi

# ---------------------------------------------------------------- 1. packages
pkgs=(podman runc busybox-static curl ca-certificates)
[ "$WITH_DEBIAN" = 1 ] && pkgs+=(debootstrap)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || fail "apt-get update failed (is the Debian mirror reachable?)"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]} failed"
else
  log "packages already installed"
fi

# ---------------------------------------------------------------- 2. podman config
lim() {  # lim HARD CAP -> min(HARD, CAP), "unlimited" counts as CAP
  if [ "$1" = unlimited ] || [ "$1" -gt "$2" ]; then echo "$2"; else echo "$1"; fi
}
# podman lowers its own RLIMIT_NPROC to 32768 before starting containers, so cap nproc there.
nofile=$(lim "$(ulimit -Hn)" 1048576)
nproc=$(lim "$(ulimit -Hu)" 32768)
want_conf="# written by setup-containers.sh
[containers]
default_ulimits = [\"nofile=${nofile}:${nofile}\", \"nproc=${nproc}:${nproc}\"]

[engine]
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"file\""
if [ "$(cat "$CONF" 2>/dev/null || true)" != "$want_conf" ]; then
  mkdir -p "$(dirname "$CONF")"
  printf '%s\n' "$want_conf" > "$CONF"
  log "wrote $CONF (nofile=$nofile nproc=$nproc, runtime=runc)"
fi
driver=$(podman info --format '{{.Store.GraphDriverName}}' 2>&1) || fail "podman info failed: $driver"
[ "$driver" = overlay ] || log "warning: storage driver is '$driver', not overlay: runs of big images will be slow"

# ---------------------------------------------------------------- 3. images
TMP=$(mktemp -d /var/tmp/ci-containers.XXXXXX)
cleanup() { rm -rf --one-file-system "$TMP"; }
trap cleanup EXIT

image_wanted() {  # true if the image must be (re)built
  [ "$REBUILD" = 1 ] || ! podman image exists "$1"
}
drop_old() {  # drop_old OLD_ID NAME: remove the image NAME pointed to before a rebuild
  local new
  new=$(podman image inspect --format '{{.Id}}' "$2" 2>/dev/null) || return 0
  if [ -n "$1" ] && [ "$1" != "$new" ]; then podman rmi "$1" >/dev/null 2>&1 || true; fi
}

if image_wanted "$BUSYBOX_IMAGE"; then
  log "building $BUSYBOX_IMAGE from busybox-static"
  old_id=$(podman image inspect --format '{{.Id}}' "$BUSYBOX_IMAGE" 2>/dev/null || true)
  bb=$(dpkg -L busybox-static | grep -m1 -E '/bin/busybox$') || fail "busybox-static has no /bin/busybox"
  r=$TMP/busybox-rootfs
  mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,root,dev,proc,sys,workspace}
  install -d -m 1777 "$r/tmp"
  cp "$bb" "$r/bin/busybox"
  for applet in $("$r/bin/busybox" --list-full); do
    [ -e "$r/$applet" ] || ln -s /bin/busybox "$r/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$r/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$r/etc/group"
  tar -C "$r" -c . | podman import -q \
      --change 'CMD ["/bin/sh"]' \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      - "$BUSYBOX_IMAGE" >/dev/null || fail "podman import of $BUSYBOX_IMAGE failed"
  drop_old "$old_id" "$BUSYBOX_IMAGE"
else
  log "$BUSYBOX_IMAGE already present"
fi

debian_mirror() {
  if [ -n "${CI_DEBIAN_MIRROR:-}" ]; then echo "$CI_DEBIAN_MIRROR"; return; fi
  local m
  m=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
      | grep -oE 'https?://[^ ]*/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ') || true
  echo "${m:-http://deb.debian.org/debian}"
}

if [ "$WITH_DEBIAN" = 1 ] && image_wanted "$DEBIAN_IMAGE"; then
  suite=${CI_DEBIAN_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}
  mirror=$(debian_mirror)
  old_id=$(podman image inspect --format '{{.Id}}' "$DEBIAN_IMAGE" 2>/dev/null || true)
  log "building $DEBIAN_IMAGE: debootstrap --variant=minbase $suite from $mirror (about a minute)"
  r=$TMP/debian-rootfs
  debootstrap --variant=minbase "$suite" "$r" "$mirror" > "$TMP/debootstrap.log" 2>&1 \
    || { tail -n 20 "$TMP/debootstrap.log" >&2; fail "debootstrap $suite from $mirror failed"; }
  rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/cache/apt/*.bin "$r"/var/lib/apt/lists/* "$r"/var/log/*.log
  mkdir -p "$r/workspace"
  tar -C "$r" -c . | podman import -q \
      --change 'CMD ["/bin/bash"]' \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      - "$DEBIAN_IMAGE" >/dev/null || fail "podman import of $DEBIAN_IMAGE failed"
  drop_old "$old_id" "$DEBIAN_IMAGE"
  rm -rf --one-file-system "$r"
elif [ "$WITH_DEBIAN" = 1 ]; then
  log "$DEBIAN_IMAGE already present"
fi

# smoke test: a real container through the CLI
out=$(podman run --rm --network=none "$BUSYBOX_IMAGE" sh -c 'echo container-ok' 2>&1) \
  || fail "podman run $BUSYBOX_IMAGE failed: $out"
[ "$out" = container-ok ] || fail "podman run $BUSYBOX_IMAGE printed unexpected output: $out"

# ---------------------------------------------------------------- 4. Docker-compatible API
ping_ok() { [ "$(curl -s -m 5 --unix-socket "$SOCK" http://d/_ping 2>/dev/null)" = OK ]; }

if [ "$WITH_SERVICE" = 1 ]; then
  if ping_ok; then
    log "Docker-compatible API already answering on unix://$SOCK"
  else
    if pid=$(service_pid); then kill "$pid" 2>/dev/null || true; sleep 1; fi  # hung leftover of ours
    mkdir -p "$(dirname "$SOCK")"
    rm -f "$SOCK"
    # setsid: own session, survives the caller; stdio detached so $(...) callers do not hang
    # From /: conmon inherits the service's working directory and fails ("Failed to get working
    # directory") for every container once that directory is deleted (a removed checkout).
    (cd / && exec setsid podman system service --time=0 "unix://$SOCK") > "$LOGFILE" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    for _ in $(seq 100); do ping_ok && break; sleep 0.1; done
    ping_ok || { tail -n 20 "$LOGFILE" >&2 || true; fail "podman system service did not answer on unix://$SOCK within 10 s"; }
    log "started Docker-compatible API on unix://$SOCK (pid $(cat "$PIDFILE"), log $LOGFILE)"
  fi
  api=$(curl -s -m 10 --unix-socket "$SOCK" http://d/version | grep -o '"ApiVersion":"[^"]*"' | head -n1) \
    || fail "GET /version on unix://$SOCK failed"
  log "API $api"
  if [ "$LINK_DOCKER" = 1 ]; then
    if [ ! -e /var/run/docker.sock ] || [ -L /var/run/docker.sock ]; then
      ln -sfn "$SOCK" /var/run/docker.sock && log "linked /var/run/docker.sock -> $SOCK"
    else
      log "warning: /var/run/docker.sock exists and is not a link; left alone"
    fi
  fi
fi

log "ready: images $(podman images --format '{{.Repository}}' | grep '^localhost/ci-' | tr '\n' ' ')"
[ "$WITH_SERVICE" = 1 ] && log "use: export DOCKER_HOST=unix://$SOCK"
exit 0
