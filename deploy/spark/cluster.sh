#!/usr/bin/env bash
# A Spark standalone cluster on loopback for paircurate's SparkRunner runs and tests:
# a master, one worker, a Beam Python worker pool and Beam's Spark job server.
#
#   deploy/spark/cluster.sh fetch    # pyspark 3.5.0 (Spark) + the job server's jars, cached
#   deploy/spark/cluster.sh start    # start everything, wait until ready, write cluster.env
#   deploy/spark/cluster.sh stop     # stop what start started
#
# start writes $PAIRCURATE_SPARK_STATE/cluster.env (source it): PAIRCURATE_SPARK_JOB_ENDPOINT,
# PAIRCURATE_SPARK_MASTER_URL and PAIRCURATE_SPARK_WORKER_POOL, which the Spark test and the
# benchmark read. Environment: PAIRCURATE_PYTHON (the interpreter with paircurate installed,
# default .venv/bin/python), PAIRCURATE_SPARK_CACHE (downloads, default ~/.cache/paircurate-spark),
# PAIRCURATE_SPARK_STATE (logs, pids, default /tmp/paircurate-spark), PAIRCURATE_SPARK_WORKER_CORES
# (default 2), PAIRCURATE_SPARK_WORKER_MEMORY (default 4g).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
SPARK_VERSION=3.5.0   # the version deploy/spark/pom.xml's Beam runner was built against
cache="${PAIRCURATE_SPARK_CACHE:-$HOME/.cache/paircurate-spark}"
state="${PAIRCURATE_SPARK_STATE:-/tmp/paircurate-spark}"
python="${PAIRCURATE_PYTHON:-$repo/.venv/bin/python}"
spark_home="$cache/pyspark-$SPARK_VERSION/pyspark"
jobserver_lib="$cache/job-server-lib"
export SPARK_HOME="$spark_home" SPARK_LOCAL_IP=127.0.0.1 SPARK_LOG_DIR="$state/logs"
# Spark and the Beam runner on Java 17 need these modules opened.
JAVA_OPENS=(--add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/java.lang.invoke=ALL-UNNAMED
            --add-opens=java.base/java.nio=ALL-UNNAMED --add-opens=java.base/sun.nio.ch=ALL-UNNAMED
            --add-opens=java.base/java.util=ALL-UNNAMED)

log() { echo "[spark-cluster] $*" >&2; }

# wait_for_port NAME PORT SECONDS: until 127.0.0.1:PORT accepts connections; fail if NAME dies or time runs out.
wait_for_port() {
  local name=$1 port=$2 limit=$3
  wait_until "$name" "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", $port), 1).close()' 2>/dev/null" "$limit"
}

