#!/usr/bin/env bash
# System test of the docker-compose federation: build the image, run passive + assistant +
# active + the one-shot demo client, and pass only if the demo's held-out AUC is >= MIN_AUC.
# The stack (containers, network, the parties' volumes) is always taken down.
#
#   bash tests/system/test_compose.sh          (or: make test-compose)
#
# Environment: MIN_AUC (0.99), TIMEOUT_S (900, for `up`), VFL_KEY_BITS (2048),
# VFL_ACTIVE_HOST_PORT (default: a free port, so a local run on 50051 does not clash),
# COMPOSE_FILE and SERVICES (default docker-compose.yml with "passive assistant active demo";
# the two-passive federation: COMPOSE_FILE=docker-compose.parties.yml SERVICES="b1 b2 active demo";
# the Ray profile: COMPOSE_FILE=docker-compose.yml:docker-compose.ray.yml), EXPECT_LOG ("service:text"),
# RAY_ISOLATION (1: check that no party reaches another's Ray cluster).
# METRICS_CHECK (1: after the demo, A is started again and must serve vfl_rpc_duration_seconds
# on VFL_ACTIVE_METRICS_HOST_PORT; the other *_METRICS_HOST_PORT default to free ports too).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MIN_AUC=${MIN_AUC:-0.99}
TIMEOUT_S=${TIMEOUT_S:-900}
# A project name of its own: its containers, network and volumes cannot clash with `make up`
# or with another run of this test.
PROJECT="vflsystest$$"
LOG_DIR="$(mktemp -d)"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
if [ -z "${VFL_ACTIVE_HOST_PORT:-}" ]; then
  VFL_ACTIVE_HOST_PORT=$(free_port)
fi
export VFL_ACTIVE_HOST_PORT
# The metrics ports the compose files publish (docs/METRICS.md): free ones too, unless given.
for var in VFL_ACTIVE_METRICS_HOST_PORT VFL_PASSIVE_METRICS_HOST_PORT VFL_ASSISTANT_METRICS_HOST_PORT \
  VFL_B1_METRICS_HOST_PORT VFL_B2_METRICS_HOST_PORT; do
  [ -n "${!var:-}" ] || printf -v "$var" '%s' "$(free_port)"
  export "${var?}"
done

