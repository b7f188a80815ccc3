"""The embedding table: prompt -> text embedding, computed offline and read at training time.

File format (``.npz``, readable with ``np.load(path, allow_pickle=False)``):

* ``format``: the string ``'cf3d_jax.embedding_table/1'``.
* ``prompts``: unicode array ``[P]``; unique; may contain the null prompt ``''``.
* ``embeddings``: float32 ``[P, L, E]``; ``L = 1`` for pooled or projected vectors, the context
  length (e.g. 256 for BiomedCLIP) for token states. Padded token positions hold zeros.
* ``mask``: bool ``[P, L]``; True marks a valid token; every row has at least one True.
* ``meta``: 0-d unicode array holding a JSON object: ``encoder``, ``model``,
  ``weights_sha256``, ``kind`` ('pooled' | 'tokens' | 'projected'), ``dim`` (E), ``length`` (L),
  and whatever provenance the writer adds (creation time, library versions, ...).

No pickled objects are stored, so loading a table cannot run code. This module needs only NumPy.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import zipfile
from typing import Any, Sequence

import numpy as np

from cf3d_jax.errors import ConfigError, DataError, PromptError
from cf3d_jax.files import atomic_path

FORMAT = 'cf3d_jax.embedding_table/1'
KINDS = ('pooled', 'tokens', 'projected')
_KEYS = ('format', 'prompts', 'embeddings', 'mask', 'meta')
_REQUIRED_META = ('encoder', 'model', 'weights_sha256', 'kind', 'dim', 'length')
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')


def _where(path: str | None) -> str:
  """How to name a table's origin in an error message."""
  return f'embedding table {path}' if path else 'embedding table (not loaded from a file)'


