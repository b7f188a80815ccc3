"""3D DenseNet-121: the paper's text-alignment classifier (flax.linen, channels-last).

Transcribes MONAI's `monai.networks.nets.DenseNet121(spatial_dims=3, in_channels=1,
out_channels=num_classes)` (MONAI 1.x `networks/nets/densenet.py`, default `act` ReLU, `norm`
BatchNorm):

  conv0        7×7×7, stride 2, padding 3, in_channels → 64, no bias; `norm0`; ReLU
  pool0        max pool 3×3×3, stride 2, padding 1 (floor mode, padding never wins the max)
  denseblock1…4 with (6, 12, 24, 16) layers; layer j of a block maps C → C + 32:
               `norm1` → ReLU → `conv1` 1×1×1 C → 128 → `norm2` → ReLU → `conv2` 3×3×3
               (padding 1) 128 → 32 → channel dropout (rate `dropout_rate`, `Dropout3d`: whole
               channels of an item), then `concat([x, new], channels)` (old channels first)
  transition1…3 after blocks 1–3: `norm` → ReLU → `conv` 1×1×1 C → C/2 → avg pool 2, stride 2
               (floor mode: an odd size loses its last voxel)
  norm5        after block 4 (1024 channels); then ReLU, global average pool, `out` Linear
               1024 → num_classes

Channels: 64 → 256 → 128 → 512 → 256 → 1024 → 512 → 1024. All convs are bias-free. With
`num_classes=2` and one input channel the model has **11,244,674** parameters (as MONAI's),
plus 83,648 BatchNorm running statistics. Spatial size per axis: `s → ⌈s/2⌉ → ⌈s/4⌉` in the
stem, then `⌊·/2⌋` three times, so every spatial size must be at least 29 (`MIN_SPATIAL`); the
global pool makes the output independent of it.

BatchNorm (eps 1e-5): `train=True` normalises with the batch statistics (biased variance over
N, D, H, W) and updates the running averages in the mutable `'batch_stats'` collection with flax
momentum 0.9 (PyTorch's momentum 0.1); `train=False` uses the running averages. One difference
from PyTorch remains: flax folds the *biased* batch variance into `var`, PyTorch the unbiased
one (× n/(n−1), n = N·D·H·W voxels per channel) — negligible at the sizes we train, and the
normalisation itself is identical. Train-mode statistics over very few voxels are
ill-conditioned: with one voxel per channel at `norm5` (N = 1 and fewer than 61 voxels on every
axis) flax normalises it to its bias (PyTorch refuses it); with two (N = 2, 32³ inputs)
PyTorch's own float32 logits move by ~3% against float64. Train on batches that leave ≥ 8
voxels per channel there (e.g. N = 2 at 32×64×64, N = 1 at 64³).

Compile time on a 2-core CPU (XLA, jax 0.10): eval forward 15 s, a train step (value and grad)
50 s; 3 s and 23 s with `compiler_options={'xla_backend_optimization_level': 0}`, whose code
ran the forward about 1.8× slower. `init_variables` compiles that way (the forward is dead code).

API: `build_densenet121`, `DenseNet3D` (`__call__` → logits, `features` → pooled features),
`abstract_variables` / `init_variables` / `count_params` / `param_logical_axes`; the MONAI
checkpoint import is `cf3d_jax.convert.monai_densenet`.

Flax names mirror MONAI's state dict without its `features.` / `class_layers.` prefixes and the
`layers.` inside a dense layer: `features.denseblock2.denselayer3.layers.norm1` →
`denseblock2/denselayer3/norm1`, `features.transition1.conv` → `transition1/conv`,
`class_layers.out` → `out`. Conv kernels `[kD, kH, kW, C_in, C_out]` (torch
`[C_out, C_in, kD, kH, kW]`), the Linear kernel `[1024, num_classes]`; BN `scale`/`bias` in
params, `mean`/`var` in batch_stats. `cf3d_jax.convert.monai_densenet` maps a MONAI checkpoint
onto these variables. Initialisation follows MONAI: convs Kaiming-normal (fan_in, gain √2), BN
scale 1 / bias 0, Linear kernel PyTorch's default uniform `±1/√1024`, Linear bias 0.

Logical axis names: conv kernels `CONV_AXES`, BN scale/bias `('norm',)`, the Linear kernel
`('embed', 'mlp')` and bias `('mlp',)` (layers.py has no class axis; a 2-wide axis is never worth
sharding). Input `[N, D, H, W, in_channels]`, the spatial axes in the order of torch's
`[N, C, D, H, W]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cf3d_jax.errors import ConfigError
from cf3d_jax.models.layers import CONV_AXES, NORM_AXES, uniform_fan_in_init

__all__ = ['DENSENET121_BLOCKS', 'MIN_SPATIAL', 'NUM_PARAMS_2_CLASSES', 'min_spatial_size',
           'DenseNet3DConfigError', 'DenseNet3D', 'build_densenet121', 'abstract_variables',
           'init_variables', 'count_params', 'param_logical_axes']

Array = jax.Array
Dtype = Any

DENSENET121_BLOCKS = (6, 12, 24, 16)
# MONAI DenseNet121(spatial_dims=3, in_channels=1, out_channels=2): sum(p.numel()).
NUM_PARAMS_2_CLASSES = 11_244_674


def min_spatial_size(num_blocks: int) -> int:
  """Smallest input size per axis leaving a voxel after the stem (`⌈s/4⌉`) and the
  `num_blocks − 1` transitions (`⌊·/2⌋` each): `4·(2^(num_blocks−1) − 1) + 1`."""
  return 4 * (2 ** (num_blocks - 1) - 1) + 1


MIN_SPATIAL = min_spatial_size(len(DENSENET121_BLOCKS))  # 29 for DenseNet-121
_BN_EPS = 1e-5
_BN_MOMENTUM = 0.9  # flax: new = 0.9·old + 0.1·batch (PyTorch's momentum=0.1)
# Compile the init without backend optimisation: the forward pass is dead code there, and
# XLA's optimiser spends its time on the hundreds of inlined PRNG calls (as in unet.py).
_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


class DenseNet3DConfigError(ConfigError, ValueError):
  """An invalid DenseNet setting or input shape (a `ConfigError` and a `ValueError`)."""


def _conv(features: int, kernel: int, stride: int = 1, padding: int = 0,
          name: str | None = None, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32) -> nn.Conv:
  """Bias-free 3D conv, torch-style symmetric zero padding, MONAI's Kaiming-normal init."""
  init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
  return nn.Conv(features, (kernel,) * 3, strides=(stride,) * 3,
                 padding=((padding, padding),) * 3, use_bias=False,
                 kernel_init=nn.with_logical_partitioning(init, CONV_AXES), dtype=dtype,
                 param_dtype=param_dtype, name=name)


