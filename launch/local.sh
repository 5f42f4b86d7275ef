#!/usr/bin/env bash
# Starts N real JAX processes on this machine (loopback, gloo CPU collectives), the same
# multi-host code path as a TPU pod or a GPU cluster.
#
#   launch/local.sh N [--dry-run] --config=configs/X.py[:ARGS] --workdir=DIR [--config.FIELD=V ...]
#   launch/local.sh 2 --config=configs/fashion_mnist.py --workdir=runs/two --config.num_train_steps=20
#
# Environment: LOCAL_DEVICES (simulated CPU devices per process, default 2), LOCAL_XLA_FLAGS
# (extra XLA flags for every process), PORT (coordinator port, default: a free one), LOGDIR
# (per-process logs, default WORKDIR/logs or ./logs), PYTHON (default: .venv/bin/python if
# present, else python3), SASA_HEARTBEAT_TIMEOUT (seconds before survivors fail when a
# process dies, default 30). Prints each process's command; waits for every process; if one
# fails, stops the others and exits with its status; TERM/INT reach every process (they
# save one agreed step) and the script waits for them.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
N=$1; shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: N must be a positive integer, got '$N'" >&2; exit 2; }
DRY_RUN=0
ARGS=()
WORKDIR=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --workdir=*) WORKDIR="${a#--workdir=}"; ARGS+=("$a") ;;
    *) ARGS+=("$a") ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}
command -v "$PYTHON" >/dev/null 2>&1 || { echo "local.sh: python not found: $PYTHON" >&2; exit 127; }
PORT=${PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOGDIR=${LOGDIR:-${WORKDIR:+$WORKDIR/logs}}
LOGDIR=${LOGDIR:-logs}
DEVICES=${LOCAL_DEVICES:-2}

cmd_for() {  # the exact command of process $1, shell-quoted
  printf 'env JAX_PLATFORMS=cpu XLA_FLAGS=%q ' \
    "--xla_force_host_platform_device_count=$DEVICES${LOCAL_XLA_FLAGS:+ $LOCAL_XLA_FLAGS}"
  printf 'SASA_COORDINATOR_ADDRESS=127.0.0.1:%s SASA_NUM_PROCESSES=%s SASA_PROCESS_ID=%s ' "$PORT" "$N" "$1"
  printf 'SASA_HEARTBEAT_TIMEOUT=%s ' "${SASA_HEARTBEAT_TIMEOUT:-30}"
  printf '%q ' "$PYTHON" -m sasa_jax.main "${ARGS[@]}"
}

if [[ $DRY_RUN == 1 ]]; then
  for ((i = 0; i < N; i++)); do echo "$(cmd_for "$i")> $LOGDIR/process_$i.log 2>&1 &"; done
  exit 0
fi

mkdir -p "$LOGDIR"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap 'cleanup; wait; exit 143' TERM INT  # the processes save first
cd "$ROOT"
for ((i = 0; i < N; i++)); do
  echo "local.sh: process $i: $(cmd_for "$i")"
  # exec: the recorded pid is the training process itself, so signals reach it directly.
  { eval "exec $(cmd_for "$i")"; } > "$LOGDIR/process_$i.log" 2>&1 &
  PIDS+=($!)
done
echo "local.sh: started $N processes (pids ${PIDS[*]}), coordinator 127.0.0.1:$PORT, logs in $LOGDIR"
STATUS=0
for ((left = N; left > 0; left--)); do
  # Any of this script's jobs (the N processes alone): naming their pids would name reaped ones.
  set +e; wait -n; rc=$?; set -e
  if [[ $rc -ne 0 ]]; then
    echo "local.sh: a process exited with status $rc; stopping the others (see $LOGDIR)" >&2
    STATUS=$rc
    cleanup
    wait 2>/dev/null || true
    break
  fi
done
exit $STATUS
