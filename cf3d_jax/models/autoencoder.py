"""MAISI's 3D KL autoencoder (MONAI `AutoencoderKlMaisi`) in flax.linen, channels-last.

Volumes are `[N, D, H, W, C]`; with `L = len(channels)` levels the latents are
`[N, D/f, H/f, W/f, latent_channels]`, `f = 2**(L - 1)` (4 for MAISI's three levels).
The defaults are the released MAISI VAE (`configs/config_maisi.json` of the MAISI tutorials):
1 → 4 latent channels, channels (64, 128, 256), 2 residual blocks per level, GroupNorm 32
groups with eps 1e-6, no attention: 20,944,897 parameters.

Structure (exactly `monai.apps.generation.maisi.networks.autoencoderkl_maisi`, which reuses
`monai.networks.nets.autoencoderkl.AutoencoderKL`'s encode/decode):
  encoder: `blocks_0` conv3 in→channels[0]; per level i `num_res_blocks[i]` ResBlocks to
           channels[i], then (not after the last level) a Downsample: zero-pad (0, 1) at the END
           of every spatial axis, then a stride-2 3×3×3 conv with no padding (same channels);
           then GroupNorm and conv3 channels[-1]→latent_channels. No SiLU between that last
           norm and conv (MONAI's encoder and decoder have none there).
  quant:   `quant_conv_mu`, `quant_conv_log_sigma` (1×1×1, latent→latent); log-variance clamped
           to [-30, 20]. (MONAI's `encode` returns σ = exp(logvar / 2); ours returns logvar.)
  decoder: `post_quant_conv` (1×1×1) then `blocks_0` conv3 latent→channels[-1]; levels in
           reverse order with `num_res_blocks` reversed, each level followed (but the last) by
           an Upsample: trilinear ×2 (torch `F.interpolate(mode='trilinear',
           align_corners=False)`, edge voxels clamped) then a conv3 (same channels); then
           GroupNorm and conv3 → out_channels, again with no SiLU in between.
  ResBlock: `h = conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))`, output `nin_shortcut(x) + h`
           (`nin_shortcut` a 1×1×1 conv when the channels change, else identity).
All GroupNorms are computed in float32 (torch's biased variance), as MONAI's `MaisiGroupNorm3D`.
MONAI's `MaisiConvolution` splits a conv's input along `dim_split` into `num_splits` pieces with a
3-voxel halo and `MaisiGroupNorm3D` loops over groups; both only save GPU memory and are the
plain conv / GroupNorm up to float rounding (tests/test_convert.py checks num_splits=2).
`norm_float16` (fp16 norm outputs) is not reproduced; use `dtype=bfloat16` for low precision.

Flax names mirror torch's flat block lists: `encoder.blocks.{i}` → `encoder/blocks_{i}` with the
same index (ResBlock children `norm1, conv1, norm2, conv2, nin_shortcut`; Downsample/Upsample
child `conv`), `quant_conv_mu`, `quant_conv_log_sigma`, `post_quant_conv` unchanged. Conv
kernels are `[kD, kH, kW, C_in, C_out]` (torch `[C_out, C_in, kD, kH, kW]`), norms
`scale`/`bias`. `cf3d_jax.convert.maisi_vae` imports MONAI checkpoints.

Memory: `remat=True` rematerialises every ResBlock in the backward pass (same outputs and
gradients); `cf3d_jax.models.chunked_decode.decode_split` decodes the latent in chunks along one
spatial axis.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cf3d_jax.errors import ConfigError
from cf3d_jax.models import layers

__all__ = ['AutoencoderConfigError', 'AutoencoderKL', 'LOGVAR_RANGE', 'abstract_params',
           'autoencoder_hparams', 'build_autoencoder', 'count_params', 'init_params',
           'param_logical_axes', 'sample_latent', 'upsample_trilinear_2x']

Array = jax.Array
Dtype = Any

LOGVAR_RANGE = (-30.0, 20.0)  # MONAI clamps the encoder's log-variance to this range.


class AutoencoderConfigError(ConfigError, ValueError):
  """An invalid autoencoder setting or input shape (a `ConfigError` and a `ValueError`)."""


def upsample_trilinear_2x(x: Array) -> Array:
  """Trilinear ×2 on every spatial axis: `[N, D, H, W, C] → [N, 2D, 2H, 2W, C]`.

  Equals torch's `F.interpolate(x, scale_factor=2, mode='trilinear', align_corners=False)`:
  along each axis `out[2i] = ¾x[i] + ¼x[i-1]`, `out[2i+1] = ¾x[i] + ¼x[i+1]`, with the
  missing neighbour at either end replaced by the edge voxel itself.
  """
  for axis in (1, 2, 3):
    n = x.shape[axis]
    first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
    last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
    prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
    even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
    x = jnp.stack([even, odd], axis=axis + 1).reshape(
        x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])
  return x


def sample_latent(mean: Array, logvar: Array, key: Array) -> Array:
  """`z = mean + exp(logvar / 2) · ε`, ε ~ N(0, 1) from `key`; shapes `[N, d, h, w, C]`."""
  eps = jax.random.normal(key, mean.shape, jnp.float32)
  return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps)


class ResBlock(nn.Module):
  """MAISI ResBlock: `nin_shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))`.

  `[N, D, H, W, C_in] → [N, D, H, W, out_channels]`; children `norm1, conv1, norm2, conv2`
  and, when `C_in != out_channels`, the 1×1×1 conv `nin_shortcut`.
  """
  out_channels: int
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  conv_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv_kw = dict(impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype)
    norm_kw = dict(num_groups=self.norm_num_groups, epsilon=self.norm_eps,
                   param_dtype=self.param_dtype)
    h = nn.silu(layers.GroupNorm(name='norm1', **norm_kw)(x))
    h = layers.Conv3D(self.out_channels, 3, name='conv1', **conv_kw)(h)
    h = nn.silu(layers.GroupNorm(name='norm2', **norm_kw)(h))
    h = layers.Conv3D(self.out_channels, 3, name='conv2', **conv_kw)(h)
    if x.shape[-1] != self.out_channels:
      x = layers.Conv3D(self.out_channels, 1, name='nin_shortcut', **conv_kw)(x)
    return x.astype(h.dtype) + h


class Downsample(nn.Module):
  """Zero-pad (0, 1) at the end of D, H and W, then a stride-2 3×3×3 conv (child `conv`).

  `[N, D, H, W, C] → [N, D/2, H/2, W/2, C]` for even sizes.
  """
  conv_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 1), (0, 0)))
    return layers.Conv3D(x.shape[-1], 3, stride=2, padding=0, impl=self.conv_impl,
                         dtype=self.dtype, param_dtype=self.param_dtype, name='conv')(x)


class Upsample(nn.Module):
  """Trilinear ×2 then a 3×3×3 conv (child `conv`): `[N, D, H, W, C] → [N, 2D, 2H, 2W, C]`."""
  conv_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = upsample_trilinear_2x(x.astype(self.dtype))
    return layers.Conv3D(x.shape[-1], 3, impl=self.conv_impl, dtype=self.dtype,
                         param_dtype=self.param_dtype, name='conv')(x)


class _Cascade(nn.Module):
  """Shared fields of `Encoder` and `Decoder` (see the module docstring for the layout)."""
  channels: tuple[int, ...] = (64, 128, 256)
  num_res_blocks: tuple[int, ...] = (2, 2, 2)
  out_channels: int = 4
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  remat: bool = False
  conv_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _res_block(self, out_channels: int, name: str) -> nn.Module:
    cls = nn.remat(ResBlock) if self.remat else ResBlock
    return cls(out_channels, self.norm_num_groups, self.norm_eps, self.conv_impl,
               self.dtype, self.param_dtype, name=name)

  def _conv(self, features: int, name: str) -> layers.Conv3D:
    return layers.Conv3D(features, 3, impl=self.conv_impl, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)

  def _head(self, h: Array, index: int) -> Array:
    """GroupNorm `blocks_{index}` then conv3 `blocks_{index + 1}` to `out_channels`."""
    h = layers.GroupNorm(self.norm_num_groups, self.norm_eps, param_dtype=self.param_dtype,
                         name=f'blocks_{index}')(h)
    return self._conv(self.out_channels, f'blocks_{index + 1}')(h)


class Encoder(_Cascade):
  """`[N, D, H, W, C_in] → [N, D/f, H/f, W/f, out_channels]` (before the quant convs)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.constrain_volume(self._conv(self.channels[0], 'blocks_0')(x.astype(self.dtype)))
    index = 1
    for level, (ch, blocks) in enumerate(zip(self.channels, self.num_res_blocks)):
      for _ in range(blocks):
        h = layers.constrain_volume(self._res_block(ch, f'blocks_{index}')(h))
        index += 1
      if level != len(self.channels) - 1:
        h = layers.constrain_volume(Downsample(name=f'blocks_{index}', **kw)(h))
        index += 1
    return layers.constrain_volume(self._head(h, index))


