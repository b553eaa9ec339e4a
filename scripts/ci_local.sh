#!/usr/bin/env bash
# Rehearse .github/workflows/build.yml on this machine, against a local MLflow
# server with artifact proxying, in the workflow's order:
#
#   validate -> plan matrix -> per target: build + register (the build jobs)
#   -> in a fresh artifacts dir (another runner): pull -> eval --device cpu
#      -> register -> summary (the eval job)
#   -> for recipes whose gates need several devices: pull -> register -> summary
#      in another fresh dir (the finalize job)
#
#   scripts/ci_local.sh RECIPE [BIN]       # `make ci-local RECIPE=...` calls it
#
# BIN: the venv's bin folder (default .venv/bin). Exits non-zero on any failure;
# exit 3 when a gate failed (after registering, as the workflow does).
# Env:
#   CI_LOCAL_DIR       work folder (default: $QUANTFORGE_ARTIFACTS/ci-local if that
#                      is set, else a temp dir, removed after a successful run)
#   CI_LOCAL_TARGETS   only these targets (space-separated names), for a quick run
#   CI_LOCAL_ISOLATE_BUILDS=1
#                      each build in its own artifacts dir, as separate runners do
#                      (each then builds the source model again); default: one dir
#   CI_LOCAL_STOP_AFTER  validate | build | pull | eval: stop after that step
#   CI_LOCAL_SEED_STORE=DIR
#                      start each build dir with DIR/store (hard links; e.g. `artifacts`
#                      after `make demo`): built stages are cache hits, as on a runner
#                      with a warm store; register, pull and eval still run for real
#   CI_LOCAL_KEEP=1    keep the temp dir after a successful run
#   CI_LOCAL_PORT      server port (default: a free loopback port)
set -euo pipefail

recipe=${1:-}
bin=${2:-.venv/bin}
if [[ -z "$recipe" ]]; then
  echo "usage: $0 RECIPE [BIN]" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")/.." && pwd)
[[ -d "$bin" ]] || { echo "ci-local: no folder $bin: run make setup" >&2; exit 2; }
[[ -f "$recipe" ]] || { echo "ci-local: no recipe at $recipe" >&2; exit 2; }
# Paths given relative to the caller's folder, before moving to the repository root.
bin=$(cd "$bin" && pwd)
recipe=$(cd "$(dirname "$recipe")" && pwd)/$(basename "$recipe")
[[ -n "${CI_LOCAL_DIR:-}" ]] && { mkdir -p "$CI_LOCAL_DIR"; CI_LOCAL_DIR=$(cd "$CI_LOCAL_DIR" && pwd); }
[[ -n "${QUANTFORGE_ARTIFACTS:-}" ]] && { mkdir -p "$QUANTFORGE_ARTIFACTS"; QUANTFORGE_ARTIFACTS=$(cd "$QUANTFORGE_ARTIFACTS" && pwd); }
[[ -n "${CI_LOCAL_SEED_STORE:-}" ]] && CI_LOCAL_SEED_STORE=$(cd "$CI_LOCAL_SEED_STORE" && pwd)
cd "$here"
qf="$bin/quantforge"
py="$bin/python"
[[ -x "$qf" && -x "$py" ]] || { echo "ci-local: $bin has no quantforge/python: run make setup" >&2; exit 2; }
stop_after=${CI_LOCAL_STOP_AFTER:-}
case "$stop_after" in ""|validate|build|pull|eval) ;; *) echo "ci-local: CI_LOCAL_STOP_AFTER must be validate, build, pull or eval" >&2; exit 2 ;; esac

# The eval job starts with `quantforge pull`: fail now rather than after the builds.
if [[ $stop_after != validate && $stop_after != build ]] && ! "$qf" pull --help >/dev/null 2>&1; then
  echo "ci-local: this quantforge has no 'pull' command, which the eval job needs;" \
    "rehearse up to the builds with CI_LOCAL_STOP_AFTER=build" >&2
  exit 2
fi

# ------------------------------------------------------------------ work dir
temp_work=0
if [[ -n "${CI_LOCAL_DIR:-}" ]]; then
  work=$CI_LOCAL_DIR
elif [[ -n "${QUANTFORGE_ARTIFACTS:-}" ]]; then
  work=$QUANTFORGE_ARTIFACTS/ci-local
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/qf-ci-local.XXXXXX")
  temp_work=1
