"""The one validation pass of a config (`validate`), run at the entry: `modes.preflight` (the
CLI's `main.py`), `curve.training_curve`, and the programmatic entry points (`train_and_evaluate`,
`evaluate`, `checkpoints.load_generator`, `train_classifier`, `train_autoencoder`), which a
CLI run reaches after `preflight` has passed the same config: a pass is remembered by the
config's content, so each check runs once per config however many entry points it crosses.

What it checks, in this order, raising ConfigError naming the key (all range problems at once):
  ranges      every key in its range (`config_ranges.RANGES`, docs/configs.md's *allowed* column);
  between     conditions between keys (manifest with its source, lengths per U-Net level,
              widths divisible by the GroupNorm groups, the mesh rules, the autoencoder's keys);
  grid        for the diffusion modes (DIFFUSION_MODES): data.shape divisible by what the space
              and the U-Net need;
  names       names against the registries that resolve them (`registries()`: spaces, U-Net
              conv implementations, remat policies and dtypes, datasets, built-in text tables)
              and the objective built from `config.objective` (its options resolved against
              the objectives' registries, the conditions between its keys);
  autoencoder for --mode=train_autoencoder: the autoencoder's patch and eval shapes against the
              data (`autoencoder_train.check_config`).
Modules keep only cheap asserts of invariants a direct caller could break (e.g. the U-Net's input
shapes); they do not repeat these checks.
"""

from __future__ import annotations

from typing import Callable, Collection

import ml_collections

from cf3d_jax.config_ranges import check_ranges, get_key
from cf3d_jax.errors import ConfigError

# Modes that build the diffusion U-Net on config.data.shape (others, e.g. the autoencoder's
# configs, may use a grid the default U-Net cannot take).
DIFFUSION_MODES = ("train", "calibrate", "sample", "all", "evaluate")

_PASSED: dict[str, frozenset[str]] = {}    # config content → the check groups it passed
_MAX_REMEMBERED = 64


def validate(c: ml_collections.ConfigDict, mode: str | None = None) -> None:
  """Raises ConfigError naming the key for values outside what the code supports.

  One pass before any mode writes anything: the groups of checks this `mode` needs (see the
  module docstring), each skipped when this config's content has already passed it.
  """
  needed = (["ranges", "between"] + (["grid"] if mode in DIFFUSION_MODES else []) + ["names"]
            + (["autoencoder"] if mode == "train_autoencoder" else []))
  content = c.to_json_best_effort(sort_keys=True)
  passed = _PASSED.get(content, frozenset())
  for group in needed:
    if group not in passed:
      CHECKS[group](c)
  if len(_PASSED) >= _MAX_REMEMBERED:
    _PASSED.clear()
  _PASSED[content] = passed | frozenset(needed)


def _check(cond: bool, key: str, value, expected: str) -> None:
  if not cond:
    raise ConfigError(f"config.{key}={value!r}: expected {expected}")


def _has_key(c: ml_collections.ConfigDict, dotted: str) -> bool:
  try:
    get_key(c, dotted)
  except (KeyError, AttributeError, TypeError):
    return False
  return True


# ---- names against the registries -------------------------------------------------------------
def registries() -> dict[str, tuple[Collection[str], ...]]:
  """Key → the registries its value must be a name of (each module's own name → function or
  class dict; a dataset must be known to every per-dataset table)."""
  from cf3d_jax import config_base, spaces
  from cf3d_jax.data import ingest
  from cf3d_jax.metrics import phantom
  from cf3d_jax.models import layers, unet
  from cf3d_jax.text import prompts
  return {
      "space.name": (spaces.SPACES,),
      "model.conv_impl": (layers.CONV_CHOICES,),
      "autoencoder.conv_impl": (layers.CONV_CHOICES,),
      "model.middle_remat": (layers.REMAT_POLICIES,),
      "model.dtype": (unet.DTYPES,),
      "model.param_dtype": (unet.DTYPES,),
      "data.dataset": (config_base.DATASET_DEFAULTS, prompts.CLASSES, ingest.MANIFEST_COLUMNS,
                       phantom.STATS),
  }


