"""Notebook session, part 2: prompts as embeddings for the sampler.

`prepare_prompts(gen.table, PROMPTS)` takes table rows for known prompts (bit-identical to
training); other prompts are encoded with the table's own encoder (`table_encoder`) when it can
be loaded, else replaced by the closest table prompt. `PromptSet.describe()` says which happened.
Embeddings are float32 `[P, L, E]` with bool masks `[P, L]`.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Sequence

import numpy as np

from cf3d_jax.errors import Cf3dError, DataError, PromptError
from cf3d_jax.text.table import EmbeddingTable


def split_prompts(text: str) -> list[str]:
  """Prompts from one string, separated by '|' or newlines (a Colab form field); blanks dropped."""
  return [p.strip() for p in text.replace("\n", "|").split("|") if p.strip()]


def table_encoder(table: EmbeddingTable) -> tuple[Any | None, str]:
  """The encoder the table was made with, rebuilt from its meta, and a line saying what happened.

  Returns (encoder, message) when the same model loads (torch/transformers and the weights
  present, offline is fine) and its `weights_sha256` equals the table's; else (None, why not).
  """
  from cf3d_jax.text import encoders as enc_lib
  meta = table.meta
  name, model = meta.get("encoder"), meta.get("model")
  if name == "hf":
    kwargs = {"model": model, "pooling": meta.get("pooling", "mean"),
              "max_length": int(meta.get("max_length", 77)),
              "normalize": bool(meta.get("normalized", True))}
  elif name == "biomedclip":
    kwargs = {"model": model, "output": meta.get("kind", "tokens"),
              "context_length": int(meta.get("context_length", 256)),
              "normalize": bool(meta.get("normalized", False))}
  else:
    return None, f"the table's encoder {name!r} is unknown to cf3d_jax.text.encoders"
  try:
    encoder = enc_lib.make_encoder(name, **kwargs)
  except (ImportError, Cf3dError, OSError, ValueError, RuntimeError) as e:
    return None, f"its encoder ({name}: {model}) is not available here: {e}"
  if encoder.weights_sha256 != meta.get("weights_sha256"):
    return None, (f"the loadable {name}: {model} has weights {encoder.weights_sha256[:12]}…, the "
                  f"table was made with {str(meta.get('weights_sha256'))[:12]}…")
  return encoder, f"encoded with the table's own encoder ({name}: {model})"


def encode_prompts(encoder: Any, table: EmbeddingTable,
                   prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Embeds prompts with `encoder`: float32 `[P, L, E]`, bool mask `[P, L]`, checked against the
  table's (L, E) so they can stand in for table rows. DataError naming the table otherwise."""
  emb, mask = encoder.encode(list(prompts))
  if emb.shape[1:] != table.embeddings.shape[1:]:
    raise DataError(f"encoder output [P, L, E] = {list(emb.shape)} does not match embedding table "
                    f"{table.path} ({list(table.embeddings.shape[1:])} per prompt)")
  return emb.astype(np.float32), mask.astype(bool)


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """Prompts ready for the sampler.

  Attributes:
    prompts: the P prompts used (after any fallback), the first the factual reference.
    requested: the P prompts as typed.
    emb: float32 `[P, L, E]`; mask: bool `[P, L]`.
    sources: per prompt, 'table', 'encoded' or 'closest' (a table prompt stood in for it).
    note: why prompts were or were not encoded (from `table_encoder`).
  """
  prompts: tuple[str, ...]
  requested: tuple[str, ...]
  emb: np.ndarray
  mask: np.ndarray
  sources: tuple[str, ...]
  note: str = ""

  def describe(self) -> str:
    """Lines saying, per prompt, where its embedding came from."""
    lines = []
    for req, used, src in zip(self.requested, self.prompts, self.sources):
      if src == "table":
        lines.append(f"  {used!r}: from the embedding table")
      elif src == "encoded":
        lines.append(f"  {used!r}: {self.note}")
      else:
        lines.append(f"  {req!r}: not in the table and not encodable ({self.note}); "
                     f"using the closest table prompt {used!r}")
    return "\n".join(lines)


def closest_table_prompt(table: EmbeddingTable, prompt: str) -> str:
  """The table's non-null prompt most similar to `prompt` as text (difflib ratio, ties: first)."""
  candidates = [p for p in table.prompts if p] or list(table.prompts)
  scores = [difflib.SequenceMatcher(None, prompt.lower(), c.lower()).ratio() for c in candidates]
  return candidates[int(np.argmax(scores))]


def choose_prompts(table: EmbeddingTable, prompts: Sequence[str], encoder: Any | None = None,
                   note: str = "", strict: bool = False) -> PromptSet:
  """Embeddings for `prompts`: table rows where the table holds the prompt (bit-identical to
  training), the encoder's output for the others, or — without an encoder — the closest table
  prompt's row (`strict=True`: PromptError naming the table instead).

  note: the message of `table_encoder` (why there is or is no encoder), shown by `describe()`.
  """
  if isinstance(prompts, str):
    raise TypeError(f"choose_prompts takes a sequence of prompts, got the string {prompts!r}")
  prompts = list(prompts)
  if not prompts:
    raise PromptError("no prompts given; type at least one (the first is the factual reference)")
  used, sources = [], []
  for p in prompts:
    if p in table:
      used.append(p)
      sources.append("table")
    elif encoder is not None:
      used.append(p)
      sources.append("encoded")
    elif strict:
      table.index(p)                                    # PromptError naming the table
    else:
      used.append(closest_table_prompt(table, p))
      sources.append("closest")
  emb = np.zeros((len(used),) + table.embeddings.shape[1:], np.float32)
  mask = np.zeros((len(used),) + table.mask.shape[1:], bool)
  rows = [i for i, s in enumerate(sources) if s != "encoded"]
  new = [i for i, s in enumerate(sources) if s == "encoded"]
  if rows:
    emb[rows], mask[rows] = table.lookup([used[i] for i in rows])
  if new:
    emb[new], mask[new] = encode_prompts(encoder, table, [used[i] for i in new])
  return PromptSet(tuple(used), tuple(prompts), emb, mask, tuple(sources), note)


def prepare_prompts(table: EmbeddingTable, prompts: Sequence[str],
                    strict: bool = False) -> PromptSet:
  """`choose_prompts` that loads the table's encoder (`table_encoder`) only when some prompt is
  not in the table; `PromptSet.describe()` then says whether it was encoded or replaced."""
  missing = [p for p in prompts if p not in table]
  encoder, note = table_encoder(table) if missing else (None, "")
  return choose_prompts(table, prompts, encoder, note, strict=strict)
