#!/usr/bin/env bash
# Run one cf3d_jax job on this machine (one process, all local devices).
# Usage: launch/local.sh CONFIG WORKDIR [MODE] [extra flags, e.g. --config.train.num_steps=100]
# Example: launch/local.sh configs/demo.py runs/demo all
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [MODE] [flags...]" >&2
  exit 2
fi
config=$1 workdir=$2
mode=${3:-all}
shift $(( $# >= 3 ? 3 : 2 ))
cd "$(dirname "$0")/.."
mkdir -p "$workdir"
python -m cf3d_jax.main --config="$config" --workdir="$workdir" --mode="$mode" "$@" \
  2>&1 | tee -a "$workdir/log.txt"
