#!/usr/bin/env bash
# Starts a scale-out Tributary on this machine, for trying it by hand and for
# `tributary bench server --server`: 2 `serve api`, 2 `serve scheduler`, 2 `serve projector`,
# 1 `serve metering`, 2 `tributary agent` processes on Kafka (4 events + 2 logs partitions, fresh
# topics) and a fresh PostgreSQL database, objects in a local directory.
#
#   scripts/scale-out-local.sh start [BINARY]   # default ./target/release/tributary
#   scripts/scale-out-local.sh stop
#
# Needs the broker and PostgreSQL of scripts/setup-brokers.sh. Everything lives in
# $TRIBUTARY_SCALE_DIR (default /tmp/tributary-scale-out): logs, the admin token, agents' work.
set -euo pipefail
DIR=${TRIBUTARY_SCALE_DIR:-/tmp/tributary-scale-out}
KAFKA=${TRIBUTARY_TEST_KAFKA:-127.0.0.1:19092}
PG=${TRIBUTARY_TEST_PG:-postgres://tributary:tributary@127.0.0.1:5432}
CAPACITY=${CAPACITY:-4}

stop() {
    if [ -f "$DIR/pids" ]; then
        xargs -r kill <"$DIR/pids" 2>/dev/null || true
        rm -f "$DIR/pids"
    fi
}

case "${1:-}" in
start)
    BIN=${2:-./target/release/tributary}
    [ -x "$BIN" ] || { echo "no binary $BIN: cargo build --release -p tributary" >&2; exit 1; }
    BIN=$(realpath "$BIN")
    stop
    rm -rf "$DIR" && mkdir -p "$DIR"
    stamp=$(date +%s)
    db="scale_$stamp"
    PGPASSWORD=tributary psql -h 127.0.0.1 -U tributary -d tributary_test -qc "CREATE DATABASE $db" \
        || { echo "cannot create a database: run scripts/setup-brokers.sh" >&2; exit 1; }
    common=(--kafka "$KAFKA" --kafka-topic-prefix "scale-$stamp" --kafka-event-partitions 4
        --kafka-log-partitions 2 --database "$PG/$db" --objects "$DIR/objects")
    run() { # name, args...
        local name=$1; shift
        "$BIN" "$@" >"$DIR/$name.log" 2>&1 &
        echo $! >>"$DIR/pids"
    }
    api() { # i
        run "api-$1" serve api "${common[@]}" --data "$DIR/api-$1" --listen "127.0.0.1:1780$1" \
            --admin-token-file "$DIR/admin.token" --server-key-file "$DIR/server.key"
    }
    api 1
    for _ in $(seq 100); do [ -s "$DIR/admin.token" ] && break; sleep 0.1; done
    api 2
    for i in 1 2; do
        run "scheduler-$i" serve scheduler "${common[@]}" --data "$DIR/scheduler-$i"
        run "projector-$i" serve projector "${common[@]}" --data "$DIR/projector-$i"
    done
    run metering serve metering "${common[@]}" --data "$DIR/metering"
    for i in 1 2; do
        run "agent-$i" agent --server "http://127.0.0.1:1780$i" --token "$(cat "$DIR/admin.token")" \
            --name "agent-$i" --capacity "$CAPACITY" --workdir "$DIR/agent-$i"
    done
    echo "API: http://127.0.0.1:17801 and http://127.0.0.1:17802; token: $DIR/admin.token; logs: $DIR/*.log"
    echo "e.g. $BIN bench server --server http://127.0.0.1:17801 --token \$(cat $DIR/admin.token)"
    ;;
stop) stop ;;
*) sed -n '2,12p' "$0"; exit 2 ;;
esac
