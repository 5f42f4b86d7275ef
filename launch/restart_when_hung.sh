#!/usr/bin/env bash
# Runs a training command, and again each time it exits with status 75 (the run hung: no
# progress for the config's hang_timeout_s), at most RESTARTS more times. Each start resumes
# from the run's last checkpoint. TERM and INT reach the command as TERM (it saves a
# checkpoint and exits; a background command ignores INT) and no restart follows. Exits with
# the command's last status.
#
#   launch/restart_when_hung.sh RESTARTS python -m sasa_jax.main --config=... --workdir=...
#
# launch/tpu_pod.sh starts every worker's run under it (HANG_RESTARTS, default 2).
set -uo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
[[ $# -ge 2 && "$1" =~ ^[0-9]+$ ]] || { usage >&2; exit 2; }
RESTARTS=$1; shift

child=""
stopping=0
trap 'stopping=1; [[ -n $child ]] && kill -TERM "$child" 2>/dev/null' TERM INT
restarts=0
while :; do
  "$@" &
  child=$!
  while kill -0 "$child" 2>/dev/null; do wait "$child"; done  # a trap interrupts wait
  wait "$child"
  rc=$?
  if [[ $rc != 75 || $stopping == 1 || $restarts -ge $RESTARTS ]]; then
    exit "$rc"
  fi
  restarts=$((restarts + 1))
  echo "[$(date -Is)] restart_when_hung.sh: the run hung (status 75): starting it again ($restarts of $RESTARTS), from its last checkpoint"
done