def _bn(name: str, train: bool, dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32) -> nn.BatchNorm:
  """BatchNorm3d: batch statistics when `train` (running averages updated), else running."""
  return nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPS,
                      use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                              NORM_AXES),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             NORM_AXES),
                      name=name)


class _DenseLayer(nn.Module):
  """BN-ReLU-conv1 (→ bn_size·growth) BN-ReLU-conv3 (→ growth), channel dropout, concat.

  `[N, D, H, W, C] → [N, D, H, W, C + growth_rate]`, the input channels first.
  """
  growth_rate: int
  bn_size: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.relu(_bn('norm1', train, **kw)(x))
    h = _conv(self.bn_size * self.growth_rate, 1, name='conv1', **kw)(h)
    h = nn.relu(_bn('norm2', train, **kw)(h))
    h = _conv(self.growth_rate, 3, padding=1, name='conv2', **kw)(h)
    if self.dropout_rate > 0.0:  # torch Dropout3d: one mask entry per (item, channel)
      h = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2, 3),
                     rng_collection='dropout')(h, deterministic=not train)
    return jnp.concatenate([x.astype(h.dtype), h], axis=-1)


class _DenseBlock(nn.Module):
  """`num_layers` dense layers `denselayer1…`: `[N, D, H, W, C] → [.., C + L·growth_rate]`."""
  num_layers: int
  growth_rate: int
  bn_size: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    for j in range(1, self.num_layers + 1):
      x = _DenseLayer(self.growth_rate, self.bn_size, self.dropout_rate, self.dtype,
                      self.param_dtype, name=f'denselayer{j}')(x, train=train)
    return x


