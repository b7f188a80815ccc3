"""What the torch text encoders (`cf3d_jax.text.encoders`, `cf3d_jax.text.biomedclip`) share:
the lazy torch/transformers import, the weights hash recorded in table meta, prompt checks, and
`TorchTextEncoder.encode` (prompts in batches → emb float32 [P, L, E], mask bool [P, L]).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping, Sequence

import numpy as np

from cf3d_jax.errors import ConfigError, PromptError

INSTALL_HINT = 'pip install cf3d_jax[text]'


def import_torch_transformers() -> tuple[Any, Any]:
  """Returns (torch, transformers) or raises ImportError with the install command."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'text encoders need torch and transformers ({e}); install them with `{INSTALL_HINT}`'
    ) from e
  return torch, transformers


def state_dict_sha256(state_dict: Mapping[str, Any]) -> str:
  """SHA-256 over a torch state dict: for each key in sorted order, the key, dtype, shape and
  the tensor's raw bytes. Independent of device and insertion order."""
  torch, _ = import_torch_transformers()
  digest = hashlib.sha256()
  for key in sorted(state_dict):
    tensor = state_dict[key].detach().to('cpu').contiguous()
    digest.update(f'{key}|{tensor.dtype}|{tuple(tensor.shape)}|'.encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
  return digest.hexdigest()


def check_prompts(prompts: Sequence[str]) -> list[str]:
  """The prompts as a list; TypeError for a bare string or non-string items."""
  if isinstance(prompts, str):
    raise TypeError(f'encode takes a sequence of prompts, got the string {prompts!r}')
  prompts = list(prompts)
  bad = [p for p in prompts if not isinstance(p, str)]
  if bad:
    raise TypeError(f'prompts must be strings, got {bad!r}')
  return prompts


def check_token_counts(prompts: Sequence[str], counts: Sequence[int], limit: int) -> None:
  """PromptError for the first prompt with more tokens than `limit` (it would be truncated)."""
  for prompt, count in zip(prompts, counts):
    if count > limit:
      raise PromptError(
          f'prompt {prompt!r} has {count} tokens, more than the context length {limit}; '
          'shorten it or raise the length')


def batches(items: Sequence[str], batch_size: int) -> list[Sequence[str]]:
  """Consecutive slices of `items` of at most `batch_size`."""
  if batch_size < 1:
    raise ConfigError(f'batch_size must be >= 1, got {batch_size}')
  return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def stack_batches(parts: list[tuple[np.ndarray, np.ndarray]], length: int,
           dim: int) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates per-batch (emb [B, L, E], mask [B, L]); empty arrays when no batch."""
  if not parts:
    return np.zeros((0, length, dim), np.float32), np.zeros((0, length), bool)
  emb = np.concatenate([p[0] for p in parts]).astype(np.float32)
  mask = np.concatenate([p[1] for p in parts]).astype(bool)
  return emb, mask


def looks_like_path(model: str) -> bool:
  """Whether `model` is meant as a filesystem path rather than a hub id such as 'org/name'."""
  return (os.path.isabs(model) or model.startswith(('.', '~')) or
          os.path.exists(os.path.expanduser(model)))


class TorchTextEncoder:
  """What the encoders share: `encode(prompts, batch_size)` over `_encode_batch`, which a
  subclass defines with its `dim` (E) and `length` (L)."""
  dim: int
  length: int

  def encode(self, prompts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Embeds prompts: float32 [P, L, E] and bool mask [P, L]."""
    prompts = check_prompts(prompts)
    parts = [self._encode_batch(b) for b in batches(prompts, batch_size)]
    return stack_batches(parts, self.length, self.dim)

  def _encode_batch(self, batch: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """One batch: ([B, L, E], [B, L])."""
    raise NotImplementedError
