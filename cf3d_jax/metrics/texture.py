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
2×2×2 block means (LLL) do not.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cf3d_jax.wavelets import SUBBANDS, haar_dwt3d

DETAIL_SUBBANDS = SUBBANDS[1:]


def detail_energy(volumes) -> np.ndarray:
  """Per item and detail subband: `[N, D, H, W, C]` (even D, H, W) → `[N, 7]` float64, the mean
  square of each Haar detail subband (LLH … HHH) over positions and channels."""
  v = np.asarray(volumes, np.float32)
  if v.ndim != 5:
    raise ValueError(f"volumes of shape {v.shape}: expected [N, D, H, W, C]")
  n, c = v.shape[0], v.shape[-1]
  z = np.asarray(haar_dwt3d(jnp.asarray(v)), np.float64)        # [N, d, h, w, 8C]
  z = z.reshape(n, -1, len(SUBBANDS), c)                           # channel = subband·C + c
  return np.mean(z[:, :, 1:, :] ** 2, axis=(1, 3))


def detail_energy_ratio(generated, real, batch_size: int = 16) -> dict:
  """Generated against real volumes (both `[N, D, H, W, C]`, same grid): `{"total": float,
  "per_subband": {name: float}}`, each the generated set's mean detail energy over the real
  set's (module docstring); `total` sums the seven subbands first."""
  gen_e = np.concatenate([detail_energy(generated[i:i + batch_size])
                          for i in range(0, len(generated), batch_size)]).mean(axis=0)
  real_e = np.concatenate([detail_energy(real[i:i + batch_size])
                           for i in range(0, len(real), batch_size)]).mean(axis=0)
  if not np.all(real_e > 0):
    raise ValueError("the real volumes have no detail energy (constant 2×2×2 blocks); the "
                     "texture ratio is undefined")
  return {"total": float(gen_e.sum() / real_e.sum()),
          "per_subband": {name: float(g / r) for name, g, r in zip(DETAIL_SUBBANDS, gen_e, real_e)}}