class _Transition(nn.Module):
  """`norm` → ReLU → `conv` 1×1×1 → avg pool 2 (floor): `[N, D, H, W, C] → [N, ⌊D/2⌋, …, F]`."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.relu(_bn('norm', train, **kw)(x))
    h = _conv(self.features, 1, name='conv', **kw)(h)
    return nn.avg_pool(h, (2, 2, 2), strides=(2, 2, 2), padding='VALID')


class DenseNet3D(nn.Module):
  """3D DenseNet classifier (defaults: DenseNet-121): `[N, D, H, W, C]` → logits `[N, classes]`.

  `model.apply(variables, x, train=False)` → logits; in training
  `model.apply(variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': key})`
  → `(logits, {'batch_stats': …})` (the `rngs` only when `dropout_rate > 0`).
  `method='features'` returns the pooled `[N, C_final]` features (1024 for DenseNet-121)
  that feed the Linear head. Features and logits are float32 whatever `dtype`.
  """
  num_classes: int
  in_channels: int = 1
  dropout_rate: float = 0.0
  init_features: int = 64
  growth_rate: int = 32
  block_config: Sequence[int] = DENSENET121_BLOCKS
  bn_size: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool, return_features: bool = False) -> Array:
    _check_settings(self)
    _check_input(x, self.in_channels, min_spatial_size(len(self.block_config)))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _conv(self.init_features, 7, stride=2, padding=3, name='conv0', **kw)(
        x.astype(self.dtype))
    h = nn.relu(_bn('norm0', train, **kw)(h))
    h = nn.max_pool(h, (3, 3, 3), strides=(2, 2, 2), padding=((1, 1),) * 3)
    channels = self.init_features
    for i, num_layers in enumerate(self.block_config, start=1):
      h = _DenseBlock(num_layers, self.growth_rate, self.bn_size, self.dropout_rate,
                      name=f'denseblock{i}', **kw)(h, train=train)
      channels += num_layers * self.growth_rate
      if i < len(self.block_config):
        channels //= 2
        h = _Transition(channels, name=f'transition{i}', **kw)(h, train=train)
    h = nn.relu(_bn('norm5', train, **kw)(h))
    features = jnp.mean(h.astype(jnp.float32), axis=(1, 2, 3))
    if return_features:
      return features
    kernel_init = nn.with_logical_partitioning(uniform_fan_in_init(channels), ('embed', 'mlp'))
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ('mlp',))
    logits = nn.Dense(self.num_classes, kernel_init=kernel_init, bias_init=bias_init,
                      name='out', **kw)(features.astype(self.dtype))
    return logits.astype(jnp.float32)

  def features(self, x: Array, *, train: bool = False) -> Array:
    """Pooled features after `norm5` and ReLU: `[N, D, H, W, C]` → `[N, C_final]` float32."""
    return self(x, train=train, return_features=True)


def _check_settings(model: DenseNet3D) -> None:
  ints = dict(num_classes=model.num_classes, in_channels=model.in_channels,
              init_features=model.init_features, growth_rate=model.growth_rate,
              bn_size=model.bn_size)
  for name, value in ints.items():
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise DenseNet3DConfigError(f'DenseNet3D.{name}={value!r}: expected a positive integer.')
  if not model.block_config or any(int(n) < 1 for n in model.block_config):
    raise DenseNet3DConfigError(f'DenseNet3D.block_config={tuple(model.block_config)!r}: '
                                'expected a non-empty sequence of positive layer counts.')
  if not 0.0 <= model.dropout_rate < 1.0:
    raise DenseNet3DConfigError(f'DenseNet3D.dropout_rate={model.dropout_rate!r}: expected a '
                                'value in [0, 1).')


def _check_input(x: Array, in_channels: int, min_size: int) -> None:
  if x.ndim != 5 or x.shape[-1] != in_channels:
    raise DenseNet3DConfigError(f'DenseNet3D input must be [N, D, H, W, {in_channels}] '
                                f'(in_channels={in_channels}), got shape {tuple(x.shape)}.')
  if min(x.shape[1:4]) < min_size:
    raise DenseNet3DConfigError(f'DenseNet3D input spatial size {tuple(x.shape[1:4])} is too '
                                f'small: every axis needs at least {min_size} voxels (the stem '
                                'divides by 4 (ceil), each transition by 2 (floor)).')


def build_densenet121(num_classes: int, in_channels: int = 1, dropout_rate: float = 0.0,
                      dtype: Dtype = jnp.float32,
                      param_dtype: Dtype = jnp.float32) -> DenseNet3D:
  """MONAI's DenseNet121(spatial_dims=3) in flax; validates the settings."""
  model = DenseNet3D(num_classes=num_classes, in_channels=in_channels,
                     dropout_rate=dropout_rate, dtype=dtype, param_dtype=param_dtype)
  _check_settings(model)
  return model


