#!/usr/bin/env bash
# Run one cf3d_jax job on every host of a Cloud TPU slice (v4 / v5e), the same command on each.
# JAX finds the other hosts from the TPU metadata (jax.distributed.initialize() with no
# arguments; --distributed=on), each host feeds its own rows, orbax writes the sharded state
# from every host to the shared WORKDIR (a gs:// bucket or a shared filesystem), and only
# process 0 writes summaries and images.
#
# Usage: launch/tpu_pod.sh TPU_NAME ZONE SLICE CONFIG WORKDIR [MODE] [flags...]
#   SLICE picks the mesh for the paper's configs (override with MESH=d,f,s in the environment:
#   a second --config.mesh.shape flag would append to the first, ml_collections tuples do):
#     v5e-16  (4 hosts × 4 chips, 16 GiB HBM each):  WDM 256³ batch 1: mesh 1,4,4
#     v4-32   (4 hosts × 4 chips, 32 GiB HBM each):  WDM 256³ batch 1: mesh 1,4,4
#     v5e-8 / v4-16 / other:                         data-parallel mesh -1,1,1
#   (memory per chip for these choices: docs/benchmarks.md, "Scale-out memory").
# Example:
#   launch/tpu_pod.sh my-v5e us-west4-a v5e-16 configs/wdm_ms.py:res256 gs://bucket/wdm256 train
# Before the first run, install the code on every host:
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all \
#     --command='git clone REPO cf3d && cd cf3d && pip install -e . "jax[tpu]"'
set -euo pipefail
if [ $# -lt 5 ]; then
  echo "usage: $0 TPU_NAME ZONE SLICE CONFIG WORKDIR [MODE] [flags...]" >&2
  exit 2
fi
tpu=$1 zone=$2 slice=$3 config=$4 workdir=$5
mode=${6:-train}
shift $(( $# >= 6 ? 6 : 5 ))
case "$slice" in
  v5e-16|v4-32)
    # Batch 1 cannot split over hosts: split the volume (depth on 'spatial', height on 'fsdp'),
    # params/Adam FSDP on 'fsdp', every U-Net level rematerialised (set on the host below, one
    # 'full' per level of the config's U-Net), bf16 compute.
    remat=1
    mesh_flags=(--config.mesh.shape=${MESH:-1,4,4} --config.model.dtype=bfloat16 --config.model.middle_remat=full
                "--config.mesh.rules=(('activation_batch','data'),('activation_depth','spatial'),('activation_height','fsdp'),('conv_out','fsdp'),('mlp','fsdp'),('heads','fsdp'),('conv_in','fsdp'),('embed','fsdp'),('text_embed','fsdp'),('norm','fsdp'))")
    ;;
  *)
    remat=0
    mesh_flags=(--config.mesh.shape=${MESH:-"-1,1,1"})
    ;;
esac
extra=""
for a in "${mesh_flags[@]}" "$@"; do extra+=" $(printf '%q' "$a")"; done
# remat_levels needs one entry per U-Net level: read the count from the config on the host.
# Every user-given value reaches the remote shell quoted (printf %q), never as shell syntax.
q_config=$(printf '%q' "$config") q_workdir=$(printf '%q' "$workdir") q_mode=$(printf '%q' "$mode")
remat_cmd=""
if [ "$remat" = 1 ]; then
  remat_cmd="--config.model.remat_levels=\"\$(python -c 'import sys; from cf3d_jax.config_base import load_config_file as load; path, _, arg = sys.argv[1].partition(\":\"); print(repr((\"full\",) * len(load(path, arg or None).model.channel_mult)))' $q_config)\""
fi
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command="
  cd ~/cf3d && python -m cf3d_jax.main --config=$q_config --workdir=$q_workdir --mode=$q_mode \
    --distributed=on $extra $remat_cmd 2>&1 | tee -a ~/cf3d_\$(hostname).log"
