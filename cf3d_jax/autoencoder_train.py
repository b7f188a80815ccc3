"""`--mode=train_autoencoder`: MAISI's KL autoencoder trained on the prepared volumes.

Input: the records `--mode=prepare` wrote (`WORKDIR/data/records`, volumes `[D, H, W, 1]` in
[-1, 1]) through the diffusion training stream (`data.pipeline`: train split, class weighting,
augmentation), in batches of `config.autoencoder.batch_size`; its text fields are ignored.
Each step crops every volume at a random offset to `config.autoencoder.patch_shape` (() = the
whole volume; MAISI trains on 64³ then 128³ patches).

Losses (MAISI's VAE recipe, DESIGN.md §4), weights from `config.autoencoder`:
  generator      L1(x̂, x) + kl_weight·KL + perceptual_weight·P(x̂, x)
                 + adversarial_weight·mean((D(x̂) − 1)²)               (defaults 1e-7, 0.3, 0.1)
  discriminator  adversarial_weight·½[mean(D(x̂)²) + mean((D(x) − 1)²)]  (least squares)
KL = ½ Σ(μ² + σ² − log σ² − 1) summed over the latent voxels and channels, averaged over the
batch (MAISI's `KL_loss`); x̂ decodes a posterior sample `μ + σ·ε`. D is MONAI's
`PatchDiscriminator` (`models.patch_discriminator`: 3 layers, 32 channels, instance norm). Both
adversarial losses switch on after `adversarial_warmup_steps` steps: before that the step
function has no discriminator at all (a separate compiled step), so the term is exactly off.
Generator and discriminator have their own Adam optimizers (`learning_rate`, MAISI 1e-4).

Perceptual term: MAISI uses squeeze-net LPIPS on 2D slices, whose pretrained weights cannot be
downloaded here. We use a 3D network instead: the MedicalNet ResNet (`models.resnet3d`) loaded
from a converted folder (`config.autoencoder.perceptual_network`, written by
`python -m cf3d_jax.convert medicalnet`); P is the LPIPS distance without learned weights on the
outputs of its four stages (`perceptual_loss`). Empty = the term is off (logged).

Randomness: `fold_in(key(seed) ⊕ stream, step)` per step (crop offsets and the posterior
sample), so a run is a pure function of the config. Checkpoints (orbax, `WORKDIR/autoencoder/
checkpoints`) hold the state `{params, opt_state, disc_params, disc_opt_state, step[, ema]}`
and the grain iterator: a resumed run equals an uninterrupted one. At the end the VAE params
(the EMA when `ema_decay > 0`) are written as a converted-checkpoint folder
`WORKDIR/autoencoder/vae` (converter 'maisi-vae', so `convert.load_converted` and the latent
space read it like NVIDIA's converted VAE), and the held-out (val split) reconstruction L1 and
PSNR to `WORKDIR/autoencoder/metrics.json`. Single process (no mesh): the data-parallel
trainer is `train.py`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from cf3d_jax import checkpoints, config_base, convert
from cf3d_jax.data import pipeline, records
from cf3d_jax.data.export import read_records, split_entries
from cf3d_jax.errors import Cf3dError, ConfigError, DataError
from cf3d_jax.files import write_text
from cf3d_jax.metrics.image import psnr
from cf3d_jax.models import autoencoder as ae_lib
from cf3d_jax.models import patch_discriminator as disc_lib
from cf3d_jax.models import resnet3d
from cf3d_jax.text.table import load_table
from cf3d_jax.workdir import Workdir

State = dict[str, Any]
Array = jax.Array

AUTOENCODER_STREAM = 4_000_037   # folded into key(seed): this mode's draws differ from train's
METRICS_NAME = "metrics.json"
DATA_RANGE = 2.0                 # volumes in [-1, 1]


# ---------------------------------------------------------------------------------------------
# Models and settings from the config

def build_vae(ac) -> ae_lib.AutoencoderKL:
  """The `AutoencoderKL` of `config.autoencoder` (1 → 1 channels)."""
  return ae_lib.build_autoencoder(dict(
      channels=tuple(int(c) for c in ac.channels),
      num_res_blocks=tuple(int(b) for b in ac.num_res_blocks),
      latent_channels=int(ac.latent_channels), norm_num_groups=int(ac.norm_num_groups),
      remat=bool(ac.remat), conv_impl=str(ac.conv_impl)))


def build_space_vae(config) -> ae_lib.AutoencoderKL:
  """`build_vae(config.autoencoder)`, checked against the latent space it is to serve:
  ConfigError if its latent channels or downsampling differ from `config.space`'s."""
  vae = build_vae(config.autoencoder)
  if (vae.latent_channels, vae.downsample_factor) != (int(config.space.latent_channels),
                                                      int(config.space.downsample)):
    raise ConfigError(
        f"config.autoencoder gives {vae.latent_channels} latent channels and downsampling "
        f"{vae.downsample_factor}; config.space.latent_channels={config.space.latent_channels}, "
        f"config.space.downsample={config.space.downsample}")
  return vae


