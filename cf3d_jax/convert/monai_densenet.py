"""MONAI `DenseNet121(spatial_dims=3)` PyTorch state dict → the flax variables of
`cf3d_jax.models.densenet3d` (`{'params', 'batch_stats'}`): `convert_monai_densenet_state_dict`.

MONAI names carry `features.` / `class_layers.` prefixes and a `layers.` inside each dense
layer (`features.denseblock2.denselayer3.layers.norm1` → flax `denseblock2/denselayer3/norm1`,
`class_layers.out` → `out`); torch conv kernels `[C_out, C_in, kD, kH, kW]` become
`[kD, kH, kW, C_in, C_out]`, the Linear kernel `[O, I]` becomes `[I, O]`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cf3d_jax.convert import key_mismatch, listing, strip_module_prefix
from cf3d_jax.errors import DataError
from cf3d_jax.models.densenet3d import abstract_variables, build_densenet121

__all__ = ['MonaiDenseNetCheckpointError', 'convert_monai_densenet_state_dict']

Array = jax.Array


class MonaiDenseNetCheckpointError(DataError, ValueError):
  """A MONAI DenseNet state dict with missing, unexpected or mis-shaped entries."""


# (flax collection, flax leaf) → torch leaf.
_LEAVES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
           ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
           ('batch_stats', 'var'): 'running_var'}
_IGNORED_SUFFIXES = ('.num_batches_tracked',)


def _torch_module(path: tuple[str, ...]) -> str:
  """flax module path → MONAI module name (`('denseblock1', 'denselayer2', 'norm1')` →
  `features.denseblock1.denselayer2.layers.norm1`, `('out',)` → `class_layers.out`)."""
  if path == ('out',):
    return 'class_layers.out'
  parts = ['features']
  for p in path:
    parts.append(p)
    if p.startswith('denselayer'):
      parts.append('layers')
  return '.'.join(parts)


@functools.lru_cache(maxsize=8)
def _expected_torch_keys(num_classes: int,
                         in_channels: int) -> dict[str, tuple[str, tuple[str, ...], tuple]]:
  """torch key → (flax collection, flax path, torch shape) for DenseNet-121's variables
  (cached: tracing the 121 layers takes about a second)."""
  expected = {}
  for collection, tree in abstract_variables(build_densenet121(num_classes, in_channels)).items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      shape = tuple(leaf.shape)
      if path[-1] == 'kernel' and len(shape) == 5:  # [kD, kH, kW, I, O] → [O, I, kD, kH, kW]
        shape = (shape[4], shape[3]) + shape[:3]
      elif path[-1] == 'kernel':  # Linear [I, O] → [O, I]
        shape = shape[::-1]
      expected[f'{_torch_module(path[:-1])}.{_LEAVES[collection, path[-1]]}'] = (
          collection, path, shape)
  return expected


def _shape_hint(key: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> str:
  """A suggestion when a mismatch is explained by num_classes or in_channels."""
  if key.startswith('class_layers.out.') and shape[1:] == expected[1:] and shape:
    return f' (the checkpoint has num_classes={shape[0]})'
  if key == 'features.conv0.weight' and len(shape) == 5 and shape[0] == expected[0]:
    return f' (the checkpoint has in_channels={shape[1]})'
  return ''


def convert_monai_densenet_state_dict(state_dict: Mapping[str, Any], num_classes: int,
                                      in_channels: int = 1) -> dict[str, Any]:
  """MONAI `DenseNet121(spatial_dims=3)` state dict → flax `{'params': …, 'batch_stats': …}`.

  Args:
    state_dict: torch key → array (NumPy, a CPU tensor, anything `np.asarray` accepts), e.g.
      `{k: v.numpy() for k, v in torch.load(path).items()}`. A leading `module.` (from
      `nn.DataParallel`) is stripped; `*.num_batches_tracked` is ignored.
    num_classes: the checkpoint's `out_channels` (rows of `class_layers.out.weight`).
    in_channels: the checkpoint's input channels.

  Returns:
    Nested dicts of float32 `jax.Array`s for `build_densenet121(num_classes, in_channels)`.

  Raises:
    MonaiDenseNetCheckpointError: keys missing, unexpected or duplicated, or a shape mismatch
      (naming the key, both shapes and, for the head or stem, the checkpoint's setting).
  """
  build_densenet121(num_classes, in_channels)  # validates the settings
  expected = _expected_torch_keys(int(num_classes), int(in_channels))
  found = strip_module_prefix(state_dict, 'MONAI DenseNet state dict',
                              MonaiDenseNetCheckpointError,
                              ignore=lambda key: key.endswith(_IGNORED_SUFFIXES))
  mismatch = key_mismatch(expected, found)
  if mismatch:
    parts = ['MONAI DenseNet state dict does not match DenseNet121(spatial_dims=3):', *mismatch]
    raise MonaiDenseNetCheckpointError(' '.join(parts))
  values = {key: np.asarray(found[key], np.float32) for key in expected}
  wrong = [f'{key!r} has shape {values[key].shape}, expected {shape}'
           f'{_shape_hint(key, values[key].shape, shape)}'
           for key, (_, _, shape) in sorted(expected.items()) if values[key].shape != shape]
  if wrong:
    raise MonaiDenseNetCheckpointError(
        f'MONAI DenseNet state dict does not fit DenseNet121(spatial_dims=3, in_channels='
        f'{in_channels}, out_channels={num_classes}): {len(wrong)} entries with the wrong '
        f'shape: {listing(wrong, limit=4, sep="; ")}.')
  flat: dict[str, dict[tuple[str, ...], Array]] = {'params': {}, 'batch_stats': {}}
  for key, (collection, path, _) in expected.items():
    value = values[key]
    if path[-1] == 'kernel':
      value = np.transpose(value, (2, 3, 4, 1, 0) if value.ndim == 5 else (1, 0))
    flat[collection][path] = jnp.asarray(value)
  return {c: traverse_util.unflatten_dict(tree) for c, tree in flat.items()}
