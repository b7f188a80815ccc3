"""Background regularization of generated volumes: the air around the head set to its value.

The phantoms (and skull-stripped MRI) have a constant background, −1 in the model's [-1, 1]
range, over most of the grid. A generator's last denoising steps leave a faint speckle there
(std ~0.04 on the 7,200-step showcase; docs/results.md, "What the FID counts"), which a
feature-based FID counts as strongly as anatomy. MAISI's reference inference sets the voxels
outside the body mask to the air value after decoding ("regularize background intensities",
`crop_img_body_mask`); without a given mask, `regularize_background` finds the background in
the volume itself:

  background = voxels ≤ −1 + threshold that connect to the grid's border through such voxels
               (face neighbours),
             + specks: brighter components of fewer than `min_island` voxels whose every
               neighbour is such background (isolated bright voxels in the air),
             − those within `margin` face-neighbour steps of a brighter voxel that is not a
               speck (margin > 0 keeps a dark, blurred brain edge as decoded).

On real phantoms (MS FLAIR and AD T1) it changes nothing at threshold 0.25, margin 0, islands
under 27 voxels (their background is exactly −1, no tissue darker than −0.75 connects to it,
and the head is one component; tested); dark
structures enclosed by tissue (ventricles) never connect to the border.
Volumes are `[N, D, H, W, C]` (NDHWC), C = 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cf3d_jax.errors import ConfigError

BACKGROUND_VALUE = -1.0


def _neighbours(a: jnp.ndarray, fill) -> list[jnp.ndarray]:
  """a `[N, D, H, W]` → its six face-neighbour shifts (each voxel sees one neighbour's value;
  `fill` beyond the grid)."""
  out = []
  for axis in (1, 2, 3):
    pad = [(0, 0)] * 4
    pad[axis] = (1, 1)
    p = jnp.pad(a, pad, constant_values=fill)
    n = a.shape[axis]
    out += [jax.lax.slice_in_dim(p, 0, n, axis=axis), jax.lax.slice_in_dim(p, 2, n + 2, axis=axis)]
  return out


def _dilate(m: jnp.ndarray) -> jnp.ndarray:
  """m `[N, D, H, W]` bool → m OR its six face neighbours (outside the grid counts as False)."""
  return functools.reduce(jnp.logical_or, _neighbours(m, False), m)


def _until_stable(step, init):
  """Iterates `step` from `init` until it returns its input (flood fills, label propagation)."""
  def body(state):
    value, _ = state
    new = step(value)
    return new, jnp.any(new != value)
  return jax.lax.while_loop(lambda s: s[1], body, (init, jnp.array(True)))[0]


def _islands(fg: jnp.ndarray, reach: jnp.ndarray, low: jnp.ndarray, min_size: int) -> jnp.ndarray:
  """Components of `fg` (face-connected) with fewer than `min_size` voxels whose every face
  neighbour outside them lies in `reach` (the border-connected background): specks in the air."""
  ids = jnp.where(fg, jnp.arange(1, fg.size + 1, dtype=jnp.int32).reshape(fg.shape), 0)
  labels = _until_stable(
      lambda lab: jnp.where(fg, functools.reduce(jnp.maximum, _neighbours(lab, 0), lab), 0), ids)
  flat = labels.ravel()
  size = jnp.zeros(fg.size + 1, jnp.int32).at[flat].add(1)
  # A component touching a low voxel that is not background (a ventricle's dark) stays.
  inner_dark = functools.reduce(jnp.logical_or, _neighbours(low & ~reach, False))
  touches = jnp.zeros(fg.size + 1, bool).at[flat].max((fg & inner_dark).ravel())
  return fg & (size[labels] < min_size) & ~touches[labels]


def _border(shape: tuple[int, ...]) -> jnp.ndarray:
  """`[1, D, H, W]` bool: True on the six faces of the grid."""
  inner = jnp.zeros(tuple(s - 2 for s in shape[1:]), bool)
  return jnp.pad(inner, 1, constant_values=True)[None]


def background_mask(x: jnp.ndarray, threshold: float, margin: int = 0,
                    min_island: int = 0) -> jnp.ndarray:
  """x `[N, D, H, W, 1]` → `[N, D, H, W]` bool: the background of each volume (module doc)."""
  low = x[..., 0] <= BACKGROUND_VALUE + threshold
  reach = _until_stable(lambda r: _dilate(r) & low, low & _border(low.shape))
  tissue = ~low
  if min_island > 0:
    specks = _islands(tissue, reach, low, min_island)
    reach, tissue = reach | specks, tissue & ~specks
  for _ in range(margin):
    tissue = _dilate(tissue)
  return reach & ~tissue


def regularize_background(x: jnp.ndarray, threshold: float, margin: int = 0,
                          min_island: int = 0) -> jnp.ndarray:
  """x `[N, D, H, W, 1]` in [-1, 1] → the same with `background_mask` set to −1."""
  if x.shape[-1] != 1:
    raise ValueError(f"regularize_background expects one channel [N, D, H, W, 1]; got {x.shape}")
  return jnp.where(background_mask(x, threshold, margin, min_island)[..., None],
                   BACKGROUND_VALUE, x)


def background_of(config) -> tuple[float, int, int] | None:
  """`(threshold, margin, min_island)` from `config.sample.background_threshold` /
  `background_margin` / `background_min_island`; None when the threshold is 0 (off)."""
  threshold = float(config.sample.background_threshold)
  margin = int(config.sample.background_margin)
  min_island = int(config.sample.background_min_island)
  if not 0.0 <= threshold < 2.0:
    raise ConfigError(f"config.sample.background_threshold={threshold}: expected 0 (off) or a "
                      "value in (0, 2): voxels within it of −1 may be background")
  if margin < 0:
    raise ConfigError(f"config.sample.background_margin={margin}: expected an integer ≥ 0")
  if min_island < 0:
    raise ConfigError(f"config.sample.background_min_island={min_island}: expected an integer "
                      "≥ 0 (0 = keep every speck)")
  return (threshold, margin, min_island) if threshold > 0 else None


def background_record(config) -> dict | None:
  """What index.json and a calibration record of the regularization: {'threshold', 'margin',
  'min_island'}, or None when off."""
  bg = background_of(config)
  return None if bg is None else dict(zip(("threshold", "margin", "min_island"), bg))