def build_discriminator(ac) -> disc_lib.PatchDiscriminator:
  return disc_lib.PatchDiscriminator(channels=int(ac.disc_channels),
                                     num_layers=int(ac.disc_layers), conv_impl=str(ac.conv_impl))


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """The step's hyperparameters (hashable: a static argument of the jitted step)."""
  learning_rate: float = 1e-4
  kl_weight: float = 1e-7
  perceptual_weight: float = 0.3
  adversarial_weight: float = 0.1
  patch_shape: tuple[int, ...] = ()
  ema_decay: float = 0.0
  contrast_weight: float = 0.0

  @classmethod
  def from_config(cls, ac) -> "LossSettings":
    return cls(float(ac.learning_rate), float(ac.kl_weight), float(ac.perceptual_weight),
               float(ac.adversarial_weight), tuple(int(p) for p in ac.patch_shape),
               float(ac.ema_decay), float(ac.contrast_weight))


def make_optimizers(settings: LossSettings
                    ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(generator, discriminator) Adam, both at `learning_rate` (MAISI: 1e-4 for each)."""
  return optax.adam(settings.learning_rate), optax.adam(settings.learning_rate)


def _check(cond: bool, key: str, value, expected: str) -> None:
  if not cond:
    raise ConfigError(f"config.{key}={value!r}: expected {expected}")


def check_config(config) -> None:
  """Checks of `config.autoencoder` against the data, ConfigError naming the key: the
  validation pass runs them for --mode=train_autoencoder only (`cf3d_jax.validation`; the keys
  alone are checked for every mode)."""
  ac = config.autoencoder
  shape = tuple(int(s) for s in config.data.shape)
  factor = 2 ** (len(ac.channels) - 1)
  patch = tuple(int(p) for p in ac.patch_shape) or shape
  _check(all(p <= s for p, s in zip(patch, shape)), "autoencoder.patch_shape",
         tuple(ac.patch_shape), f"at most the volume, config.data.shape={shape} per axis "
         "(or () for the whole volume)")
  _check(all(s % factor == 0 for s in patch), "autoencoder.patch_shape", tuple(ac.patch_shape),
         f"sides divisible by {factor} = 2**(len(autoencoder.channels) - 1) (for () the volume "
         f"config.data.shape={shape})")
  logits = disc_lib.output_shape(patch, int(ac.disc_layers))
  _check(min(logits) >= 1, "autoencoder.disc_layers", ac.disc_layers,
         f"fewer layers: a {patch} patch leaves a {logits} logit grid (needs ≥ 1 per side; "
         "or use a larger autoencoder.patch_shape)")
  evals = tuple(int(p) for p in ac.eval_shape) or shape
  _check(all(p <= s and p % factor == 0 for p, s in zip(evals, shape)),
         "autoencoder.eval_shape", tuple(ac.eval_shape),
         f"at most config.data.shape={shape} and divisible by {factor} (or () for the volume)")


# ---------------------------------------------------------------------------------------------
# Losses: pure functions of arrays

def l1_loss(reconstruction: Array, target: Array) -> Array:
  """Mean |x̂ − x| over all voxels and items (MAISI's `L1Loss(reduction='mean')`)."""
  return jnp.mean(jnp.abs(reconstruction - target))


def contrast_l1_loss(reconstruction: Array, target: Array, strength: float) -> Array:
  """`config.autoencoder.contrast_weight` λ: mean of `w · |x̂ − x|` with `w` the target's local
  contrast weight (`objectives.common.contrast_weight_map`, mean 1 per volume, in units of the
  target's own std): a few-voxel lesion, which plain L1 lets the decoder blur into its
  surroundings, weighs up to (1 + λ c/mean c)/(1 + λ) times a flat voxel. λ = 0: `l1_loss`."""
  from cf3d_jax.objectives.common import contrast_weight_map
  weight = contrast_weight_map(target, 1.0, strength)
  if weight is None:
    return l1_loss(reconstruction, target)
  return jnp.mean(weight * jnp.abs(reconstruction - target))


def kl_loss(mean: Array, logvar: Array) -> Array:
  """KL(N(μ, σ²) ‖ N(0, 1)) of latents `[N, d, h, w, C]`: ½Σ(μ² + σ² − log σ² − 1) per item,
  averaged over the batch (MAISI's `KL_loss`)."""
  per_item = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - logvar - 1.0,
                           axis=tuple(range(1, mean.ndim)))
  return jnp.mean(per_item)


def lsgan_generator_loss(fake_logits: Array) -> Array:
  """Least squares, fake labelled real: mean((D(x̂) − 1)²)."""
  return jnp.mean(jnp.square(fake_logits - 1.0))


def lsgan_discriminator_loss(real_logits: Array, fake_logits: Array) -> Array:
  """½[mean(D(x̂)²) + mean((D(x) − 1)²)] (MONAI `PatchAdversarialLoss('least_squares')`)."""
  return 0.5 * (jnp.mean(jnp.square(fake_logits)) + jnp.mean(jnp.square(real_logits - 1.0)))


@dataclasses.dataclass(frozen=True)
class PerceptualNetwork:
  """A frozen MedicalNet ResNet whose stage outputs define the perceptual distance."""
  model: resnet3d.MedicalNetResNet

  @property
  def stages(self) -> tuple[str, ...]:
    """Flax names of the last block of layer1 … layer4."""
    _, counts = resnet3d.DEPTHS[self.model.depth]
    return tuple(f"layer{i}_{n - 1}" for i, n in enumerate(counts, start=1))

  def features(self, variables: Any, x: Array) -> list[Array]:
    """Stage outputs `[N, d_i, h_i, w_i, C_i]` of volumes x `[N, D, H, W, 1]`, each volume first
    standardised to zero mean and unit variance (MONAI's MedicalNet intensity normalisation)."""
    axes = tuple(range(1, x.ndim))
    x = (x - jnp.mean(x, axes, keepdims=True)) / (jnp.std(x, axes, keepdims=True) + 1e-6)
    names = set(self.stages)
    _, captured = self.model.apply(
        variables, x, pooled=False, mutable=["intermediates"],
        capture_intermediates=lambda module, method: method == "__call__" and
        module.name in names)
    return [captured["intermediates"][name]["__call__"][0] for name in self.stages]


def perceptual_loss(net: PerceptualNetwork, variables: Any, reconstruction: Array,
                    target: Array) -> Array:
  """LPIPS without learned weights on MedicalNet stages: features unit-normalised along channels,
  squared differences summed over channels, averaged over voxels and items, summed over the
  stages. Zero (up to float rounding) for identical volumes; x̂, x `[N, D, H, W, 1]`."""
  n = reconstruction.shape[0]
  total = jnp.zeros((), jnp.float32)
  for f in net.features(variables, jnp.concatenate([reconstruction, target])):  # one pass
    fa, fb = f[:n].astype(jnp.float32), f[n:].astype(jnp.float32)
    na = fa / (jnp.sqrt(jnp.sum(jnp.square(fa), -1, keepdims=True)) + 1e-10)
    nb = fb / (jnp.sqrt(jnp.sum(jnp.square(fb), -1, keepdims=True)) + 1e-10)
    total = total + jnp.mean(jnp.sum(jnp.square(na - nb), -1))
  return total


def load_perceptual_network(path: str) -> tuple[PerceptualNetwork | None, Any]:
  """(network, variables) from a converted MedicalNet folder; (None, None) for ''."""
  if not path:
    return None, None
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise DataError(f"config.autoencoder.perceptual_network={path!r}: no such folder; write one "
                    "with python -m cf3d_jax.convert medicalnet IN OUT (or set '' to turn the "
                    "perceptual term off)")
  meta = convert.read_converted_config(path)
  if meta["converter"] != "medicalnet":
    raise DataError(f"config.autoencoder.perceptual_network={path!r} holds a "
                    f"{meta['converter']!r} checkpoint; expected a 'medicalnet' one")
  model_config, variables = convert.load_converted(path)
  model = resnet3d.build_resnet3d(int(model_config["depth"]), model_config.get("shortcut_type"))
  return PerceptualNetwork(model), variables


# ---------------------------------------------------------------------------------------------
# State and the step

def random_crop(volume: Array, patch_shape: tuple[int, ...], key: Array) -> Array:
  """`[B, D, H, W, C] → [B, *patch_shape, C]`, a uniform random offset per item; () = no crop."""
  if not patch_shape or tuple(patch_shape) == tuple(volume.shape[1:4]):
    return volume
  limits = jnp.asarray([s - p for s, p in zip(volume.shape[1:4], patch_shape)], jnp.int32)
  starts = jax.random.randint(key, (volume.shape[0], 3), 0, limits + 1)
  size = tuple(patch_shape) + (volume.shape[-1],)
  return jax.vmap(lambda v, s: jax.lax.dynamic_slice(v, (s[0], s[1], s[2], 0), size))(
      volume, starts)


def center_crop(volumes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """`[N, D, H, W, C]` → the central `shape` block; () = unchanged."""
  if not shape:
    return volumes
  starts = [(s - p) // 2 for s, p in zip(volumes.shape[1:4], shape)]
  return volumes[:, starts[0]:starts[0] + shape[0], starts[1]:starts[1] + shape[1],
                 starts[2]:starts[2] + shape[2]]


def make_state(params: Any, disc_params: Any, settings: LossSettings) -> State:
  """The train state around given VAE and discriminator params (EMA when `ema_decay > 0`)."""
  tx_g, tx_d = make_optimizers(settings)
  state = {"params": params, "opt_state": tx_g.init(params), "disc_params": disc_params,
           "disc_opt_state": tx_d.init(disc_params), "step": jnp.zeros((), jnp.int32)}
  if settings.ema_decay > 0:
    state["ema"] = jax.tree.map(jnp.copy, params)
  return state


def _fresh_state(key: Array, model: ae_lib.AutoencoderKL, disc: disc_lib.PatchDiscriminator,
                 settings: LossSettings) -> State:
  k_vae, k_disc = jax.random.split(key)
  f = model.downsample_factor
  x = jnp.zeros((1, f, f, f, model.in_channels), jnp.float32)
  params = nn.unbox(model.init({"params": k_vae}, x)["params"])
  disc_params = disc_lib.init_params(disc, k_disc, jit=False)
  return make_state(params, disc_params, settings)


@functools.lru_cache(maxsize=8)
def _compiled_init(model: ae_lib.AutoencoderKL, disc: disc_lib.PatchDiscriminator,
                   settings: LossSettings):
  """`_fresh_state` compiled once per process and settings, without backend optimisation
  (the init's forward passes are dead code; see `ae_lib.init_params`)."""
  fn = jax.jit(functools.partial(_fresh_state, model=model, disc=disc, settings=settings))
  return fn.lower(jax.random.key(0)).compile(
      compiler_options={"xla_backend_optimization_level": 0})


def init_state(model: ae_lib.AutoencoderKL, disc: disc_lib.PatchDiscriminator,
               settings: LossSettings, key: Array) -> State:
  """A fresh state: the initialisers of `ae_lib.init_params` (torch defaults) and
  `disc_lib.init_params` (MONAI's)."""
  return _compiled_init(model, disc, settings)(key)


def abstract_state(model: ae_lib.AutoencoderKL, disc: disc_lib.PatchDiscriminator,
                   settings: LossSettings) -> State:
  """Shapes and dtypes of `init_state`'s output, allocating nothing (the restore target)."""
  return jax.eval_shape(functools.partial(make_state, settings=settings),
                        ae_lib.abstract_params(model), disc_lib.abstract_params(disc))


def train_step(state: State, volume: Array, base_key: Array, perceptual_variables: Any, *,
               model: ae_lib.AutoencoderKL, disc: disc_lib.PatchDiscriminator,
               perceptual: PerceptualNetwork | None, settings: LossSettings,
               adversarial: bool) -> tuple[State, dict[str, Array]]:
  """One generator (and, when `adversarial`, discriminator) update on volumes `[B, D, H, W, 1]`.

  adversarial=False: no discriminator in the graph; its params and Adam state pass through.
  Metrics: loss (the generator's total), l1, kl, perceptual, generator_adversarial,
  discriminator (unweighted LSGAN losses; 0 where off), grad_norm.
  """
  key = jax.random.fold_in(base_key, state["step"])
  k_crop, k_latent = jax.random.split(key)
  x = random_crop(volume.astype(jnp.float32), settings.patch_shape, k_crop)
  tx_g, tx_d = make_optimizers(settings)
  use_perceptual = perceptual is not None and settings.perceptual_weight > 0
  zero = jnp.zeros((), jnp.float32)

  def generator_loss(params):
    recon, mean, logvar = model.apply({"params": params}, x, k_latent)
    terms = {"l1": l1_loss(recon, x), "kl": kl_loss(mean, logvar), "perceptual": zero,
             "generator_adversarial": zero}
    reconstruction = (terms["l1"] if settings.contrast_weight == 0 else
                      contrast_l1_loss(recon, x, settings.contrast_weight))
    loss = reconstruction + settings.kl_weight * terms["kl"]
    if use_perceptual:
      terms["perceptual"] = perceptual_loss(perceptual, perceptual_variables, recon, x)
      loss = loss + settings.perceptual_weight * terms["perceptual"]
    if adversarial:
      fake_logits = disc.apply({"params": state["disc_params"]}, recon)
      terms["generator_adversarial"] = lsgan_generator_loss(fake_logits)
      loss = loss + settings.adversarial_weight * terms["generator_adversarial"]
    return loss, (recon, terms)

  (loss, (recon, terms)), grads = jax.value_and_grad(generator_loss, has_aux=True)(
      state["params"])
  updates, opt_state = tx_g.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
  terms["discriminator"] = zero
  if adversarial:
    fake = jax.lax.stop_gradient(recon)

    def discriminator_loss(disc_params):
      real_logits = disc.apply({"params": disc_params}, x)
      fake_logits = disc.apply({"params": disc_params}, fake)
      raw = lsgan_discriminator_loss(real_logits, fake_logits)
      return settings.adversarial_weight * raw, raw

    (_, raw), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
        state["disc_params"])
    d_updates, d_opt_state = tx_d.update(d_grads, state["disc_opt_state"], state["disc_params"])
    new_state["disc_params"] = optax.apply_updates(state["disc_params"], d_updates)
    new_state["disc_opt_state"] = d_opt_state
    terms["discriminator"] = raw
  if "ema" in state:
    d = settings.ema_decay
    new_state["ema"] = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], params)
  return new_state, {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}


