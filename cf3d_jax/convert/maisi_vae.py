"""MONAI `AutoencoderKlMaisi` state dict → `cf3d_jax.models.autoencoder.AutoencoderKL` params.

Torch keys (MONAI 1.5/1.6, `monai/apps/generation/maisi/networks/autoencoderkl_maisi.py`):
  encoder.blocks.{i}.conv.conv.{weight,bias}             conv3 (MaisiConvolution → Convolution
                                                          → Conv3d: hence `.conv.conv`)
  encoder.blocks.{i}.{norm1,norm2}.{weight,bias}         ResBlock GroupNorms
  encoder.blocks.{i}.{conv1,conv2,nin_shortcut}.conv.conv.{weight,bias}
  encoder.blocks.{i}.conv.conv.conv.{weight,bias}        Downsample (decoder: Upsample)
  encoder.blocks.{i}.{weight,bias}                       the final GroupNorm
  quant_conv_mu.conv.{weight,bias}, quant_conv_log_sigma.conv.*, post_quant_conv.conv.*
and the same under `decoder.`. Each maps to the flax path with `blocks.{i}` → `blocks_{i}` and
the leaf `weight` → `kernel` (convs, transposed `[O, I, kD, kH, kW]` → `[kD, kH, kW, I, O]`) or
`scale` (norms). The expected keys and shapes come from the flax model itself, so any
architecture that `AutoencoderKL` accepts converts; checkpoints with attention blocks do not.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import numpy as np

from cf3d_jax.convert import Converter, flatten_params, to_numpy, unflatten_params
from cf3d_jax.errors import DataError
from cf3d_jax.models import autoencoder

__all__ = ['CONVERTER', 'convert_maisi_vae_state_dict', 'expected_torch_keys']


def _model(config: autoencoder.AutoencoderKL | Mapping[str, Any] | None
           ) -> autoencoder.AutoencoderKL:
  return autoencoder.build_autoencoder({} if config is None else config)


def _torch_module(path: tuple[str, ...]) -> str:
  """('encoder', 'blocks_3', 'conv1') → 'encoder.blocks.3.conv1'."""
  parts = []
  for part in path:
    head, _, index = part.rpartition('_')
    parts.extend([head, index] if head == 'blocks' and index.isdigit() else [part])
  return '.'.join(parts)


def expected_torch_keys(model: autoencoder.AutoencoderKL
                        ) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
  """torch key → (flax path, flax shape, is a conv kernel) for every param of `model`."""
  flat = flatten_params(autoencoder.abstract_params(model))
  out = {}
  for path, leaf in flat.items():
    module, name = path[:-1], path[-1]
    is_conv = (module + ('kernel',)) in flat
    prefix = _torch_module(module)
    if is_conv:  # MaisiConvolution wraps Convolution wraps Conv3d; the quant convs skip one.
      prefix += '.conv.conv' if module[0] in ('encoder', 'decoder') else '.conv'
    torch_name = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[name]
    out[f'{prefix}.{torch_name}'] = (path, tuple(leaf.shape), name == 'kernel')
  return out


def _torch_shape(flax_shape: tuple[int, ...], is_kernel: bool) -> tuple[int, ...]:
  if not is_kernel:
    return flax_shape
  *spatial, c_in, c_out = flax_shape
  return (c_out, c_in, *spatial)


def _listing(items: list[str], limit: int = 12) -> str:
  shown = ', '.join(items[:limit])
  return shown + (f', ... and {len(items) - limit} more' if len(items) > limit else '')


def _architecture_hint(state_dict: Mapping[str, np.ndarray]) -> str:
  """What the checkpoint's own shapes say about channels / latent channels."""
  hints = []
  first = state_dict.get('encoder.blocks.0.conv.conv.weight')
  if first is not None and np.ndim(first) == 5:
    hints.append(f'in_channels={first.shape[1]}, channels[0]={first.shape[0]}')
  mu = state_dict.get('quant_conv_mu.conv.weight')
  if mu is not None and np.ndim(mu) == 5:
    hints.append(f'latent_channels={mu.shape[0]}')
  last = state_dict.get('decoder.blocks.0.conv.conv.weight')
  if last is not None and np.ndim(last) == 5:
    hints.append(f'channels[-1]={last.shape[0]}')
  return f' The checkpoint has {", ".join(hints)}.' if hints else ''


