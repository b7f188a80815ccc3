"""Where diffusion runs: one `encode(x) → z` / `decode(z) → x` interface for every model family.

`WaveletSpace` (WDM): z = Haar DWT of the image with the LLL subband divided by `lll_scale` (3).
`x [N, D, H, W, C]` in [-1, 1] ↔ `z [N, D/2, H/2, W/2, 8*C]`. `clip_x0` clips a predicted z0
through image space (IDWT → clamp to [-1, 1] → DWT), as wdm-3d does when sampling.
`LatentSpace` (MAISI): z = VAE posterior mean × `scale_factor` (1/std of the prepared
latents). `x [N, D, H, W, 1]` ↔ `z [N, D/f, H/f, W/f, latent_channels]`, f = 4 for MAISI.
`clip_x0` is None (MAISI does not clip latents). The trainer reads `prepare_latents`' shards of
unscaled latents (`Workdir.train_records`), so it never runs the encoder; sampling decodes through the VAE.

Every space (the `Space` protocol) has `latent_shape(image)`, `record_shape(image)` (what the training records hold),
`from_records(v)` (records → z0), `encode(x)`, `decode(z)`, `clip_x0`, and `params` (arrays the
space needs on device, passed to jitted functions as an argument with `with_params`, so a VAE's
weights are not baked into compiled code as constants). One trainer and one sampler serve WDM
and MAISI alike.

On a mesh (`placed(space, mesh, rules)`, from `cf3d_jax.parallel`), the wavelet space runs its
transforms block-local under `shard_map` (`wavelets.haar_dwt3d_sharded`): a volume split along
depth is transformed by each device on its own block with no communication.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, ClassVar, Protocol

import jax
import jax.numpy as jnp

from cf3d_jax import parallel, wavelets
from cf3d_jax.errors import ConfigError, DataError
from cf3d_jax.workdir import Workdir


class Space(Protocol):
  """Where diffusion runs (`WaveletSpace`, `LatentSpace`): what the trainer and sampler call.

  Shapes: image `x [N, D, H, W, C]` in [-1, 1]; z `[N, *latent_shape]`; records as
  `record_shape` says.
  """
  params: Any                   # arrays the space needs on device (None: none)
  # `clip_x0(z0 [N, ...]) → z0 [N, ...]` clips a predicted z0 through image space, or None.
  clip_x0: Callable[[jnp.ndarray], jnp.ndarray] | None

  def latent_shape(self, image_shape: tuple[int, int, int], channels: int = 1
                   ) -> tuple[int, int, int, int]:
    """`(D, H, W)` → the diffused tensor's `(d, h, w, c)`; a ConfigError for sizes it cannot
    take."""

  def record_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """What one training record's `volume` holds, `(…, channels)`."""

  def from_records(self, volume: jnp.ndarray) -> jnp.ndarray:
    """Record batch `[N, *record_shape]` → z0 `[N, *latent_shape]`."""

  def encode(self, x: jnp.ndarray) -> jnp.ndarray:
    """Image `[N, D, H, W, C]` → z `[N, *latent_shape]`."""

  def decode(self, z: jnp.ndarray) -> jnp.ndarray:
    """z `[N, *latent_shape]` → image `[N, D, H, W, C]`."""

  def with_params(self, params: Any) -> "Space":
    """The same space with `params` (traced arguments inside jit)."""


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

  def record_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Training records hold images `(D, H, W, 1)`."""
    return tuple(image_shape) + (1,)

  def from_records(self, volume: jnp.ndarray) -> jnp.ndarray:
    """Record batch `[N, D, H, W, 1]` → z0 (the DWT)."""
    return self.encode(volume)

  params = None   # nothing on device

  def with_params(self, params) -> "WaveletSpace":
    del params
    return self


@dataclasses.dataclass(frozen=True)
class LatentSpace:
  """A frozen KL autoencoder's latents × `scale_factor` (MAISI's latent diffusion).

  Shapes come from the config (`latent_channels`, `downsample`), so training state and
  shardings are known without loading the VAE; `autoencoder`/`params` are set by
  `make_space(..., load_autoencoder=True)` for encoding and decoding. `decode_splits > 1`
  decodes in chunks along depth (`chunked_decode.decode_split`: less memory, GroupNorm statistics
  per chunk).
  """
  latent_channels: int = 4
  downsample: int = 4
  scale_factor: float | None = None
  decode_splits: int = 1
  autoencoder: Any = None       # models.autoencoder.AutoencoderKL
  params: Any = None            # its params
  clip_x0: ClassVar[None] = None

  def latent_shape(self, image_shape: tuple[int, int, int], channels: int = 1
                   ) -> tuple[int, int, int, int]:
    """`(D, H, W)` → `(D/f, H/f, W/f, latent_channels)`; sizes not divisible by f are an error."""
    if channels != 1:
      raise ConfigError(f"latent space encodes one image channel, got {channels}")
    if any(s % self.downsample for s in image_shape):
      raise ConfigError(f"latent space needs image sizes divisible by {self.downsample} "
                        f"(config.space.downsample); config.data.shape={tuple(image_shape)}")
    return tuple(s // self.downsample for s in image_shape) + (self.latent_channels,)

  def record_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Training records (`prepare_latents`) hold unscaled latents `(D/f, H/f, W/f, C_lat)`."""
    return self.latent_shape(image_shape)

  def _scale(self) -> float:
    if self.scale_factor is None:
      raise ConfigError("latent space: no scale factor; run --mode=prepare_latents (it records "
                        "1/std of the latents) or set config.space.scale_factor")
    return float(self.scale_factor)

  def _model(self):
    if self.autoencoder is None or self.params is None:
      raise ConfigError("latent space built without its autoencoder: use "
                        "make_space(config.space, workdir, load_autoencoder=True)")
    return self.autoencoder

  def from_records(self, latent: jnp.ndarray) -> jnp.ndarray:
    """Unscaled latents `[N, d, h, w, C_lat]` → z0 = latent × scale_factor."""
    return latent * jnp.asarray(self._scale(), latent.dtype)

  def encode(self, x: jnp.ndarray) -> jnp.ndarray:
    """Image `[N, D, H, W, 1]` → z = posterior mean × scale_factor `[N, D/f, H/f, W/f, C_lat]`."""
    mean, _ = self._model().apply({"params": self.params}, x, method="encode")
    return mean * self._scale()

  def decode(self, z: jnp.ndarray) -> jnp.ndarray:
    """z `[N, d, h, w, C_lat]` → image `[N, f·d, f·h, f·w, 1]`."""
    from cf3d_jax.models.chunked_decode import decode_split
    model = self._model()
    return decode_split(model, self.params, z / self._scale(), self.decode_splits, axis=0)

  def with_params(self, params) -> "LatentSpace":
    """The same space with `params` (e.g. traced arguments inside jit)."""
    return dataclasses.replace(self, params=params)


