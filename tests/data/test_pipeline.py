"""The grain pipeline: subject split, class weights, prompt/null picks, batches, checkpointable state."""

import numpy as np
import pytest

from cf3d_jax.data import pipeline, records
from cf3d_jax.data.prepare import data_paths, prepare_table
from cf3d_jax.errors import PromptError
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.text.table import load_table


def test_split_is_by_subject_deterministic_and_70_15_15():
  subjects = [f"s{i % 40}" for i in range(100)]   # 40 subjects, several scans each
  a = pipeline.split_subjects(subjects, (0.7, 0.15, 0.15), seed=3)
  b = pipeline.split_subjects(list(reversed(subjects)), (0.7, 0.15, 0.15), seed=3)
  assert a == b
  assert [len(a[s]) for s in pipeline.SPLITS] == [28, 6, 6]
  assert not set(a["train"]) & set(a["val"]) and not set(a["train"]) & set(a["test"])
  assert set(a["train"]) | set(a["val"]) | set(a["test"]) == set(subjects)
  assert pipeline.split_subjects(subjects, (0.7, 0.15, 0.15), seed=4) != a


def test_class_weights_equalise_expected_class_frequency():
  labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
  w = pipeline.class_weights(labels, 3)
  assert w.sum() == pytest.approx(1.0)
  per_class = [w[labels == c].sum() for c in range(3)]
  np.testing.assert_allclose(per_class, [1 / 3] * 3)


def _stream(workdir, config):
  paths = data_paths(workdir)
  index = records.load_index(paths["records"])
  table = load_table(paths["table"])
  return index, table, pipeline.make_train_dataset(paths["records"], index, table, config)


def test_batches_have_documented_keys_and_shapes(workdir_with_data, smoke_config):
  _, table, ds = _stream(workdir_with_data, smoke_config)
  batch = next(iter(ds))
  b = smoke_config.train.batch_size
  assert batch["volume"].shape == (b, 16, 16, 16, 1) and batch["volume"].dtype == np.float32
  assert batch["text_emb"].shape == (b,) + table.embeddings.shape[1:]
  assert batch["text_mask"].shape == (b, table.embeddings.shape[1]) and batch["text_mask"].dtype == bool
  assert batch["label"].dtype == np.int32 and batch["is_null"].shape == (b,)


def test_weighting_balances_classes_and_null_rate_matches(workdir_with_data, smoke_config):
  smoke_config.train.batch_size = 50
  index, table, ds = _stream(workdir_with_data, smoke_config)
  it = iter(ds)
  labels, nulls, rows_ok = [], [], True
  null_row = table.embeddings[table.index(prompt_lib.NULL_PROMPT)]
  for _ in range(12):
    b = next(it)
    labels.append(b["label"])
    nulls.append(b["is_null"])
    rows_ok &= bool(np.all(np.isclose(b["text_emb"][b["is_null"]], null_row).all(axis=(1, 2))))
  labels, nulls = np.concatenate(labels), np.concatenate(nulls)
  freq = np.bincount(labels, minlength=3) / len(labels)
  np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.06)   # train split is imbalanced
  assert abs(nulls.mean() - 0.2) < 0.04
  assert rows_ok


def test_non_null_prompts_are_templates_of_the_label(workdir_with_data, smoke_config):
  _, table, ds = _stream(workdir_with_data, smoke_config)
  it = iter(ds)
  classes = prompt_lib.MS_CLASSES
  for _ in range(10):
    b = next(it)
    for emb, label, is_null in zip(b["text_emb"], b["label"], b["is_null"]):
      if is_null:
        continue
      allowed = [table.embeddings[table.index(p)]
                 for p in prompt_lib.DEFAULT_TEMPLATES["ms"][classes[label]]]
      assert any(np.allclose(emb, a) for a in allowed)


def test_iterator_state_restores_the_exact_stream(workdir_with_data, smoke_config):
  _, _, ds = _stream(workdir_with_data, smoke_config)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  got = [next(it2) for _ in range(3)]
  for a, b in zip(want, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_table_missing_a_prompt_is_a_prompt_error(workdir_with_data, smoke_config, tmp_path):
  table = load_table(data_paths(workdir_with_data)["table"])
  keep = [i for i, p in enumerate(table.prompts) if p != "Subject has high lesion load."]
  import dataclasses
  small = dataclasses.replace(table, prompts=tuple(table.prompts[i] for i in keep),
                              embeddings=table.embeddings[keep], mask=table.mask[keep])
  path = str(tmp_path / "small.npz")
  small.save(path)
  smoke_config.text.table = path
  with pytest.raises(PromptError, match="Subject has high lesion load"):
    prepare_table(smoke_config, str(tmp_path / "copy.npz"))


WORKER_SCRIPT = '''
import sys
from absl import app


def main(argv):
  import numpy as np
  sys.path.insert(0, {tests!r})
  from conftest import load_config
  from cf3d_jax.data import pipeline, records
  from cf3d_jax.data.prepare import data_paths
  from cf3d_jax.text.table import load_table
  c = load_config()
  p = data_paths({workdir!r})
  index, table = records.load_index(p["records"]), load_table(p["table"])
  c.data.num_workers = 0
  it = iter(pipeline.make_train_dataset(p["records"], index, table, c))
  want = [next(it)["volume"] for _ in range(4)]
  c.data.num_workers = 2
  ds = pipeline.make_train_dataset(p["records"], index, table, c)
  it = iter(ds)
  got = [next(it)["volume"] for _ in range(3)]
  state = it.get_state()
  got.append(next(it)["volume"])
  it2 = iter(ds)
  it2.set_state(state)
  assert all(np.array_equal(a, b) for a, b in zip(want, got)), "workers changed the stream"
  assert np.array_equal(next(it2)["volume"], want[3]), "worker iterator state did not restore"
  print("WORKERS_OK")


if __name__ == "__main__":
  app.run(main)
'''


def test_worker_processes_give_the_same_restorable_stream(prepared_data, tmp_path):
  import os
  import subprocess
  import sys
  tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = tmp_path / "workers.py"
  script.write_text(WORKER_SCRIPT.format(tests=tests, workdir=prepared_data))
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=300)
  assert "WORKERS_OK" in proc.stdout, proc.stderr[-3000:]


