"""`python -m cf3d_jax.convert wdm-unet IN OUT`: a wdm-3d U-Net checkpoint → `UNet` params.

wdm-3d (pfriedri/wdm-3d, `guided_diffusion/unet.py` `UNetModel` as its `run.sh` builds it:
dims=3, additive skips, resblock_updown, no attention, bottleneck_attention=False,
resample_2d=False, use_scale_shift_norm=False, GroupNorm 32) saves `model.state_dict()` as
`brats_NNNNNN.pt`. With attention and text off, `cf3d_jax.models.unet.UNet` with
`num_middle_blocks=2` is the same network (57,914,824 parameters at 128³), so the weights map
one to one:

  time_embed.{0,2}.*                 → time_embed_{0,2}/{kernel,bias}       (Linear)
  input_blocks.0.0.*                 → input_blocks_0/{kernel,bias}         (conv3 in → base)
  input_blocks.k.0.<res>.*           → input_blocks_k/<res>                 (ResBlock; down)
  input_blocks.k.0.op.*              → input_blocks_k/op                    (strided conv,
                                                                             resblock_updown off)
  middle_block.j.<res>.*             → middle_block_j/<res>
  output_blocks.k.0.<res>.*          → output_blocks_k/<res>
  output_blocks.k.1.<res>.* / conv.* → output_blocks_k_up/<res> / conv     (up block)
  out.0.*, out.2.*                   → out_norm, out_conv
  <res>: in_layers.0 → in_norm, in_layers.2 → in_conv, emb_layers.1 → emb_dense,
         out_layers.0 → out_norm, out_layers.3 → out_conv, skip_connection → skip_conv
  leaves: conv `weight` [O, I, kD, kH, kW] → `kernel` [kD, kH, kW, I, O]; Linear `weight`
          [O, I] → `kernel` [I, O]; GroupNorm `weight` → `scale`; `bias` → `bias`.

Text on: with `--cross-attention-levels` (and/or `--middle-cross-attention`, `--attention-levels`,
`--middle-attention`) the target U-Net has attention layers wdm-3d lacks. They come from a fresh
init (`--seed`) whose output projections are zero, merged with the converted weights by
`merge_pretrained`, so the converted text-conditioned model computes the unconditional wdm-3d
function for any text until it is fine-tuned (each attention layer adds exactly zero; its
compiled program may round differently from the attention-free one's, by a few ulp). The same `merge_pretrained` fills a freshly
initialised training state from an unconditional conversion (`config.train.init_from`).

The model dict in `config.json` holds `UNet` field names (for `build_unet`) plus `in_channels`
(input channels, 8 = 8 subbands × 1 modality), `text_dim` (E of the `[N, L, E]` text tokens,
0 without cross-attention) and `init_seed` (of the fresh attention params).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cf3d_jax.convert import Converter, flatten_params, to_numpy, unflatten_params
from cf3d_jax.errors import ConfigError, DataError

__all__ = ['CONVERTER', 'WDM_128', 'abstract_params', 'build_model', 'convert_wdm_unet_state_dict',
           'describe_checkpoint', 'expected_torch_keys', 'is_attention_param', 'merge_pretrained',
           'torch_key']

# wdm-3d's `ours_unet_128` (run.sh): 8 × 64³ subbands in and out. 256³: channel_mult + (4,).
WDM_128: dict[str, Any] = dict(
    in_channels=8, out_channels=8, base_channels=64, channel_mult=(1, 2, 2, 4, 4),
    num_res_blocks=2, num_middle_blocks=2, num_groups=32, resblock_updown=True,
    attention_levels=(), middle_attention=False, cross_attention_levels=(),
    middle_cross_attention=False, head_channels=32, text_dim=0, init_seed=0)

_RESBLOCK = {'in_norm': 'in_layers.0', 'in_conv': 'in_layers.2', 'emb_dense': 'emb_layers.1',
             'out_norm': 'out_layers.0', 'out_conv': 'out_layers.3',
             'skip_conv': 'skip_connection', 'op': 'op', 'conv': 'conv'}
_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
_ATTENTION = re.compile(r'_(self|cross)_attn$')
_TOP = [  # (flax module regex, torch prefix template)
    (re.compile(r'time_embed_(\d+)$'), 'time_embed.{0}'),
    (re.compile(r'input_blocks_(0)$'), 'input_blocks.0.0'),
    (re.compile(r'input_blocks_(\d+)$'), 'input_blocks.{0}.0'),
    (re.compile(r'middle_block_(\d+)$'), 'middle_block.{0}'),
    (re.compile(r'output_blocks_(\d+)_up$'), 'output_blocks.{0}.1'),
    (re.compile(r'output_blocks_(\d+)$'), 'output_blocks.{0}.0'),
    (re.compile(r'out_norm$'), 'out.0'),
    (re.compile(r'out_conv$'), 'out.2'),
]


# ---------------------------------------------------------------------------------------------
# The target model

def build_model(config: Mapping[str, Any]):
  """The `UNet` for a converter model dict (`WDM_128` keys; missing ones take its values)."""
  from cf3d_jax.models import unet  # lazy: keeps `python -m cf3d_jax.convert --help` light
  return unet.build_unet({k: v for k, v in {**WDM_128, **config}.items()
                          if k not in ('in_channels', 'text_dim', 'init_seed')})


def _shapes(config: Mapping[str, Any]) -> tuple[tuple[int, ...], tuple[int, int] | None]:
  """Smallest valid init shapes: x `[s, s, s, in_channels]` with s = 2^(levels-1); text."""
  config = {**WDM_128, **config}
  side = 2 ** (len(config['channel_mult']) - 1)
  model = build_model(config)
  text_shape = (1, int(config['text_dim'])) if model.uses_text else None
  return (side, side, side, int(config['in_channels'])), text_shape


def abstract_params(config: Mapping[str, Any]) -> Any:
  """`jax.ShapeDtypeStruct` tree of the `UNet` params for a converter model dict."""
  from cf3d_jax.models import unet
  return unet.abstract_params(build_model(config), *_shapes(config))


@functools.lru_cache(maxsize=4)
def _compiled_init(architecture: str) -> Callable[[Any], Any]:
  """`key → params`, compiled once per architecture (JSON of a model dict without the seed):
  compiling the init's PRNG calls takes seconds even for a tiny U-Net."""
  import jax

  from cf3d_jax.models import unet
  config = json.loads(architecture)
  init = jax.jit(unet.make_init_fn(build_model(config), *_shapes(config)))
  return init.lower(jax.random.key(0)).compile(compiler_options=unet.INIT_COMPILER_OPTIONS)


