#!/usr/bin/env bash
# Runs sasa_jax on every worker of a Cloud TPU VM slice, detached from this shell.
#
#   TPU_NAME=sasa ZONE=us-central2-b WORKDIR=gs://B/sasa/r50 TFDS_DATA_DIR=gs://B/tfds \
#     launch/tpu_pod.sh [--create] [--dry-run] --config=configs/imagenet.py:depth=50,variant=full_attention
#   TPU_NAME=sasa ZONE=us-central2-b launch/tpu_pod.sh --status | --logs [--worker=N] | --stop | --check
#
# Start (the default): ships the tracked files of this checkout to every worker (a re-run
# replaces the old copy by renaming), gives each worker Python PYTHON_VERSION in ~/sasa_venv
# (uv; Cloud TPU VM images ship 3.10, jax needs >= 3.11), installs the package with its
# [PIP_EXTRAS] and starts training with nohup/setsid: it survives a dropped ssh connection.
# --status: running or not, and the last log lines, per worker. --logs: a worker's log tail.
# --stop: SIGTERM to every worker (they save one agreed step and exit), waits for the exit.
# --check: prints each worker's process index, process count and devices (jax.distributed).
# --create: creates the slice first. --dry-run: prints every command, runs none.
# Required: TPU_NAME, ZONE; to start also WORKDIR and TFDS_DATA_DIR (gs://, shared by all
# workers). Optional: PROJECT, ACCELERATOR_TYPE (default v4-32), RUNTIME_VERSION (default:
# the one for the accelerator generation), SPOT=1 (a Spot slice), PYTHON_VERSION (3.11),
# PIP_EXTRAS (tpu), HANG_RESTARTS (default 2: a run that hangs starts again that often,
# launch/restart_when_hung.sh). After a preemption, run the same start command again: it resumes.
# Before creating or starting anything, `python -m sasa_jax.tools.preflight` checks the config
# for the slice's chips, the dataset and the workdir here, and with --create (or PLAN_MEMORY=1)
# the step's memory on one chip, where libtpu is installed here (PYTHON; PREFLIGHT=0 skips it).
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }
ACTION=start; CREATE=0; DRY_RUN=0; WORKER=0; ARGS=()
for a in "$@"; do
  case "$a" in
    -h|--help) usage; exit 0 ;;
    --create) CREATE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --status|--stop|--logs|--check) ACTION=${a#--} ;;
    --worker=*) WORKER=${a#--worker=} ;;
    *) ARGS+=("$a") ;;
  esac
done
need=(TPU_NAME ZONE)
[[ $ACTION == start ]] && need+=(WORKDIR TFDS_DATA_DIR)
missing=()
for v in "${need[@]}"; do [[ -n "${!v:-}" ]] || missing+=("$v"); done
if (( ${#missing[@]} )); then
  echo "tpu_pod.sh: environment variable(s) ${missing[*]} required (see --help)" >&2; exit 2
fi
if [[ $ACTION == start && " ${ARGS[*]:-} " != *" --config="* ]]; then
  echo "tpu_pod.sh: --config=configs/X.py[:args] is required to start a run (see --help)" >&2; exit 2
fi
if [[ $DRY_RUN == 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  echo "tpu_pod.sh: gcloud not found: install the Google Cloud SDK (https://cloud.google.com/sdk)" >&2
  exit 127
fi
if [[ $ACTION == start && $WORKDIR != gs://* ]]; then
  echo "tpu_pod.sh: warning: WORKDIR=$WORKDIR is not gs://; every worker must see the same directory" >&2
fi

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
GENERATION=${ACCELERATOR_TYPE%%-*}
SIZE=${ACCELERATOR_TYPE##*-}
# Runtime image, hosts and JAX devices of each generation (the suffix counts TensorCores up to
# v5p, whose two cores per chip are one device, and chips from v5e on).
case "$GENERATION" in
  v2|v3) DEFAULT_RUNTIME=tpu-ubuntu2204-base; WORKERS=$(( (SIZE + 7) / 8 )); DEVICES=$SIZE ;;
  v4) DEFAULT_RUNTIME=tpu-ubuntu2204-base; WORKERS=$(( (SIZE + 7) / 8 )); DEVICES=$(( SIZE / 2 )) ;;
  v5p) DEFAULT_RUNTIME=v2-alpha-tpuv5; WORKERS=$(( (SIZE + 7) / 8 )); DEVICES=$(( SIZE / 2 )) ;;
  v5litepod) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite; WORKERS=$(( SIZE <= 8 ? 1 : SIZE / 4 )); DEVICES=$SIZE ;;
  v6e) DEFAULT_RUNTIME=v2-alpha-tpuv6e; WORKERS=$(( SIZE <= 8 ? 1 : SIZE / 4 )); DEVICES=$SIZE ;;
  *) echo "tpu_pod.sh: ACCELERATOR_TYPE=$ACCELERATOR_TYPE is not one of v2-N, v3-N, v4-N, v5p-N, v5litepod-N, v6e-N" >&2; exit 2 ;;
esac
RUNTIME_VERSION=${RUNTIME_VERSION:-$DEFAULT_RUNTIME}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
PIP_EXTRAS=${PIP_EXTRAS-tpu}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GC=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && WHERE+=(--project="$PROJECT")

run() {  # prints the command; runs it unless --dry-run
  printf '%q ' "$@"; echo
  [[ $DRY_RUN == 1 ]] || "$@"
}
on_workers() {  # on_workers WORKER|all SCRIPT: runs SCRIPT with bash on the worker(s)
  local script=${2//$'\n'/; }  # one line: the printed command stays copy-pasteable
  run "${GC[@]}" ssh "$TPU_NAME" --worker="$1" "${WHERE[@]}" --command="bash -c $(printf '%q' "$script")"
}

PIDFILE='$HOME/sasa_run.pid'
LOG='$HOME/sasa_logs/train.log'
ALIVE="[ -f $PIDFILE ] && kill -0 \$(cat $PIDFILE) 2>/dev/null"
case "$ACTION" in
  status)
    on_workers all "if $ALIVE; then echo \"\$(hostname): running (pid \$(cat $PIDFILE))\"; else echo \"\$(hostname): not running\"; fi; tail -n 3 $LOG 2>/dev/null || true"
    exit ;;
  logs)
    on_workers "$WORKER" "tail -n ${LINES:-100} $LOG"
    exit ;;
  stop)
    on_workers all "if $ALIVE; then kill -TERM \$(cat $PIDFILE); for i in \$(seq 600); do $ALIVE || break; sleep 1; done; fi; if $ALIVE; then echo \"\$(hostname): still running\"; exit 1; else echo \"\$(hostname): stopped\"; tail -n 2 $LOG; fi"
    exit ;;
  check)
    on_workers all "cd ~/sasa_jax && ~/sasa_venv/bin/python -m sasa_jax.distributed"
    exit ;;