def _input_shape(model: DenseNet3D, shape: Sequence[int] | None) -> tuple[int, ...]:
  """`shape` (`[N, D, H, W, C]`) or the smallest convenient `(1, 32, 32, 32, in_channels)`."""
  return (1, 32, 32, 32, model.in_channels) if shape is None else tuple(int(s) for s in shape)


def _boxed_init(model: DenseNet3D, key: Array, shape: tuple[int, ...]) -> dict[str, Any]:
  """`model.init` (eval mode) on zeros of `shape`; params still boxed with logical names."""
  return model.init({'params': key}, jnp.zeros(shape, jnp.float32), train=False)


def abstract_variables(model: DenseNet3D,
                       shape: Sequence[int] | None = None) -> dict[str, Any]:
  """Shapes of `{'params', 'batch_stats'}` (unboxed `jax.ShapeDtypeStruct`s), no compute.

  The variables do not depend on the spatial size; `shape` defaults to `(1, 32, 32, 32, C)`.
  """
  shape = _input_shape(model, shape)
  return nn.unbox(jax.eval_shape(lambda k: _boxed_init(model, k, shape), jax.random.key(0)))


def init_variables(model: DenseNet3D, key: Array,
                   shape: Sequence[int] | None = None) -> dict[str, Any]:
  """Freshly initialised `{'params', 'batch_stats'}` (unboxed), jitted at `shape` `[N,D,H,W,C]`.

  Compiled without backend optimisation (the forward pass is dead code in an init).
  """
  shape = _input_shape(model, shape)
  init = jax.jit(lambda k: nn.unbox(_boxed_init(model, k, shape)))
  return init.lower(key).compile(compiler_options=_INIT_COMPILER_OPTIONS)(key)


def param_logical_axes(model: DenseNet3D) -> Any:
  """PartitionSpecs of logical axis names, one per param leaf (via `jax.eval_shape`)."""
  shape = _input_shape(model, None)
  boxed = jax.eval_shape(lambda k: _boxed_init(model, k, shape), jax.random.key(0))
  return nn.get_partition_spec(boxed['params'])


def count_params(tree: Any) -> int:
  """Total number of scalars in a tree of arrays or `ShapeDtypeStruct`s."""
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree)))