fetch() {
  local t0=$SECONDS
  if [ ! -x "$spark_home/bin/spark-class" ]; then
    log "installing pyspark $SPARK_VERSION (Spark's jars and launch scripts) into $cache"
    rm -rf "$cache/pyspark-$SPARK_VERSION.tmp"
    python3 -m pip install -q --disable-pip-version-check --no-deps \
      --target "$cache/pyspark-$SPARK_VERSION.tmp" "pyspark==$SPARK_VERSION"
    mv "$cache/pyspark-$SPARK_VERSION.tmp" "$cache/pyspark-$SPARK_VERSION"
  fi
  if [ ! -f "$jobserver_lib/.complete" ]; then
    log "resolving the Beam Spark job server's classpath with Maven (cached under ~/.m2)"
    rm -rf "$jobserver_lib"
    mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$jobserver_lib"
    # Jars Spark already has (same file name) are left to Spark: Spark refuses to register
    # one name twice when it ships the job's jars to the executors.
    local jar
    for jar in "$jobserver_lib"/*.jar; do
      [ ! -e "$spark_home/jars/$(basename "$jar")" ] || rm "$jar"
    done
    touch "$jobserver_lib/.complete"
  fi
  log "fetch done in $((SECONDS - t0)) s"
}

# free_ports N: N distinct free loopback ports (all bound at once, so no two picks can coincide).
free_ports() {
  python3 -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

# start_bg NAME CMD...: run CMD in its own process group, log to $state/logs/NAME.log.
start_bg() {
  local name=$1; shift
  setsid "$@" >"$state/logs/$name.log" 2>&1 < /dev/null &
  echo "$!" > "$state/pids/$name"
}

# wait_for NAME PATTERN SECONDS: until NAME's log shows PATTERN; fail if it dies or time runs out.
wait_for() {
  wait_until "$1" "grep -qE '$2' '$state/logs/$1.log' 2>/dev/null" "$3"
}

wait_until() {
  local name=$1 check=$2 limit=$3 pid
  pid=$(cat "$state/pids/$name")
  for _ in $(seq 1 "$limit"); do
    if eval "$check"; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited before it was ready; the end of its log:"; tail -n 30 "$state/logs/$name.log" >&2
      return 1
    fi
    sleep 1
  done
  log "$name was not ready within $limit s; the end of its log:"; tail -n 30 "$state/logs/$name.log" >&2
  return 1
}

start() {
  [ -x "$spark_home/bin/spark-class" ] && [ -f "$jobserver_lib/.complete" ] || fetch
  stop 2>/dev/null || true
  mkdir -p "$state/logs" "$state/pids" "$state/work" "$state/artifacts"
  # Whatever makes start fail (set -e), nothing it started is left running.
  started=0
  trap '[ "$started" = 1 ] || { log "start failed; stopping what was started (logs in $state/logs)"; stop; }' EXIT
  local t0=$SECONDS
  local master_port master_ui worker_ui pool_port job_port artifact_port expansion_port
  read -r master_port master_ui worker_ui pool_port job_port artifact_port expansion_port < <(free_ports 7)
  local master="spark://127.0.0.1:$master_port"

  start_bg master "$spark_home/bin/spark-class" org.apache.spark.deploy.master.Master \
    --host 127.0.0.1 --port "$master_port" --webui-port "$master_ui"
  wait_for master "I have been elected leader" 120
  start_bg worker "$spark_home/bin/spark-class" org.apache.spark.deploy.worker.Worker \
    --host 127.0.0.1 --webui-port "$worker_ui" --work-dir "$state/work" \
    --cores "${PAIRCURATE_SPARK_WORKER_CORES:-2}" --memory "${PAIRCURATE_SPARK_WORKER_MEMORY:-4g}" "$master"
  # The pool starts each SDK worker as plain `python`: put the project's interpreter first on PATH.
  PATH="$(dirname "$python"):$PATH" start_bg worker-pool "$python" "$here/worker_pool.py" --port "$pool_port"
  # The job server is the Spark driver: Spark's own log4j2 defaults (INFO to stderr); the executors
  # get the Beam runner's jars first on their classpath (Spark's older Guava would shadow Beam's).
  start_bg job-server java "${JAVA_OPENS[@]}" -Dlog4j2.configurationFile=org/apache/spark/log4j2-defaults.properties \
    -Dspark.ui.enabled=false -Dspark.executor.extraClassPath="$jobserver_lib/*" \
    -Dspark.driver.host=127.0.0.1 -Dspark.driver.bindAddress=127.0.0.1 \
    -cp "$jobserver_lib/*:$spark_home/jars/*" org.apache.beam.runners.spark.SparkJobServerDriver \
    --job-host 127.0.0.1 --job-port "$job_port" --artifact-port "$artifact_port" \
    --expansion-port "$expansion_port" --artifacts-dir "$state/artifacts" --spark-master-url "$master"
  wait_for worker "Successfully registered with master" 120
  wait_for_port worker-pool "$pool_port" 60
  wait_for_port job-server "$job_port" 120
  started=1
  cat > "$state/cluster.env" <<ENV
export PAIRCURATE_SPARK_JOB_ENDPOINT=127.0.0.1:$job_port
export PAIRCURATE_SPARK_MASTER_URL=$master
export PAIRCURATE_SPARK_WORKER_POOL=127.0.0.1:$pool_port
ENV
  log "cluster up in $((SECONDS - t0)) s: master $master, job server 127.0.0.1:$job_port, worker pool 127.0.0.1:$pool_port"
  log "source $state/cluster.env before running the Spark test or benchmark"
}

stop() {
  [ -d "$state/pids" ] || return 0
  local name pid
  for name in job-server worker-pool worker master; do
    [ -f "$state/pids/$name" ] || continue
    pid=$(cat "$state/pids/$name")
    kill -TERM -- "-$pid" 2>/dev/null || true   # the process group start_bg made
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$state/pids/$name"
  done
  rm -f "$state/cluster.env"
  rm -rf "$state/work"   # each Spark application's copy of the job's jars (~400 MB)
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 fetch|start|stop" >&2; exit 2 ;;
esac
