#!/usr/bin/env bash
# SLURM batch script: one cf3d_jax job over GPU nodes, one process per GPU.
# Submit:  sbatch --nodes=2 launch/slurm_gpu.sh CONFIG WORKDIR [MODE] [flags...]
# jax.distributed.initialize() reads the SLURM environment (coordinator = first node, process
# count = tasks, process id = task rank); WORKDIR must be on a filesystem every node sees.
#SBATCH --job-name=cf3d
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=cf3d-%j.out
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: sbatch [--nodes=N] $0 CONFIG WORKDIR [MODE] [flags...]" >&2
  exit 2
fi
config=$1 workdir=$2
mode=${3:-train}
shift $(( $# >= 3 ? 3 : 2 ))
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
mkdir -p "$workdir"
# Default mesh: data-parallel over every GPU; override with --config.mesh.shape=DATA,FSDP,SPATIAL
srun --kill-on-bad-exit=1 python -m cf3d_jax.main --config="$config" --workdir="$workdir" \
  --mode="$mode" --distributed=on "$@"
