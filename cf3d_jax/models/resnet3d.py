"""Med3D / MedicalNet 3D ResNet as a feature extractor for FID (flax.linen, channels-last).

Transcribes Tencent MedicalNet's `models/resnet.py` (also copied into wdm-3d `eval/models/`):

  conv1    7×7×7, stride 2, padding 3, 1 → 64 channels, no bias; `bn1`; ReLU
  maxpool  3×3×3, stride 2, padding 1
  layer1   64 planes,  stride 1                      (blocks per layer: see `DEPTHS`)
  layer2   128 planes, stride 2 (first block)
  layer3   256 planes, stride 1, dilation 2 (3×3×3 convs with padding 2)
  layer4   512 planes, stride 1, dilation 4 (padding 4)
  features global average pool of layer4's output → `[N, 512·expansion]` (2048 for depth ≥ 50)

The network downsamples by 8 in all (`⌈⌈⌈D/2⌉/2⌉/2⌉` voxels per axis at layer4). Blocks:
BasicBlock (depths 10/18/34, expansion 1: 3×3×3 conv → BN → ReLU → 3×3×3 conv → BN, + shortcut,
ReLU) and Bottleneck (depths 50/101/152/200, expansion 4: 1×1×1 → 3×3×3 (stride, dilation) →
1×1×1, each with BN, + shortcut, ReLU). Every block of a layer uses the layer's dilation; only the
first block strides. A layer's first block gets a projection shortcut when it strides or
changes the channel count: shortcut 'B' = 1×1×1 conv (stride) + BN (`downsample.0`, `.1`);
shortcut 'A' = parameter-free `x[::s, ::s, ::s]` with zero channels appended. MedicalNet's
released weights use 'B' for depths 10, 50, 101, 152, 200 and 'A' for 18 and 34 (its README);
`shortcut_type=None` picks that. MedicalNet's segmentation head (`conv_seg`) is not part of the
extractor; wdm-3d replaces it by the average pool, which is what we return.

BatchNorm runs in inference mode only (running statistics, eps 1e-5): the extractor is frozen.
Input `[N, D, H, W, 1]`, the spatial axes in the order of torch's `[N, 1, D, H, W]`.

Flax names mirror the torch state dict with `.k` → `_k` (`layer1.0.conv1` → `layer1_0/conv1`,
`layer2.0.downsample.0` → `layer2_0/downsample_0`); conv kernels `[kD, kH, kW, C_in, C_out]`
(torch `[C_out, C_in, kD, kH, kW]`), BN `scale`/`bias` in params, `mean`/`var` in batch_stats.
`cf3d_jax.convert.medicalnet` maps a MedicalNet checkpoint onto these variables.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cf3d_jax.errors import ConfigError
from cf3d_jax.models.layers import CONV_AXES, NORM_AXES

__all__ = ['DEPTHS', 'MEDICALNET_SHORTCUT', 'ResNet3DConfigError', 'MedicalNetResNet',
           'build_resnet3d', 'abstract_variables', 'feature_dim', 'resolve_shortcut']

Array = jax.Array
Dtype = Any

# depth → (block, blocks per layer), as MedicalNet's resnet10 … resnet200.
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ('basic', (1, 1, 1, 1)),
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
    200: ('bottleneck', (3, 24, 36, 3)),
}
# The shortcut type of MedicalNet's released weights (README "Network structure parameter
# settings": resnet-10 B, resnet-18 A, resnet-34 A, resnet-50 … resnet-200 B).
MEDICALNET_SHORTCUT: dict[int, str] = {10: 'B', 18: 'A', 34: 'A', 50: 'B', 101: 'B', 152: 'B',
                                       200: 'B'}
_EXPANSION = {'basic': 1, 'bottleneck': 4}
# (planes, stride, dilation) of layer1 … layer4.
_LAYERS = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))
_BN_EPS = 1e-5


class ResNet3DConfigError(ConfigError, ValueError):
  """An invalid ResNet setting or input shape (a `ConfigError` and a `ValueError`)."""


def _check_depth(depth: int) -> tuple[str, tuple[int, ...]]:
  if depth not in DEPTHS:
    raise ResNet3DConfigError(f'MedicalNet ResNet depth {depth!r} is not one of {sorted(DEPTHS)}.')
  return DEPTHS[depth]


def resolve_shortcut(depth: int, shortcut_type: str | None) -> str:
  """`shortcut_type`, or MedicalNet's released one for `depth` when None."""
  _check_depth(depth)
  shortcut = MEDICALNET_SHORTCUT[depth] if shortcut_type is None else shortcut_type
  if shortcut not in ('A', 'B'):
    raise ResNet3DConfigError(f"shortcut_type {shortcut_type!r}: expected 'A', 'B' or None.")
  return shortcut


def feature_dim(depth: int) -> int:
  """Length of the feature vector: 512 for depths 10/18/34, 2048 for 50 and deeper."""
  block, _ = _check_depth(depth)
  return 512 * _EXPANSION[block]