class Decoder(_Cascade):
  """`[N, d, h, w, C_latent] → [N, f·d, f·h, f·w, out_channels]` (after `post_quant_conv`)."""

  @nn.compact
  def __call__(self, z: Array) -> Array:
    kw = dict(conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype)
    channels = tuple(reversed(self.channels))
    h = layers.constrain_volume(self._conv(channels[0], 'blocks_0')(z.astype(self.dtype)))
    index = 1
    for level, (ch, blocks) in enumerate(zip(channels, reversed(self.num_res_blocks))):
      for _ in range(blocks):
        h = layers.constrain_volume(self._res_block(ch, f'blocks_{index}')(h))
        index += 1
      if level != len(channels) - 1:
        h = layers.constrain_volume(Upsample(name=f'blocks_{index}', **kw)(h))
        index += 1
    return layers.constrain_volume(self._head(h, index))


class AutoencoderKL(nn.Module):
  """MAISI KL autoencoder; see the module docstring for the layout and names.

  Methods (call through `apply(..., method='encode')` etc.):
    encode(x `[N, D, H, W, in_channels]`) → (mean, logvar), each `[N, D/f, H/f, W/f, latent]`
    decode(z `[N, d, h, w, latent]`) → x `[N, f·d, f·h, f·w, out_channels]`
    sample_latent(mean, logvar, key) → z
    __call__(x, key) → (reconstruction, mean, logvar)
  Outputs are float32 whatever `dtype` (the compute dtype) is.
  """
  in_channels: int = 1
  out_channels: int = 1
  latent_channels: int = 4
  channels: tuple[int, ...] = (64, 128, 256)
  num_res_blocks: tuple[int, ...] = (2, 2, 2)
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  attention_levels: tuple[bool, ...] = ()   # MONAI's; any True is unsupported (error)
  with_encoder_nonlocal_attn: bool = False  # MONAI's; True is unsupported (error)
  with_decoder_nonlocal_attn: bool = False  # MONAI's; True is unsupported (error)
  remat: bool = False                       # rematerialise the ResBlocks in backward passes
  conv_impl: str = 'xla'                    # 'xla' | 'im2col' | 'planes' | 'auto' (layers.conv3d)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self) -> None:
    self.check_config()
    super().__post_init__()

  @property
  def downsample_factor(self) -> int:
    """Image voxels per latent voxel along each axis: `2**(len(channels) - 1)`."""
    return 2 ** (len(self.channels) - 1)

  def check_config(self) -> None:
    """Raises `AutoencoderConfigError` for settings this port does not support."""
    name = 'AutoencoderKL'
    if len(self.channels) < 1:
      raise AutoencoderConfigError(f'{name}.channels must have at least one level.')
    if len(self.num_res_blocks) != len(self.channels):
      raise AutoencoderConfigError(
          f'{name}.num_res_blocks={tuple(self.num_res_blocks)} needs one entry per level of '
          f'channels={tuple(self.channels)}.')
    if any(int(b) < 0 for b in self.num_res_blocks):
      raise AutoencoderConfigError(
          f'{name}.num_res_blocks={tuple(self.num_res_blocks)} must be non-negative.')
    bad = [c for c in self.channels if int(c) <= 0 or int(c) % self.norm_num_groups]
    if bad:
      raise AutoencoderConfigError(
          f'{name}.channels={tuple(self.channels)}: {bad} not positive multiples of '
          f'norm_num_groups={self.norm_num_groups} (GroupNorm needs whole groups).')
    for field in ('in_channels', 'out_channels', 'latent_channels'):
      if int(getattr(self, field)) <= 0:
        raise AutoencoderConfigError(f'{name}.{field}={getattr(self, field)} must be positive.')
    if self.attention_levels and len(self.attention_levels) != len(self.channels):
      raise AutoencoderConfigError(
          f'{name}.attention_levels={tuple(self.attention_levels)} needs one entry per level '
          f'of channels={tuple(self.channels)} (or none).')
    if (any(self.attention_levels) or self.with_encoder_nonlocal_attn
        or self.with_decoder_nonlocal_attn):
      raise AutoencoderConfigError(
          f'{name}: attention is not supported (attention_levels='
          f'{tuple(self.attention_levels)}, with_encoder_nonlocal_attn='
          f'{self.with_encoder_nonlocal_attn}, with_decoder_nonlocal_attn='
          f'{self.with_decoder_nonlocal_attn}); the MAISI VAE has none. Set them all False.')
    if self.conv_impl not in layers.CONV_CHOICES:
      raise AutoencoderConfigError(f'{name}.conv_impl={self.conv_impl!r}: expected one of '
                                   f'{layers.CONV_CHOICES}.')

  def setup(self) -> None:
    kw = dict(channels=tuple(int(c) for c in self.channels),
              num_res_blocks=tuple(int(b) for b in self.num_res_blocks),
              norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps, remat=self.remat,
              conv_impl=self.conv_impl, dtype=jnp.dtype(self.dtype),
              param_dtype=jnp.dtype(self.param_dtype))
    conv_kw = dict(impl=self.conv_impl, dtype=jnp.dtype(self.dtype),
                   param_dtype=jnp.dtype(self.param_dtype))
    self.encoder = Encoder(out_channels=self.latent_channels, **kw)
    self.decoder = Decoder(out_channels=self.out_channels, **kw)
    self.quant_conv_mu = layers.Conv3D(self.latent_channels, 1, **conv_kw)
    self.quant_conv_log_sigma = layers.Conv3D(self.latent_channels, 1, **conv_kw)
    self.post_quant_conv = layers.Conv3D(self.latent_channels, 1, **conv_kw)

  def _check_input(self, x: Array, channels: int, what: str, factor: int) -> None:
    if x.ndim != 5 or x.shape[-1] != channels:
      raise AutoencoderConfigError(
          f'AutoencoderKL.{what} expects [N, D, H, W, {channels}] (channels-last), got shape '
          f'{tuple(x.shape)}.')
    if factor > 1 and any(s % factor for s in x.shape[1:4]):
      raise AutoencoderConfigError(
          f'AutoencoderKL.{what}: spatial shape {tuple(x.shape[1:4])} (input '
          f'{tuple(x.shape)}) must be divisible by {factor} = 2**(len(channels) - 1) on every '
          f'axis for channels={tuple(self.channels)}; pad or crop the volume.')

  def encode(self, x: Array) -> tuple[Array, Array]:
    """x `[N, D, H, W, in]` → (mean, logvar) `[N, D/f, H/f, W/f, latent]`, float32.

    logvar is clamped to `LOGVAR_RANGE` as MONAI does before taking σ = exp(logvar / 2).
    """
    self._check_input(x, self.in_channels, 'encode', self.downsample_factor)
    h = self.encoder(x)
    mean = self.quant_conv_mu(h).astype(jnp.float32)
    logvar = jnp.clip(self.quant_conv_log_sigma(h).astype(jnp.float32), *LOGVAR_RANGE)
    return mean, logvar

  def decode(self, z: Array) -> Array:
    """z `[N, d, h, w, latent]` → x `[N, f·d, f·h, f·w, out]`, float32."""
    self._check_input(z, self.latent_channels, 'decode', 1)
    return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

  def sample_latent(self, mean: Array, logvar: Array, key: Array) -> Array:
    """`mean + exp(logvar / 2) · ε` (see the module-level `sample_latent`)."""
    return sample_latent(mean, logvar, key)

  def __call__(self, x: Array, key: Array | None = None) -> tuple[Array, Array, Array]:
    """encode → sample → decode: x `[N, D, H, W, in]` → (reconstruction, mean, logvar).

    key: PRNG key for the posterior sample; None decodes the mean (MONAI's `reconstruct`).
    """
    mean, logvar = self.encode(x)
    z = mean if key is None else self.sample_latent(mean, logvar, key)
    return self.decode(z), mean, logvar


