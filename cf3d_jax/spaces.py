"""Where diffusion runs: one `encode(x) → z` / `decode(z) → x` interface for every model family.

`WaveletSpace` (WDM): z = Haar DWT of the image with the LLL subband divided by `lll_scale` (3).
`x [N, D, H, W, C]` in [-1, 1] ↔ `z [N, D/2, H/2, W/2, 8*C]`. `clip_x0` clips a predicted z0
through image space (IDWT → clamp to [-1, 1] → DWT), as wdm-3d does when sampling.
The latent space (frozen VAE × scale factor) plugs in here with the same three methods, so one
trainer and one sampler serve WDM and MAISI alike.

On a mesh (`placed(space, mesh, rules)`, from `cf3d_jax.parallel`), the wavelet space runs its
transforms block-local under `shard_map` (`wavelets.haar_dwt3d_sharded`): a volume split along
depth is transformed by each device on its own block with no communication.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from cf3d_jax import parallel, wavelets
from cf3d_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class WaveletSpace:
  """Haar wavelet space with the LLL subband scaled by 1/lll_scale.

  With `mesh` set (see `placed`), encode/decode lay volumes out by the logical `rules`
  (parallel.VOLUME_AXES) and transform each device's block locally.
  """
  lll_scale: float = 3.0
  mesh: Any = None              # jax.sharding.Mesh, or None: plain (unsharded) transforms
  rules: tuple = ()             # logical-axis rules (parallel.Rules) used with `mesh`

  def _spec(self, shape: tuple[int, ...], block_multiple: int):
    """The volume layout for `shape` whose spatial blocks are multiples of `block_multiple`."""
    sizes = dict(self.mesh.shape)
    spec = parallel.logical_to_spec(parallel.VOLUME_AXES, shape, self.rules, sizes)
    entries = list(spec) + [None] * (5 - len(spec))
    for axis in (1, 2, 3):   # a spatial split the block size does not allow → unsplit
      entries[axis] = parallel.fit_axes(entries[axis], shape[axis] // block_multiple, sizes)
    entries[4] = None
    return parallel.P(*entries)

  def latent_shape(self, image_shape: tuple[int, int, int], channels: int = 1
                   ) -> tuple[int, int, int, int]:
    """`(D, H, W)` → `(D/2, H/2, W/2, 8*channels)`; odd sizes are a ConfigError."""
    if any(s % 2 for s in image_shape):
      raise ConfigError(f"wavelet space needs even image sizes; config.data.shape={image_shape}")
    return tuple(s // 2 for s in image_shape) + (8 * channels,)

  def _scale(self, channels: int) -> jnp.ndarray:
    """Per-channel factor `[8*C]`: 1/lll_scale on the LLL channels (the first C), else 1."""
    c = channels // 8
    return jnp.concatenate([jnp.full((c,), 1.0 / self.lll_scale), jnp.ones((channels - c,))])

  def encode(self, x: jnp.ndarray) -> jnp.ndarray:
    """Image `[N, D, H, W, C]` → z `[N, D/2, H/2, W/2, 8C]`."""
    if self.mesh is None:
      z = wavelets.haar_dwt3d(x)
    else:
      z = wavelets.haar_dwt3d_sharded(x, self.mesh, self._spec(x.shape, 2))
    return z * self._scale(z.shape[-1]).astype(z.dtype)

  def decode(self, z: jnp.ndarray) -> jnp.ndarray:
    """z `[N, d, h, w, 8C]` → image `[N, 2d, 2h, 2w, C]`."""
    z = z / self._scale(z.shape[-1]).astype(z.dtype)
    if self.mesh is None:
      return wavelets.haar_idwt3d(z)
    return wavelets.haar_idwt3d_sharded(z, self.mesh, self._spec(z.shape, 1))

  def clip_x0(self, z: jnp.ndarray) -> jnp.ndarray:
    """Clips a predicted z0 to images in [-1, 1]: IDWT → clamp → DWT."""
    return self.encode(jnp.clip(self.decode(z), -1.0, 1.0))


SPACES = {"wavelet": lambda cfg: WaveletSpace(lll_scale=cfg.lll_scale)}


def placed(space, mesh, rules):
  """`space` laid out on `mesh` under logical `rules` (block-local transforms); a space without
  mesh support is returned unchanged."""
  if isinstance(space, WaveletSpace):
    return dataclasses.replace(space, mesh=mesh, rules=tuple(rules))
  return space


def make_space(space_config):
  """Builds the space named by `config.space.name`."""
  if space_config.name not in SPACES:
    raise ConfigError(f"config.space.name={space_config.name!r}: expected one of {sorted(SPACES)}")
  return SPACES[space_config.name](space_config)
