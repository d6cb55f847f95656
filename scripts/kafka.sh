#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft, broker+controller in one JVM) on 127.0.0.1
# for tests, CI and local development. No Docker, no tarball download: the jars
# come from Maven Central through `mvn dependency:copy-dependencies`.
#
# Usage: scripts/kafka.sh {start|stop|restart|clean|status|fetch|cluster-id [N]}
#
#   fetch       download the Kafka jars into the cache (done by `start` as needed)
#   start       fetch, format the storage if it is not formatted yet, start the
#               broker in the background, wait until it answers metadata
#               requests, print KAFKA_BOOTSTRAP=host:port. Data left by an
#               earlier run (topics, offsets, committed group offsets) is reused.
#               If it is already running it only prints the bootstrap line.
#   stop        stop the broker; its data stays in the state dir for the next start
#   restart     stop + start, keeping the data (fault tests: "the broker restarts")
#   clean       stop and delete the state dir: the next start begins empty
#   status      print "running ..." (exit 0) or "not running" (exit 1)
#   cluster-id  print N (default 1) new random KRaft cluster ids, one a line
#
# Environment (all optional):
#   KAFKA_VERSION          Kafka version from Maven Central   (default 4.1.2)
#   KAFKA_PORT             PLAINTEXT listener port            (default 19092)
#   KAFKA_CONTROLLER_PORT  KRaft controller port              (default KAFKA_PORT+1)
#   KAFKA_STATE_DIR        data, server.properties, logs, pid (default /tmp/shadowlens-kafka)
#   KAFKA_NUM_PARTITIONS   partitions of auto-created topics  (default 1)
#   KAFKA_HEAP_OPTS        JVM heap options                   (default -Xms256m -Xmx512m)
#   KAFKA_START_TIMEOUT    seconds to wait for readiness      (default 90)
#   SHADOWLENS_HOME        cache root (default ~/.cache/shadowlens); jars go to
#                          $SHADOWLENS_HOME/kafka-$KAFKA_VERSION/libs
#   KAFKA_PYTHON           python with aiokafka used for the readiness check
#                          (default: <repo>/.venv/bin/python if present)
set -euo pipefail

KAFKA_VERSION="${KAFKA_VERSION:-4.1.2}"
# log4j-core must match the log4j-api that Kafka pulls in; the slf4j 1.x binding
# of the same version routes Kafka's slf4j logging into log4j2.
LOG4J_VERSION="${KAFKA_LOG4J_VERSION:-2.25.3}"
KAFKA_PORT="${KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
KAFKA_STATE_DIR="${KAFKA_STATE_DIR:-/tmp/shadowlens-kafka}"
KAFKA_NUM_PARTITIONS="${KAFKA_NUM_PARTITIONS:-1}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
CACHE_DIR="${SHADOWLENS_HOME:-$HOME/.cache/shadowlens}/kafka-${KAFKA_VERSION}"
LIBS_DIR="$CACHE_DIR/libs"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PID_FILE="$KAFKA_STATE_DIR/kafka.pid"
LOG_FILE="$KAFKA_STATE_DIR/kafka.log"       # broker log (log4j2, WARN + startup lines)
OUT_FILE="$KAFKA_STATE_DIR/kafka.out"       # JVM stdout/stderr
BOOT_FILE="$KAFKA_STATE_DIR/bootstrap"      # "127.0.0.1:PORT" of the running broker
MARKER="$KAFKA_STATE_DIR/.shadowlens-kafka" # `stop` only deletes dirs carrying this

