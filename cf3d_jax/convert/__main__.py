"""CLI: `python -m cf3d_jax.convert NAME IN OUT [--overwrite] [architecture options]`.

  python -m cf3d_jax.convert maisi-vae autoencoder_epoch273.pt runs/maisi_vae
  python -m cf3d_jax.convert maisi-vae vae.safetensors runs/vae --channels 64 128 256

`python -m cf3d_jax.convert NAME --help` lists a converter's options. Errors print one message
and exit with status 2; success prints where the checkpoint went.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cf3d_jax import convert
from cf3d_jax.errors import Cf3dError, DataError


def build_parser() -> argparse.ArgumentParser:
  """The top-level parser with one subcommand per entry of `convert.CONVERTERS`."""
  parser = argparse.ArgumentParser(
      prog='python -m cf3d_jax.convert',
      description='Convert a PyTorch checkpoint into a cf3d_jax checkpoint folder '
                  '(orbax params + config.json).')
  commands = parser.add_subparsers(dest='converter', required=True, metavar='CONVERTER')
  for name in convert.CONVERTERS:
    converter = convert.get_converter(name)
    sub = commands.add_parser(name, help=converter.description,
                              description=converter.description)
    sub.add_argument('input', help='torch checkpoint: .pt/.pth/.bin/.ckpt or .safetensors')
    sub.add_argument('output', help='output folder (must not exist unless --overwrite)')
    sub.add_argument('--overwrite', action='store_true',
                     help='replace an existing output folder (once the new one is complete)')
    converter.add_arguments(sub)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI on `argv` (default: sys.argv[1:]); returns the exit status."""
  args = build_parser().parse_args(argv)
  try:
    converter = convert.get_converter(args.converter)
    model_config = converter.model_config(args)
    if os.path.exists(args.output) and not args.overwrite:  # fail before reading IN
      raise DataError(f'{args.output} already exists; pass --overwrite to replace it.')
    state_dict = convert.load_torch_state_dict(args.input)
    params = converter.convert(state_dict, model_config, args.input)
    out = convert.save_converted(args.output, params, converter.name, model_config,
                                 source=args.input, overwrite=args.overwrite)
  except Cf3dError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  num_params = sum(v.size for v in _leaves(params))
  print(f'{converter.name}: {len(state_dict)} tensors, {num_params:,} parameters → {out}')
  return 0


def _leaves(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _leaves(value)
  else:
    yield tree


if __name__ == '__main__':
  sys.exit(main())
