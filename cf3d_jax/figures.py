"""Figures of volumes and curves, drawn with matplotlib only when called (no GUI backend).

Montages of volumes live here once, for every caller:
  `save_montage`     the PNG of `--mode=sample` (and the notebook's `montage.png`): mid-slices
                     (axial, coronal, sagittal) per volume, then differences against volume 0;
  `slice_figure`     one slice of every volume side by side over their difference maps (the
                     notebook's slider viewer redraws it);
  `montage_figure`   five slice positions per volume and per difference map (the notebook's
                     static viewer);
  `pyplot`, `save_png`, `figure_png`: the Agg pyplot, an atomic PNG file, PNG bytes (the
                     evaluation and training-curve plots use the first two).

Volumes are `[D, H, W]` arrays in [-1, 1] (RAS: D = x, H = y, W = z); difference maps share one
symmetric colour range (red = brighter).
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from cf3d_jax.files import atomic_path

AXES = {"axial": 2, "coronal": 1, "sagittal": 0}   # RAS volumes: the axis a view slices across


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_png(fig, path: str) -> None:
  """Writes `fig` to `path` atomically as PNG and closes it."""
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110, format="png")
  pyplot().close(fig)


def figure_png(fig, dpi: int = 100) -> bytes:
  """The figure rendered as PNG bytes (no pyplot, no GUI backend)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  return buf.getvalue()


def short_title(title: str, n: int = 30) -> str:
  """`title` cut to at most `n` characters, the last an ellipsis when cut."""
  return title if len(title) <= n else title[:n - 1] + "…"


def slice_2d(volume: np.ndarray, axis: str, index: int) -> np.ndarray:
  """The 2D slice of `[D, H, W]` across `axis` ('axial', 'coronal', 'sagittal') at `index`,
  rotated for display."""
  return np.rot90(np.take(volume, int(index), axis=AXES[axis]))


def save_montage(path: str, volumes: Sequence[np.ndarray], titles: Sequence[str],
                 real: tuple[str, np.ndarray] | None = None) -> None:
  """PNG of mid-slices (axial, coronal, sagittal) per volume, then differences vs volume 0.

  volumes: `[D, H, W]` arrays in [-1, 1] (RAS: D = x, H = y, W = z).
  real: `(title, [D, H, W])`, a real volume drawn last, in the same grey scale, so that the
  generated volumes' texture and contrast can be judged against the data's.
  """
  plt = pyplot()

  def views(v):
    d, h, w = (s // 2 for s in v.shape)
    return [np.rot90(v[:, :, w]), np.rot90(v[:, h, :]), np.rot90(v[d, :, :])]

  rows = [(t, views(v), "gray", (-1, 1)) for t, v in zip(titles, volumes)]
  diffs = [v - volumes[0] for v in volumes[1:]]
  lim = max([float(np.abs(d).max()) for d in diffs] + [1e-6])
  rows += [(f"{t} − {titles[0]}", views(d), "RdBu_r", (-lim, lim))
           for t, d in zip(titles[1:], diffs)]
  if real is not None:
    rows.append((real[0], views(np.asarray(real[1])), "gray", (-1, 1)))
  fig, axes = plt.subplots(len(rows), 3, figsize=(6.6, 2.3 * len(rows)), squeeze=False)
  for r, (title, imgs, cmap, (lo, hi)) in enumerate(rows):
    for c, img in enumerate(imgs):
      ax = axes[r][c]
      ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
    axes[r][0].set_ylabel(title if len(title) < 34 else title[:31] + "…", fontsize=7)
  for c, name in enumerate(("axial", "coronal", "sagittal")):
    axes[0][c].set_title(name, fontsize=8)
  fig.tight_layout()
  save_png(fig, path)


def slice_figure(volumes: Sequence[np.ndarray], titles: Sequence[str],
                 diffs: Sequence[np.ndarray], diff_titles: Sequence[str], axis: str = "axial",
                 index: int | None = None):
  """matplotlib Figure: row 1 the volumes side by side, row 2 their differences (red = brighter,
  shared symmetric range), all at one slice `index` across `axis` (default: the middle)."""
  from matplotlib.figure import Figure
  if axis not in AXES:
    raise ValueError(f"axis {axis!r}: expected one of {list(AXES)}")
  size = volumes[0].shape[AXES[axis]]
  index = size // 2 if index is None else int(np.clip(index, 0, size - 1))
  cols = len(volumes)
  offset = cols - len(diffs)              # differences sit under the volume they belong to
  lim = max([float(np.abs(d).max()) for d in diffs] + [1e-6])
  rows = 2 if len(diffs) else 1
  fig = Figure(figsize=(2.1 * cols, 2.3 * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for c, (v, t) in enumerate(zip(volumes, titles)):
    axes[0][c].imshow(slice_2d(v, axis, index), cmap="gray", vmin=-1, vmax=1,
                      interpolation="nearest")
    axes[0][c].set_title(short_title(t), fontsize=7)
  if rows == 2:
    for c in range(cols):
      if c < offset:
        axes[1][c].set_visible(False)
        continue
      im = axes[1][c].imshow(slice_2d(diffs[c - offset], axis, index), cmap="RdBu_r",
                             vmin=-lim, vmax=lim, interpolation="nearest")
      axes[1][c].set_title(diff_titles[c - offset], fontsize=5)
    fig.colorbar(im, ax=axes[1].tolist(), shrink=0.8, label="difference")
  for ax in np.ravel(axes):
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f"{axis} slice {index} / {size - 1}", fontsize=8)
  return fig


def montage_figure(volumes: Sequence[np.ndarray], titles: Sequence[str],
                   diffs: Sequence[np.ndarray], diff_titles: Sequence[str], axis: str = "axial",
                   fractions: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7)):
  """Static fallback: matplotlib Figure with one row per volume and per difference map, one
  column per slice position (`fractions` of the extent across `axis`)."""
  from matplotlib.figure import Figure
  size = volumes[0].shape[AXES[axis]]
  idx = [min(size - 1, int(round(f * (size - 1)))) for f in fractions]
  lim = max([float(np.abs(d).max()) for d in diffs] + [1e-6])
  rows = [(t, v, "gray", -1.0, 1.0) for t, v in zip(titles, volumes)]
  rows += [(t, d, "RdBu_r", -lim, lim) for t, d in zip(diff_titles, diffs)]
  fig = Figure(figsize=(1.5 * len(idx) + 1.6, 1.5 * len(rows)))
  axes = fig.subplots(len(rows), len(idx), squeeze=False)
  for r, (t, v, cmap, lo, hi) in enumerate(rows):
    for c, i in enumerate(idx):
      axes[r][c].imshow(slice_2d(v, axis, i), cmap=cmap, vmin=lo, vmax=hi,
                        interpolation="nearest")
      axes[r][c].set_xticks([])
      axes[r][c].set_yticks([])
      if r == 0:
        axes[r][c].set_title(f"{axis} {i}", fontsize=7)
    axes[r][0].set_ylabel(short_title(t, 24), fontsize=6)
  fig.tight_layout()
  return fig
