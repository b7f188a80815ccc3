"""Shared building blocks for the 3D networks (channels-last `[N, D, H, W, C]`).

Every parameter carries logical axis names (`nn.with_logical_partitioning`); `parallel.py`
maps them to mesh axes. The names used here:

  conv kernel  `('conv_d', 'conv_h', 'conv_w', 'conv_in', 'conv_out')`, conv bias `('conv_out',)`
  dense kernel `(in_axis, out_axis)`, dense bias `(out_axis,)`, where the axes are taken from
               `'embed'` (model / time-embedding features), `'mlp'` (hidden features of an MLP
               or of the per-block time projection), `'heads'` (attention q/k/v features, all
               heads together) and `'text_embed'` (features of the text tokens)
  norm scale and bias `('norm',)`

Activations are constrained at block boundaries to `VOLUME_AXES`; without a mesh and rules
that is a no-op.

Initialisation follows PyTorch's defaults (uniform in `±1/sqrt(fan_in)` for kernels and
biases), so a model trained from scratch behaves like the torch reference; layers marked
`zero_init` start at exactly zero (`zero_module` in guided-diffusion).
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cf3d_jax import parallel

Dtype = Any
Array = jax.Array

CONV_AXES = ('conv_d', 'conv_h', 'conv_w', 'conv_in', 'conv_out')
NORM_AXES = ('norm',)
VOLUME_AXES = parallel.VOLUME_AXES   # ('activation_batch', 'activation_depth', …)
PARAM_AXIS_NAMES = ('conv_d', 'conv_h', 'conv_w', 'conv_in', 'conv_out', 'embed', 'mlp',
                    'heads', 'text_embed', 'norm')


REMAT_POLICIES = {
    'none': None,                                              # keep every activation
    'full': jax.checkpoint_policies.nothing_saveable,          # recompute the whole block
    'dots': jax.checkpoint_policies.dots_saveable,             # keep conv/matmul outputs only
}


def remat(module_cls: type, policy: str, static_argnums: tuple[int, ...] = ()) -> type:
  """`module_cls` rematerialised under `REMAT_POLICIES[policy]` ('none': unchanged). The
  wrapped class has the same parameter names and values; only the backward pass changes."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f'remat policy {policy!r}: expected one of {sorted(REMAT_POLICIES)}')
  if policy == 'none':
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)


def constrain_volume(x: Array) -> Array:
  """Annotates a `[N, D, H, W, C]` activation with `VOLUME_AXES` (no-op without rules and mesh;
  axes that do not divide a dimension are left unsharded, see `parallel.logical_to_spec`)."""
  return parallel.constrain(x, VOLUME_AXES)