COMPOSE_FILE=${COMPOSE_FILE:-docker-compose.yml}
read -r -a SERVICES <<<"${SERVICES:-passive assistant active demo}"
# COMPOSE_FILE may list overrides, colon-separated as docker-compose reads it (base first).
COMPOSE=(docker-compose --project-directory "$ROOT")
IFS=: read -r -a FILES <<<"$COMPOSE_FILE"
for f in "${FILES[@]}"; do COMPOSE+=(-f "$ROOT/$f"); done
COMPOSE+=(-p "$PROJECT")
compose() { "${COMPOSE[@]}" "$@"; }
log() { printf '[test_compose %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    log "FAILED (exit $rc); last service logs:"
    compose logs --no-color --tail=40 >&2 2>/dev/null || true
  fi
  log "docker-compose down -v"
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$LOG_DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v docker-compose >/dev/null || { log "docker-compose not found"; exit 1; }
docker info >/dev/null 2>&1 || { log "docker engine not reachable (docker info failed)"; exit 1; }

t0=$SECONDS
log "building the image (project $PROJECT)"
compose build >"$LOG_DIR/build.log" 2>&1 || { tail -n 40 "$LOG_DIR/build.log" >&2; exit 1; }
build_s=$((SECONDS - t0))
log "built in ${build_s} s"

t1=$SECONDS
log "docker-compose -f $COMPOSE_FILE up (${SERVICES[*]}); active published on 127.0.0.1:$VFL_ACTIVE_HOST_PORT"
# --exit-code-from demo implies --abort-on-container-exit: the demo's exit ends the run, and
# a service that dies first ends it too (with a non-zero code). The services are named so that
# compose attaches to them and not to the one-shot `certs` service (started as their dependency),
# whose successful exit would otherwise end the run.
set +e
timeout "$TIMEOUT_S" "${COMPOSE[@]}" up --no-build --no-color --abort-on-container-exit --exit-code-from demo \
  "${SERVICES[@]}" >"$LOG_DIR/up.log" 2>&1
up_rc=$?
set -e
run_s=$((SECONDS - t1))

# The demo's own output (without the other services' logs), less compose's "demo_1 | " prefix
# and its "Attaching to" line; the last line is "AUC 0.xxxx".
compose logs --no-color demo | sed -nE 's/^[^|]*\| ?//p' >"$LOG_DIR/demo.log"
echo "---- demo output ----"
cat "$LOG_DIR/demo.log"
echo "---------------------"

if [ "$up_rc" -ne 0 ]; then
  [ "$up_rc" -eq 124 ] && log "timed out after ${TIMEOUT_S} s"
  tail -n 60 "$LOG_DIR/up.log" >&2
  log "docker-compose up exited $up_rc"
  exit 1
fi

auc=$(grep -oE 'AUC [0-9]+\.[0-9]+' "$LOG_DIR/demo.log" | tail -n 1 | cut -d' ' -f2 || true)
if [ -z "$auc" ]; then
  log "no 'AUC x.xxxx' line in the demo output"
  exit 1
fi

# EXPECT_LOG="service:text": the service's log must contain the text (e.g. that the crypto
# ran on the party's Ray workers).
if [ -n "${EXPECT_LOG:-}" ]; then
  svc=${EXPECT_LOG%%:*}
  text=${EXPECT_LOG#*:}
  if ! compose logs --no-color "$svc" | grep -qF -- "$text"; then
    log "the $svc log has no line with: $text"
    exit 1
  fi
  echo "$svc log: $(compose logs --no-color "$svc" | grep -F -- "$text" | tail -n 1 | sed -E 's/^[^|]*\| ?//')"
fi

# METRICS_CHECK=1 (default): A serves Prometheus metrics on its published port, with the
# per-RPC histogram fed (the healthcheck's calls count), once it is up again.
if [ "${METRICS_CHECK:-1}" = 1 ]; then
  compose up -d --no-build active >/dev/null 2>&1 || { log "could not start active again for the metrics check"; exit 1; }
  url="http://127.0.0.1:$VFL_ACTIVE_METRICS_HOST_PORT/metrics"
  found=""
  for _ in $(seq 1 60); do
    if python3 -c 'import sys, urllib.request; t = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(); sys.exit(0 if "vfl_rpc_duration_seconds_count{" in t else 1)' "$url" 2>/dev/null; then
      found=1
      break
    fi
    sleep 2
  done
  if [ -z "$found" ]; then
    log "no vfl_rpc_duration_seconds samples at $url"
    exit 1
  fi
  echo "metrics: vfl_rpc_duration_seconds served by active at $url"
  compose stop >/dev/null 2>&1 || true
fi

# RAY_ISOLATION=1 (the Ray profile): the red-team check that no other party reaches a party's
# Ray cluster (whoever reaches it runs code beside the party's keys). With the heads up again,
# each party's own service reaches its head (the control: the probe can succeed), and neither the
# other data party nor the assistant reaches it, by name or at all.
if [ "${RAY_ISOLATION:-0}" = 1 ]; then
  compose up -d --no-build passive-ray-head active-ray-head >/dev/null 2>&1
  probe() {  # service, host: exit 0 if a TCP connection to host:10001 and host:6379 opens
    compose run --rm --no-deps -T --entrypoint python "$1" -c '
import socket, sys
for port in (10001, 6379):
    try:
        socket.create_connection((sys.argv[1], port), 3).close()
    except OSError as exc:
        print(f"{sys.argv[1]}:{port} unreachable ({type(exc).__name__})")
        sys.exit(1)
print(f"{sys.argv[1]}: reachable")
' "$2" 2>/dev/null
  }
  # The control, retried while the heads start (their Ray Client server opens a few seconds after).
  for pair in passive:passive-ray-head active:active-ray-head; do
    for try in $(seq 1 20); do
      probe "${pair%%:*}" "${pair#*:}" && break
      [ "$try" -lt 20 ] || { log "${pair%%:*} cannot reach its own Ray head"; exit 1; }
      sleep 3
    done
  done
  ip_of() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "$(compose ps -q "$1")" | awk '{print $1}'; }
  passive_ip=$(ip_of passive-ray-head)
  active_ip=$(ip_of active-ray-head)
  probe passive "$passive_ip" || { log "passive cannot reach its own Ray head at $passive_ip"; exit 1; }
  for pair in active:passive-ray-head "active:$passive_ip" assistant:passive-ray-head "assistant:$passive_ip" \
      passive:active-ray-head "passive:$active_ip" assistant:active-ray-head "assistant:$active_ip"; do
    if probe "${pair%%:*}" "${pair#*:}"; then
      log "${pair%%:*} reaches ${pair#*:}: another party's Ray cluster is reachable"
      exit 1
    fi
  done
  echo "Ray isolation: each party reaches only its own Ray head"
fi

echo "AUC $auc (min $MIN_AUC)"
echo "image build ${build_s} s, federation run ${run_s} s, total $((SECONDS - t0)) s"
if ! python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) >= float(sys.argv[2]) else 1)' "$auc" "$MIN_AUC"; then
  log "AUC $auc is below $MIN_AUC"
  exit 1
fi
echo "test_compose: PASS"