# Module level, so every run in a process with the same static settings shares one compile.
jit_train_step = jax.jit(train_step, donate_argnums=0,
                         static_argnames=("model", "disc", "perceptual", "settings",
                                          "adversarial"))


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(model: ae_lib.AutoencoderKL, params: Any, x: Array) -> Array:
  return model.apply({"params": params}, x)[0]   # decodes the posterior mean


ROUND_TRIP_TOLERANCE_ML = 2.0   # issue 17: the round trip keeps the lesion load within 2 mL


def evaluate_reconstruction(model: ae_lib.AutoencoderKL, params: Any, volumes: np.ndarray,
                            batch_size: int, rule=None) -> dict[str, Any]:
  """Mean L1 and PSNR (dB, data range 2) of `volumes [N, D, H, W, 1]` reconstructed from μ.

  With a phantom `rule` (`metrics.phantom.PhantomRule` on the volumes' grid), also the ground
  truth through encode → decode: the rule's measurement (lesion or ventricle mL) of each input
  and of its reconstruction, their mean absolute difference, the largest, and the fraction of
  volumes within `ROUND_TRIP_TOLERANCE_ML`.
  """
  l1, db, before, after = [], [], [], []
  for i in range(0, len(volumes), batch_size):
    x = jnp.asarray(volumes[i:i + batch_size], jnp.float32)
    recon = _reconstruct(model, params, x)
    l1.extend(np.asarray(jnp.mean(jnp.abs(recon - x), axis=(1, 2, 3, 4))).tolist())
    db.extend(np.asarray(psnr(recon, x, DATA_RANGE)).tolist())
    if rule is not None:
      before.extend(rule.measure(v) for v in np.asarray(x))
      after.extend(rule.measure(v) for v in np.asarray(recon))
  out: dict[str, Any] = {"l1": float(np.mean(l1)), "psnr": float(np.mean(db)),
                         "num_volumes": len(volumes)}
  if rule is not None and before:
    change = np.asarray(after) - np.asarray(before)
    out["ground_truth"] = {
        "stat": rule.stat, "input": [round(v, 3) for v in before],
        "reconstruction": [round(v, 3) for v in after],
        "mean_abs_change": float(np.mean(np.abs(change))),
        "max_abs_change": float(np.max(np.abs(change))),
        "mean_change": float(np.mean(change)),
        "within_tolerance": float(np.mean(np.abs(change) <= ROUND_TRIP_TOLERANCE_ML)),
        "tolerance": ROUND_TRIP_TOLERANCE_ML}
  return out