def _problems(prompts: tuple[str, ...], embeddings: np.ndarray, mask: np.ndarray,
              meta: Any) -> list[str]:
  """Everything wrong with a table's contents; an empty list when it is valid."""
  problems = []
  if not all(isinstance(p, str) for p in prompts):
    problems.append('prompts must all be strings')
  if any('\0' in p for p in prompts if isinstance(p, str)):
    problems.append('prompts must not contain NUL characters')
  duplicates = sorted(p for p, n in collections.Counter(prompts).items() if n > 1)
  if duplicates:
    problems.append(f'duplicate prompts {duplicates}')
  if embeddings.ndim != 3 or embeddings.shape[0] != len(prompts):
    problems.append(
        f'embeddings have shape {embeddings.shape}, expected [P={len(prompts)}, L, E]')
  elif mask.shape != embeddings.shape[:2]:
    problems.append(f'mask has shape {mask.shape}, expected {embeddings.shape[:2]}')
  elif mask.size and not mask.any(axis=1).all():
    problems.append('some prompts have no valid token in mask')
  if embeddings.dtype != np.float32:
    problems.append(f'embeddings have dtype {embeddings.dtype}, expected float32')
  elif not np.isfinite(embeddings).all():
    problems.append('embeddings contain NaN or infinite values')
  if mask.dtype != np.bool_:
    problems.append(f'mask has dtype {mask.dtype}, expected bool')
  if not isinstance(meta, dict):
    problems.append(f'meta must be a dict, got {type(meta).__name__}')
  else:
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
      problems.append(f'meta lacks keys {missing}')
    elif meta['kind'] not in KINDS:
      problems.append(f"meta['kind'] is {meta['kind']!r}, expected one of {list(KINDS)}")
    elif embeddings.ndim == 3 and (meta['length'], meta['dim']) != embeddings.shape[1:]:
      problems.append(
          f"meta says length={meta['length']}, dim={meta['dim']} but embeddings are "
          f'{embeddings.shape}')
  return problems


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingTable:
  """Prompt embeddings with their validity mask and provenance.

  Attributes:
    prompts: the P prompts, unique, in file order.
    embeddings: float32 [P, L, E] (read-only).
    mask: bool [P, L], True = valid token (read-only).
    meta: provenance: encoder, model, weights_sha256, kind, dim (E), length (L), ...
    path: the file the table was loaded from, for error messages.
  """
  prompts: tuple[str, ...]
  embeddings: np.ndarray
  mask: np.ndarray
  meta: dict
  path: str | None = None

  def __post_init__(self):
    prompts = tuple(self.prompts)
    embeddings = np.array(self.embeddings, copy=True)
    if embeddings.dtype.kind == 'f':
      embeddings = embeddings.astype(np.float32)
    mask = np.array(self.mask, copy=True)
    problems = _problems(prompts, embeddings, mask, self.meta)
    if problems:
      raise DataError(f'{_where(self.path)} is malformed: ' + '; '.join(problems))
    embeddings.setflags(write=False)
    mask.setflags(write=False)
    object.__setattr__(self, 'prompts', prompts)
    object.__setattr__(self, 'embeddings', embeddings)
    object.__setattr__(self, 'mask', mask)
    object.__setattr__(self, 'meta', dict(self.meta))
    object.__setattr__(self, '_rows', {p: i for i, p in enumerate(prompts)})

  def __len__(self) -> int:
    return len(self.prompts)

  def __contains__(self, prompt: object) -> bool:
    return prompt in self._rows

  @property
  def dim(self) -> int:
    """E, the embedding width."""
    return int(self.embeddings.shape[2])

  @property
  def length(self) -> int:
    """L, the number of token positions (1 for pooled or projected vectors)."""
    return int(self.embeddings.shape[1])

  def index(self, prompt: str) -> int:
    """The row of `prompt`; PromptError naming the prompt, the table and the known prompts."""
    try:
      return self._rows[prompt]
    except (KeyError, TypeError):
      raise PromptError(
          f'prompt {prompt!r} is not in {_where(self.path)}; it holds {list(self.prompts)}. '
          'Add it (python -m cf3d_jax.text.embed --prompts_file=...) or use a listed prompt.'
      ) from None

  def lookup(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings float32 [n, L, E] and mask bool [n, L] for `prompts` (n of them)."""
    if isinstance(prompts, str):
      raise TypeError(f'lookup takes a sequence of prompts, got the string {prompts!r}')
    rows = np.array([self.index(p) for p in prompts], dtype=np.int64)
    return self.embeddings[rows], self.mask[rows]

  def save(self, path: str | os.PathLike) -> None:
    """Writes the table to `path` (.npz) atomically: the old file survives a failed write."""
    with atomic_path(path) as tmp:
      with open(tmp, 'wb') as f:
        np.savez(
            f,
            format=np.array(FORMAT),
            prompts=np.array(self.prompts, dtype=str).reshape(len(self.prompts)),
            embeddings=self.embeddings,
            mask=self.mask,
            meta=np.array(json.dumps(self.meta, sort_keys=True)),
            allow_pickle=False)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """Reads every array of an .npz without pickle; DataError naming `path` on failure."""
  if not os.path.isfile(path):
    raise DataError(f'embedding table {path} does not exist (or is not a file)')
  try:
    npz = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f'embedding table {path} is not a readable .npz file: {e}') from e
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise DataError(f'embedding table {path} holds a single .npy array, not an .npz table')
  with npz:
    missing = [k for k in _KEYS if k not in npz.files]
    if missing:
      raise DataError(
          f'embedding table {path} lacks arrays {missing} (has {sorted(npz.files)}); '
          'write tables with python -m cf3d_jax.text.embed')
    try:
      return {k: npz[k] for k in _KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      raise DataError(f'embedding table {path} has an unreadable array: {e}') from e


def _decode_meta(path: str, raw: np.ndarray) -> dict:
  """Parses the JSON meta array of the table at `path`."""
  try:
    meta = json.loads(str(raw[()]))
  except (ValueError, TypeError, IndexError) as e:
    raise DataError(f"embedding table {path} has unreadable 'meta' JSON: {e}") from e
  if not isinstance(meta, dict):
    raise DataError(f"embedding table {path} has 'meta' that is not a JSON object")
  return meta


def load_table(path: str | os.PathLike) -> EmbeddingTable:
  """Reads and validates an embedding table; DataError naming `path` when it is unusable."""
  path = os.fspath(path)
  arrays = _read_npz(path)
  fmt = str(arrays['format'][()]) if arrays['format'].ndim == 0 else None
  if fmt != FORMAT:
    raise DataError(f'embedding table {path} has format {fmt!r}, expected {FORMAT!r}')
  if arrays['prompts'].ndim != 1 or arrays['prompts'].dtype.kind != 'U':
    raise DataError(
        f"embedding table {path} has 'prompts' of dtype {arrays['prompts'].dtype} and shape "
        f"{arrays['prompts'].shape}, expected a 1-D unicode array")
  return EmbeddingTable(
      prompts=tuple(str(p) for p in arrays['prompts']),
      embeddings=arrays['embeddings'],
      mask=arrays['mask'],
      meta=_decode_meta(path, arrays['meta']),
      path=path)


def builtin_table_names() -> list[str]:
  """Names of the tables shipped in cf3d_jax/text/assets/ (file stems)."""
  if not os.path.isdir(ASSETS_DIR):
    return []
  return sorted(f[:-4] for f in os.listdir(ASSETS_DIR) if f.endswith('.npz'))


def builtin_table_path(name: str) -> str:
  """Path of the shipped table `name` (e.g. 'ms_minilm'); ConfigError listing the names."""
  names = builtin_table_names()
  if name not in names:
    raise ConfigError(f'unknown built-in embedding table {name!r}; available: {names}')
  return os.path.join(ASSETS_DIR, name + '.npz')
