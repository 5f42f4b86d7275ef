#!/usr/bin/env bash
# Runs sasa_jax on every worker of a Cloud TPU VM pod slice.
#
#   TPU_NAME=sasa ZONE=europe-west4-a WORKDIR=gs://B/sasa/r50 TFDS_DATA_DIR=gs://B/tfds \
#     launch/tpu_pod.sh [--create] [--dry-run] --config=configs/imagenet.py:depth=50,variant=full_attention
#
# Environment: TPU_NAME, ZONE, WORKDIR (gs://), TFDS_DATA_DIR (gs://, holds imagenet2012/)
# required; PROJECT, ACCELERATOR_TYPE (default v3-128), RUNTIME_VERSION (default
# tpu-ubuntu2204-base), REPO (git URL to clone on the workers; default: copy this checkout
# with scp), LOGDIR (default ./logs/TPU_NAME). Flags after the options go to sasa_jax.main.
# --create creates the slice first. Every worker's output is collected in LOGDIR/worker_N.log.
# jax.distributed picks up the pod's topology by itself; a preempted slice is restarted by
# running this script again: the run resumes from the last checkpoint in WORKDIR.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
CREATE=0; DRY_RUN=0; ARGS=()
for a in "$@"; do
  case "$a" in
    -h|--help) usage; exit 0 ;;
    --create) CREATE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    *) ARGS+=("$a") ;;
  esac
done
for v in TPU_NAME ZONE WORKDIR TFDS_DATA_DIR; do
  [[ -n "${!v:-}" ]] || { echo "tpu_pod.sh: environment variable $v is required (see --help)" >&2; exit 2; }
done
if [[ $DRY_RUN == 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  echo "tpu_pod.sh: gcloud not found: install the Google Cloud SDK (https://cloud.google.com/sdk)" >&2
  exit 127
fi
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v3-128}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
LOGDIR=${LOGDIR:-logs/$TPU_NAME}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GC=(gcloud compute tpus tpu-vm)
PROJ=(); [[ -n "${PROJECT:-}" ]] && PROJ=(--project="$PROJECT")
WHERE=(--zone="$ZONE" "${PROJ[@]}")

run() {  # prints the command; runs it unless --dry-run
  printf '%q ' "$@"; echo
  [[ $DRY_RUN == 1 ]] || "$@"
}

TRAIN=$(printf '%q ' python3 -m sasa_jax.main --workdir="$WORKDIR" \
  --config.dataset.data_dir="$TFDS_DATA_DIR" "${ARGS[@]}")

if [[ $CREATE == 1 ]]; then
  run "${GC[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION"
fi
if [[ -n "${REPO:-}" ]]; then
  SETUP="rm -rf sasa_jax_src && git clone --depth 1 $(printf '%q' "$REPO") sasa_jax_src"
else
  run "${GC[@]}" scp --recurse "$ROOT" "$TPU_NAME":sasa_jax_src --worker=all "${WHERE[@]}"
  SETUP="true"
fi
SETUP="$SETUP && cd sasa_jax_src && python3 -m pip install -q -e '.[tpu]'"
run "${GC[@]}" ssh "$TPU_NAME" --worker=all "${WHERE[@]}" --command="$SETUP"
[[ $DRY_RUN == 1 ]] || mkdir -p "$LOGDIR"
# One ssh per worker so that each worker's output lands in its own log.
WORKERS=${NUM_WORKERS:-$([[ $DRY_RUN == 1 ]] && echo 1 || \
  "${GC[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format='value(networkEndpoints.len())')}
PIDS=()
for ((w = 0; w < WORKERS; w++)); do
  if [[ $DRY_RUN == 1 ]]; then
    run "${GC[@]}" ssh "$TPU_NAME" --worker="$w" "${WHERE[@]}" --command="cd sasa_jax_src && $TRAIN"
  else
    "${GC[@]}" ssh "$TPU_NAME" --worker="$w" "${WHERE[@]}" \
      --command="cd sasa_jax_src && $TRAIN" > "$LOGDIR/worker_$w.log" 2>&1 &
    PIDS+=($!)
  fi
done
STATUS=0
for p in "${PIDS[@]}"; do wait "$p" || STATUS=$?; done
[[ $DRY_RUN == 1 ]] || echo "tpu_pod.sh: workers finished (status $STATUS); logs in $LOGDIR"
exit $STATUS