esac

source "$ROOT/launch/preflight.bash"
# With --create (or PLAN_MEMORY=1) the step's memory is planned for one chip of the
# generation too: a compile of the whole step here, a minute or more for a ResNet-50.
case "$GENERATION" in v5litepod) CHIP=v5e ;; v4|v5p|v6e) CHIP=$GENERATION ;; *) CHIP= ;; esac
[[ $CREATE == 1 || ${PLAN_MEMORY:-0} == 1 ]] || CHIP=
[[ $DRY_RUN == 1 ]] || preflight tpu_pod.sh "$DEVICES" "${ARGS[@]}" --workdir="$WORKDIR" \
  --config.dataset.data_dir="$TFDS_DATA_DIR" ${CHIP:+--tpu=$CHIP}
if [[ $CREATE == 1 ]]; then
  run "${GC[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" ${SPOT:+--spot}
fi
# Ship the tracked files only (as they are in the working tree), never .venv or runs/.
TARBALL=$(mktemp -d)/sasa_jax.tgz
[[ $DRY_RUN == 1 ]] || (cd "$ROOT" && git ls-files -z | tar --null -czf "$TARBALL" -T -)
run "${GC[@]}" scp "$TARBALL" "$TPU_NAME":sasa_jax.tgz --worker=all "${WHERE[@]}"
EXTRAS=${PIP_EXTRAS:+[$PIP_EXTRAS]}
SETUP="set -e
if $ALIVE; then echo \"\$(hostname): a run is going (pid \$(cat $PIDFILE)); stop it first (--stop)\"; exit 1; fi
rm -rf ~/sasa_jax.next && mkdir ~/sasa_jax.next && tar xzf ~/sasa_jax.tgz -C ~/sasa_jax.next
rm -rf ~/sasa_jax.prev; if [ -d ~/sasa_jax ]; then mv ~/sasa_jax ~/sasa_jax.prev; fi; mv ~/sasa_jax.next ~/sasa_jax
export PATH=\$HOME/.local/bin:\$PATH
command -v uv >/dev/null || python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv
[ -x ~/sasa_venv/bin/python ] || uv venv -q --python $PYTHON_VERSION ~/sasa_venv
uv pip install -q --python ~/sasa_venv/bin/python -e \"\$HOME/sasa_jax$EXTRAS\"
echo \"\$(hostname): code and Python ready (\$(~/sasa_venv/bin/python --version))\""
on_workers all "$SETUP"
TRAIN=$(printf '%q ' -m sasa_jax.main "${ARGS[@]}" --workdir="$WORKDIR" \
  --config.dataset.data_dir="$TFDS_DATA_DIR")
START="mkdir -p ~/sasa_logs && cd ~/sasa_jax
nohup setsid launch/restart_when_hung.sh ${HANG_RESTARTS:-2} ~/sasa_venv/bin/python $TRAIN >> $LOG 2>&1 < /dev/null & echo \$! > $PIDFILE
echo \"\$(hostname): started pid \$(cat $PIDFILE); log $LOG\""
echo "# every one of the $WORKERS workers of $ACCELERATOR_TYPE ($RUNTIME_VERSION, $DEVICES JAX devices) runs: python $TRAIN"
on_workers all "$START"
[[ $DRY_RUN == 1 ]] || echo "tpu_pod.sh: started; follow with --status, --logs [--worker=N]; stop with --stop"
