"""Does the prompt act? Phantom ground-truth measurements of generated volumes, per prompt.

On phantom data every generated volume can be measured by the rule the phantoms were calibrated
with: MS lesion volume (`metrics.lesion`: voxels > threshold inside the template white matter)
or AD ventricle volume (`metrics.ventricles`). `PhantomRule` measures one volume;
`prompt_effect` turns a `[K noises, P prompts]` table of measurements into what a user checks:

- `mean` per prompt, and `change_vs_first` (per-noise value minus the first prompt's, the
  factual reference, averaged; also listed per noise);
- `class_hit_rate` (MS): the fraction of the noises whose volume lies in the prompted class's
  range (minimal [0, 10), moderate [10, 25), high [25, ∞) mL), per prompt and over all volumes;
- `ordered_fraction`: the fraction of noises whose values rise strictly with the prompts' class
  order (MS: minimal < moderate < high lesion load; AD: CN < MCI < AD ventricle volume).

Pure NumPy; the caller generates the volumes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from cf3d_jax.metrics import lesion as lesion_lib
from cf3d_jax.metrics import ventricles as ventricle_lib
from cf3d_jax.text import prompts as prompt_lib

STATS = {"ms": "lesion_volume_ml", "adni": "ventricle_volume_ml"}


@dataclasses.dataclass(frozen=True)
class PhantomRule:
  """The dataset's ground-truth rule on one reference grid. `measure(volume [D, H, W] or
  [D, H, W, 1]) → float` (mL); `stat` names it; `description` states it for index files."""
  dataset: str
  reference: object                      # phantom_reference.Reference
  lesion_threshold: float = lesion_lib.DEFAULT_LESION_THRESHOLD
  region: np.ndarray | None = None       # AD: the ventricle rule's region (computed once)

  @classmethod
  def build(cls, dataset: str, reference, lesion_threshold: float) -> "PhantomRule":
    region = None
    if dataset == "adni":
      region = ventricle_lib.central_region(reference.ventricle_fraction, reference.brain_mask,
                                            reference.voxel_ml)
    return cls(dataset, reference, float(lesion_threshold), region)

  @property
  def stat(self) -> str:
    return STATS[self.dataset]

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.reference.wm_mask.shape)

  def measure(self, volume: np.ndarray) -> float:
    volume = np.asarray(volume)
    if volume.ndim == 4:
      volume = volume[..., 0]
    if self.dataset == "adni":
      return float(ventricle_lib.ventricle_volume_ml(volume, self.region,
                                                     self.reference.voxel_ml))
    return float(lesion_lib.lesion_volume_ml(volume, self.reference.wm_mask,
                                             self.reference.voxel_ml, self.lesion_threshold))

  def wm_mean_intensity(self, volume: np.ndarray) -> float:
    volume = np.asarray(volume)
    return float((volume[..., 0] if volume.ndim == 4 else volume)[self.reference.wm_mask].mean())

  @property
  def description(self) -> str:
    voxel = f"{self.reference.voxel_ml:.4f} mL per voxel"
    if self.dataset == "adni":
      return (f"voxels of the template brain within {ventricle_lib.DEFAULT_MARGIN_MM:g} mm of "
              f"the template lateral ventricles with intensity < "
              f"{ventricle_lib.DEFAULT_VENTRICLE_THRESHOLD:g} (images in [-1, 1]); volume = "
              f"count × {voxel} (a monotone proxy, see metrics.ventricles)")
    return (f"voxels inside the template white-matter mask with intensity > "
            f"{self.lesion_threshold:g} (images in [-1, 1]); volume = count × {voxel}")


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray, data_range: float) -> float:
  """PSNR (dB) between volumes `a`, `b` `[D, H, W]` over the voxels where `mask` is True
  (+inf where they agree there exactly)."""
  diff = np.asarray(a, np.float64)[mask] - np.asarray(b, np.float64)[mask]
  mse = float(np.mean(diff ** 2))
  return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def class_range_ml(cls_index: int) -> tuple[float, float]:
  """MS lesion-load class `cls_index` (0 minimal, 1 moderate, 2 high) → [lo, hi) in mL."""
  bounds = (0.0, *prompt_lib.LESION_BOUNDS_ML, np.inf)
  return float(bounds[cls_index]), float(bounds[cls_index + 1])


def prompt_effect(values: np.ndarray, prompts: Sequence[str], dataset: str) -> dict:
  """Summary of measurements `values` `[K, P]` (noise k, prompt p; prompt 0 = the factual
  reference) — see the module docstring for the keys. Prompts that name no class of `dataset`
  get means and changes but no class-hit rate and take no part in the ordering."""
  values = np.asarray(values, np.float64)
  prompts = list(prompts)
  if values.ndim != 2 or values.shape[1] != len(prompts):
    raise ValueError(f"values of shape {values.shape}: expected [K, {len(prompts)}] "
                     "(noises × prompts)")
  out = {"stat": STATS[dataset], "num_noises": int(values.shape[0]),
         "mean": {p: float(values[:, i].mean()) for i, p in enumerate(prompts)},
         "change_vs_first": {p: float((values[:, i] - values[:, 0]).mean())
                             for i, p in enumerate(prompts[1:], start=1)},
         "change_vs_first_per_noise": {p: [round(float(v), 3)
                                           for v in values[:, i] - values[:, 0]]
                                       for i, p in enumerate(prompts[1:], start=1)}}
  classes = [prompt_lib.prompt_class(dataset, p) for p in prompts]
  named = [(c, i) for i, c in enumerate(classes) if c is not None]
  if dataset == "ms" and named:
    hits, dist = {}, {}
    for c, i in named:
      lo, hi = class_range_ml(c)
      hits[prompts[i]] = float(np.mean((values[:, i] >= lo) & (values[:, i] < hi)))
      dist[prompts[i]] = float(np.mean(np.maximum(lo - values[:, i], 0)
                                       + np.maximum(values[:, i] - hi, 0)))
    out["class_hit_rate"] = hits
    out["class_hit_rate_all"] = float(np.mean(list(hits.values())))
    out["mean_distance_to_class_range_ml"] = dist
  if len({c for c, _ in named}) >= 2:
    order = [i for _, i in sorted(named)]
    rising = np.all(np.diff(values[:, order], axis=1) > 0, axis=1)
    out["ordered_fraction"] = float(np.mean(rising))
  return out


def format_table(effects: dict[str, dict], prompts: Sequence[str]) -> str:
  """Plain-text table, one row per guidance scale key of `effects` (`prompt_effect` outputs):
  mean per prompt, class-hit rate (MS) and the ordered fraction; a named set's row (e.g.
  'calibrated') is followed by each prompt's scale."""
  short = [p.replace("Subject has ", "").replace("Subject is ", "").rstrip(".") for p in prompts]
  width = max([5] + [len(k) for k in effects])
  lines = [f"{'w':>{width}}  " + "  ".join(f"{s[:22]:>22}" for s in short) + "   hit   ordered"]
  for key, eff in effects.items():
    cells = []
    for p in prompts:
      hit = eff.get("class_hit_rate", {}).get(p)
      cells.append(f"{eff['mean'][p]:8.1f} mL" + (f" ({hit:4.0%})" if hit is not None else ""))
    hit_all = eff.get("class_hit_rate_all")
    ordered = eff.get("ordered_fraction")
    lines.append(f"{key:>{width}}  " + "  ".join(f"{c:>22}" for c in cells)
                 + (f"  {hit_all:4.0%}" if hit_all is not None else "     -")
                 + (f"   {ordered:4.0%}" if ordered is not None else "      -"))
    if eff.get("guidance_scale"):
      lines.append(f"{'':>{width}}  " + "  ".join(
          f"{'w = ' + _scales_text(eff['guidance_scale'][p]):>22}" for p in prompts))
  return "\n".join(lines)


def _scales_text(w) -> str:
  """One scale ('6') or, where a set decodes a prompt at several (given scans of several
  factual classes), all of them ('4/10')."""
  return "/".join(format(v, "g") for v in w) if isinstance(w, (list, tuple)) else format(w, "g")
