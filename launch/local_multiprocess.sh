#!/usr/bin/env bash
# Run one cf3d_jax job as N CPU processes on this machine, joined by jax.distributed on
# 127.0.0.1 (the multi-host code path without a cluster; tests/test_multihost.py uses it).
# Usage: launch/local_multiprocess.sh N CONFIG WORKDIR [MODE] [extra flags...]
#   env: PORT (coordinator port; default: a free one), DEVICES_PER_PROCESS (fake CPU devices
#        per process, default 1), PYTHON (default: python).
# Example: launch/local_multiprocess.sh 2 configs/demo.py:smoke runs/mp train \
#            --config.mesh.shape=2,1,1
# Logs: WORKDIR/log.proc<i>.txt; exits non-zero if any process fails.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 N CONFIG WORKDIR [MODE] [flags...]" >&2
  exit 2
fi
n=$1 config=$2 workdir=$3
mode=${4:-train}
shift $(( $# >= 4 ? 4 : 3 ))
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
port=${PORT:-$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
devices=${DEVICES_PER_PROCESS:-1}
mkdir -p "$workdir"
pids=()
for (( i = 0; i < n; i++ )); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
    "$python" -m cf3d_jax.main --config="$config" --workdir="$workdir" --mode="$mode" \
      --distributed=on --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
      --process_id="$i" "$@" > "$workdir/log.proc$i.txt" 2>&1 &
  pids+=($!)
done
status=0
for (( i = 0; i < n; i++ )); do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $workdir/log.proc$i.txt" >&2
    tail -n 20 "$workdir/log.proc$i.txt" >&2 || true
    status=1
  fi
done
exit $status