def _wavelet(space_config, workdir, with_vae) -> WaveletSpace:
  del workdir, with_vae
  return WaveletSpace(lll_scale=space_config.lll_scale)


def autoencoder_path(space_config, workdir: str | None) -> str:
  """The VAE folder: `config.space.autoencoder`, or `WORKDIR/autoencoder/vae` (written by
  `--mode=train_autoencoder`) when empty."""
  if space_config.autoencoder:
    return os.path.abspath(os.path.expanduser(space_config.autoencoder))
  if workdir is None:
    raise ConfigError("config.space.autoencoder is empty and there is no workdir to find "
                      "WORKDIR/autoencoder/vae in")
  return os.path.abspath(Workdir(workdir).vae)


def latents_dir(workdir: str) -> str:
  """`WORKDIR/data/latents`, where `prepare_latents` writes the latent shards; kept for callers
  of the earlier API (use `Workdir(workdir).latents`)."""
  return Workdir(workdir).latents


def recorded_scale_factor(workdir: str) -> float:
  """The scale factor `prepare_latents` recorded in `data/latents/dataset.json`."""
  path = os.path.join(latents_dir(workdir), "dataset.json")
  if not os.path.exists(path):
    raise DataError(f"{path}: no prepared latents; run --mode=prepare_latents first (after "
                    "prepare and train_autoencoder, or with config.space.autoencoder set)")
  try:
    with open(path, encoding="utf-8") as f:
      return float(json.load(f)["meta"]["scale_factor"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: no readable meta.scale_factor ({e!r})") from e


def load_autoencoder(space_config, workdir: str | None):
  """(AutoencoderKL, params) from the VAE folder, checked against the space's shape keys."""
  from cf3d_jax import convert
  from cf3d_jax.models import autoencoder as ae_lib
  path = autoencoder_path(space_config, workdir)
  if not os.path.isdir(path):
    raise DataError(f"{path}: no autoencoder here; train one (--mode=train_autoencoder) or "
                    "convert MAISI's (python -m cf3d_jax.convert maisi-vae IN OUT) and set "
                    "config.space.autoencoder")
  model_config, params = convert.load_converted(path)
  model = ae_lib.build_autoencoder(model_config)
  if (model.latent_channels, model.downsample_factor) != (space_config.latent_channels,
                                                          space_config.downsample):
    raise ConfigError(
        f"{path}: the autoencoder has {model.latent_channels} latent channels and downsamples "
        f"by {model.downsample_factor}; config.space.latent_channels="
        f"{space_config.latent_channels}, config.space.downsample={space_config.downsample}")
  return model, params


def _latent(space_config, workdir, with_vae) -> LatentSpace:
  scale = float(space_config.scale_factor) or None
  if scale is None:
    scale = recorded_scale_factor(workdir) if workdir is not None else 1.0
  model, params = load_autoencoder(space_config, workdir) if with_vae else (None, None)
  return LatentSpace(latent_channels=int(space_config.latent_channels),
                     downsample=int(space_config.downsample), scale_factor=scale,
                     decode_splits=int(space_config.decode_splits), autoencoder=model,
                     params=params)


SPACES = {"wavelet": _wavelet, "latent": _latent}


def placed(space: Space, mesh, rules) -> Space:
  """`space` laid out on `mesh` under logical `rules` (block-local transforms); a space without
  mesh support is returned unchanged."""
  if isinstance(space, WaveletSpace):
    return dataclasses.replace(space, mesh=mesh, rules=tuple(rules))
  return space


def make_space(space_config, workdir: str | None = None, *, load_autoencoder: bool = False
               ) -> Space:
  """Builds the space named by `config.space.name`.

  Latent space: the scale factor is `config.space.scale_factor` if > 0, else the one recorded
  by `prepare_latents` in `workdir` (without a workdir: 1, for shape and timing uses only);
  `load_autoencoder` loads the VAE (needed to encode images or decode samples).
  """
  if space_config.name not in SPACES:
    raise ConfigError(f"config.space.name={space_config.name!r}: expected one of {sorted(SPACES)}")
  return SPACES[space_config.name](space_config, workdir, load_autoencoder)
