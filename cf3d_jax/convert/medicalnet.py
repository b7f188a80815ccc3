"""`python -m cf3d_jax.convert medicalnet IN OUT --depth 50`: a MedicalNet (Med3D) 3D ResNet
checkpoint (e.g. `resnet_50_23dataset.pth`, the FID feature network of wdm-3d) → the flax
`cf3d_jax.models.resnet3d.MedicalNetResNet` variables `{'params', 'batch_stats'}`
(`convert_medicalnet_state_dict`).

Torch names map to flax with `.k` → `_k` (`layer1.0.conv1` → `layer1_0/conv1`); torch conv
kernels `[C_out, C_in, kD, kH, kW]` become `[kD, kH, kW, C_in, C_out]`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cf3d_jax.convert import Converter, key_mismatch, strip_module_prefix
from cf3d_jax.errors import DataError
from cf3d_jax.models import resnet3d

Array = jax.Array


class MedicalNetCheckpointError(DataError, ValueError):
  """A MedicalNet state dict with missing, unexpected or mis-shaped entries."""


def _torch_module(flax_name: str) -> str:
  """`layer1_0` → `layer1.0`, `downsample_1` → `downsample.1` (flax → torch module names)."""
  return re.sub(r'_(\d+)$', r'.\1', flax_name)


# (flax collection, flax leaf) → torch leaf.
_LEAVES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
           ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
           ('batch_stats', 'var'): 'running_var'}
_IGNORED_SUFFIXES = ('.num_batches_tracked',)
_IGNORED_PREFIXES = ('conv_seg.',)


def _expected_torch_keys(
    depth: int, shortcut_type: str | None) -> dict[str, tuple[str, tuple[str, ...], tuple]]:
  """torch key → (flax collection, flax path, torch shape) for the extractor's variables."""
  model = resnet3d.MedicalNetResNet(depth=depth, shortcut_type=shortcut_type)
  expected = {}
  for collection, tree in resnet3d.abstract_variables(model).items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      shape = tuple(leaf.shape)
      if path[-1] == 'kernel':  # [kD, kH, kW, I, O] → torch [O, I, kD, kH, kW]
        shape = (shape[4], shape[3]) + shape[:3]
      key = '.'.join([_torch_module(p) for p in path[:-1]] + [_LEAVES[collection, path[-1]]])
      expected[key] = (collection, path, shape)
  return expected


def convert_medicalnet_state_dict(state_dict: Mapping[str, Any], depth: int,
                                  shortcut_type: str | None = None) -> dict[str, Any]:
  """MedicalNet PyTorch state dict → flax variables `{'params': …, 'batch_stats': …}`.

  Args:
    state_dict: torch key → array (NumPy, or anything `np.asarray` accepts), e.g.
      `{k: v.numpy() for k, v in torch.load(path)['state_dict'].items()}`. A leading
      `module.` (from `nn.DataParallel`, as in MedicalNet's released files) is stripped.
      `*.num_batches_tracked` and the segmentation head `conv_seg.*` are ignored.
    depth: 10, 18, 34, 50, 101, 152 or 200.
    shortcut_type: 'A', 'B' or None (MedicalNet's released setting for `depth`).

  Returns:
    Nested dicts of float32 `jax.Array`s for `MedicalNetResNet(depth, shortcut_type).apply`.

  Raises:
    MedicalNetCheckpointError: keys missing, unexpected or duplicated, or a shape mismatch;
      the message lists the keys and, for shortcut keys, suggests the other shortcut type.
  """
  shortcut = resnet3d.resolve_shortcut(depth, shortcut_type)
  expected = _expected_torch_keys(depth, shortcut)
  found = strip_module_prefix(
      state_dict, 'MedicalNet state dict', MedicalNetCheckpointError,
      ignore=lambda key: key.endswith(_IGNORED_SUFFIXES) or key.startswith(_IGNORED_PREFIXES))
  mismatch = key_mismatch(expected, found)
  if mismatch:
    parts = [f'MedicalNet state dict does not match resnet{depth} with shortcut '
             f'{shortcut!r}:', *mismatch]
    if any('.downsample.' in k for k in set(expected) ^ set(found)):
      other = 'A' if shortcut == 'B' else 'B'
      parts.append(f'(the downsample keys suggest shortcut_type={other!r})')
    raise MedicalNetCheckpointError(' '.join(parts))
  flat: dict[str, dict[tuple[str, ...], Array]] = {'params': {}, 'batch_stats': {}}
  for key, (collection, path, torch_shape) in expected.items():
    value = np.asarray(found[key], np.float32)
    if value.shape != torch_shape:
      raise MedicalNetCheckpointError(f'MedicalNet state dict entry {key!r} has shape '
                                      f'{value.shape}, expected {torch_shape} for '
                                      f'resnet{depth}.')
    if path[-1] == 'kernel':
      value = np.transpose(value, (2, 3, 4, 1, 0))
    flat[collection][path] = jnp.asarray(value)
  return {c: traverse_util.unflatten_dict(tree) for c, tree in flat.items()}


def _add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--depth', type=int, default=50, choices=list(resnet3d.DEPTHS),
                      help='ResNet depth (default: %(default)s, resnet_50_23dataset)')
  parser.add_argument('--shortcut-type', choices=['A', 'B'], default=None,
                      help="shortcut type (default: MedicalNet's released setting for the depth)")


def _model_config(args: argparse.Namespace) -> dict[str, Any]:
  return {'depth': int(args.depth), 'shortcut_type': args.shortcut_type}


def _abstract(config) -> Any:
  model = resnet3d.build_resnet3d(config['depth'], config.get('shortcut_type'))
  return resnet3d.abstract_variables(model)


CONVERTER = Converter(
    name='medicalnet',
    description='MedicalNet / Med3D 3D ResNet → cf3d_jax.models.resnet3d (FID features)',
    add_arguments=_add_arguments,
    model_config=_model_config,
    convert=lambda sd, config, source: convert_medicalnet_state_dict(
        sd, config['depth'], config.get('shortcut_type')),
    abstract_params=_abstract,
)
