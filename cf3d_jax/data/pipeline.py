"""The grain input pipeline: subject split, class-weighted sampling, prompt pick, null text, batches.

Batches are dicts of NumPy arrays (keys say what they hold):
  volume `[B, D, H, W, 1]` float32 in [-1, 1]; text_emb `[B, L, E]` float32; text_mask `[B, L]`
  bool; label `[B]` int32 (class index); is_null `[B]` bool (prompt replaced by the null text).
Every random choice comes from grain's per-element generator, seeded from `config.seed`, so the
stream is a pure function of (seed, position) and the iterator state (a position) checkpoints it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from cf3d_jax.data import records
from cf3d_jax.errors import DataError
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.text.table import EmbeddingTable

SPLITS = ("train", "val", "test")


def split_subjects(subject_ids: Sequence[str], fractions: Sequence[float], seed: int
                   ) -> dict[str, list[str]]:
  """Deterministic subject-level split: a seeded permutation of the sorted unique subjects.

  Each split gets `round(fraction × n)` subjects (train takes the remainder); no subject is in two
  splits, so scans of one subject never leak across train/val/test.
  """
  subjects = sorted(set(subject_ids))
  order = np.random.default_rng([seed, 7]).permutation(len(subjects))
  n_val = int(round(fractions[1] * len(subjects)))
  n_test = int(round(fractions[2] * len(subjects)))
  n_train = len(subjects) - n_val - n_test
  shuffled = [subjects[i] for i in order]
  return {"train": shuffled[:n_train], "val": shuffled[n_train:n_train + n_val],
          "test": shuffled[n_train + n_val:]}


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Per-record sampling probabilities `[n]` ∝ 1 / (count of the record's class); sums to 1.

  In expectation every class present is drawn equally often.
  """
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  w = 1.0 / counts[labels]
  return w / w.sum()


@dataclasses.dataclass(frozen=True)
class PromptSampler:
  """Maps a class index to a table row: a random paraphrase, or the null text with prob p."""
  class_rows: tuple[tuple[int, ...], ...]   # table rows of each class's templates
  null_row: int
  null_prob: float

  @classmethod
  def build(cls, table: EmbeddingTable, dataset: str, paraphrases: bool, null_prob: float
            ) -> "PromptSampler":
    """Looks every template of `dataset` up in `table` (PromptError if one is missing)."""
    templates = prompt_lib.DEFAULT_TEMPLATES[dataset]
    classes = prompt_lib.CLASSES[dataset]
    rows = tuple(tuple(table.index(p) for p in (templates[c] if paraphrases else templates[c][:1]))
                 for c in classes)
    return cls(rows, table.index(prompt_lib.NULL_PROMPT), null_prob)

  def pick(self, label: int, rng: np.random.Generator) -> tuple[int, bool]:
    """Returns (table row, is_null)."""
    if rng.random() < self.null_prob:
      return self.null_row, True
    options = self.class_rows[label]
    return options[int(rng.integers(len(options)))], False


class _Element:
  """Decodes record `positions[i]` and attaches its prompt embedding (picklable for workers)."""

  def __init__(self, shard_paths: Sequence[str], positions: np.ndarray, weights: np.ndarray | None,
               table: EmbeddingTable, sampler: PromptSampler):
    self.shard_paths = list(shard_paths)
    self.positions = positions
    self.weights = weights
    self.embeddings, self.mask = table.embeddings, table.mask
    self.sampler = sampler
    self._source = None

  def _read(self, position: int) -> dict[str, np.ndarray]:
    if self._source is None:
      self._source = grain.sources.ArrayRecordDataSource(self.shard_paths)
    return records.decode_record(self._source[int(position)])

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __call__(self, i: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if self.weights is not None:
      j = int(rng.choice(len(self.positions), p=self.weights))
    else:
      j = int(i) % len(self.positions)
    rec = self._read(self.positions[j])
    row, is_null = self.sampler.pick(int(rec["label"]), rng)
    return {"volume": rec["volume"].astype(np.float32),
            "text_emb": self.embeddings[row], "text_mask": self.mask[row],
            "label": np.int32(rec["label"]), "is_null": np.bool_(is_null)}


def make_train_dataset(data_dir: str, index: Mapping[str, Any], table: EmbeddingTable,
                       config) -> grain.IterDataset:
  """The endless, shuffled/weighted training stream of batches of `config.train.batch_size`."""
  split = split_subjects([r["subject_id"] for r in index["records"]], config.data.split,
                         config.seed)
  pos = records.positions(index, split["train"])
  if len(pos) < 1:
    raise DataError(f"{data_dir}: the train split is empty ({len(index['records'])} records)")
  labels = np.asarray([index["records"][p]["label"] for p in pos], np.int64)
  num_classes = len(prompt_lib.CLASSES[config.data.dataset])
  weights = class_weights(labels, num_classes) if config.data.class_weighting else None
  sampler = PromptSampler.build(table, config.data.dataset, config.text.paraphrases,
                                config.text.null_prob)
  element = _Element(records.shard_paths(data_dir, index), pos, weights, table, sampler)
  ds = grain.MapDataset.range(len(pos))
  if weights is None:
    ds = ds.shuffle(seed=config.seed)
  ds = ds.repeat(None).random_map(element, seed=config.seed)
  ds = ds.batch(config.train.batch_size, drop_remainder=True)
  it_ds = ds.to_iter_dataset()
  if config.data.num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return it_ds