# ---------------------------------------------------------------------------------------------
# Construction, parameters

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
_TUPLE_FIELDS = ('channels', 'num_res_blocks', 'attention_levels')


def _fields() -> list[str]:
  return [f.name for f in dataclasses.fields(AutoencoderKL) if f.name not in ('parent', 'name')]


def build_autoencoder(model_config: Any) -> AutoencoderKL:
  """Builds an `AutoencoderKL` from a mapping / ConfigDict with its field names.

  Missing fields take the MAISI defaults; lists become tuples; dtypes may be strings
  ('float32', 'bfloat16', 'float16'). Unknown keys are an `AutoencoderConfigError` (with the
  closest field name when there is one), so a typo never silently falls back to a default.
  """
  if isinstance(model_config, AutoencoderKL):
    return model_config
  if hasattr(model_config, 'to_dict'):
    items = dict(model_config.to_dict())
  elif isinstance(model_config, Mapping):
    items = dict(model_config)
  else:
    raise AutoencoderConfigError(f'autoencoder config must be a mapping, got '
                                 f'{type(model_config).__name__}.')
  fields = _fields()
  unknown = [k for k in items if k not in fields]
  if unknown:
    hints = [f'{k} (did you mean {difflib.get_close_matches(k, fields, 1)[0]}?)'
             if difflib.get_close_matches(k, fields, 1) else k for k in unknown]
    raise AutoencoderConfigError(f'autoencoder config has unknown keys {hints}; the settings '
                                 f'are {fields}.')
  kwargs = {}
  for key, value in items.items():
    if key in ('dtype', 'param_dtype') and isinstance(value, str):
      if value not in _DTYPES:
        raise AutoencoderConfigError(f'autoencoder {key}={value!r} is not one of '
                                     f'{sorted(_DTYPES)}.')
      value = _DTYPES[value]
    elif key in _TUPLE_FIELDS:
      value = tuple(bool(v) if key == 'attention_levels' else int(v) for v in value)
    kwargs[key] = value
  return AutoencoderKL(**kwargs)


