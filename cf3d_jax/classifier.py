"""`--mode=train_classifier`: the paper's text-alignment classifier, a 3D DenseNet-121.

Trained on the prepared records (real scans or phantoms) of the training split with the same
subject split and class-weighted sampling as the generator (`data.pipeline`), cross-entropy,
AdamW; the validation split picks the best checkpoint. Written (atomically) to
`WORKDIR/classifier/`: `variables/` (orbax: params + BatchNorm statistics) and
`classifier.json` (classes, step, validation and test accuracy — the latter is the paper's
"accuracy on held-out real scans" baseline, 96.5% MS low vs high, 83.3% ADNI CN vs AD).
`evaluate` loads it (`find_predictor`) to score the counterfactuals.

BatchNorm in training normalises over batch × the voxels left at the last block: at 32³ that
is one voxel per item, so train with batches of ≥ 8 there (or on 64³+ volumes, where 128³ leaves
4³ voxels). `classifier.block_config` shrinks the network for tests; the paper's model is the
default DenseNet-121 (11.2 M parameters).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from cf3d_jax import config_base
from cf3d_jax.data import records
from cf3d_jax.data.export import read_records, split_entries
from cf3d_jax.errors import ConfigError, DataError
from cf3d_jax.files import atomic_dir, write_text
from cf3d_jax.models import densenet3d
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.text.table import load_table
from cf3d_jax.workdir import Workdir

META_NAME = "classifier.json"
VARIABLES_NAME = "variables"
CLASSIFIER_STREAM = 3_000_017


def classifier_dir(config, workdir: str) -> str:
  return config.eval.classifier or Workdir(workdir).classifier


def _batches(volumes: np.ndarray, bsz: int):
  for i in range(0, len(volumes), bsz):
    yield volumes[i:i + bsz]


@dataclasses.dataclass
class Predictor:
  """A trained classifier: `predict(volumes [N, D, H, W, 1], bsz) → class indices [N]`."""
  path: str
  classes: list[str]
  model: densenet3d.DenseNet3D
  variables: dict

  def __post_init__(self):
    self._logits = jax.jit(lambda v, x: self.model.apply(v, x, train=False))

  def predict(self, volumes: np.ndarray, bsz: int = 8) -> np.ndarray:
    return np.concatenate([np.asarray(jnp.argmax(self._logits(self.variables, jnp.asarray(b)), -1))
                           for b in _batches(volumes, bsz)])


def load_predictor(path: str) -> Predictor:
  """Reads `path/classifier.json` and `path/variables`; DataError naming the folder if absent."""
  import orbax.checkpoint as ocp
  meta_path = os.path.join(path, META_NAME)
  if not os.path.exists(meta_path):
    raise DataError(f"{path}: no trained classifier here (run --mode=train_classifier)")
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  model = densenet3d.DenseNet3D(len(meta["classes"]),
                                block_config=tuple(meta.get("block_config",
                                                            densenet3d.DENSENET121_BLOCKS)))
  abstract = densenet3d.abstract_variables(model, (1, *meta["input_shape"], 1))
  variables = ocp.StandardCheckpointer().restore(os.path.abspath(
      os.path.join(path, VARIABLES_NAME)), abstract)
  return Predictor(path, meta["classes"], model, variables)


def find_predictor(config, workdir: str) -> Predictor | None:
  """The configured classifier, or WORKDIR/classifier if trained, else None (no alignment)."""
  path = classifier_dir(config, workdir)
  if not config.eval.classifier and not os.path.exists(os.path.join(path, META_NAME)):
    logging.warning("no classifier in %s: alignment is not measured (run "
                    "--mode=train_classifier first)", path)
    return None
  return load_predictor(path)


def _accuracy(predictor: Predictor, data_dir: str, index: dict, config, split: str,
              bsz: int) -> float | None:
  entries = split_entries(index, split, config.seed, tuple(config.data.split))
  if not entries:
    return None
  recs = read_records(data_dir, index, entries)
  volumes = np.stack([r["volume"] for r in recs]).astype(np.float32)
  labels = np.asarray([int(r["label"]) for r in recs])
  return float(np.mean(predictor.predict(volumes, bsz) == labels))


def train_classifier(config, workdir: str) -> dict:
  """Trains the DenseNet-121 and writes `WORKDIR/classifier/`; returns its metadata."""
  import orbax.checkpoint as ocp
  from cf3d_jax.data import pipeline
  from tqdm import tqdm
  config_base.validate(config)
  cc = config.classifier
  shape = tuple(config.data.shape)
  blocks = tuple(int(b) for b in cc.block_config)
  need = densenet3d.min_spatial_size(len(blocks))
  if min(shape) < need:
    raise ConfigError(f"config.data.shape={shape}: a DenseNet with {len(blocks)} blocks needs at "
                      f"least {need} voxels per side (config.classifier.block_config)")
  wd = Workdir(workdir)
  index = records.load_index(wd.records)
  classes = list(prompt_lib.CLASSES[config.data.dataset])
  model = densenet3d.DenseNet3D(len(classes), dropout_rate=cc.dropout, block_config=blocks)
  key = jax.random.key(config.seed + CLASSIFIER_STREAM)
  variables = densenet3d.init_variables(model, jax.random.fold_in(key, 0), (1, *shape, 1))
  tx = optax.adamw(cc.learning_rate, weight_decay=cc.weight_decay)
  opt_state = tx.init(variables["params"])
  stream_cfg = config.copy_and_resolve_references()
  with stream_cfg.unlocked():
    stream_cfg.train.batch_size = cc.batch_size
    stream_cfg.data.num_workers = 0
  stream = iter(pipeline.make_train_dataset(wd.records, index, load_table(wd.table),
                                            stream_cfg))

  @jax.jit
  def step(params, batch_stats, opt_state, x, y, k):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"], rngs={"dropout": k})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, (upd["batch_stats"], jnp.mean(jnp.argmax(logits, -1) == y))
    (loss, (stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss, acc

  params, batch_stats = variables["params"], variables["batch_stats"]
  best = (-1.0, 0, None)
  history = []
  out_dir = classifier_dir(config, workdir)
  for i in tqdm(range(1, cc.num_steps + 1), desc="classifier", unit="step",
                disable=jax.process_index() > 0):
    batch = next(stream)
    params, batch_stats, opt_state, loss, acc = step(
        params, batch_stats, opt_state, jnp.asarray(batch["volume"]),
        jnp.asarray(batch["label"], jnp.int32), jax.random.fold_in(key, i))
    if i % cc.eval_every == 0 or i == cc.num_steps:
      pred = Predictor(out_dir, classes, model, {"params": params, "batch_stats": batch_stats})
      val = _accuracy(pred, wd.records, index, config, "val", cc.batch_size)
      history.append({"step": i, "loss": float(loss), "train_batch_accuracy": float(acc),
                      "val_accuracy": val})
      logging.info("classifier step %d: loss %.4f, val accuracy %s", i, float(loss), val)
      score = -1.0 if val is None else val
      if best[2] is None or score > best[0]:
        best = (score, i, jax.tree.map(np.asarray, {"params": params,
                                                    "batch_stats": batch_stats}))
  _, best_step, best_vars = best
  predictor = Predictor(out_dir, classes, model, best_vars)
  meta = {"classes": classes, "dataset": config.data.dataset, "input_shape": list(shape),
          "block_config": list(blocks),
          "step": best_step, "num_steps": cc.num_steps, "history": history,
          "val_accuracy": _accuracy(predictor, wd.records, index, config, "val",
                                    cc.batch_size),
          "test_accuracy": _accuracy(predictor, wd.records, index, config, "test",
                                     cc.batch_size),
          "num_params": densenet3d.count_params(best_vars["params"])}
  with atomic_dir(out_dir) as tmp:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(os.path.join(tmp, VARIABLES_NAME)), best_vars)
    ckptr.wait_until_finished()
    write_text(os.path.join(tmp, META_NAME), json.dumps(meta, indent=1))
  logging.info("classifier: val accuracy %s, test accuracy %s → %s", meta["val_accuracy"],
               meta["test_accuracy"], out_dir)
  return meta
