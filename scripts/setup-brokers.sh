#!/usr/bin/env bash
# setup-brokers.sh — the servers Tributary's scale-out integration tests run against, on loopback:
#
#   * Apache Kafka (the real broker, from its Maven Central jars) in KRaft combined mode
#     (broker + controller in one JVM) on 127.0.0.1:19092 (controller on 19093);
#   * PostgreSQL 15 from Debian, on 127.0.0.1:5432, with a role `tributary` (password
#     `tributary`) owning the database `tributary_test`.
#
# Idempotent and quick when everything already runs (a port check each). The Kafka jars are
# cached in ~/.cache/tributary/kafka-<version>/libs (Maven's own ~/.m2 too); the broker's data and
# its log are in ~/.cache/tributary/kafka-run (override with TRIBUTARY_KAFKA_DIR).
#
# Usage: scripts/setup-brokers.sh [--kafka|--postgres]   # default: both
#        scripts/setup-brokers.sh --stop-kafka            # stop the broker this script started
# Then the tests find them through (these are the defaults):
#   TRIBUTARY_TEST_KAFKA=127.0.0.1:19092
#   TRIBUTARY_TEST_DATABASE_URL=postgres://tributary:tributary@127.0.0.1:5432/tributary_test
set -Eeuo pipefail

KAFKA_VERSION=3.9.1
KAFKA_PORT=19092
CONTROLLER_PORT=19093
CACHE=${TRIBUTARY_CACHE:-$HOME/.cache/tributary}
LIBS=$CACHE/kafka-$KAFKA_VERSION/libs
RUN=${TRIBUTARY_KAFKA_DIR:-$CACHE/kafka-run}
PG_PORT=5432

log()  { printf '[setup-brokers +%ss] %s\n' "$SECONDS" "$*" >&2; }
fail() { printf '[setup-brokers] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'fail "command failed (line $LINENO, exit $?): $BASH_COMMAND"' ERR

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
apt_install() {
    log "installing $*"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

kafka_jars() {
    [ -f "$LIBS/.complete" ] && return 0
    command -v java >/dev/null 2>&1 || apt_install default-jre-headless
    command -v mvn >/dev/null 2>&1 || apt_install maven
    log "fetching Apache Kafka $KAFKA_VERSION from Maven Central into $LIBS"
    local pom_dir; pom_dir=$(mktemp -d)
    cat >"$pom_dir/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.tributary</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-reload4j</artifactId><version>1.7.36</version></dependency>
  </dependencies>
</project>
EOF
    rm -rf "$LIBS"; mkdir -p "$LIBS"
    (cd "$pom_dir" && mvn -q -B dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIBS")
    rm -rf "$pom_dir"
    touch "$LIBS/.complete"
}

start_kafka() {
    if listening "$KAFKA_PORT"; then
        log "Kafka already listening on 127.0.0.1:$KAFKA_PORT"
        return 0
    fi
    kafka_jars
    mkdir -p "$RUN"
    cat >"$RUN/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$RUN/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
    cat >"$RUN/log4j.properties" <<EOF
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File=$RUN/server.log
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
EOF
    local java_opts=(-Xms256m -Xmx512m -XX:+UseG1GC -Djava.awt.headless=true
        "-Dlog4j.configuration=file:$RUN/log4j.properties")
    if [ ! -f "$RUN/data/meta.properties" ]; then
        log "formatting the broker's storage in $RUN/data"
        local cluster_id; cluster_id=$(java "${java_opts[@]}" -cp "$LIBS/*" kafka.tools.StorageTool random-uuid)
        java "${java_opts[@]}" -cp "$LIBS/*" kafka.tools.StorageTool format -t "$cluster_id" \
            -c "$RUN/server.properties" >/dev/null
    fi
    log "starting Kafka $KAFKA_VERSION on 127.0.0.1:$KAFKA_PORT (log: $RUN/server.log)"
    : >"$RUN/server.log"
    nohup setsid java "${java_opts[@]}" -cp "$LIBS/*" kafka.Kafka "$RUN/server.properties" \
        >"$RUN/stdout.log" 2>&1 </dev/null &
    echo $! >"$RUN/kafka.pid"
    local pid; pid=$(cat "$RUN/kafka.pid")
    for _ in $(seq 1 240); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$RUN/stdout.log" "$RUN/server.log" >&2 || true
            fail "the Kafka broker exited during start; see $RUN/server.log"
        fi
        if listening "$KAFKA_PORT" && grep -q "Kafka Server started" "$RUN/server.log" 2>/dev/null; then
            log "Kafka is up (pid $pid)"
            return 0
        fi
        sleep 0.5
    done
    fail "Kafka did not start listening on 127.0.0.1:$KAFKA_PORT within 120 s; see $RUN/server.log"
}

stop_kafka() {
    if [ -f "$RUN/kafka.pid" ] && kill -0 "$(cat "$RUN/kafka.pid")" 2>/dev/null; then
        local pid; pid=$(cat "$RUN/kafka.pid")
        log "stopping Kafka (pid $pid)"
        kill "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$RUN/kafka.pid"
}

as_postgres() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }

start_postgres() {
    command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /usr/lib/postgresql/15 ] \
        || apt_install postgresql-15
    if ! listening "$PG_PORT"; then
        [ -d /etc/postgresql/15/main ] || $SUDO pg_createcluster 15 main >/dev/null
        log "starting PostgreSQL 15"
        $SUDO pg_ctlcluster 15 main start
        for _ in $(seq 1 60); do listening "$PG_PORT" && break; sleep 0.5; done
        listening "$PG_PORT" || fail "PostgreSQL did not listen on 127.0.0.1:$PG_PORT; see /var/log/postgresql/"
    fi
    if ! PGPASSWORD=tributary psql -qtA -h 127.0.0.1 -U tributary -d tributary_test -c 'select 1' >/dev/null 2>&1; then
        log "creating the role tributary and the database tributary_test"
        as_postgres psql -q -v ON_ERROR_STOP=1 <<'EOF'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tributary') THEN
    CREATE ROLE tributary LOGIN CREATEDB PASSWORD 'tributary';
  ELSE
    ALTER ROLE tributary LOGIN CREATEDB PASSWORD 'tributary';
  END IF;
END $$;
SELECT 'CREATE DATABASE tributary_test OWNER tributary'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'tributary_test') \gexec
EOF
        PGPASSWORD=tributary psql -qtA -h 127.0.0.1 -U tributary -d tributary_test -c 'select 1' >/dev/null \
            || fail "cannot log in as tributary@127.0.0.1:$PG_PORT/tributary_test (check pg_hba.conf)"
    fi
    log "PostgreSQL ready: postgres://tributary:tributary@127.0.0.1:$PG_PORT/tributary_test"
}

case "${1:-}" in
    "") start_kafka; start_postgres ;;
    --kafka) start_kafka ;;
    --postgres) start_postgres ;;
    --stop-kafka) stop_kafka ;;
    *) fail "unknown argument '$1' (expected --kafka, --postgres or --stop-kafka)" ;;
esac
