#!/usr/bin/env bash
# Start/stop a lean local MLflow tracking server, tracked by PID.
#
#   scripts/mlflow_server.sh start DIR [PORT]   # DIR/mlflow.db, DIR/artifacts, DIR/server.pid, DIR/server.log
#   scripts/mlflow_server.sh stop DIR
#   scripts/mlflow_server.sh status DIR
#   scripts/mlflow_server.sh kill DIR           # SIGKILL the server and its workers: a crash, for fault tests
#
# DIR is usually <artifacts-dir>/mlflow, the same store that `quantforge register`
# writes when no server is given, so a server started here shows that registry.
# Lean because the default starts ~15 processes (~2.5 GB); job execution off and
# one worker starts 2 processes (~490 MB) in ~4 s on an idle 2-core machine.
# Artifacts are proxied (--artifacts-destination): clients upload over HTTP and
# need no access to DIR, as a remote server's clients would.
# Env: MLFLOW_BIN (default: the repo's .venv mlflow, else `mlflow` on PATH),
#      MLFLOW_SERVER_WAIT (seconds to wait for /health, default 120).
set -euo pipefail

cmd=${1:-}
dir=${2:-}
port=${3:-5000}
if [[ -z "$cmd" || -z "$dir" ]]; then
  echo "usage: $0 start|stop|status|kill DIR [PORT]" >&2
  exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
pidfile="$dir/server.pid"
portfile="$dir/server.port"
logfile="$dir/server.log"

here=$(cd "$(dirname "$0")/.." && pwd)
mlflow_bin=${MLFLOW_BIN:-}
if [[ -z "$mlflow_bin" ]]; then
  if [[ -x "$here/.venv/bin/mlflow" ]]; then mlflow_bin="$here/.venv/bin/mlflow"; else mlflow_bin=mlflow; fi
fi

alive() { [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

healthy() {
  local url="http://127.0.0.1:$1/health"
  if command -v curl >/dev/null; then
    curl -fsS --max-time 2 "$url" >/dev/null 2>&1
  else
    python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url" >/dev/null 2>&1
  fi
}

case "$cmd" in
  start)
    if alive; then
      echo "already running: pid $(cat "$pidfile") port $(cat "$portfile" 2>/dev/null)"
      exit 0
    fi
    mkdir -p "$dir/artifacts"
    # setsid: the server gets its own session, so a Ctrl-C in the caller's
    # terminal does not reach it; it lives until `stop`.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$mlflow_bin" server \
      --backend-store-uri "sqlite:///$dir/mlflow.db" \
      --artifacts-destination "$dir/artifacts" \
      --host 127.0.0.1 --port "$port" --workers 1 \
      >"$logfile" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$pidfile"
    echo "$port" >"$portfile"
    wait_s=${MLFLOW_SERVER_WAIT:-120}
    for ((i = 0; i < wait_s * 4; i++)); do
      if healthy "$port"; then
        echo "mlflow server up: http://127.0.0.1:$port (pid $pid, log $logfile)"
        exit 0
      fi
      if ! kill -0 "$pid" 2>/dev/null; then
        echo "mlflow server exited during start; last lines of $logfile:" >&2
        tail -20 "$logfile" >&2
        rm -f "$pidfile"
        exit 1
      fi
      sleep 0.25
    done
    echo "mlflow server did not answer /health within ${wait_s}s; stopping pid $pid" >&2
    kill -TERM "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    exit 1
    ;;
  stop)
    if ! alive; then
      echo "not running"
      rm -f "$pidfile"
      exit 0
    fi
    pid=$(cat "$pidfile")
    # The mlflow CLI forwards SIGTERM to its uvicorn child and exits after it.
    kill -TERM "$pid"
    for ((i = 0; i < 120; i++)); do
      kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; echo "stopped pid $pid"; exit 0; }
      sleep 0.25
    done
    echo "pid $pid ignored SIGTERM for 30 s; sending SIGKILL to its process group" >&2
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    ;;
  kill)
    if ! alive; then
      echo "not running"
      rm -f "$pidfile"
      exit 0
    fi
    pid=$(cat "$pidfile")
    # The server was started with setsid, so its PID is its process group: the uvicorn
    # workers die with it, as they would when the machine went away.
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    rm -f "$pidfile"
    echo "killed pid $pid and its process group"
    ;;
  status)
    if alive && healthy "$(cat "$portfile")"; then
      echo "running: pid $(cat "$pidfile") http://127.0.0.1:$(cat "$portfile")"
    elif alive; then
      echo "pid $(cat "$pidfile") alive but /health does not answer"
      exit 1
    else
      echo "not running"
      exit 3
    fi
    ;;
  *)
    echo "usage: $0 start|stop|status|kill DIR [PORT]" >&2
    exit 2
    ;;
esac
