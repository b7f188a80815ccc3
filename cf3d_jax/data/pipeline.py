"""The grain input pipeline: subject split, class-weighted sampling, prompt pick, null text,
optional augmentation, per-host sharding, worker processes, prefetch, batches.

Batches are dicts of NumPy arrays (keys say what they hold):
  volume `[B, D, H, W, 1]` float32 in [-1, 1]; text_emb `[B, L, E]` float32; text_mask `[B, L]`
  bool; label `[B]` int32 (class index); is_null `[B]` bool (prompt replaced by the null text).
Every random choice comes from grain's per-element generator, seeded from `config.seed`, so the
stream is a pure function of (seed, position) and the iterator state (a position) checkpoints it.

Multi-host: the global stream (element i = the i-th draw) is cut element-wise between
`shard_count` processes, process p taking elements p, p + n, p + 2n, … and batching
`batch_size / n` of them. Each process therefore decodes only its share, and the union of the n
local batches number k is exactly the single-process global batch k: the training stream does
not depend on the number of hosts.
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


@dataclasses.dataclass(frozen=True)
class Augment:
  """Train-time augmentation of one volume `[D, H, W, C]` in [-1, 1] (`config.data.augment`).

  Intensity: `x ← clip(-1 + s·(x + 1) + b, -1, 1)`, s ~ U(1 − scale, 1 + scale), b ~ U(−shift,
  shift) — a global contrast/brightness change about the background (scanner gain and offset
  differences). Flips: each axis in `flip_axes` reversed with probability 1/2. Off by default:
  brains are not mirror-symmetric (a left–right flip moves lateralised anatomy and lesions to the
  other hemisphere; flipping other axes makes impossible anatomy), so flips are for ablations.
  Draws come from the element's generator, only for what is enabled (the stream with everything
  off is the unaugmented stream).
  """
  intensity_scale: float = 0.0
  intensity_shift: float = 0.0
  flip_axes: tuple[int, ...] = ()

  @classmethod
  def from_config(cls, augment_config) -> "Augment":
    return cls(float(augment_config.intensity_scale), float(augment_config.intensity_shift),
               tuple(int(a) for a in augment_config.flip_axes))

  @property
  def enabled(self) -> bool:
    return bool(self.intensity_scale or self.intensity_shift or self.flip_axes)

  def __call__(self, volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if self.intensity_scale or self.intensity_shift:
      s = 1.0 + self.intensity_scale * rng.uniform(-1.0, 1.0)
      b = self.intensity_shift * rng.uniform(-1.0, 1.0)
      volume = np.clip(-1.0 + s * (volume + 1.0) + b, -1.0, 1.0).astype(np.float32)
    for axis in self.flip_axes:
      if rng.random() < 0.5:
        volume = np.flip(volume, axis)
    return np.ascontiguousarray(volume, np.float32)


class _Element:
  """Decodes record `positions[i]`, attaches its prompt embedding, augments (picklable for
  workers)."""

  def __init__(self, shard_paths: Sequence[str], positions: np.ndarray, weights: np.ndarray | None,
               table: EmbeddingTable, sampler: PromptSampler, augment: Augment | None = None):
    self.shard_paths = list(shard_paths)
    self.positions = positions
    self.weights = weights
    self.embeddings, self.mask = table.embeddings, table.mask
    self.sampler = sampler
    self.augment = augment if augment is not None and augment.enabled else None
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
    volume = np.asarray(rec["volume"], np.float32)   # no copy: decoded arrays are fresh
    if self.augment is not None:
      volume = self.augment(volume, rng)
    return {"volume": volume,
            "text_emb": self.embeddings[row], "text_mask": self.mask[row],
            "label": np.int32(rec["label"]), "is_null": np.bool_(is_null)}


def _default_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  """(shard_index, shard_count), defaulting to (jax.process_index(), jax.process_count())."""
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=import-outside-toplevel  (keeps worker processes jax-free)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise DataError(f"shard_index={shard_index}, shard_count={shard_count}: expected "
                    "0 <= shard_index < shard_count")
  return int(shard_index), int(shard_count)


def make_train_dataset(data_dir: str, index: Mapping[str, Any], table: EmbeddingTable,
                       config, shard_index: int | None = None, shard_count: int | None = None
                       ) -> grain.IterDataset:
  """The endless, shuffled/weighted training stream of this process's batches.

  Each of `shard_count` processes (default `jax.process_count()`) gets batches of
  `config.train.batch_size / shard_count` (the global batch divided among hosts) made of its
  share of the global stream (see the module docstring); `shard_index` defaults to
  `jax.process_index()`. `config.data.num_workers` worker processes decode and augment
  (`config.data.augment`); `config.data.prefetch` batches are read ahead per process by
  `config.data.read_threads` threads (per worker with workers). The iterator's
  `get_state`/`set_state` checkpoint the position.
  """
  shard_index, shard_count = _default_shard(shard_index, shard_count)
  if config.train.batch_size % shard_count:
    raise DataError(f"config.train.batch_size={config.train.batch_size} is not divisible by "
                    f"the {shard_count} data shards (processes)")
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
  element = _Element(records.shard_paths(data_dir, index), pos, weights, table, sampler,
                     Augment.from_config(config.data.augment))
  ds = grain.MapDataset.range(len(pos))
  if weights is None:
    ds = ds.shuffle(seed=config.seed)
  ds = ds.repeat(None).random_map(element, seed=config.seed)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]   # lazy: this process decodes only its elements
  ds = ds.batch(config.train.batch_size // shard_count, drop_remainder=True)
  prefetch = int(config.data.prefetch)
  read = grain.ReadOptions(num_threads=int(config.data.read_threads) if prefetch else 0,
                           prefetch_buffer_size=prefetch)
  it_ds = ds.to_iter_dataset(read_options=read)
  if config.data.num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.data.num_workers, per_worker_buffer_size=max(1, prefetch)))
  return it_ds