def uniform_fan_in_init(fan_in: int) -> Callable[..., Array]:
  """PyTorch's default initialiser: uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in)]`."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _param_init(zero_init: bool, fan_in: int, names: tuple[str, ...]) -> Callable[..., Any]:
  """Zero or torch-default initialiser, boxed with logical axis `names`."""
  init = nn.initializers.zeros_init() if zero_init else uniform_fan_in_init(fan_in)
  return nn.with_logical_partitioning(init, names)


CONV_IMPLS = ('xla', 'im2col', 'planes')   # the formulations
CONV_CHOICES = CONV_IMPLS + ('auto',)      # what a config may name


def resolve_conv_impl(impl: str) -> str:
  """'auto' → 'planes' on XLA's CPU backend (its 2D convolution is 3–7× faster than its 3D
  one at the demo's shapes, docs/benchmarks.md) and 'xla' elsewhere (cuDNN, the TPU
  convolution); any other value is checked against `CONV_IMPLS` and returned."""
  if impl == 'auto':
    return 'planes' if jax.default_backend() == 'cpu' else 'xla'
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv impl {impl!r}: expected one of {CONV_CHOICES}')
  return impl


def conv3d(x: Array, kernel: Array, stride: int, pad: int, impl: str = 'xla') -> Array:
  """`[N, D, H, W, C_in] ⊛ [k, k, k, C_in, C_out] → [N, D', H', W', C_out]`, zero padding `pad`.

  'xla': `lax.conv_general_dilated` in 3D. 'im2col': the k³ shifted views are concatenated on
  the channel axis and multiplied by the reshaped kernel in one matmul (stride 1 only; other
  strides fall back to 'xla'). 'planes' (`conv3d_planes`): the k depth taps are stacked on the
  channel axis and the depth folded into the batch, so one 2D convolution over (H, W) does the
  rest. Same parameters and result to float rounding. XLA's CPU backend runs 2D convolutions
  far faster than 3D ones: the demo's train step takes 227 ms with 'planes', 460 with 'im2col'
  and 642 with 'xla' (docs/benchmarks.md). 'auto': see `resolve_conv_impl`.
  """
  impl = resolve_conv_impl(impl)
  k = kernel.shape[0]
  if impl == 'planes':
    return conv3d_planes(x, kernel, stride, pad)
  if impl == 'xla' or stride != 1 or k == 1:
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride,) * 3, padding=((pad, pad),) * 3,
        dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (pad, pad), (0, 0)))
  d, h, w = (xp.shape[i] - k + 1 for i in (1, 2, 3))
  cols = jnp.concatenate([xp[:, i:i + d, j:j + h, l:l + w]
                          for i in range(k) for j in range(k) for l in range(k)], axis=-1)
  return jnp.einsum('ndhwk,ko->ndhwo', cols, kernel.reshape(-1, kernel.shape[-1]))


def conv3d_planes(x: Array, kernel: Array, stride: int, pad: int) -> Array:
  """The 3D convolution of `conv3d` as one 2D convolution: `[N, D, H, W, C]` is padded in depth,
  its k depth-shifted (and depth-strided) views are stacked on the channel axis
  (`[N, D', H, W, k·C]`), the depth is folded into the batch (`[N·D', H, W, k·C]`) and convolved
  over (H, W) with the kernel reshaped to `[k, k, k·C_in, C_out]` (tap-major on the channel
  axis), then unfolded: `[N, D', H', W', C_out]`."""
  n, depth, _, _, c = x.shape
  k, c_out = kernel.shape[0], kernel.shape[-1]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0), (0, 0)))
  d_out = (depth + 2 * pad - k) // stride + 1
  stop = stride * (d_out - 1) + 1
  views = [xp[:, i:i + stop:stride] for i in range(k)]
  stacked = views[0] if k == 1 else jnp.concatenate(views, axis=-1)
  planes = stacked.reshape((n * d_out,) + stacked.shape[2:])
  kernel2d = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(k, k, k * c, c_out)
  y = jax.lax.conv_general_dilated(
      planes, kernel2d, window_strides=(stride, stride), padding=((pad, pad),) * 2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y.reshape((n, d_out) + y.shape[1:])


class Conv3D(nn.Module):
  """3D convolution, channels-last, torch-style explicit padding.

  `[N, D, H, W, C_in] → [N, D', H', W', features]`; kernel `[k, k, k, C_in, features]`.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int | None = None  # None: (kernel_size - 1) // 2 on every side
  use_bias: bool = True
  zero_init: bool = False
  impl: str = 'xla'           # 'xla' | 'im2col' | 'planes' | 'auto' (see conv3d)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    in_features = x.shape[-1]
    fan_in = in_features * k ** 3
    kernel = self.param('kernel', _param_init(self.zero_init, fan_in, CONV_AXES),
                        (k, k, k, in_features, self.features), self.param_dtype)
    pad = (k - 1) // 2 if self.padding is None else self.padding
    y = conv3d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, pad, self.impl)
    if self.use_bias:
      bias = self.param('bias', _param_init(self.zero_init, fan_in, ('conv_out',)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class Dense(nn.Module):
  """Linear layer on the last axis: `[..., C_in] → [..., features]`, kernel `[C_in, features]`."""
  features: int
  in_axis: str = 'embed'
  out_axis: str = 'mlp'
  use_bias: bool = True
  zero_init: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1]
    kernel = self.param(
        'kernel', _param_init(self.zero_init, in_features, (self.in_axis, self.out_axis)),
        (in_features, self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param('bias', _param_init(self.zero_init, in_features, (self.out_axis,)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class GroupNorm(nn.Module):
  """GroupNorm over all axes but batch, computed in float32, returned in the input dtype.

  `[N, ..., C] → [N, ..., C]`; variance as `mean((x - mean)^2)` (torch's definition).
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f'GroupNorm: {channels} channels are not divisible by '
                       f'num_groups={self.num_groups}.')
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             NORM_AXES),
                       (channels,), self.param_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           NORM_AXES),
                      (channels,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    grouped = x32.reshape(*x.shape[:-1], self.num_groups, channels // self.num_groups)
    axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
    mean = jnp.mean(grouped, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
    normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    y = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding of guided-diffusion: `[N]` (int or float) → `[N, dim]` float32.

  `[cos(t·f_i), sin(t·f_i)]` with `f_i = max_period^(-i/half)`, `i < half = dim // 2`;
  an odd `dim` gets a trailing zero column.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def avg_pool_2x(x: Array) -> Array:
  """Average pooling ×2 on every spatial axis: `[N, D, H, W, C] → [N, D/2, H/2, W/2, C]`."""
  n, d, h, w, c = x.shape
  return x.reshape(n, d // 2, 2, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4, 6))


def upsample_nearest_2x(x: Array) -> Array:
  """Nearest-neighbour ×2 on every spatial axis: `[N, D, H, W, C] → [N, 2D, 2H, 2W, C]`."""
  n, d, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :, None, :], (n, d, 2, h, 2, w, 2, c))
  return x.reshape(n, 2 * d, 2 * h, 2 * w, c)


class ResBlock(nn.Module):
  """guided-diffusion ResBlock (use_scale_shift_norm=False), optionally resampling.

  `h = conv3(SiLU(GN(x)))` (with avg-pool ×2 or nearest ×2 between SiLU and conv when
  `down`/`up`, applied to the skip path too) `+ Dense(SiLU(emb))`; then
  `conv3_zero(dropout(SiLU(GN(h))))`; output `skip(x) + h` with skip the identity or a 1×1×1
  conv. `[N, D, H, W, C] → [N, D', H', W', out_channels]`, `emb` `[N, E]`.
  `scale_shift=True` (guided-diffusion's use_scale_shift_norm): `emb_dense` gives 2·out values
  (scale, shift) and the second half reads `SiLU(GN(h)·(1 + scale) + shift)` instead of adding
  the embedding: a multiplicative (FiLM) modulation by time and, through the embedding, text.
  Parameter names: `in_norm, in_conv, emb_dense, out_norm, out_conv, skip_conv`.
  """
  out_channels: int
  num_groups: int = 32
  dropout: float = 0.0
  up: bool = False
  down: bool = False
  conv_impl: str = 'xla'
  scale_shift: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    # `train` may be positional so that `nn.remat(ResBlock, static_argnums=(3,))` keeps it static.
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv_kw = dict(kw, impl=self.conv_impl)
    h = nn.silu(GroupNorm(self.num_groups, param_dtype=self.param_dtype, name='in_norm')(x))
    if self.down:
      h, x = avg_pool_2x(h), avg_pool_2x(x)
    elif self.up:
      h, x = upsample_nearest_2x(h), upsample_nearest_2x(x)
    h = Conv3D(self.out_channels, 3, name='in_conv', **conv_kw)(h)
    width = 2 * self.out_channels if self.scale_shift else self.out_channels
    emb_out = Dense(width, in_axis='embed', out_axis='mlp', name='emb_dense',
                    **kw)(nn.silu(emb))[:, None, None, None, :].astype(h.dtype)
    if self.scale_shift:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = GroupNorm(self.num_groups, param_dtype=self.param_dtype, name='out_norm')(h)
      h = nn.silu(h * (1 + scale) + shift)
    else:
      h = nn.silu(GroupNorm(self.num_groups, param_dtype=self.param_dtype,
                            name='out_norm')(h + emb_out))
    if self.dropout > 0.0:
      h = nn.Dropout(self.dropout, rng_collection='dropout')(h, deterministic=not train)
    h = Conv3D(self.out_channels, 3, zero_init=True, name='out_conv', **conv_kw)(h)
    if x.shape[-1] != self.out_channels:
      x = Conv3D(self.out_channels, 1, name='skip_conv', **kw)(x)
    return x.astype(h.dtype) + h


class Downsample(nn.Module):
  """guided-diffusion Downsample with conv: stride-2 3×3×3 conv, padding 1 (name `op`)."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return Conv3D(self.out_channels, 3, stride=2, dtype=self.dtype,
                  param_dtype=self.param_dtype, name='op')(x)


class Upsample(nn.Module):
  """guided-diffusion Upsample with conv: nearest ×2 then a 3×3×3 conv (name `conv`)."""
  out_channels: int
  conv_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return Conv3D(self.out_channels, 3, impl=self.conv_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype, name='conv')(upsample_nearest_2x(x))


def num_heads_for(channels: int, head_channels: int) -> int:
  """Heads for `channels` at `head_channels` per head: `max(1, channels // head_channels)`."""
  if head_channels <= 0:
    raise ValueError(f'head_channels must be positive, got {head_channels}.')
  heads = max(1, channels // head_channels)
  if channels % heads:
    raise ValueError(f'Attention over {channels} channels with head_channels={head_channels} '
                     f'gives {heads} heads, which do not divide the channels.')
  return heads


def multi_head_attention(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
  """Softmax attention with float32 logits and softmax.

  q `[N, S, heads, Dh]`, k and v `[N, L, heads, Dh]`, mask `[N, L]` bool (True = attend) or
  None → `[N, S, heads, Dh]` in v's dtype. The largest intermediate is `[N, heads, S, L]`.
  A query whose keys are all masked gets a zero output (masked keys never contribute).
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum('nshd,nlhd->nhsl', q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    valid = mask[:, None, None, :]
    logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    probs = jnp.where(jnp.any(valid, axis=-1, keepdims=True), probs, 0.0)
  return jnp.einsum('nhsl,nlhd->nshd', probs.astype(v.dtype), v)


class SpatialAttention(nn.Module):
  """Residual attention from the voxels of a volume to a context (itself or text tokens).

  `x + Dense_zero(MHA(q=Dense(GN(x)), k,v=Dense(context)))`. x `[N, D, H, W, C]`; context
  `[N, L, E]` (None: self-attention over the normalised voxels, L = D·H·W); mask `[N, L]`.
  Parameter names: `norm, query, key, value, out`.
  """
  head_channels: int = 32
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None,
               mask: Array | None = None) -> Array:
    n, d, h, w, c = x.shape
    heads = num_heads_for(c, self.head_channels)
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    normed = GroupNorm(self.num_groups, param_dtype=self.param_dtype, name='norm')(x)
    tokens = normed.reshape(n, d * h * w, c)
    context_axis = 'embed'
    if context is None:
      context = tokens
    else:
      context_axis = 'text_embed'
    q = Dense(c, in_axis='embed', out_axis='heads', name='query', **kw)(tokens)
    k = Dense(c, in_axis=context_axis, out_axis='heads', name='key', **kw)(context)
    v = Dense(c, in_axis=context_axis, out_axis='heads', name='value', **kw)(context)
    split = lambda a: a.reshape(*a.shape[:2], heads, c // heads)
    out = multi_head_attention(split(q), split(k), split(v), mask).reshape(n, d * h * w, c)
    out = Dense(c, in_axis='heads', out_axis='embed', zero_init=True, dtype=self.dtype,
                param_dtype=self.param_dtype, name='out')(out)
    return x.astype(out.dtype) + out.reshape(n, d, h, w, c)
