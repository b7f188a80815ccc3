"""MONAI's `PatchDiscriminator` (the MAISI VAE's adversary) in flax.linen, channels-last.

`monai.networks.nets.PatchDiscriminator(spatial_dims=3, num_layers_d=L, channels=C,
in_channels=1, out_channels=1, norm='INSTANCE')` with its defaults (kernel 4, padding 1,
LeakyReLU(0.2), no dropout, `bias=False` in the normalised layers):

  initial_conv  conv4 stride 2, in → C, bias; LeakyReLU (no norm)
  layer_{l}     l = 0 … L-1: conv4 (stride 2, the last stride 1), no bias, C·2^l → C·2^(l+1);
                InstanceNorm (no affine parameters, eps 1e-5, biased variance); LeakyReLU
  final_conv    conv4 stride 1, padding 1, C·2^L → out_channels, bias; no activation

Every conv pads 1 voxel on each side (torch `padding=1`), so a side of `s` voxels becomes
`⌊s/2⌋` after a stride-2 layer and `s - 1` after a stride-1 layer: 64³ → 32, 16, 8, 7 → 6³
logits for L = 3 (`output_shape`). MAISI uses L = 3, C = 32 (2,770,977 parameters).

Flax names ↔ torch state-dict keys: `initial_conv` ↔ `initial_conv.conv.*`, `layer_{l}` ↔
`{l}.conv.weight`, `final_conv` ↔ `final_conv.conv.*`; kernels `[4, 4, 4, C_in, C_out]`
(torch `[C_out, C_in, 4, 4, 4]`). Kernels start N(0, 0.02) as MONAI's `initialise_weights`,
biases torch's default U(±1/√fan_in). MONAI returns every layer's output; we return the logits
(the last one), the only output MAISI's least-squares loss uses.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cf3d_jax.errors import ConfigError
from cf3d_jax.models import layers

__all__ = ['PatchDiscriminator', 'abstract_params', 'count_params', 'init_params', 'instance_norm',
           'output_shape']

Array = jax.Array
Dtype = Any

KERNEL = 4
NEGATIVE_SLOPE = 0.2
INSTANCE_NORM_EPS = 1e-5


def output_shape(spatial: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
  """Logit grid `(d', h', w')` for an input of `spatial` voxels (entries < 1: input too small)."""
  out = []
  for s in spatial:
    s = s // 2                                   # initial_conv: (s + 2 - 4) // 2 + 1
    for layer in range(num_layers):
      s = s // 2 if layer < num_layers - 1 else s - 1
    out.append(s - 1)                            # final_conv, stride 1
  return tuple(out)


def instance_norm(x: Array, eps: float = INSTANCE_NORM_EPS) -> Array:
  """Per item and channel over D, H, W; no affine parameters. `[N, D, H, W, C]`, float32 math."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=(1, 2, 3), keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 3), keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class _Conv(nn.Module):
  """A 4×4×4 conv, torch padding 1, kernel N(0, 0.02), bias U(±1/√fan_in)."""
  features: int
  stride: int
  use_bias: bool
  conv_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c_in = x.shape[-1]
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), layers.CONV_AXES),
        (KERNEL,) * 3 + (c_in, self.features), self.param_dtype)
    y = layers.conv3d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, 1,
                      self.conv_impl)
    if self.use_bias:
      bound = 1.0 / math.sqrt(c_in * KERNEL ** 3)
      bias = self.param('bias', nn.with_logical_partitioning(
          lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound), ('conv_out',)),
          (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class PatchDiscriminator(nn.Module):
  """`[N, D, H, W, in_channels]` → logits `[N, *output_shape((D, H, W), num_layers), out]`.

  Outputs float32 whatever the compute `dtype`.
  """
  channels: int = 32
  num_layers: int = 3
  out_channels: int = 1
  conv_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.ndim != 5:
      raise ConfigError(f'PatchDiscriminator expects [N, D, H, W, C] volumes, got shape '
                        f'{tuple(x.shape)}.')
    grid = output_shape(tuple(x.shape[1:4]), self.num_layers)
    if min(grid) < 1:
      raise ConfigError(
          f'PatchDiscriminator with num_layers={self.num_layers}: input {tuple(x.shape[1:4])} '
          f'is too small (logit grid {grid}); use larger patches or fewer layers.')
    kw = dict(conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype)
    h = _Conv(self.channels, 2, True, name='initial_conv', **kw)(x)
    h = nn.leaky_relu(h, NEGATIVE_SLOPE)
    features = self.channels
    for layer in range(self.num_layers):
      features *= 2
      stride = 1 if layer == self.num_layers - 1 else 2
      h = _Conv(features, stride, False, name=f'layer_{layer}', **kw)(h)
      h = nn.leaky_relu(instance_norm(h), NEGATIVE_SLOPE)
    h = _Conv(self.out_channels, 1, True, name='final_conv', **kw)(h)
    return h.astype(jnp.float32)


def _boxed_init(model: PatchDiscriminator, key: Array, in_channels: int) -> Any:
  """`model.init` on the smallest volume the layers accept (params do not depend on it)."""
  side = 1
  while min(output_shape((side,) * 3, model.num_layers)) < 1:
    side *= 2
  x = jnp.zeros((1, side, side, side, in_channels), jnp.float32)
  return model.init(key, x)['params']


def init_params(model: PatchDiscriminator, key: Array, in_channels: int = 1,
                jit: bool = True) -> Any:
  """Plain (unboxed) params, compiled without backend optimisation (the forward is dead code);
  `jit=False` traces inline (inside another jitted function)."""
  if not jit:
    return nn.unbox(_boxed_init(model, key, in_channels))
  init = jax.jit(lambda k: nn.unbox(_boxed_init(model, k, in_channels)))
  return init.lower(key).compile(
      compiler_options={'xla_backend_optimization_level': 0})(key)


def abstract_params(model: PatchDiscriminator, in_channels: int = 1) -> Any:
  """`jax.ShapeDtypeStruct` tree of `init_params`' output, allocating nothing."""
  return nn.unbox(jax.eval_shape(lambda k: _boxed_init(model, k, in_channels),
                                 jax.random.key(0)))


def count_params(params: Any) -> int:
  """Total number of scalars in a param tree."""
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
