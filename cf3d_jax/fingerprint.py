"""What a workdir was made with: the config keys that define its data and its model, recorded
where they were used (`data/records/dataset.json` meta, each checkpoint's `meta` item) and
compared with the running config before anything is reused.

Groups (`keys_for`):
- `data`: what the prepared records and text table hold (grid, field of view, dataset, source,
  phantom settings and seed, or the manifest and its intensity window; the text table).
- `model`: what the weights mean (U-Net architecture, space, objective's training definition,
  data grid, dataset, text table) — checked by train (resume) and sample.
- `recipe`: how training continues (seed, batch size, optimiser settings) — checked on resume.

A difference is one ConfigError listing every differing key with its old and new value.
`config.train.allow_config_change` lists keys allowed to differ (fine-tuning with a new
learning rate, a new seed); the keys in `STRUCTURAL` change the shapes of the weights or records
and cannot be allowed (use a new workdir). Records and checkpoints written before fingerprints
existed carry none and are not checked (a warning says so).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from absl import logging

from cf3d_jax.errors import ConfigError

# Keys that change the shape of the weights or the records: never allowed to differ.
STRUCTURAL = (
    "data.shape", "space.name", "space.latent_channels", "space.downsample",
    "model.out_channels", "model.base_channels", "model.channel_mult", "model.num_res_blocks",
    "model.num_middle_blocks", "model.attention_levels", "model.middle_attention",
    "model.cross_attention_levels", "model.middle_cross_attention", "model.head_channels",
    "model.num_groups", "model.resblock_updown", "model.text_time_embedding",
    "model.scale_shift_norm", "model.param_dtype")

MODEL = STRUCTURAL + (
    "model.dropout", "model.dropout_levels", "model.middle_dropout", "space.lll_scale",
    "objective.name", "objective.num_train_steps", "objective.prediction",
    "objective.preconditioning", "objective.sigma_data", "objective.sigma_data_channels",
    "objective.beta_schedule", "objective.beta_start", "objective.beta_end", "objective.loss",
    "objective.loss_weighting", "objective.snr_range", "objective.channel_weight_power",
    "objective.contrast_weight", "objective.contrast_source", "objective.contrast_channels",
    "objective.time_sampling",
    "objective.logit_normal",
    "objective.time_shift", "objective.shift_base_numel", "objective.shift_scale",
    "data.dataset", "text.table")

RECIPE = ("seed", "train.batch_size", "train.learning_rate", "train.warmup_steps",
          "train.lr_schedule", "train.lr_decay_steps", "train.final_lr_fraction",
          "train.weight_decay", "train.grad_clip_norm", "train.ema_decay")

_DATA_COMMON = ("data.source", "data.dataset", "data.shape", "data.fov_mm", "text.table")
_DATA_PHANTOM = ("seed", "data.num_subjects", "data.class_fractions", "data.phantom.deform_mm",
                 "data.phantom.bias_strength", "data.phantom.noise_std",
                 "data.phantom.lesion_radius_mm")
_DATA_MANIFEST = ("data.manifest", "data.intensity_percentiles")


def keys_for(config, group: str) -> tuple[str, ...]:
  """The keys of `group` ('data' | 'model' | 'recipe') for this config."""
  if group == "data":
    extra = _DATA_PHANTOM if config.data.source == "phantom" else _DATA_MANIFEST
    return _DATA_COMMON + extra
  return {"model": MODEL, "recipe": RECIPE}[group]


def _plain(value: Any) -> Any:
  """JSON-comparable form: tuples → lists, numpy scalars → Python numbers."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if hasattr(value, "item") and not isinstance(value, (str, bytes)):
    return value.item()
  return value


def _get(config, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def record(config, *groups: str) -> dict[str, Any]:
  """{key: value} of the config's keys in `groups`, JSON-ready (what is stored)."""
  keys = dict.fromkeys(k for g in groups for k in keys_for(config, g))
  return {k: _plain(_get(config, k)) for k in keys}


def differences(stored: Mapping[str, Any], config, keys: Sequence[str]) -> list[tuple[str, Any,
                                                                                       Any]]:
  """(key, stored value, config value) for each of `keys` the stored record holds with
  another value (a key the record lacks is not compared)."""
  out = []
  for key in keys:
    if key not in stored:
      continue
    new = _plain(_get(config, key))
    old = stored[key]
    if isinstance(new, float) or isinstance(old, float):
      same = isinstance(new, (int, float)) and isinstance(old, (int, float)) and \
          float(new) == float(old)
    else:
      same = new == old
    if not same:
      out.append((key, old, new))
  return out


def check(stored: Mapping[str, Any] | None, config, groups: Sequence[str], where: str,
          more: Sequence[tuple[str, Any, Any]] = ()) -> None:
  """ConfigError listing every key of `groups` whose value differs from the `stored` record
  (written when `where` was made), unless `config.train.allow_config_change` lists it and it is
  not STRUCTURAL. `more`: differences found elsewhere, reported in the same error. None (a
  workdir from before fingerprints) is logged and passes."""
  if stored is None:
    logging.warning("%s: no config fingerprint recorded (written by an older version); "
                    "not checked against the config", where)
    diffs = list(more)
  else:
    keys = dict.fromkeys(k for g in groups for k in keys_for(config, g))
    diffs = list(more) + differences(stored, config, list(keys))
  allowed = set(config.train.allow_config_change)
  blocking = [d for d in diffs if not _allowed(d[0], allowed)]
  for key, old, new in diffs:
    if _allowed(key, allowed):
      logging.warning("%s: %s changed %r → %r (allowed by train.allow_config_change)", where,
                      key, old, new)
  if not blocking:
    return
  listed = "; ".join(f"{k}: {old!r} → {new!r}" for k, old, new in blocking)
  fixed = sorted(k for k, _, _ in blocking if k in STRUCTURAL)
  free = [k for k, _, _ in blocking if k not in STRUCTURAL]
  advice = "Use a new --workdir for the new config"
  if free:
    advice += (f"; to continue from this one anyway (e.g. fine-tuning), allow the change "
               f"explicitly: --config.train.allow_config_change=\"{tuple(sorted(free))!r}\"")
  if fixed:
    advice += f" ({', '.join(fixed)} change the shapes of what is stored and cannot be allowed)"
  raise ConfigError(f"{where} was made with another config: {listed}. {advice}")


def _allowed(key: str, allowed: set[str]) -> bool:
  """Whether `key` may differ under `allowed` (train.allow_config_change)."""
  return key in allowed and key not in STRUCTURAL
