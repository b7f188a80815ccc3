"""Command-line entry: `python -m cf3d_jax.main --config=configs/demo.py --workdir=runs/demo`.

Modes: prepare (data shards + embedding table), train_autoencoder (the MAISI KL VAE),
prepare_latents (encode the images once into latent shards, latent space), train, sample
(counterfactuals; with `--config.sample.source` of given scans), all (prepare if missing →
[latent: train_autoencoder if no VAE → prepare_latents →] train → sample), train_classifier (the 3D DenseNet-121 text-alignment classifier), evaluate (the paper's Tables 1
and 2 → WORKDIR/eval/). Config overrides: `--config.train.num_steps=100`;
the config is locked, so a misspelt key is an error. Problems with inputs exit with status 2 and
one message naming the file or key.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from cf3d_jax.errors import Cf3dError
from cf3d_jax.modes import MODES, run


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: data/, checkpoints/, samples/ …")
_MODE = flags.DEFINE_enum("mode", "all", MODES, "What to run.")
_ON_ERROR = flags.DEFINE_enum("on_error", "fail", ["fail", "skip"],
                              "prepare: stop at the first bad scan, or skip it and go on.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-host (cf3d_jax.parallel.initialize_distributed): every process runs the same command.
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed: auto = when a coordinator is given or a "
                                 "TPU-pod/SLURM cluster is detected.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 ($CF3D_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the job ($CF3D_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process ($CF3D_PROCESS_ID).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    from cf3d_jax.parallel import initialize_distributed
    initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value)
    run(_CONFIG.value, _WORKDIR.value, _MODE.value, _ON_ERROR.value)
  except Cf3dError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
