# Sourced by launch/gpu_slurm.sh and launch/tpu_pod.sh (with ROOT set to the checkout).
#
# preflight LAUNCHER DEVICES ARG...: runs `python -m sasa_jax.tools.preflight ARG...
# --devices=DEVICES` here, from the checkout, with PYTHON (default python3), unless
# PREFLIGHT=0: the run's config, dataset and workdir are checked before anything is submitted
# or started. Exits when the run would fail (status 3); warns and goes on when the check
# cannot run here (sasa_jax not importable, no access to the bucket).
preflight() {
  local launcher=$1 devices=$2 rc=0
  shift 2
  [[ ${PREFLIGHT:-1} == 0 ]] && return 0
  (cd "$ROOT" && "${PYTHON:-python3}" -m sasa_jax.tools.preflight "$@" --devices="$devices") || rc=$?
  if (( rc == 3 )); then
    echo "$launcher: nothing submitted or started: fix the above (PREFLIGHT=0 skips this check)" >&2
    exit 3
  elif (( rc != 0 )); then
    echo "$launcher: warning: the preflight check could not run here (${PYTHON:-python3} exited with status $rc: it needs sasa_jax installed, and read access to the data and workdir); going on unchecked" >&2
  fi
}