def round_trip_rule(config, workdir: str, shape: tuple[int, ...]):
  """The phantom rule for held-out volumes of `shape` (D, H, W), or None: real scans (no
  `WORKDIR/data/reference`) or a crop (`autoencoder.eval_shape`) that is not the rule's grid."""
  from cf3d_jax.data import phantom_reference
  from cf3d_jax.metrics import phantom as phantom_lib
  reference = phantom_reference.find_reference(Workdir(workdir).reference)
  if reference is None or tuple(reference.shape) != tuple(shape):
    return None
  return phantom_lib.PhantomRule.build(config.data.dataset, reference,
                                       config.eval.lesion_threshold)


def held_out_volumes(config, data_dir: str, index: dict) -> np.ndarray:
  """The val split's volumes (the first `eval_batches · batch_size`; 0 = all), centre-cropped
  to `eval_shape`: `[N, *, 1]` float32."""
  ac = config.autoencoder
  entries = split_entries(index, "val", config.seed, tuple(config.data.split))
  if ac.eval_batches > 0:
    entries = entries[:ac.eval_batches * ac.batch_size]
  if not entries:
    return np.zeros((0, 1, 1, 1, 1), np.float32)
  volumes = np.stack([r["volume"] for r in read_records(data_dir, index, entries)])
  return center_crop(volumes.astype(np.float32), tuple(int(s) for s in ac.eval_shape))


