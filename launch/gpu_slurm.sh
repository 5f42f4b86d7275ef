#!/usr/bin/env bash
# Submits sasa_jax to a SLURM GPU cluster: one process per node (all its GPUs) or per GPU.
#
#   NODES=4 GPUS_PER_NODE=8 PARTITION=gpu TIME=72:00:00 WORKDIR=/shared/sasa/r50 \
#     launch/gpu_slurm.sh [--per-gpu] [--dry-run] --config=configs/imagenet.py:depth=50
#
# Environment: NODES, GPUS_PER_NODE, WORKDIR required; PARTITION, TIME (default 24:00:00),
# ACCOUNT, PYTHON (default python3 on the nodes), TFDS_DATA_DIR. jax.distributed.initialize()
# reads SLURM's environment (SLURM_NTASKS > 1) by itself. --dry-run prints the sbatch script.
#
# Without SLURM (any cluster): on every node run
#   SASA_COORDINATOR_ADDRESS=NODE0:1234 SASA_NUM_PROCESSES=NODES SASA_PROCESS_ID=i \
#     python3 -m sasa_jax.main --config=... --workdir=SHARED_DIR
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
PER_GPU=0; DRY_RUN=0; ARGS=()
for a in "$@"; do
  case "$a" in
    -h|--help) usage; exit 0 ;;
    --per-gpu) PER_GPU=1 ;;
    --dry-run) DRY_RUN=1 ;;
    *) ARGS+=("$a") ;;
  esac
done
for v in NODES GPUS_PER_NODE WORKDIR; do
  [[ -n "${!v:-}" ]] || { echo "gpu_slurm.sh: environment variable $v is required (see --help)" >&2; exit 2; }
done
if [[ $DRY_RUN == 0 ]] && ! command -v sbatch >/dev/null 2>&1; then
  echo "gpu_slurm.sh: sbatch not found: run on a SLURM login node, or use the plain multi-node form in --help" >&2
  exit 127
fi
TASKS_PER_NODE=$([[ $PER_GPU == 1 ]] && echo "$GPUS_PER_NODE" || echo 1)
PY=${PYTHON:-python3}
TRAIN=$(printf '%q ' "$PY" -m sasa_jax.main --workdir="$WORKDIR" \
  ${TFDS_DATA_DIR:+--config.dataset.data_dir="$TFDS_DATA_DIR"} "${ARGS[@]}")
SCRIPT=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=sasa_jax
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$TASKS_PER_NODE
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --time=${TIME:-24:00:00}
#SBATCH --output=$WORKDIR/logs/%x_%j_%t.log
#SBATCH --signal=TERM@120
#SBATCH --requeue
cd $(printf '%q' "$(cd "$(dirname "$0")/.." && pwd)")
srun --kill-on-bad-exit=1 $TRAIN
SBATCH
)
# Optional directives go right after the shebang (sbatch reads #SBATCH lines up to the first command).
[[ -n "${PARTITION:-}" ]] && SCRIPT=$(echo "$SCRIPT" | sed "1a #SBATCH --partition=$PARTITION")
[[ -n "${ACCOUNT:-}" ]] && SCRIPT=$(echo "$SCRIPT" | sed "1a #SBATCH --account=$ACCOUNT")
if [[ $DRY_RUN == 1 ]]; then
  echo "$SCRIPT"
  echo "# submit with: sbatch <this script>"
  exit 0
fi
mkdir -p "$WORKDIR/logs"
echo "$SCRIPT" | sbatch