def convert_maisi_vae_state_dict(
    state_dict: Mapping[str, Any],
    config: autoencoder.AutoencoderKL | Mapping[str, Any] | None = None,
    source: str = 'state dict', dtype: Any = np.float32) -> dict[str, Any]:
  """Maps a MONAI `AutoencoderKlMaisi` state dict onto `AutoencoderKL` params.

  state_dict: torch key → array (numpy or torch tensors); config: the `AutoencoderKL` (or its
  hyperparameters, `build_autoencoder`) the weights are for, default MAISI's; source: named in
  error messages (the file). Returns the nested param dict of numpy arrays in `dtype`.
  Raises DataError listing every missing key, unexpected key and shape mismatch at once.
  """
  model = _model(config)
  expected = expected_torch_keys(model)
  arrays = {k: to_numpy(v, k, source) for k, v in state_dict.items()}
  missing = sorted(k for k in expected if k not in arrays)
  unexpected = sorted(k for k in arrays if k not in expected)
  mismatched = []
  for key, (_, flax_shape, is_kernel) in sorted(expected.items()):
    if key in arrays and tuple(arrays[key].shape) != _torch_shape(flax_shape, is_kernel):
      mismatched.append(f'{key}: checkpoint {tuple(arrays[key].shape)}, expected '
                        f'{_torch_shape(flax_shape, is_kernel)}')
  if missing or unexpected or mismatched:
    arch = (f'channels={tuple(model.channels)}, num_res_blocks={tuple(model.num_res_blocks)}, '
            f'latent_channels={model.latent_channels}, in_channels={model.in_channels}, '
            f'out_channels={model.out_channels}')
    lines = [f'{source}: the state dict does not match the MAISI autoencoder ({arch}):']
    if missing:
      lines.append(f'  {len(missing)} missing keys: {_listing(missing)}')
    if unexpected:
      lines.append(f'  {len(unexpected)} unexpected keys: {_listing(unexpected)}')
      if any('attn' in k or 'attention' in k for k in unexpected):
        lines.append('  The checkpoint has attention blocks, which this port does not support.')
    if mismatched:
      lines.append(f'  {len(mismatched)} shape mismatches (torch layout): '
                   f'{_listing(mismatched, 6)}')
    lines.append('Check --channels, --num-res-blocks, --latent-channels, --in-channels and '
                 '--out-channels.' + _architecture_hint(arrays))
    raise DataError('\n'.join(lines))
  flat = {}
  for key, (path, _, is_kernel) in expected.items():
    value = arrays[key]
    if is_kernel:
      value = np.transpose(value, (2, 3, 4, 1, 0))
    flat[path] = np.ascontiguousarray(value, dtype=dtype)
  return unflatten_params(flat)


# ---------------------------------------------------------------------------------------------
# CLI registration

def _add_arguments(parser: argparse.ArgumentParser) -> None:
  defaults = autoencoder.AutoencoderKL()
  parser.add_argument('--channels', type=int, nargs='+', default=list(defaults.channels),
                      help='channels per level (default: %(default)s, MAISI)')
  parser.add_argument('--num-res-blocks', type=int, nargs='+',
                      default=list(defaults.num_res_blocks),
                      help='residual blocks per level (default: %(default)s)')
  parser.add_argument('--latent-channels', type=int, default=defaults.latent_channels)
  parser.add_argument('--in-channels', type=int, default=defaults.in_channels)
  parser.add_argument('--out-channels', type=int, default=defaults.out_channels)
  parser.add_argument('--norm-num-groups', type=int, default=defaults.norm_num_groups)
  parser.add_argument('--norm-eps', type=float, default=defaults.norm_eps)


def _model_config(args: argparse.Namespace) -> dict[str, Any]:
  model = autoencoder.build_autoencoder(dict(
      channels=args.channels, num_res_blocks=args.num_res_blocks,
      latent_channels=args.latent_channels, in_channels=args.in_channels,
      out_channels=args.out_channels, norm_num_groups=args.norm_num_groups,
      norm_eps=args.norm_eps))
  return autoencoder.autoencoder_hparams(model)


CONVERTER = Converter(
    name='maisi-vae',
    description='MONAI AutoencoderKlMaisi (MAISI VAE) → cf3d_jax.models.autoencoder',
    add_arguments=_add_arguments,
    model_config=_model_config,
    convert=lambda sd, config, source: convert_maisi_vae_state_dict(sd, config, source),
    abstract_params=lambda config: autoencoder.abstract_params(
        autoencoder.build_autoencoder(config)),
)