def _conv(features: int, kernel: int, stride: int = 1, dilation: int = 1, padding: int = 0,
          name: str | None = None, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32) -> nn.Conv:
  """Bias-free 3D conv with torch-style symmetric zero padding; MedicalNet's kaiming init."""
  init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
  return nn.Conv(features, (kernel,) * 3, strides=(stride,) * 3, padding=((padding, padding),) * 3,
                 kernel_dilation=(dilation,) * 3, use_bias=False,
                 kernel_init=nn.with_logical_partitioning(init, CONV_AXES), dtype=dtype,
                 param_dtype=param_dtype, name=name)


def _bn(name: str, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.BatchNorm:
  """BatchNorm3d in inference mode (running statistics), eps 1e-5, scale 1 / bias 0 init."""
  return nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, dtype=dtype,
                      param_dtype=param_dtype,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                              NORM_AXES),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             NORM_AXES),
                      name=name)


def _shortcut_a(x: Array, out_channels: int, stride: int) -> Array:
  """MedicalNet `downsample_basic_block`: `avg_pool3d(kernel 1, stride)` + zero channels."""
  if stride > 1:
    x = x[:, ::stride, ::stride, ::stride]
  pad = out_channels - x.shape[-1]
  return jnp.pad(x, ((0, 0),) * 4 + ((0, pad),))


class _Block(nn.Module):
  """One BasicBlock or Bottleneck: `[N, D, H, W, C] → [N, D', H', W', planes·expansion]`."""
  block: str
  planes: int
  stride: int = 1
  dilation: int = 1
  shortcut: str | None = None  # None (identity), 'A' or 'B' (projection shortcut)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = self.dilation
    if self.block == 'basic':
      out_channels = self.planes
      h = nn.relu(_bn('bn1', **kw)(_conv(self.planes, 3, self.stride, d, d, 'conv1', **kw)(x)))
      h = _bn('bn2', **kw)(_conv(self.planes, 3, 1, d, d, 'conv2', **kw)(h))
    else:
      out_channels = self.planes * 4
      h = nn.relu(_bn('bn1', **kw)(_conv(self.planes, 1, name='conv1', **kw)(x)))
      h = nn.relu(_bn('bn2', **kw)(_conv(self.planes, 3, self.stride, d, d, 'conv2', **kw)(h)))
      h = _bn('bn3', **kw)(_conv(out_channels, 1, name='conv3', **kw)(h))
    if self.shortcut == 'B':
      x = _conv(out_channels, 1, self.stride, name='downsample_0', **kw)(x)
      x = _bn('downsample_1', **kw)(x)
    elif self.shortcut == 'A':
      x = _shortcut_a(x, out_channels, self.stride)
    return nn.relu(h + x.astype(h.dtype))


class MedicalNetResNet(nn.Module):
  """MedicalNet 3D ResNet: `[N, D, H, W, 1]` → features `[N, feature_dim(depth)]`.

  `pooled=False` returns layer4's map `[N, ⌈D/8⌉, ⌈H/8⌉, ⌈W/8⌉, feature_dim]` instead.
  Call as `model.apply({'params': …, 'batch_stats': …}, x)`; BatchNorm always uses the
  running statistics (no mutable collections needed).
  """
  depth: int = 50
  shortcut_type: str | None = None  # None: MedicalNet's released setting (MEDICALNET_SHORTCUT)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, pooled: bool = True) -> Array:
    block, counts = _check_depth(self.depth)
    shortcut = resolve_shortcut(self.depth, self.shortcut_type)
    if x.ndim != 5 or x.shape[-1] != 1:
      raise ResNet3DConfigError('MedicalNet ResNet input must be single-channel volumes '
                                f'[N, D, H, W, 1], got shape {x.shape}.')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _conv(64, 7, 2, 1, 3, 'conv1', **kw)(x.astype(self.dtype))
    h = nn.relu(_bn('bn1', **kw)(h))
    h = nn.max_pool(h, (3, 3, 3), strides=(2, 2, 2), padding=((1, 1),) * 3)
    in_channels = 64
    for layer, ((planes, stride, dilation), count) in enumerate(zip(_LAYERS, counts), start=1):
      out_channels = planes * _EXPANSION[block]
      for i in range(count):
        first = i == 0
        project = first and (stride != 1 or in_channels != out_channels)
        h = _Block(block, planes, stride if first else 1, dilation,
                   shortcut if project else None, name=f'layer{layer}_{i}', **kw)(h)
        in_channels = out_channels
    if not pooled:
      return h
    return jnp.mean(h.astype(jnp.float32), axis=(1, 2, 3))


def build_resnet3d(depth: int = 50, shortcut_type: str | None = None,
                   dtype: Dtype = jnp.float32) -> MedicalNetResNet:
  """A MedicalNet ResNet of `depth` (10, 18, 34, 50, 101, 152, 200); validates the settings."""
  resolve_shortcut(depth, shortcut_type)
  return MedicalNetResNet(depth=depth, shortcut_type=shortcut_type, dtype=dtype)


def abstract_variables(model: MedicalNetResNet,
                       x_shape: tuple[int, ...] = (1, 16, 16, 16, 1)) -> dict[str, Any]:
  """Shapes of `{'params', 'batch_stats'}` (unboxed `jax.ShapeDtypeStruct`s), no memory used."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  return nn.meta.unbox(variables)