log() { echo "kafka.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- fetch -----
fetch() {
  if [[ -f "$LIBS_DIR/.complete" ]]; then
    return 0
  fi
  command -v mvn >/dev/null || die "mvn not found (needed once to fetch Kafka $KAFKA_VERSION jars)"
  command -v java >/dev/null || die "java not found (Kafka $KAFKA_VERSION needs Java 17+)"
  mkdir -p "$CACHE_DIR"
  local work
  work="$(mktemp -d "$CACHE_DIR/fetch.XXXXXX")"
  # kafka_2.13 has kafka.Kafka (the broker main) and kafka.tools.StorageTool and
  # pulls in kafka-server, -raft, -metadata, -storage, coordinators, clients.
  # Logging: log4j-core (the 2.x API comes with Kafka) + the slf4j 1.7 binding.
  cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>shadowlens.local</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>${KAFKA_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>${LOG4J_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>${LOG4J_VERSION}</version>
    </dependency>
  </dependencies>
</project>
EOF
  log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBS_DIR ..."
  if ! (cd "$work" && mvn -q -B -f pom.xml dependency:copy-dependencies \
          -DincludeScope=runtime -DoutputDirectory="$work/libs" >"$work/mvn.log" 2>&1); then
    cat "$work/mvn.log" >&2
    rm -rf "$work"
    die "maven could not fetch Kafka $KAFKA_VERSION"
  fi
  ls "$work/libs"/kafka_2.13-*.jar >/dev/null 2>&1 || { rm -rf "$work"; die "kafka_2.13 jar missing after fetch"; }
  touch "$work/libs/.complete"
  # Atomic publish: a concurrent fetch that lost the race just discards its copy.
  if ! mv -T "$work/libs" "$LIBS_DIR" 2>/dev/null; then
    [[ -f "$LIBS_DIR/.complete" ]] || { rm -rf "$LIBS_DIR"; mv -T "$work/libs" "$LIBS_DIR"; }
  fi
  rm -rf "$work"
}

# --------------------------------------------------------------- helpers ----
lock() {
  # Serialise start/stop (e.g. two test runs starting at once). fd 9 is closed
  # for the broker process so it does not keep holding the lock.
  command -v flock >/dev/null 2>&1 || return 0
  exec 9>"${KAFKA_STATE_DIR%/}.lock"
  flock -w 300 9 || die "could not lock ${KAFKA_STATE_DIR%/}.lock"
}

running_pid() {
  # Prints the broker pid and returns 0 if our broker is alive.
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Guard against pid reuse: it must be a JVM running kafka.Kafka.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
  echo "$pid"
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

find_python() {
  local py
  for py in "${KAFKA_PYTHON:-}" "$REPO_ROOT/.venv/bin/python" python3; do
    [[ -n "$py" ]] || continue
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import aiokafka' >/dev/null 2>&1; then
      echo "$py"
      return 0
    fi
  done
  return 1
}

# A metadata round trip with a real client: proves the broker serves requests,
# not just that the socket is bound.
metadata_ok() {
  local py="$1"
  "$py" - "127.0.0.1:$KAFKA_PORT" <<'EOF' >/dev/null 2>&1
import asyncio, sys
from aiokafka.admin import AIOKafkaAdminClient

async def main(bootstrap):
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        assert cluster["brokers"], cluster
    finally:
        await admin.close()

asyncio.run(asyncio.wait_for(main(sys.argv[1]), 15))
EOF
}

write_config() {
  local data_dir="$KAFKA_STATE_DIR/data"
  cat >"$KAFKA_STATE_DIR/server.properties" <<EOF
# generated by scripts/kafka.sh -- single-node KRaft broker for tests
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:${KAFKA_CONTROLLER_PORT}
listeners=PLAINTEXT://127.0.0.1:${KAFKA_PORT},CONTROLLER://127.0.0.1:${KAFKA_CONTROLLER_PORT}
advertised.listeners=PLAINTEXT://127.0.0.1:${KAFKA_PORT}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=${data_dir}

# topics
auto.create.topics.enable=true
delete.topic.enable=true
num.partitions=${KAFKA_NUM_PARTITIONS}
default.replication.factor=1
min.insync.replicas=1

# internal topics: one replica, few partitions (faster first group join)
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0

# small footprint (2-core machines, small heap)
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=16777216
log.segment.bytes=16777216
log.retention.ms=3600000
log.retention.check.interval.ms=60000
EOF

  # Quiet log4j2 config: WARN and above, plus the lifecycle line we wait for.
  cat >"$KAFKA_STATE_DIR/log4j2.properties" <<EOF
status = error
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = ${LOG_FILE}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
logger.raftserver.name = kafka.server.KafkaRaftServer
logger.raftserver.level = INFO
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = INFO
EOF
}

random_cluster_id() {
  # Kafka Uuid: 16 random bytes, URL-safe base64 without padding (22 chars).
  # About 1 in 64 of those starts with '-', which `format -t -...` takes for an
  # option and fails; Kafka's own Uuid.randomUuid() draws again in that case,
  # and so do we.
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ "$id" == -* ]] || break
  done
  echo "$id"
}

# Formatted storage has meta.properties in its log dir (KRaft writes it there).
formatted() {
  [[ -f "$KAFKA_STATE_DIR/data/meta.properties" ]]
}

# ----------------------------------------------------------------- start ----
start() {
  local pid
  if pid="$(running_pid)"; then
    echo "KAFKA_BOOTSTRAP=$(cat "$BOOT_FILE" 2>/dev/null || echo "127.0.0.1:$KAFKA_PORT")"
    return 0
  fi
  fetch
  if port_open "$KAFKA_PORT"; then
    die "port $KAFKA_PORT is in use by something else (set KAFKA_PORT, or stop it)"
  fi
  if port_open "$KAFKA_CONTROLLER_PORT"; then
    die "controller port $KAFKA_CONTROLLER_PORT is in use (set KAFKA_CONTROLLER_PORT)"
  fi

  # State of an earlier run (stopped, or crashed) is reused so that topics and
  # offsets survive stop/start; only a dir of ours, though.
  if [[ -e "$KAFKA_STATE_DIR" ]]; then
    [[ -f "$MARKER" ]] || die "$KAFKA_STATE_DIR exists and was not created by kafka.sh; refusing to use it"
  fi
  mkdir -p "$KAFKA_STATE_DIR/data"
  touch "$MARKER"
  # A pid file left by a crashed run would read as "exited during start-up".
  rm -f "$PID_FILE" "$BOOT_FILE"
  # log4j appends: the old run's "started" line must not pass the readiness check.
  if [[ -f "$LOG_FILE" ]]; then
    mv -f "$LOG_FILE" "$LOG_FILE.1"
  fi
  write_config

  local cp="$LIBS_DIR/*"
  local jvm_common=(-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto
                    -Djava.awt.headless=true
                    "-Dlog4j2.configurationFile=$KAFKA_STATE_DIR/log4j2.properties")
  local t0=$SECONDS
  # Format only once: formatting again would need a new cluster id and the
  # broker would no longer accept the data it has.
  if ! formatted; then
    if ! java -Xmx256m "${jvm_common[@]}" -cp "$cp" kafka.tools.StorageTool format \
          -t "$(random_cluster_id)" -c "$KAFKA_STATE_DIR/server.properties" \
          >"$KAFKA_STATE_DIR/format.log" 2>&1; then
      cat "$KAFKA_STATE_DIR/format.log" >&2
      die "kafka-storage format failed"
    fi
  else
    log "reusing the data in $KAFKA_STATE_DIR/data (\`$0 clean\` deletes it)"
  fi

  # Background broker in its own session so it survives the calling shell and
  # ignores its Ctrl-C; all fds redirected so callers capturing our output
  # (e.g. subprocess.run(capture_output=True)) are not held open.
  # shellcheck disable=SC2086
  setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$PID_FILE" \
    java $KAFKA_HEAP_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
      -Djava.awt.headless=true \
      "-Dlog4j2.configurationFile=$KAFKA_STATE_DIR/log4j2.properties" \
      -cp "$cp" kafka.Kafka "$KAFKA_STATE_DIR/server.properties" \
    </dev/null >"$OUT_FILE" 2>&1 9>&- &

  local py="" deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  py="$(find_python || true)"
  while :; do
    if ((SECONDS > deadline)); then
      log "broker not ready after ${KAFKA_START_TIMEOUT}s; last log lines:"
      tail -n 30 "$LOG_FILE" "$OUT_FILE" >&2 2>/dev/null || true
      stop >/dev/null 2>&1 || true
      die "start timed out"
    fi
    if [[ -f "$PID_FILE" ]] && ! running_pid >/dev/null; then
      log "broker exited during start-up; last log lines:"
      tail -n 40 "$LOG_FILE" "$OUT_FILE" >&2 2>/dev/null || true
      rm -f "$PID_FILE"
      die "start failed (if the kept data is the problem, \`$0 clean\` deletes it)"
    fi
    if port_open "$KAFKA_PORT" && grep -q -E 'Kafka Server started|started \(kafka\.server' "$LOG_FILE" 2>/dev/null; then
      if [[ -z "$py" ]] || metadata_ok "$py"; then
        break
      fi
    fi
    sleep 0.3
  done
  echo "127.0.0.1:$KAFKA_PORT" >"$BOOT_FILE"
  log "Kafka $KAFKA_VERSION up in $((SECONDS - t0))s (pid $(cat "$PID_FILE"), state $KAFKA_STATE_DIR," \
      "cluster id $(sed -n 's/^cluster\.id=//p' "$KAFKA_STATE_DIR/data/meta.properties" 2>/dev/null))"
  echo "KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT"
}

# ------------------------------------------------------------------ stop ----
stop() {
  local pid
  if pid="$(running_pid)"; then
    kill -TERM "$pid" 2>/dev/null || true
    # Controlled shutdown of a single node is quick; don't wait forever.
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "broker did not stop in 20s, killing"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
    fi
    log "stopped (pid $pid)"
  else
    log "not running"
  fi
  # The data stays (see `clean`); only what describes a running broker goes.
  if [[ -f "$MARKER" ]]; then
    rm -f "$PID_FILE" "$BOOT_FILE"
  fi
}

# ----------------------------------------------------------------- clean ----
clean() {
  stop
  if [[ -d "$KAFKA_STATE_DIR" ]]; then
    if [[ -f "$MARKER" ]]; then
      rm -rf "$KAFKA_STATE_DIR"
      log "deleted $KAFKA_STATE_DIR"
    else
      log "leaving $KAFKA_STATE_DIR alone (not created by kafka.sh)"
    fi
  fi
}

status() {
  local pid
  if pid="$(running_pid)"; then
    echo "running (pid $pid) KAFKA_BOOTSTRAP=$(cat "$BOOT_FILE" 2>/dev/null || echo "127.0.0.1:$KAFKA_PORT")"
    return 0
  fi
  echo "not running"
  return 1
}

case "${1:-}" in
  start) lock; start ;;
  stop) lock; stop ;;
  restart) lock; stop; start ;;
  clean) lock; clean ;;
  status) status ;;
  fetch) fetch; echo "$LIBS_DIR" ;;
  cluster-id)
    n="${2:-1}"
    [[ "$n" =~ ^[0-9]+$ ]] || die "cluster-id takes a count, got '$n'"
    for ((i = 0; i < n; i++)); do random_cluster_id; done ;;
  *) echo "usage: $0 {start|stop|restart|clean|status|fetch|cluster-id [N]}" >&2; exit 2 ;;
esac