def _init_params(config: Mapping[str, Any]) -> Any:
  """A fresh init (key `init_seed`) of the `UNet` for a converter model dict; the same values
  as `unet.init_params(build_model(config), jax.random.key(init_seed), ...)`."""
  import jax
  config = {**WDM_128, **config}
  architecture = json.dumps({k: v for k, v in config.items() if k != 'init_seed'},
                            sort_keys=True)
  return _compiled_init(architecture)(jax.random.key(int(config['init_seed'])))


# ---------------------------------------------------------------------------------------------
# Names and shapes

def is_attention_param(path: str) -> bool:
  """Whether a '/'-joined param path lies in an attention layer (`*_self_attn`, `*_cross_attn`),
  which wdm-3d lacks and which starts as the identity (zero output projection)."""
  return any(_ATTENTION.search(part) for part in path.split('/'))


def torch_key(path: tuple[str, ...]) -> str | None:
  """wdm-3d state-dict key of a flax param path; None for our attention params.

  ('input_blocks_4', 'in_conv', 'kernel') → 'input_blocks.4.0.in_layers.2.weight'.
  """
  if is_attention_param('/'.join(path)):
    return None
  top, *inner, leaf = path
  for pattern, template in _TOP:
    match = pattern.match(top)
    if match:
      prefix = template.format(*match.groups())
      break
  else:
    raise ValueError(f'no wdm-3d name for U-Net param {"/".join(path)}')
  if len(inner) > 1 or (inner and inner[0] not in _RESBLOCK):
    raise ValueError(f'no wdm-3d name for U-Net param {"/".join(path)}')
  return '.'.join([prefix] + [_RESBLOCK[m] for m in inner] + [_LEAF[leaf]])


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Flax kernel shape → torch weight shape (conv `[k,k,k,I,O]` → `[O,I,k,k,k]`, dense `.T`)."""
  if len(flax_shape) == 5:
    *spatial, c_in, c_out = flax_shape
    return (c_out, c_in, *spatial)
  if len(flax_shape) == 2:
    return flax_shape[::-1]
  return flax_shape


def _to_flax(value: np.ndarray) -> np.ndarray:
  """Torch weight → flax kernel layout (conv and dense transposed, vectors unchanged)."""
  if value.ndim == 5:
    return np.transpose(value, (2, 3, 4, 1, 0))
  if value.ndim == 2:
    return value.T
  return value


def expected_torch_keys(config: Mapping[str, Any]
                        ) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """torch key → (flax path, flax shape) for every non-attention param of the model."""
  return _expected(flatten_params(abstract_params({**WDM_128, **config})))


def _expected(flat: Mapping[tuple[str, ...], Any]
              ) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  out = {}
  for path, leaf in flat.items():
    key = torch_key(path)
    if key is not None:
      out[key] = (path, tuple(leaf.shape))
  return out


def describe_checkpoint(state_dict: Mapping[str, Any]) -> str:
  """The architecture a wdm-3d state dict implies, e.g. 'in_channels=8, base_channels=64,
  channel_mult=(1, 2, 2, 4, 4), num_res_blocks=2, num_middle_blocks=2, out_channels=8'
  ('' when it cannot tell)."""
  try:
    first = np.shape(state_dict['input_blocks.0.0.weight'])
    base, parts = first[0], [f'in_channels={first[1]}', f'base_channels={first[0]}']
    ups = {int(m.group(1)) for k in state_dict
           for m in [re.match(r'output_blocks\.(\d+)\.1\.', k)] if m}
    outs = {int(m.group(1)) for k in state_dict
            for m in [re.match(r'output_blocks\.(\d+)\.', k)] if m}
    levels = len(ups) + 1
    blocks = len(outs) // levels - 1
    mult = []
    for level in range(levels):
      conv = state_dict[f'input_blocks.{level * (blocks + 1) + 1}.0.in_layers.2.weight']
      mult.append(int(np.shape(conv)[0]) // int(base))
    middle = {int(m.group(1)) for k in state_dict
              for m in [re.match(r'middle_block\.(\d+)\.', k)] if m}
    parts += [f'channel_mult={tuple(mult)}', f'num_res_blocks={blocks}',
              f'num_middle_blocks={len(middle)}',
              f'out_channels={np.shape(state_dict["out.2.weight"])[0]}']
    return ', '.join(parts)
  except Exception:  # a heuristic for the error message only
    return ''


def _listing(items: list[str], limit: int = 12) -> str:
  shown = ', '.join(items[:limit])
  return shown + (f', ... and {len(items) - limit} more' if len(items) > limit else '')


# ---------------------------------------------------------------------------------------------
# Conversion

def convert_wdm_unet_state_dict(state_dict: Mapping[str, Any],
                                config: Mapping[str, Any] | None = None,
                                source: str = 'state dict', dtype: Any = np.float32) -> Any:
  """Maps a wdm-3d `UNetModel` state dict onto our `UNet` params (numpy, `dtype`).

  config: a converter model dict (`WDM_128` keys, missing ones take wdm-3d's 128³ values).
  With attention in `config`, those params come from a fresh init (`init_seed`) merged with
  the converted ones (`merge_pretrained`). Raises DataError naming `source` and listing every
  missing key, unexpected key and shape mismatch at once.
  """
  config = {**WDM_128, **(config or {})}
  flat = flatten_params(abstract_params(config))
  expected = _expected(flat)
  arrays = {k: to_numpy(v, k, source) for k, v in state_dict.items()}
  missing = sorted(k for k in expected if k not in arrays)
  unexpected = sorted(k for k in arrays if k not in expected)
  mismatched = [f'{k}: checkpoint {tuple(arrays[k].shape)}, expected {_torch_shape(shape)}'
                for k, (_, shape) in sorted(expected.items())
                if k in arrays and tuple(arrays[k].shape) != _torch_shape(shape)]
  if missing or unexpected or mismatched:
    arch = ', '.join(f'{k}={config[k]}' for k in (
        'in_channels', 'base_channels', 'channel_mult', 'num_res_blocks', 'num_middle_blocks',
        'out_channels', 'resblock_updown'))
    lines = [f'{source}: the state dict does not match the wdm-3d U-Net ({arch}):']
    if missing:
      lines.append(f'  {len(missing)} missing keys: {_listing(missing)}')
    if unexpected:
      lines.append(f'  {len(unexpected)} unexpected keys: {_listing(unexpected)}')
      if any(re.search(r'\.(qkv|proj_out|norm)\.', k) for k in unexpected):
        lines.append('  The checkpoint has attention blocks (attention_resolutions / '
                     'bottleneck_attention), which this importer does not map.')
    if mismatched:
      lines.append(f'  {len(mismatched)} shape mismatches (torch layout): '
                   f'{_listing(mismatched, 6)}')
    described = describe_checkpoint(arrays)
    lines.append('Check --in-channels, --base-channels, --channel-mult, --num-res-blocks, '
                 '--num-middle-blocks and --out-channels.'
                 + (f' The checkpoint has {described}.' if described else ''))
    raise DataError('\n'.join(lines))
  converted = unflatten_params({path: np.ascontiguousarray(_to_flax(arrays[k]), dtype=dtype)
                          for k, (path, _) in expected.items()})
  if len(expected) == len(flat):  # no attention layers: nothing new to initialise
    return converted
  import jax
  fresh = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), _init_params(config))
  return merge_pretrained(fresh, converted, source=source)


def merge_pretrained(init_params: Mapping[str, Any], pretrained: Mapping[str, Any], *,
                     source: str = 'pretrained params',
                     allow_new: Callable[[str], bool] = is_attention_param) -> dict[str, Any]:
  """`init_params` with every param that `pretrained` has replaced by the pretrained value.

  init_params: a fresh param tree of the target model (e.g. a text-conditioned `UNet`);
  pretrained: a param tree of a model it extends (e.g. `load_converted(OUT)[1]` of a wdm-3d
  conversion). Params only in `init_params` keep their init when `allow_new('a/b/kernel')`
  holds; by default only attention layers (`is_attention_param`) may be new: their output
  projections start at zero, so the merged model computes exactly the pretrained one.
  (A fresh ResBlock whose input and output channels agree is the identity as well — its
  `out_conv` is zero — so e.g. `allow_new=lambda p: is_attention_param(p) or
  p.startswith(('middle_block_2/', 'middle_block_3/'))` deepens wdm-3d's 2 middle blocks to 4
  without changing the function.)

  Leaves keep the init's dtype; jax.Array leaves keep their sharding (built with
  `jax.make_array_from_callback`, so this works for params created sharded, multi-host too);
  numpy leaves stay numpy. Raises DataError naming `source` and listing every pretrained param
  the target lacks, every shape mismatch and every target param without a pretrained value
  that `allow_new` rejects.
  """
  import jax

  init_flat = flatten_params(init_params)
  pre_flat = flatten_params(pretrained)
  join = '/'.join
  unexpected = sorted(join(p) for p in pre_flat if p not in init_flat)
  mismatched = sorted(f'{join(p)}: pretrained {tuple(np.shape(v))}, target '
                      f'{tuple(np.shape(init_flat[p]))}' for p, v in pre_flat.items()
                      if p in init_flat and tuple(np.shape(v)) != tuple(np.shape(init_flat[p])))
  missing = sorted(join(p) for p in init_flat if p not in pre_flat and not allow_new(join(p)))
  if unexpected or mismatched or missing:
    lines = [f'{source}: cannot initialise the model from these params:']
    if unexpected:
      lines.append(f'  {len(unexpected)} params the model does not have: {_listing(unexpected)}')
    if mismatched:
      lines.append(f'  {len(mismatched)} shape mismatches: {_listing(mismatched, 6)}')
    if missing:
      lines.append(f'  {len(missing)} model params missing from them (only new attention '
                   f'layers may be missing): {_listing(missing)}')
    lines.append('Check that the model config matches the one the params were converted or '
                 'trained with (channels, channel_mult, num_res_blocks, num_middle_blocks).')
    raise DataError('\n'.join(lines))

  def place(init: Any, value: Any) -> Any:
    if isinstance(init, jax.Array):
      host = np.asarray(value, dtype=init.dtype)
      return jax.make_array_from_callback(host.shape, init.sharding, lambda idx: host[idx])
    return np.asarray(value, dtype=np.asarray(init).dtype)

  return unflatten_params({p: place(v, pre_flat[p]) if p in pre_flat else v
                     for p, v in init_flat.items()})


# ---------------------------------------------------------------------------------------------
# CLI registration

def _flags(value: str) -> bool:
  if value.lower() in ('1', 'true', 'yes', 'on'):
    return True
  if value.lower() in ('0', 'false', 'no', 'off'):
    return False
  raise argparse.ArgumentTypeError(f'expected 1/0 or true/false, got {value!r}')


def _add_arguments(parser: argparse.ArgumentParser) -> None:
  d = WDM_128
  parser.add_argument('--in-channels', type=int, default=d['in_channels'],
                      help='input channels (default: %(default)s = 8 subbands × 1 modality)')
  parser.add_argument('--out-channels', type=int, default=d['out_channels'])
  parser.add_argument('--base-channels', type=int, default=d['base_channels'],
                      help="wdm-3d's --num_channels (default: %(default)s)")
  parser.add_argument('--channel-mult', type=int, nargs='+', default=list(d['channel_mult']),
                      help='per level (default: %(default)s, 128³; 1 2 2 4 4 4 for 256³)')
  parser.add_argument('--num-res-blocks', type=int, default=d['num_res_blocks'])
  parser.add_argument('--num-middle-blocks', type=int, default=d['num_middle_blocks'],
                      help='middle ResBlocks (default: %(default)s, as wdm-3d)')
  parser.add_argument('--num-groups', type=int, default=d['num_groups'])
  parser.add_argument('--no-resblock-updown', dest='resblock_updown', action='store_false',
                      help="wdm-3d's --resblock_updown=False (strided conv down, nearest + conv "
                           "up); its run.sh uses the default True")
  text = parser.add_argument_group(
      'text conditioning (params wdm-3d lacks: fresh init, zero output projections)')
  text.add_argument('--cross-attention-levels', type=_flags, nargs='+', default=[],
                    metavar='0|1', help='cross-attention to the text per level, e.g. 1 0 1 0 1')
  text.add_argument('--middle-cross-attention', action='store_true')
  text.add_argument('--attention-levels', type=_flags, nargs='+', default=[], metavar='0|1',
                    help='self-attention per level')
  text.add_argument('--middle-attention', action='store_true')
  text.add_argument('--text-dim', type=int, default=0,
                    help='E of the [N, L, E] text tokens (required with cross-attention)')
  text.add_argument('--head-channels', type=int, default=d['head_channels'])
  text.add_argument('--seed', type=int, default=0, help='seed of the fresh attention params')


def _model_config(args: argparse.Namespace) -> dict[str, Any]:
  config = dict(
      in_channels=args.in_channels, out_channels=args.out_channels,
      base_channels=args.base_channels, channel_mult=list(args.channel_mult),
      num_res_blocks=args.num_res_blocks, num_middle_blocks=args.num_middle_blocks,
      num_groups=args.num_groups, resblock_updown=bool(args.resblock_updown),
      attention_levels=list(args.attention_levels), middle_attention=args.middle_attention,
      cross_attention_levels=list(args.cross_attention_levels),
      middle_cross_attention=args.middle_cross_attention, head_channels=args.head_channels,
      text_dim=args.text_dim, init_seed=args.seed)
  levels = len(config['channel_mult'])
  for key in ('attention_levels', 'cross_attention_levels'):
    if config[key] and len(config[key]) != levels:
      raise ConfigError(f'--{key.replace("_", "-")} has {len(config[key])} entries '
                        f'{config[key]}, expected one per level of --channel-mult ({levels}).')
  uses_text = config['middle_cross_attention'] or any(config['cross_attention_levels'])
  if uses_text and config['text_dim'] <= 0:
    raise ConfigError('cross-attention needs --text-dim (E of the [N, L, E] text tokens, e.g. '
                      '384 for all-MiniLM-L6-v2, 768 for BiomedCLIP token states).')
  if not uses_text:
    config['text_dim'] = 0
  return config


CONVERTER = Converter(
    name='wdm-unet',
    description="wdm-3d U-Net (guided_diffusion UNetModel, BraTS checkpoints) → "
                "cf3d_jax.models.unet.UNet, optionally with new text cross-attention",
    add_arguments=_add_arguments,
    model_config=_model_config,
    convert=lambda sd, config, source: convert_wdm_unet_state_dict(sd, config, source),
    abstract_params=abstract_params,
)