def _volume_ids(workdir):
  """Maps a volume's bytes to its record position (every phantom volume is distinct)."""
  import grain
  folder = data_paths(workdir)["records"]
  index = records.load_index(folder)
  src = grain.sources.ArrayRecordDataSource(records.shard_paths(folder, index))
  ids = {records.decode_record(src[i])["volume"].tobytes(): i for i in range(len(src))}
  assert len(ids) == len(src)
  return index, ids


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_host_shards_partition_the_global_stream(workdir_with_data, smoke_config):
  index, ids = _volume_ids(workdir_with_data)
  paths = data_paths(workdir_with_data)
  table = load_table(paths["table"])
  smoke_config.data.class_weighting = False          # epochs: each train record once
  smoke_config.train.batch_size = 2
  train = set(records.positions(index, pipeline.split_subjects(
      [r["subject_id"] for r in index["records"]], smoke_config.data.split,
      smoke_config.seed)["train"]).tolist())
  n = len(train)
  make = lambda i, c, cfg=smoke_config: pipeline.make_train_dataset(paths["records"], index,
                                                                     table, cfg, i, c)
  shards = [_take(make(i, 2), n) for i in range(2)]      # n local batches of 1 = 2 epochs
  assert all(b["volume"].shape[0] == 1 for s in shards for b in s)
  first_epoch = [[ids[b["volume"][0].tobytes()] for b in s[: n // 2]] for s in shards]
  assert not set(first_epoch[0]) & set(first_epoch[1])
  assert set(first_epoch[0]) | set(first_epoch[1]) == train
  # Local batch k of every host together = the single-process global batch k.
  smoke_config.data.prefetch = 0                       # synchronous reading: same stream
  whole = _take(make(0, 1), n)
  for k, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([shards[0][k][key],
                                                                shards[1][k][key]]))
  again = _take(make(1, 2), n)                         # deterministic
  for a, b in zip(again, shards[1]):
    np.testing.assert_array_equal(a["volume"], b["volume"])
  assert pipeline._default_shard(None, None) == (0, 1)  # jax.process_index/count
  with pytest.raises(Exception, match="shard_index=2"):
    make(2, 2)
  smoke_config.train.batch_size = 3
  with pytest.raises(Exception, match="not divisible"):
    make(0, 2)


def test_augmentation_is_off_by_default_and_draws_after_the_prompt(workdir_with_data,
                                                                   smoke_config):
  aug = pipeline.Augment.from_config(smoke_config.data.augment)
  assert not aug.enabled
  x = np.full((4, 4, 4, 1), -1.0, np.float32)
  x[1:3, 1:3, 1:3] = 0.5
  x[1, 1, 1] = 0.9
  on = pipeline.Augment(intensity_scale=0.2, intensity_shift=0.0, flip_axes=(0,))
  outs = [on(x, np.random.default_rng(s)) for s in range(20)]
  assert all(o.min() >= -1 and o.max() <= 1 and o.dtype == np.float32 for o in outs)
  assert all(np.all(o[x == -1] == -1) for o in outs)    # scaling about the background
  flipped = [np.array_equal(o[::-1] > -1, o > -1) and o[2, 1, 1, 0] > o[1, 1, 1, 0] for o in outs]
  assert 0 < sum(flipped) < 20                          # axis 0 flipped about half the time
  np.testing.assert_array_equal(on(x, np.random.default_rng(3)), outs[3])
  shifted = pipeline.Augment(intensity_shift=0.1)(x, np.random.default_rng(0))
  assert 0 < np.abs(shifted[x > -1] - x[x > -1]).max() <= 0.1 + 1e-6
  _, _, plain = _stream(workdir_with_data, smoke_config)
  smoke_config.data.augment.intensity_scale = 0.3
  smoke_config.data.augment.flip_axes = (2,)
  from cf3d_jax import config_base
  config_base.validate(smoke_config)
  _, _, augmented = _stream(workdir_with_data, smoke_config)
  a, b = _take(plain, 3), _take(augmented, 3)
  for p, q in zip(a, b):
    for key in ("label", "is_null", "text_emb"):
      np.testing.assert_array_equal(p[key], q[key])
  assert any(not np.array_equal(p["volume"], q["volume"]) for p, q in zip(a, b))
  smoke_config.data.augment.flip_axes = (3,)
  with pytest.raises(Exception, match="data.augment.flip_axes"):
    config_base.validate(smoke_config)