def _check_names(c: ml_collections.ConfigDict) -> None:
  """Names against the registries that resolve them; the objective built from its section."""
  for key, tables in registries().items():
    value = get_key(c, key)
    for table in tables:
      _check(value in table, key, value, f"one of {sorted(table)}")
  from cf3d_jax.models import layers
  for policy in c.model.remat_levels:
    _check(policy in layers.REMAT_POLICIES, "model.remat_levels", tuple(c.model.remat_levels),
           f"entries among {sorted(layers.REMAT_POLICIES)}")
  if c.text.table.startswith("builtin:"):
    from cf3d_jax.text.table import builtin_table_names
    names = builtin_table_names()
    _check(c.text.table[len("builtin:"):] in names, "text.table", c.text.table,
           f"a .npz path or 'builtin:NAME' with NAME among {names}")
  from cf3d_jax.objectives import build_objective
  from cf3d_jax.spaces import make_space
  build_objective(c.objective, make_space(c.space).latent_shape(tuple(c.data.shape)))


# ---- conditions between keys ------------------------------------------------------------------
def _check_between(c: ml_collections.ConfigDict) -> None:
  """Conditions between keys (each key is already in its own range)."""
  if c.data.manifest and c.data.source != "manifest":
    raise ConfigError(f"config.data.manifest={c.data.manifest!r} is set but "
                      f"config.data.source={c.data.source!r}: add --config.data.source=manifest "
                      "to prepare from the manifest, or leave data.manifest empty for phantoms")
  _check(c.data.source != "manifest" or bool(c.data.manifest), "data.manifest", c.data.manifest,
         "a CSV path when data.source='manifest'")
  _check(abs(sum(c.data.split) - 1) < 1e-6, "data.split", c.data.split,
         "three fractions summing to 1")
  _check(abs(sum(c.data.class_fractions) - 1) < 1e-6, "data.class_fractions",
         c.data.class_fractions, "fractions summing to 1")
  _check(len(set(c.data.augment.flip_axes)) == len(c.data.augment.flip_axes),
         "data.augment.flip_axes", c.data.augment.flip_axes, "distinct axes among 0, 1, 2")
  lo, hi = c.data.intensity_percentiles
  _check(lo < hi, "data.intensity_percentiles", c.data.intensity_percentiles, "(lo, hi), lo < hi")
  _check(not c.sample.calibrate or c.data.dataset == "ms", "sample.calibrate", c.sample.calibrate,
         f"False for data.dataset={c.data.dataset!r}: calibration scores prompts by the class "
         "ranges of the MS lesion-load prompts (cf3d_jax.calibrate)")
  lo, hi = c.data.phantom.lesion_radius_mm
  _check(lo <= hi, "data.phantom.lesion_radius_mm", c.data.phantom.lesion_radius_mm,
         "(lo, hi), lo <= hi")
  horizon = c.train.lr_decay_steps or c.train.num_steps
  _check(c.train.lr_schedule != "cosine" or horizon > c.train.warmup_steps,
         "train.lr_decay_steps", c.train.lr_decay_steps,
         f"> train.warmup_steps ({c.train.warmup_steps}) for the cosine schedule "
         f"(0 = train.num_steps = {c.train.num_steps})")
  unknown = [k for k in c.train.allow_config_change if not _has_key(c, k)]
  _check(not unknown, "train.allow_config_change", tuple(c.train.allow_config_change),
         f"dotted config keys (unknown: {unknown})")
  if c.space.name == "latent":
    _check(c.model.out_channels == c.space.latent_channels, "model.out_channels",
           c.model.out_channels, f"= space.latent_channels ({c.space.latent_channels})")
  _check(c.objective.beta_start <= c.objective.beta_end, "objective.beta_end",
         c.objective.beta_end, f">= objective.beta_start ({c.objective.beta_start})")
  _check(c.objective.num_sample_steps <= c.objective.num_train_steps,
         "objective.num_sample_steps", c.objective.num_sample_steps,
         f"<= objective.num_train_steps ({c.objective.num_train_steps}); 0 = the default")
  channels = tuple(c.objective.sigma_data_channels)
  _check(not channels or len(channels) == c.model.out_channels, "objective.sigma_data_channels",
         channels, f"() or one value per diffused channel (model.out_channels = "
         f"{c.model.out_channels})")
  lo, hi = c.sample.guidance_interval
  _check(lo <= hi, "sample.guidance_interval", c.sample.guidance_interval,
         "(lo, hi) with 0 <= lo <= hi <= 1")
  _check_unet_levels(c)
  from cf3d_jax import parallel
  parallel.rules_from_config(c.mesh)          # ConfigError naming config.mesh.rules
  _check_autoencoder_keys(c)


