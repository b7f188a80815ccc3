"""Background regularization of generated volumes: the air around the head set to its value.

The phantoms (and skull-stripped MRI) have a constant background, −1 in the model's [-1, 1]
range, over most of the grid. A generator's last denoising steps leave a faint speckle there
(std ~0.04 on the 7,200-step showcase; docs/results.md, "What the FID counts"), which a
feature-based FID counts as strongly as anatomy. MAISI's reference inference sets the voxels
outside the body mask to the air value after decoding ("regularize background intensities",
`crop_img_body_mask`); without a given mask, `regularize_background` finds the background in
the volume itself:

  background = voxels ≤ −1 + threshold that connect to the grid's border through such voxels
               (face neighbours), less those within `margin` face-neighbour steps of a brighter
               voxel (margin > 0 keeps a dark, blurred brain edge as decoded).

On real phantoms (MS FLAIR and AD T1) it changes nothing at threshold 0.25, margin 0 (their
background is exactly −1, and no tissue darker than −0.75 connects to it; tested); dark
structures enclosed by tissue (ventricles) never connect to the border.
Volumes are `[N, D, H, W, C]` (NDHWC), C = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cf3d_jax.errors import ConfigError

BACKGROUND_VALUE = -1.0


def _dilate(m: jnp.ndarray) -> jnp.ndarray:
  """m `[N, D, H, W]` bool → m OR its six face neighbours (outside the grid counts as False)."""
  out = m
  for axis in (1, 2, 3):
    pad = [(0, 0)] * 4
    pad[axis] = (1, 1)
    p = jnp.pad(m, pad)
    n = m.shape[axis]
    out = out | jax.lax.slice_in_dim(p, 0, n, axis=axis) | jax.lax.slice_in_dim(p, 2, n + 2, axis=axis)
  return out


def _border(shape: tuple[int, ...]) -> jnp.ndarray:
  """`[1, D, H, W]` bool: True on the six faces of the grid."""
  inner = jnp.zeros(tuple(s - 2 for s in shape[1:]), bool)
  return jnp.pad(inner, 1, constant_values=True)[None]


def background_mask(x: jnp.ndarray, threshold: float, margin: int = 0) -> jnp.ndarray:
  """x `[N, D, H, W, 1]` → `[N, D, H, W]` bool: the background of each volume (module doc)."""
  low = x[..., 0] <= BACKGROUND_VALUE + threshold
  seed = low & _border(low.shape)

  def grow(state):
    reach, _ = state
    new = _dilate(reach) & low
    return new, jnp.any(new != reach)

  reach, _ = jax.lax.while_loop(lambda s: s[1], grow, (seed, jnp.array(True)))
  near_tissue = ~low
  for _ in range(margin):
    near_tissue = _dilate(near_tissue)
  return reach & ~near_tissue


def regularize_background(x: jnp.ndarray, threshold: float, margin: int = 0) -> jnp.ndarray:
  """x `[N, D, H, W, 1]` in [-1, 1] → the same with `background_mask` set to −1."""
  if x.shape[-1] != 1:
    raise ValueError(f"regularize_background expects one channel [N, D, H, W, 1]; got {x.shape}")
  return jnp.where(background_mask(x, threshold, margin)[..., None], BACKGROUND_VALUE, x)


def background_of(config) -> tuple[float, int] | None:
  """`(threshold, margin)` from `config.sample.background_threshold` / `background_margin`;
  None when the threshold is 0 (off)."""
  threshold = float(config.sample.background_threshold)
  margin = int(config.sample.background_margin)
  if not 0.0 <= threshold < 2.0:
    raise ConfigError(f"config.sample.background_threshold={threshold}: expected 0 (off) or a "
                      "value in (0, 2): voxels within it of −1 may be background")
  if margin < 0:
    raise ConfigError(f"config.sample.background_margin={margin}: expected an integer ≥ 0")
  return (threshold, margin) if threshold > 0 else None


def background_record(config) -> dict | None:
  """What index.json and a calibration record of the regularization: {'threshold', 'margin'},
  or None when off."""
  bg = background_of(config)
  return None if bg is None else {"threshold": bg[0], "margin": bg[1]}
