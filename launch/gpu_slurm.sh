#!/usr/bin/env bash
# Submits sasa_jax to a SLURM GPU cluster: one process per node (all its GPUs) or per GPU.
#
#   NODES=4 GPUS_PER_NODE=8 WORKDIR=/shared/sasa/r50 TFDS_DATA_DIR=/shared/tfds \
#     launch/gpu_slurm.sh [--per-gpu] [--dry-run] --config=configs/imagenet.py:depth=50
#
# Required: NODES, GPUS_PER_NODE, WORKDIR (shared by all nodes: a path, or a gs:// URL with
# LOGDIR set). Optional: LOGDIR (default WORKDIR/logs; a directory all nodes share),
# TFDS_DATA_DIR, PARTITION, ACCOUNT, TIME (default 24:00:00), CPUS_PER_TASK (default 8 per
# GPU of a task), MEM (default 0: all of each node's memory), TIME_WARNING (seconds before
# the limit at which the ranks save and the job requeues itself, default 300), JOB_NAME
# (default sasa_ + the WORKDIR's last part + a hash of WORKDIR), PYTHON (default python3 on
# the nodes). One job of a name runs at a time (--dependency=singleton): a second submission
# for the same WORKDIR waits for the first. --dry-run prints the batch script, submits nothing.
# At the time limit the job saves a checkpoint, requeues itself and resumes where it stopped;
# `scancel --signal=TERM JOBID` saves and ends it. A run that hangs (no progress for the
# config's hang_timeout_s: every rank exits with status 75) starts again in the same
# allocation, up to HANG_RESTARTS times (default 2). Logs: LOGDIR/JOB_JOBID_rankN.log (one
# per rank, lines labelled, appended across requeues) and LOGDIR/JOB_JOBID.batch.log.
# Before submitting, `python -m sasa_jax.tools.preflight` checks the config for NODES x
# GPUS_PER_NODE GPUs, the dataset and the workdir here (PYTHON; PREFLIGHT=0 skips it); with
# GPU_TYPE (h100, h200 or a100) also the training step's memory on one such GPU, compiled
# here by jax's CUDA plugin with no GPU (`make gpu-compiler`; a ResNet-50 step takes minutes).
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }
PER_GPU=0; DRY_RUN=0; ARGS=()
for a in "$@"; do
  case "$a" in
    -h|--help) usage; exit 0 ;;
    --per-gpu) PER_GPU=1 ;;
    --dry-run) DRY_RUN=1 ;;
    *) ARGS+=("$a") ;;
  esac
done
missing=()
for v in NODES GPUS_PER_NODE WORKDIR; do [[ -n "${!v:-}" ]] || missing+=("$v"); done
if (( ${#missing[@]} )); then
  echo "gpu_slurm.sh: environment variable(s) ${missing[*]} required (see --help)" >&2; exit 2
fi
LAST=${WORKDIR%/}; LAST=${LAST##*/}  # the WORKDIR's last part, as basename gives it
if [[ "$WORKDIR" == *://* && -z "${LOGDIR:-}" ]]; then
  echo "gpu_slurm.sh: WORKDIR=$WORKDIR is a URL, and SLURM writes its logs to files: set LOGDIR to a directory that every node shares (LOGDIR=\$HOME/sasa_logs/$LAST, say)" >&2; exit 2
fi
LOGDIR=${LOGDIR:-$WORKDIR/logs}
[[ " ${ARGS[*]:-} " == *" --config="* ]] || { echo "gpu_slurm.sh: --config=configs/X.py[:args] is required (see --help)" >&2; exit 2; }
if [[ $DRY_RUN == 0 ]] && ! command -v sbatch >/dev/null 2>&1; then
  echo "gpu_slurm.sh: sbatch not found: run on a SLURM login node, or use the plain multi-node form in docs/scaling_out.md" >&2
  exit 127
fi
TASKS_PER_NODE=$([[ $PER_GPU == 1 ]] && echo "$GPUS_PER_NODE" || echo 1)
GPUS_PER_TASK=$(( GPUS_PER_NODE / TASKS_PER_NODE ))
CPUS=${CPUS_PER_TASK:-$(( 8 * GPUS_PER_TASK ))}
NAME=${JOB_NAME:-sasa_${LAST//[^A-Za-z0-9_.-]/_}_$(printf '%s' "$WORKDIR" | md5sum | cut -c1-6)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# --config first: ml_collections rejects --config.X before --config.
TRAIN=$(printf '%q ' "${PYTHON:-python3}" -m sasa_jax.main "${ARGS[@]}" --workdir="$WORKDIR" \
  ${TFDS_DATA_DIR:+--config.dataset.data_dir="$TFDS_DATA_DIR"})
LOGS=$(printf '%q' "$LOGDIR")
SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=$NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$TASKS_PER_NODE
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --cpus-per-task=$CPUS
#SBATCH --mem=${MEM:-0}
#SBATCH --time=${TIME:-24:00:00}
#SBATCH --output=$LOGDIR/%x_%j.batch.log
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@${TIME_WARNING:-300}
#SBATCH --requeue
#SBATCH --dependency=singleton
$([[ -n "${PARTITION:-}" ]] && echo "#SBATCH --partition=$PARTITION")
$([[ -n "${ACCOUNT:-}" ]] && echo "#SBATCH --account=$ACCOUNT")
set -u
cd $(printf '%q' "$ROOT")
echo \"[\$(date -Is)] job \$SLURM_JOB_ID starts on \$SLURM_JOB_NODELIST (restart \${SLURM_RESTART_COUNT:-0})\"
# Near the time limit SLURM sends USR1 here: every rank saves (TERM), then the job requeues.
requeue=0
trap 'echo \"[\$(date -Is)] time limit near: ranks save, then the job requeues\"; requeue=1; scancel --signal=TERM \$SLURM_JOB_ID' USR1
hung_restarts=0
while :; do
  srun --kill-on-bad-exit=1 --label --open-mode=append --output=$LOGS/%x_%j_rank%t.log \\
    $TRAIN &
  srun_pid=\$!
  rc=0
  while kill -0 \$srun_pid 2>/dev/null; do wait \$srun_pid && rc=0 || rc=\$?; done
  echo \"[\$(date -Is)] ranks exited with status \$rc\"
  # 75: the run hung (no progress for hang_timeout_s): start it again in this allocation.
  [[ \$rc == 75 && \$requeue == 0 && \$hung_restarts -lt ${HANG_RESTARTS:-2} ]] || break
  hung_restarts=\$((hung_restarts + 1))
  echo \"[\$(date -Is)] the run hung: starting it again (\$hung_restarts of ${HANG_RESTARTS:-2}), from its last checkpoint\"
done
if [[ \$requeue == 1 && \$rc == 0 ]]; then scontrol requeue \$SLURM_JOB_ID; fi
exit \$rc"
SCRIPT=$(echo "$SCRIPT" | sed '/^$/d')
echo "gpu_slurm.sh: every rank runs: $TRAIN"
if [[ $DRY_RUN == 1 ]]; then
  echo "$SCRIPT"
  echo "# submit with: sbatch <this script>"
  exit 0
fi
source "$ROOT/launch/preflight.bash"
preflight gpu_slurm.sh $(( NODES * GPUS_PER_NODE )) "${ARGS[@]}" --workdir="$WORKDIR" \
  ${TFDS_DATA_DIR:+--config.dataset.data_dir="$TFDS_DATA_DIR"} ${GPU_TYPE:+--gpu="$GPU_TYPE"}
mkdir -p "$LOGDIR"
echo "$SCRIPT" | sbatch
