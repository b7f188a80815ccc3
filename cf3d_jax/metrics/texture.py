"""Fine texture of 3D volumes: the energy of the Haar detail subbands, against real volumes.

A generator that adds voxel texture the data lacks (or smooths away texture the data has, such as
an MRI's acquisition noise) changes the energy of the finest wavelet details long before FID on
a coarse feature network notices. With the orthonormal Haar transform of `cf3d_jax.wavelets`
(subbands LLL, LLH, …, HHH), the detail energy of a volume is the mean square of its seven
detail subbands, per subband:

  `E_s(x) = mean over positions of haar_dwt3d(x)[..., s]²`,  s = LLH … HHH,

and the ratio of a set of generated volumes to a set of real ones, `mean_x E_s(gen) /
mean_x E_s(real)`, is 1 where the generated volumes carry the data's texture, above 1 where they
carry more (noise-like or blocky texture), below 1 where they are smoother. Because the
transform is orthonormal, the seven subbands together hold the part of `mean(x²)` that the
2×2×2 block means (LLL) do not. The same at coarser levels (the transform of LLL again) measures
texture at 4 and 8 voxels.

The ratio counts energy, not its arrangement: a sample may match the data's energy with coarser
mottling where the data has fine noise and sharp edges. Read it beside FID and the montage.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cf3d_jax.wavelets import SUBBANDS, haar_dwt3d

DETAIL_SUBBANDS = SUBBANDS[1:]


def detail_energy(volumes, levels: int = 1) -> np.ndarray:
  """Per item, level and detail subband: `[N, D, H, W, C]` → `[N, levels, 7]` float64, the mean
  square of each Haar detail subband (LLH … HHH) over positions and channels. Level 1 is the
  transform of the volume (2-voxel details), level l + 1 the transform of level l's LLL (the
  orthonormal multi-level transform, as `pywt.wavedecn(x, 'haar', level=levels)`); every
  spatial size must divide by 2^levels."""
  v = np.asarray(volumes, np.float32)
  if v.ndim != 5:
    raise ValueError(f"volumes of shape {v.shape}: expected [N, D, H, W, C]")
  if levels < 1:
    raise ValueError(f"levels={levels}: expected at least 1")
  if any(size % (1 << levels) for size in v.shape[1:4]):
    raise ValueError(f"volumes of shape {v.shape}: {levels} Haar levels need spatial sizes "
                     f"divisible by {1 << levels}")
  n, c = v.shape[0], v.shape[-1]
  x = jnp.asarray(v)
  out = []
  for _ in range(levels):
    z = haar_dwt3d(x)                                              # [N, d, h, w, 8C]
    zz = np.asarray(z, np.float64).reshape(n, -1, len(SUBBANDS), c)  # channel = subband·C + c
    out.append(np.mean(zz[:, :, 1:, :] ** 2, axis=(1, 3)))
    x = z[..., :c]                                                 # LLL of every channel
  return np.stack(out, axis=1)


def max_levels(shape, limit: int = 3) -> int:
  """The most Haar levels (at most `limit`) that the spatial `shape` (D, H, W) allows."""
  levels = 0
  while levels < limit and all(size % (1 << (levels + 1)) == 0 for size in shape):
    levels += 1
  return levels


def mean_detail_energy(volumes, levels: int, batch_size: int = 16) -> np.ndarray:
  """`detail_energy` averaged over the items of `[N, D, H, W, C]`, in batches: `[levels, 7]`."""
  return np.concatenate([detail_energy(volumes[i:i + batch_size], levels)
                         for i in range(0, len(volumes), batch_size)]).mean(axis=0)


def energy_ratio(generated_energy: np.ndarray, real_energy: np.ndarray) -> dict:
  """Two `mean_detail_energy` results `[levels, 7]` (generated, real) → `{"total": float,
  "per_subband": {name: float}, "per_level": [float] * levels}`: `total` and `per_subband` are
  level 1 (the finest, 2-voxel details; `total` sums the seven subbands first), `per_level[l]`
  the sum over the subbands of level l + 1 (coarser texture)."""
  gen_e, real_e = np.asarray(generated_energy), np.asarray(real_energy)
  if gen_e.shape != real_e.shape:
    raise ValueError(f"detail energies of shapes {gen_e.shape} and {real_e.shape}: expected the "
                     "same levels")
  if not np.all(real_e > 0):
    raise ValueError("the real volumes have no detail energy in some subband (constant blocks); "
                     "the texture ratio is undefined")
  return {"total": float(gen_e[0].sum() / real_e[0].sum()),
          "per_subband": {name: float(g / r) for name, g, r in
                          zip(DETAIL_SUBBANDS, gen_e[0], real_e[0])},
          "per_level": [float(g.sum() / r.sum()) for g, r in zip(gen_e, real_e)]}


def detail_energy_ratio(generated, real, batch_size: int = 16, levels: int | None = None
                        ) -> dict:
  """Generated against real volumes (both `[N, D, H, W, C]`, same grid): `energy_ratio` of their
  mean detail energies (module docstring). `levels` defaults to as many as the grid allows, at
  most 3."""
  levels = max_levels(np.shape(real)[1:4]) if levels is None else levels
  return energy_ratio(mean_detail_energy(generated, levels, batch_size),
                      mean_detail_energy(real, levels, batch_size))


def format_per_level(per_level) -> str:
  """A table cell for `energy_ratio(...)["per_level"]`: '1.04 / 0.97 / 1.05' (finest first);
  '—' for None or empty."""
  return "—" if not per_level else " / ".join(f"{v:.2f}" for v in per_level)