fi
mkdir -p "$work"
work=$(cd "$work" && pwd)
# Only the folders this script makes are cleared, never the whole of a given dir.
rm -rf "$work/server" "$work/build" "$work"/build-* "$work/build.offline" "$work/eval-cpu" "$work/finalize" "$work/matrix.json" "$work/summary.md" "$work/summary-all.md"
unset QUANTFORGE_ARTIFACTS MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD MLFLOW_TRACKING_TOKEN
export QUANTFORGE_PROMOTE=true  # as on the default branch

# -------------------------------------------------------------- the server
port=${CI_LOCAL_PORT:-$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')}
server_dir="$work/server"
server_pid=""
use_script=0
[[ -f "$here/scripts/mlflow_server.sh" && -z "${CI_LOCAL_INLINE_SERVER:-}" ]] && use_script=1
status=0

stop_server() {
  if [[ $use_script == 1 ]]; then
    bash "$here/scripts/mlflow_server.sh" stop "$server_dir" >/dev/null 2>&1 || true
  elif [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 120); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$server_pid" 2>/dev/null && kill -KILL "$server_pid" 2>/dev/null || true
  fi
}

child=""
finish() {
  local rc=$?
  [[ $status != 0 ]] && rc=$status
  if [[ -n "$child" ]] && kill -0 "$child" 2>/dev/null; then
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  stop_server
  if [[ $rc == 0 && $temp_work == 1 && -z "${CI_LOCAL_KEEP:-}" ]]; then
    rm -rf "$work"
  else
    echo "ci-local: files kept in $work" >&2
  fi
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

t0=$SECONDS
timings=()
run() {  # run CMD...: in the background and wait, so a TERM/INT to this script is handled at once
  "$@" </dev/null &
  child=$!
  local rc=0
  wait "$child" || rc=$?
  child=""
  return "$rc"
}
step() {  # step NAME CMD...: run one workflow step, timed, stop on failure
  local name=$1 s=$SECONDS rc=0
  shift
  echo "==> $name" >&2
  if declare -F "$1" >/dev/null; then
    "$@" || rc=$?  # a function of this script (it may set variables here)
  else
    run "$@" || rc=$?
  fi
  timings+=("$(printf '%-40s %4ds  rc=%s' "$name" $((SECONDS - s)) "$rc")")
  if [[ $rc != 0 ]]; then
    echo "ci-local: step '$name' failed (exit $rc)" >&2
    exit "$rc"
  fi
}
print_timings() {
  echo "ci-local: step timings (total $((SECONDS - t0))s)" >&2
  printf '  %s\n' "${timings[@]}" >&2
}

start_server() {
  mkdir -p "$server_dir/artifacts"
  if [[ $use_script == 1 ]]; then
    MLFLOW_BIN="$bin/mlflow" bash "$here/scripts/mlflow_server.sh" start "$server_dir" "$port"
    return
  fi
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$bin/mlflow" server \
    --backend-store-uri "sqlite:///$server_dir/mlflow.db" \
    --artifacts-destination "$server_dir/artifacts" \
    --host 127.0.0.1 --port "$port" --workers 1 >"$server_dir/server.log" 2>&1 </dev/null &
  server_pid=$!
  for _ in $(seq 1 480); do
    if "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "http://127.0.0.1:$port/health" 2>/dev/null; then
      echo "mlflow server up: http://127.0.0.1:$port (pid $server_pid)"
      return 0
    fi
    kill -0 "$server_pid" 2>/dev/null || { tail -20 "$server_dir/server.log" >&2; return 1; }
    sleep 0.25
  done
  echo "mlflow server did not answer within 120 s" >&2
  return 1
}

# ------------------------------------------------------------------- steps
step "start mlflow server (port $port)" start_server
export MLFLOW_TRACKING_URI="http://127.0.0.1:$port"

# validate job: every shipped recipe, and this one if it lives elsewhere
validate_args=(recipes/*.yaml)
case "$(cd "$(dirname "$recipe")" && pwd)" in "$here/recipes") ;; *) validate_args+=("$recipe") ;; esac
step "validate" "$qf" validate "${validate_args[@]}"
step "plan matrix" bash -c '"$1" scripts/ci_matrix.py "$2" > "$3"' _ "$py" "$recipe" "$work/matrix.json"
if [[ $stop_after == validate ]]; then print_timings; exit 0; fi

mapfile -t targets < <("$py" -c 'import json, sys; [print(e["target"]) for e in json.load(open(sys.argv[1]))["build"]["include"]]' "$work/matrix.json")
name=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["recipes"][0]["name"])' "$work/matrix.json")
mapfile -t devices < <("$py" -c 'import json, sys; [print(e["device"]) for e in json.load(open(sys.argv[1]))["eval"]["include"]]' "$work/matrix.json")
finalize=$("$py" -c 'import json, sys; print("yes" if json.load(open(sys.argv[1]))["has_finalize"] else "no")' "$work/matrix.json")
if [[ -n "${CI_LOCAL_TARGETS:-}" ]]; then
  for t in $CI_LOCAL_TARGETS; do
    [[ " ${targets[*]} " == *" $t "* ]] || { echo "ci-local: CI_LOCAL_TARGETS: $t is not a target of $recipe (${targets[*]})" >&2; exit 2; }
  done
  read -r -a targets <<<"$CI_LOCAL_TARGETS"
fi

seed_store() {  # seed_store DIR: a warm store for a build dir, from $CI_LOCAL_SEED_STORE
  local src=${CI_LOCAL_SEED_STORE:-}
  [[ -n "$src" && ! -d "$1/store" ]] || return 0
  [[ -d "$src/store" ]] || { echo "ci-local: CI_LOCAL_SEED_STORE: no store in $src" >&2; return 2; }
  mkdir -p "$1"
  # Store entries are immutable once committed: hard links are safe and instant.
  cp -al "$src/store" "$1/store" 2>/dev/null || cp -a "$src/store" "$1/store"
  rm -rf "$1/store/.tmp"
}

# build jobs: one per target, each followed by register
for t in "${targets[@]}"; do
  if [[ -n "${CI_LOCAL_ISOLATE_BUILDS:-}" ]]; then bdir="$work/build-$t"; else bdir="$work/build"; fi
  seed_store "$bdir"
  step "build $t" "$qf" build "$recipe" --target "$t" --artifacts-dir "$bdir"
  step "register (build $t)" "$qf" register "$recipe" --artifacts-dir "$bdir"
done
if [[ $stop_after == build ]]; then print_timings; exit 0; fi

summarize() {  # summarize REPORT OUT ARGS...: the workflow's summary step
  local report=$1 out=$2
  shift 2
  "$py" scripts/ci_summary.py "$report" "$@" >"$out"
  if [[ -n "${GITHUB_STEP_SUMMARY:-}" ]]; then cat "$out" >>"$GITHUB_STEP_SUMMARY"; fi
  cat "$out"
}

# eval job for the cpu device, on a "fresh runner": nothing but what pull brings.
# The build folders go out of reach first, as the build runners' disks are in CI:
# a report path that still pointed there would otherwise hide a missing download.
for b in "$work/build" "$work"/build-*; do
  if [[ -d "$b" && "$b" != *.offline ]]; then mv "$b" "$b.offline"; fi
done
if [[ " ${devices[*]} " != *" cpu "* ]]; then
  echo "ci-local: $recipe does not evaluate on cpu (devices: ${devices[*]}); no eval job runs here" >&2
else
  edir="$work/eval-cpu"
  step "pull (eval cpu)" "$qf" pull "$recipe" --artifacts-dir "$edir"
  if [[ $stop_after == pull ]]; then print_timings; exit 0; fi
  eval_rc=0
  echo "==> eval --device cpu" >&2
  s=$SECONDS
  run "$qf" eval "$recipe" --device cpu --fail-on-gate --artifacts-dir "$edir" || eval_rc=$?
  timings+=("$(printf '%-40s %4ds  rc=%s' "eval --device cpu" $((SECONDS - s)) "$eval_rc")")
  if [[ $eval_rc != 0 && $eval_rc != 3 ]]; then
    echo "ci-local: step 'eval --device cpu' failed (exit $eval_rc)" >&2
    exit "$eval_rc"
  fi
  [[ $eval_rc == 3 ]] && echo "ci-local: a gate failed on cpu: registering the results, then exiting 3" >&2
  if [[ $stop_after == eval ]]; then print_timings; status=$eval_rc; exit "$eval_rc"; fi
  step "register (eval cpu)" "$qf" register "$recipe" --artifacts-dir "$edir"
  step "summary (eval cpu)" summarize "$edir/$name/report.json" "$work/summary.md" --device cpu --title "eval $name on cpu"
  status=$eval_rc
fi

# finalize job: only for recipes whose gates need several devices
if [[ $finalize == yes ]]; then
  fdir="$work/finalize"
  step "pull (finalize)" "$qf" pull "$recipe" --artifacts-dir "$fdir"
  step "register (finalize)" "$qf" register "$recipe" --artifacts-dir "$fdir"
  step "summary (finalize)" summarize "$fdir/$name/report.json" "$work/summary-all.md" --title "$name on every device"
  others=()
  for d in "${devices[@]}"; do [[ $d == cpu ]] || others+=("$d"); done
  echo "ci-local: ${others[*]} stay pending here: their runners evaluate them in CI" >&2
fi

print_timings
exit "$status"