def _check_unet_levels(c: ml_collections.ConfigDict) -> None:
  """Per-level lists one entry per channel_mult level; every width divisible by num_groups."""
  levels = len(c.model.channel_mult)
  for key in ("attention_levels", "cross_attention_levels", "dropout_levels"):
    _check(len(c.model[key]) == levels, f"model.{key}", c.model[key],
           f"one entry per channel_mult level ({levels})")
  remat = tuple(c.model.remat_levels)
  _check(not remat or len(remat) == levels, "model.remat_levels", remat,
         f"() or one entry per channel_mult level ({levels})")
  for mult in (1,) + tuple(c.model.channel_mult):
    _check((mult * c.model.base_channels) % c.model.num_groups == 0, "model.num_groups",
           c.model.num_groups, f"a divisor of every U-Net width (base_channels="
           f"{c.model.base_channels} × channel_mult {tuple(c.model.channel_mult)})")


def _check_autoencoder_keys(c: ml_collections.ConfigDict) -> None:
  """The `config.autoencoder` keys between themselves. Checks against config.data.shape run only
  for --mode=train_autoencoder (`_check_autoencoder_grid`), so other modes never fail on the
  autoencoder's patch size."""
  a = c.autoencoder
  groups = a.norm_num_groups
  _check(all(int(ch) % groups == 0 for ch in a.channels), "autoencoder.channels", a.channels,
         f"at least one width, each a positive multiple of norm_num_groups={groups}")
  _check(len(a.num_res_blocks) == len(a.channels), "autoencoder.num_res_blocks",
         a.num_res_blocks, f"one count >= 0 per level of autoencoder.channels ({len(a.channels)})")
  factor = 2 ** (len(a.channels) - 1)
  for key in ("patch_shape", "eval_shape"):
    shape = tuple(a[key])
    _check(not shape or (len(shape) == 3 and all(int(s) % factor == 0 for s in shape)),
           f"autoencoder.{key}", shape,
           f"() or three positive sides divisible by {factor} = 2**(len(autoencoder.channels) - 1)")


# ---- mode-specific grids ----------------------------------------------------------------------
def _check_unet_grid(c: ml_collections.ConfigDict) -> None:
  """data.shape divisible by the space's factor × the U-Net's downsampling (ConfigError)."""
  levels = len(c.model.channel_mult)
  per_axis = (2 if c.space.name == "wavelet" else c.space.downsample) * 2 ** (levels - 1)
  what = ("2 (Haar)" if c.space.name == "wavelet" else
          f"space.downsample={c.space.downsample}") + f" × 2**(len(model.channel_mult) - 1)"
  _check(all(int(s) % per_axis == 0 for s in c.data.shape), "data.shape", tuple(c.data.shape),
         f"sides divisible by {per_axis} = {what}")


def _check_autoencoder_grid(c: ml_collections.ConfigDict) -> None:
  from cf3d_jax.autoencoder_train import check_config
  check_config(c)


CHECKS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "ranges": check_ranges, "names": _check_names, "between": _check_between,
    "grid": _check_unet_grid, "autoencoder": _check_autoencoder_grid,
}