# ---------------------------------------------------------------------------------------------
# The loop

def train_autoencoder(config, workdir: str) -> dict[str, Any]:
  """Trains to `config.autoencoder.num_steps` (resuming from its checkpoints), exports
  `WORKDIR/autoencoder/vae` and writes `metrics.json`; returns the metrics."""
  # ---- config and logging ------------------------------------------------------------------
  config_base.validate(config, "train_autoencoder")   # with check_config; once per config
  if jax.process_count() > 1:
    raise Cf3dError("--mode=train_autoencoder runs in one process; start it without "
                    "jax.distributed (--distributed=off)")
  from clu import metric_writers, periodic_actions
  ac = config.autoencoder
  wd = Workdir(workdir)
  out_dir = wd.autoencoder                   # checkpoints/, tensorboard/, vae/, metrics.json
  writer = metric_writers.create_default_writer(os.path.join(out_dir, "tensorboard"))
  # ---- input -------------------------------------------------------------------------------
  index = records.load_index(wd.records)
  recorded = tuple(index.get("meta", {}).get("shape", ()))
  if recorded and recorded != tuple(config.data.shape):
    raise DataError(f"{wd.records}: records of shape {recorded}, but config.data.shape="
                    f"{tuple(config.data.shape)}; prepare again or fix the config")
  stream_config = config.copy_and_resolve_references()
  with stream_config.unlocked():
    stream_config.train.batch_size = int(ac.batch_size)
  data_iter = iter(pipeline.make_train_dataset(wd.records, index,
                                               load_table(wd.table), stream_config,
                                               shard_index=0, shard_count=1))
  # ---- models, perceptual network, optimizers ----------------------------------------------
  model, disc = build_vae(ac), build_discriminator(ac)
  settings = LossSettings.from_config(ac)
  perceptual, perceptual_variables = load_perceptual_network(ac.perceptual_network)
  if perceptual is None or settings.perceptual_weight == 0:
    logging.info("autoencoder: perceptual term off (config.autoencoder.perceptual_network=%r, "
                 "perceptual_weight=%s); MAISI's LPIPS weights are not available here",
                 ac.perceptual_network, settings.perceptual_weight)
    perceptual, perceptual_variables = None, None
  else:
    logging.info("autoencoder: perceptual term on MedicalNet resnet%d stages %s (weight %s)",
                 perceptual.model.depth, perceptual.stages, settings.perceptual_weight)
  base_key = jax.random.fold_in(jax.random.key(config.seed), AUTOENCODER_STREAM)
  init_key, step_key = jax.random.split(base_key)
  # ---- state: resume or init ---------------------------------------------------------------
  mngr = checkpoints.make_manager(os.path.join(out_dir, "checkpoints"), int(ac.max_to_keep))
  if mngr.latest_step() is not None:
    state = checkpoints.restore_state(mngr, abstract_state(model, disc, settings),
                                      data_iterator=data_iter)
    logging.info("autoencoder: resumed from step %d", int(state["step"]))
  else:
    state = init_state(model, disc, settings, init_key)
  logging.info("autoencoder: VAE %d params, discriminator %d params",
               ae_lib.count_params(state["params"]), disc_lib.count_params(state["disc_params"]))
  # ---- loop --------------------------------------------------------------------------------
  report = periodic_actions.ReportProgress(num_train_steps=int(ac.num_steps), writer=writer,
                                           every_steps=int(ac.log_every))
  step = int(state["step"])
  from tqdm import tqdm
  bar = tqdm(total=int(ac.num_steps), initial=step, desc="autoencoder", unit="step",
             disable=jax.process_index() > 0, mininterval=2.0)
  t0 = time.time()
  while step < ac.num_steps:
    volume = jnp.asarray(next(data_iter)["volume"])
    state, metrics = jit_train_step(
        state, volume, step_key, perceptual_variables, model=model, disc=disc,
        perceptual=perceptual, settings=settings,
        adversarial=step >= ac.adversarial_warmup_steps)
    step += 1
    bar.update(1)
    report(step, time.time())
    if step % ac.log_every == 0 or step == ac.num_steps:
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(values["loss"]):
        raise Cf3dError(f"autoencoder training diverged at step {step}: loss {values['loss']}; "
                        "lower config.autoencoder.learning_rate")
      values["steps_per_sec"] = ac.log_every / max(time.time() - t0, 1e-9)
      writer.write_scalars(step, values)
      bar.set_postfix(loss=f"{values['loss']:.3g}", refresh=False)
      t0 = time.time()
    if step % ac.checkpoint_every == 0 or step == ac.num_steps:
      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iter),
          meta=ocp.args.JsonSave({"step": step, "seed": config.seed})))
  bar.close()
  mngr.wait_until_finished()
  # ---- export and held-out metrics ---------------------------------------------------------
  params = jax.device_get(state["ema"] if "ema" in state else state["params"])
  vae_dir = convert.save_converted(os.path.join(out_dir, "vae"), params, "maisi-vae",
                                   ae_lib.autoencoder_hparams(model), overwrite=True)
  volumes = held_out_volumes(config, wd.records, index)
  if len(volumes):
    rule = round_trip_rule(config, workdir, volumes.shape[1:4])
    val = evaluate_reconstruction(model, params, volumes, int(ac.batch_size), rule)
  else:
    logging.warning("autoencoder: the val split is empty; no held-out metrics")
    val = None
  summary = {"step": step, "val": val, "vae": vae_dir, "ema": "ema" in state,
             "perceptual_network": ac.perceptual_network if perceptual is not None else None,
             "num_params": ae_lib.count_params(params),
             "eval_shape": list(volumes.shape[1:4]) if len(volumes) else None}
  write_text(os.path.join(out_dir, METRICS_NAME), json.dumps(summary, indent=1) + "\n")
  writer.write_scalars(step, {f"val_{k}": v for k, v in (val or {}).items()
                              if k not in ("num_volumes", "ground_truth")})
  writer.flush()
  logging.info("autoencoder: step %d, val %s → %s", step,
               {k: v for k, v in (val or {}).items() if k != "ground_truth"}, vae_dir)
  gt = (val or {}).get("ground_truth")
  if gt is not None:
    logging.info("autoencoder: round trip of %d held-out phantoms: %s changes by %.2f on average "
                 "(largest %.2f); %.0f %% within %g", len(gt["input"]), gt["stat"],
                 gt["mean_abs_change"], gt["max_abs_change"], 100 * gt["within_tolerance"],
                 gt["tolerance"])
  return summary
