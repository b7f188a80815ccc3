"""Command-line entry: `python -m cf3d_jax.main --config=configs/demo.py --workdir=runs/demo`.

Modes: prepare (data shards + embedding table), train, sample (counterfactuals), all
(prepare if missing → train → sample). Config overrides: `--config.train.num_steps=100`;
the config is locked, so a misspelt key is an error. Problems with inputs exit with status 2 and
one message naming the file or key.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from cf3d_jax.errors import Cf3dError

MODES = ("prepare", "train", "sample", "all")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: data/, checkpoints/, samples/ …")
_MODE = flags.DEFINE_enum("mode", "all", MODES, "What to run.")
_ON_ERROR = flags.DEFINE_enum("on_error", "fail", ["fail", "skip"],
                              "prepare: stop at the first bad scan, or skip it and go on.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str, mode: str, on_error: str = "fail") -> None:
  """Dispatches one mode (importing heavy modules only when needed)."""
  from cf3d_jax import config_base
  config_base.validate(config)
  if mode in ("prepare", "all"):
    from cf3d_jax.data.prepare import prepare
    prepare(config, workdir, on_error)
  if mode in ("train", "all"):
    from cf3d_jax.train import train_and_evaluate
    train_and_evaluate(config, workdir)
  if mode in ("sample", "all"):
    from cf3d_jax.sample import sample_counterfactuals
    sample_counterfactuals(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    run(_CONFIG.value, _WORKDIR.value, _MODE.value, _ON_ERROR.value)
  except Cf3dError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
