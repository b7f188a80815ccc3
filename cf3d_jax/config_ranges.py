"""The allowed range of every config key: `RANGES`, checked by `check_ranges` (the first group
of the validation pass, `cf3d_jax.validation`) and shown in docs/configs.md's *allowed* column.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import ml_collections
import numpy as np

from cf3d_jax.errors import ConfigError

# A rule is (predicate on the value, what is expected). Cross-key conditions (lengths that must
# match, divisibility) and names against the registries are checked in `cf3d_jax.validation`
# after every key is in its own range.
Rule = tuple[Callable[[Any], bool], str]


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
      and math.isfinite(float(v))


def _num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False, integer: bool = False) -> Rule:
  """A finite number (an int with `integer`) in the interval; None = unbounded on that side."""
  def ok(v) -> bool:
    if not (_is_int(v) if integer else _is_num(v)):
      return False
    return ((lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))
  kind = "an int" if integer else "a number"
  fmt = (lambda x: f"{x:d}") if integer else (lambda x: f"{x:g}")
  if lo is not None and hi is not None:
    text = f"{kind} in {'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"
  elif lo is not None:
    text = f"{kind} {'>' if lo_open else '>='} {fmt(lo)}"
  elif hi is not None:
    text = f"{kind} {'<' if hi_open else '<='} {fmt(hi)}"
  else:
    text = kind
  return ok, text


def _one_of(*values) -> Rule:
  """One of `values` (kept as the predicate's `names`, checked against the registries by
  tests/test_validation.py)."""
  def ok(v) -> bool:
    return v in values
  ok.names = values
  return ok, "one of " + ", ".join(repr(x) for x in values)


def _seq(rule: Rule, min_len: int = 0, length: int | None = None) -> Rule:
  """A tuple whose every entry satisfies `rule` (and has `length` / at least `min_len` entries)."""
  def ok(v) -> bool:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
      return False
    n = len(v)
    return (n == length if length is not None else n >= min_len) and all(rule[0](x) for x in v)
  if length is not None:
    count = f"{length} entries"
  else:
    count = "a tuple" if min_len == 0 else f"at least {min_len} entr{'y' if min_len == 1 else 'ies'}"
  return ok, f"{count}, each {rule[1]}"


_BOOL: Rule = (lambda v: isinstance(v, bool), "True or False")
_TEXT: Rule = (lambda v: isinstance(v, str), "a string ('' where allowed)")
_NONEMPTY_TEXT: Rule = (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")
_POS_INT = _num(1, integer=True)
_NONNEG_INT = _num(0, integer=True)
_POS = _num(0, lo_open=True)
_NONNEG = _num(0)
_FRACTION_OPEN = _num(0, 1, hi_open=True)

RANGES: dict[str, Rule] = {
    "seed": _num(0, 2 ** 31 - 1, integer=True),
    "space.name": _one_of("wavelet", "latent"),
    "space.lll_scale": _POS,
    "space.autoencoder": _TEXT,
    "space.latent_channels": _POS_INT,
    "space.downsample": _POS_INT,
    "space.scale_factor": _NONNEG,
    "space.decode_splits": _POS_INT,
    "space.encode_batch_size": _POS_INT,
    "data.dataset": _one_of("ms", "adni"),
    "data.source": _one_of("phantom", "manifest"),
    "data.manifest": _TEXT,
    "data.shape": _seq(_POS_INT, length=3),
    "data.fov_mm": _POS,
    "data.num_subjects": _POS_INT,
    "data.class_fractions": _seq(_num(0, 1), min_len=1),
    "data.split": _seq(_num(0, 1), length=3),
    "data.class_weighting": _BOOL,
    "data.records_per_shard": _POS_INT,
    "data.num_workers": _NONNEG_INT,
    "data.prefetch": _NONNEG_INT,
    "data.read_threads": _POS_INT,
    "data.prepare_workers": _num(-1, integer=True),
    "data.max_scan_gb": _POS,
    "data.augment.intensity_scale": _FRACTION_OPEN,
    "data.augment.intensity_shift": _num(0, 1),
    "data.augment.flip_axes": _seq(_one_of(0, 1, 2)),
    "data.intensity_percentiles": _seq(_num(0, 100), length=2),
    "data.phantom.deform_mm": _NONNEG,
    "data.phantom.bias_strength": _FRACTION_OPEN,
    "data.phantom.noise_std": _NONNEG,
    "data.phantom.lesion_radius_mm": _seq(_POS, length=2),
    "text.table": _NONEMPTY_TEXT,
    "text.null_prob": _FRACTION_OPEN,
    "text.paraphrases": _BOOL,
    "model.name": _one_of("unet"),
    "model.out_channels": _POS_INT,
    "model.base_channels": _POS_INT,
    "model.channel_mult": _seq(_POS_INT, min_len=1),
    "model.num_res_blocks": _POS_INT,
    "model.num_middle_blocks": _NONNEG_INT,
    "model.attention_levels": _seq(_BOOL),
    "model.middle_attention": _BOOL,
    "model.cross_attention_levels": _seq(_BOOL),
    "model.middle_cross_attention": _BOOL,
    "model.head_channels": _POS_INT,
    "model.dropout": _FRACTION_OPEN,
    "model.dropout_levels": _seq(_BOOL),
    "model.middle_dropout": _BOOL,
    "model.num_groups": _POS_INT,
    "model.resblock_updown": _BOOL,
    "model.text_time_embedding": _BOOL,
    "model.scale_shift_norm": _BOOL,
    "model.conv_impl": _one_of("auto", "xla", "im2col", "planes"),
    "model.dtype": _one_of("float32", "bfloat16"),
    "model.param_dtype": _one_of("float32", "bfloat16"),
    "model.remat_levels": _seq(_one_of("none", "dots", "full")),
    "model.middle_remat": _one_of("none", "dots", "full"),
    "autoencoder.channels": _seq(_POS_INT, min_len=1),
    "autoencoder.num_res_blocks": _seq(_NONNEG_INT, min_len=1),
    "autoencoder.latent_channels": _POS_INT,
    "autoencoder.norm_num_groups": _POS_INT,
    "autoencoder.remat": _BOOL,
    "autoencoder.conv_impl": _one_of("auto", "xla", "im2col", "planes"),
    "autoencoder.num_steps": _POS_INT,
    "autoencoder.batch_size": _POS_INT,
    "autoencoder.learning_rate": _POS,
    "autoencoder.kl_weight": _NONNEG,
    "autoencoder.contrast_weight": _NONNEG,
    "autoencoder.perceptual_weight": _NONNEG,
    "autoencoder.perceptual_network": _TEXT,
    "autoencoder.adversarial_weight": _NONNEG,
    "autoencoder.adversarial_warmup_steps": _NONNEG_INT,
    "autoencoder.disc_channels": _POS_INT,
    "autoencoder.disc_layers": _POS_INT,
    "autoencoder.patch_shape": _seq(_POS_INT),
    "autoencoder.ema_decay": _FRACTION_OPEN,
    "autoencoder.log_every": _POS_INT,
    "autoencoder.checkpoint_every": _POS_INT,
    "autoencoder.max_to_keep": _POS_INT,
    "autoencoder.eval_batches": _NONNEG_INT,
    "autoencoder.eval_shape": _seq(_POS_INT),
    "objective.name": _one_of("ddpm", "rflow"),
    "objective.num_train_steps": _POS_INT,
    "objective.num_sample_steps": _NONNEG_INT,
    "objective.sampler": _one_of("default", "ddim", "ancestral", "euler", "heun"),
    "objective.loss": _one_of("default", "mse", "l1"),
    "objective.preconditioning": _one_of("none", "skip"),
    "objective.sigma_data": _POS,
    "objective.loss_weighting": _one_of("none", "edm", "min_snr"),
    "objective.sigma_data_channels": _seq(_POS),
    "objective.snr_range": _seq(_NONNEG, length=2),
    "objective.channel_weight_power": _NONNEG,
    "objective.contrast_weight": _NONNEG,
    "objective.contrast_source": _one_of("clean", "noisy"),
    "objective.contrast_channels": _seq(_NONNEG_INT),
    "objective.beta_schedule": _one_of("linear", "scaled_linear"),
    "objective.beta_start": _num(0, 1, lo_open=True, hi_open=True),
    "objective.beta_end": _num(0, 1, lo_open=True, hi_open=True),
    "objective.prediction": _one_of("x0", "eps", "v"),
    "objective.eta": _num(0, 1),
    "objective.timestep_spacing": _one_of("leading", "trailing", "linspace"),
    "objective.ancestral_variance": _one_of("fixed_small", "fixed_large"),
    "objective.time_sampling": _one_of("uniform", "logit-normal"),
    "objective.logit_normal": _seq(_num(), length=2),
    "objective.time_shift": _BOOL,
    "objective.shift_base_numel": _POS_INT,
    "objective.shift_scale": _POS,
    "train.num_steps": _POS_INT,
    "train.batch_size": _POS_INT,
    "train.learning_rate": _NONNEG,
    "train.warmup_steps": _NONNEG_INT,
    "train.lr_schedule": _one_of("constant", "cosine"),
    "train.lr_decay_steps": _NONNEG_INT,
    "train.final_lr_fraction": _num(0, 1),
    "train.weight_decay": _NONNEG,
    "train.grad_clip_norm": _NONNEG,
    "train.ema_decay": _FRACTION_OPEN,
    "train.log_every": _POS_INT,
    "train.checkpoint_every": _POS_INT,
    "train.max_to_keep": _POS_INT,
    "train.init_from": _TEXT,
    "train.allow_config_change": _seq(_NONEMPTY_TEXT),
    "sample.prompts": _seq(_NONEMPTY_TEXT, min_len=1),
    "sample.guidance_scales": _seq(_NONNEG, min_len=1),
    "sample.guidance_interval": _seq(_num(0, 1), length=2),
    "sample.guidance_rescale": _num(0, 1),
    "sample.guidance_negative": _one_of("null", "factual"),
    "sample.background_threshold": _num(0, 2, hi_open=True),
    "sample.background_margin": _num(0, integer=True),
    "sample.background_min_island": _num(0, integer=True),
    "sample.calibrate": _BOOL,
    "sample.calibration_scales": _seq(_NONNEG, min_len=1),
    "sample.calibration_noises": _POS_INT,
    "sample.calibration_min_psnr": _NONNEG,
    "sample.calibration_margin": _num(0, 1, hi_open=True),
    "sample.num_subjects": _POS_INT,
    "sample.batch_size": _POS_INT,
    "sample.use_ema": _BOOL,
    "sample.checkpoint_step": _num(-1, integer=True),
    "sample.source": _TEXT,
    "sample.source_prompts": _seq(_NONEMPTY_TEXT),
    "sample.inversion": _one_of("ddim", "edit_friendly"),
    "sample.inversion_refine": _NONNEG_INT,
    "sample.inversion_depth": _num(0, 1, lo_open=True),
    "sample.edit_mask": _TEXT,
    "eval.lesion_threshold": _num(-1, 1),
    "eval.num_per_prompt": _POS_INT,
    "eval.guidance_scales": _seq(_NONNEG, min_len=1),
    "eval.batch_size": _POS_INT,
    "eval.real_split": _one_of("train", "val", "test"),
    "eval.ms_ssim_kernel": _POS_INT,
    "eval.ms_ssim_scales": _POS_INT,
    "eval.diversity_pairs": _NONNEG_INT,
    "eval.med3d": _TEXT,
    "eval.classifier": _TEXT,
    "classifier.num_steps": _POS_INT,
    "classifier.batch_size": _POS_INT,
    "classifier.learning_rate": _POS,
    "classifier.weight_decay": _NONNEG,
    "classifier.dropout": _FRACTION_OPEN,
    "classifier.eval_every": _POS_INT,
    "classifier.block_config": _seq(_POS_INT, min_len=1),
    "mesh.shape": ((lambda v: _seq(_num(-1, integer=True), length=3)[0](v) and 0 not in tuple(v)
                    and tuple(v).count(-1) <= 1),
                   "3 ints (data, fsdp, spatial), each >= 1 or one of them -1"),
    "mesh.cpu_devices": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1,
                         "an int: 0 = JAX's own, -1 = auto, n >= 1 = n CPU devices"),
    "mesh.rules": (lambda v: not isinstance(v, str) and hasattr(v, "__len__"),
                   "pairs (logical axis, mesh axes); checked by cf3d_jax.parallel"),
}


def get_key(c: ml_collections.ConfigDict, dotted: str) -> Any:
  """The value at a dotted key (`train.num_steps`); KeyError if absent."""
  for part in dotted.split("."):
    c = c[part]
  return c


def _problems(items) -> list[str]:
  """'config.KEY=VALUE: expected …' for each (key, value) outside its `RANGES` rule."""
  problems = []
  for key, value in items:
    ok, expected = RANGES[key]
    try:
      good = bool(ok(value))
    except (TypeError, ValueError):
      good = False
    if not good:
      problems.append(f"config.{key}={value!r}: expected {expected}")
  return problems


def _raise(problems: list[str]) -> None:
  if problems:
    raise ConfigError("; ".join(problems) if len(problems) > 1 else problems[0])


def check_ranges(c: ml_collections.ConfigDict) -> None:
  """Every key of `c` that `RANGES` knows in its range; ConfigError naming each key outside it."""
  items = []
  for key in RANGES:
    try:
      items.append((key, get_key(c, key)))
    except (KeyError, AttributeError):
      continue                                 # a config built without this section
  _raise(_problems(items))


def check_section(values, section: str) -> None:
  """The keys of one section (`values`: `config.<section>` as a mapping) in their `RANGES`
  range; keys it lacks are skipped. For builders called without a whole config
  (`objectives.make_objective`); `check_ranges` covers every section."""
  prefix = section + "."
  _raise(_problems((key, values[key[len(prefix):]]) for key in RANGES
                   if key.startswith(prefix) and key[len(prefix):] in values))