def autoencoder_hparams(model: AutoencoderKL) -> dict[str, Any]:
  """The model's settings as JSON-ready values (tuples → lists, dtypes → names).

  `build_autoencoder(autoencoder_hparams(model))` rebuilds an equal model.
  """
  out = {}
  for key in _fields():
    value = getattr(model, key)
    if key in ('dtype', 'param_dtype'):
      value = jnp.dtype(value).name
    elif isinstance(value, tuple):
      value = list(value)
    out[key] = value
  return out


def _boxed_init(model: AutoencoderKL, key: Array) -> Any:
  """`model.init` on the smallest valid volume (params do not depend on the spatial size)."""
  f = model.downsample_factor
  x = jnp.zeros((1, f, f, f, model.in_channels), jnp.float32)
  return model.init({'params': key}, x)['params']


def init_params(model: AutoencoderKL, key: Array) -> Any:
  """Initialised plain (unboxed) params; torch-default uniform init (`layers`).

  Compiled without backend optimisation (the forward pass is dead code; see
  `unet.init_params`).
  """
  init = jax.jit(lambda k: nn.unbox(_boxed_init(model, k)))
  return init.lower(key).compile(
      compiler_options={'xla_backend_optimization_level': 0})(key)


def abstract_params(model: AutoencoderKL) -> Any:
  """`jax.ShapeDtypeStruct` tree of `init_params`' output, allocating nothing."""
  return nn.unbox(jax.eval_shape(lambda k: _boxed_init(model, k), jax.random.key(0)))


def param_logical_axes(model: AutoencoderKL) -> Any:
  """PartitionSpecs of logical axis names, one per param leaf (via `jax.eval_shape`)."""
  return nn.get_partition_spec(jax.eval_shape(lambda k: _boxed_init(model, k),
                                              jax.random.key(0)))


def count_params(params: Any) -> int:
  """Total number of scalars in a param tree (arrays or `ShapeDtypeStruct`s)."""
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))
