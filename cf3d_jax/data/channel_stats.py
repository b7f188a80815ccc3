"""Per-subband scale of prepared data, for `config.objective.sigma_data_channels`.

The skip preconditioning (`objective.preconditioning='skip'`) is the optimal linear denoiser of
data with second moment σ_d² per channel; in the wavelet space the eight Haar subbands differ by
up to 10×, so each needs its own σ_d. This prints the root mean square of every subband of the
training split (LLL divided by `space.lll_scale`, as diffusion sees it), ready to paste:

  python -m cf3d_jax.data.channel_stats --workdir=runs/demo
  → --config.objective.sigma_data_channels="(0.81,0.166,0.157,0.096,0.177,0.096,0.101,0.083)"
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from cf3d_jax.data import records
from cf3d_jax.data.export import read_records, split_entries
from cf3d_jax.errors import Cf3dError, DataError
from cf3d_jax.workdir import Workdir


def subband_rms(volumes: np.ndarray, lll_scale: float = 3.0) -> np.ndarray:
  """Root mean square per Haar subband `[8]` (order LLL, LLH, …, HHH) of images
  `[N, D, H, W, 1]`, the LLL subband divided by `lll_scale`."""
  import jax.numpy as jnp
  from cf3d_jax.wavelets import haar_dwt3d
  z = np.asarray(haar_dwt3d(jnp.asarray(volumes, jnp.float32)), np.float64)
  z[..., 0] /= lll_scale
  return np.sqrt(np.mean(z.reshape(-1, z.shape[-1]) ** 2, axis=0))


def split_rms(data_dir: str, split: str = "train", seed: int = 0,
              fractions=(0.7, 0.15, 0.15), lll_scale: float = 3.0) -> np.ndarray:
  """`subband_rms` of the prepared records of one split (the training split rule)."""
  index = records.load_index(data_dir)
  entries = split_entries(index, split, seed, fractions)
  if not entries:
    raise DataError(f"{data_dir}: split {split!r} holds no records")
  volumes = np.stack([r["volume"] for r in read_records(data_dir, index, entries)])
  if volumes.shape[-1] != 1:
    raise DataError(f"{data_dir}: records of shape {volumes.shape[1:]}: expected images "
                    "[D, H, W, 1] (the wavelet space)")
  return subband_rms(volumes, lll_scale)


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    rms = split_rms(Workdir(f.workdir).records, f.split, f.seed,
                    lll_scale=f.lll_scale)
  except Cf3dError as e:
    raise SystemExit(f"error: {e}") from None
  print('--config.objective.sigma_data_channels="(' + ",".join(f"{v:.3g}" for v in rms) + ')"')


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "run folder holding data/records")
  flags.DEFINE_enum("split", "train", ["train", "val", "test"], "which split to measure")
  flags.DEFINE_integer("seed", 0, "the run's config.seed (fixes the split)")
  flags.DEFINE_float("lll_scale", 3.0, "config.space.lll_scale")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
