"""`prepare` with `data.dataset='adni'` phantoms: AD T1 records, labels CN/MCI/AD, ADNI table."""

import importlib.util
import os

import numpy as np
import pytest

from cf3d_jax import config_base
from cf3d_jax.data import phantom_reference, phantoms, records
from cf3d_jax.data.prepare import data_paths, phantom_classes, prepare
from cf3d_jax.errors import ConfigError, PromptError
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.text.table import load_table

NUM_SUBJECTS = 9
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _smoke_config():
  """configs/demo.py:smoke, loaded as tests/conftest.py's `load_config` does (without importing
  a module named `conftest`, which another conftest may have replaced in sys.modules)."""
  spec = importlib.util.spec_from_file_location("cfg_demo_adni",
                                                os.path.join(ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("smoke")


def _adni(config):
  """The smoke config (16³ grid) switched to AD phantoms."""
  config.data.dataset = "adni"
  config.data.num_subjects = NUM_SUBJECTS
  config.data.records_per_shard = 4
  config.text.table = "builtin:adni_minilm"
  config.sample.prompts = tuple(prompt_lib.canonical_prompt("adni", c)
                                for c in prompt_lib.ADNI_CLASSES)
  return config


@pytest.fixture(scope="module")
def adni_workdir(tmp_path_factory):
  config = _adni(_smoke_config())
  workdir = str(tmp_path_factory.mktemp("adni"))
  prepare(config, workdir)
  return config, workdir


def _records(workdir):
  paths = data_paths(workdir)
  index = records.load_index(paths["records"])
  import grain  # pylint: disable=import-outside-toplevel
  src = grain.sources.ArrayRecordDataSource(records.shard_paths(paths["records"], index))
  return index, [records.decode_record(src[i]) for i in range(len(src))]


def test_adni_phantom_config_validates(smoke_config):
  config_base.validate(_adni(smoke_config))


def test_phantom_classes_adni():
  classes = phantom_classes(100, (0.5, 0.3, 0.2), seed=1, dataset="adni")
  assert [classes.count(c) for c in prompt_lib.ADNI_CLASSES] == [50, 30, 20]
  assert classes == phantom_classes(100, (0.5, 0.3, 0.2), seed=1, dataset="adni")
  assert phantom_classes(100, (0.5, 0.3, 0.2), seed=1) == [
      prompt_lib.MS_CLASSES[prompt_lib.ADNI_CLASSES.index(c)] for c in classes]
  with pytest.raises(ConfigError, match="class_fractions"):
    phantom_classes(10, (0.5, 0.5), seed=1, dataset="adni")


def test_prepare_writes_ad_records(adni_workdir):
  config, workdir = adni_workdir
  index, recs = _records(workdir)
  assert index["meta"]["dataset"] == "adni"
  assert index["meta"]["classes"] == list(prompt_lib.ADNI_CLASSES)
  assert len(recs) == NUM_SUBJECTS == len(index["records"])
  labels = [int(r["label"]) for r in recs]
  assert set(labels) == {0, 1, 2}
  reference = phantom_reference.load_reference(data_paths(workdir)["reference"])
  for rec, entry in zip(recs, index["records"]):
    assert rec["volume"].shape == tuple(config.data.shape) + (1,)
    assert rec["volume"].dtype == np.float32
    assert rec["volume"].min() >= -1 and rec["volume"].max() <= 1
    assert "lesion_mask" not in rec
    mask = rec["ventricle_mask"]
    assert mask.shape == tuple(config.data.shape) and mask.dtype == np.uint8
    value = float(rec["clinical_value"])
    assert value == pytest.approx(mask.sum() * reference.voxel_ml)  # ventricle mL
    assert entry["clinical_value"] == pytest.approx(value)
    assert entry["label"] == int(rec["label"])
  # Subject i is make_ad_subject(reference, class, default_rng([seed, 13, i])).
  first = recs[0]
  cls = prompt_lib.ADNI_CLASSES[int(first["label"])]
  again = phantoms.make_ad_subject(reference, cls, np.random.default_rng([config.seed, 13, 0]))
  np.testing.assert_array_equal(first["volume"][..., 0], again["volume"])
  mean = [np.mean([float(r["clinical_value"]) for r in recs if int(r["label"]) == k])
          for k in range(3)]
  assert mean[0] < mean[1] < mean[2], mean


def test_prepare_copies_the_adni_table(adni_workdir):
  config, workdir = adni_workdir
  table = load_table(data_paths(workdir)["table"])
  assert table.meta["dataset"] == "adni"
  for prompt in prompt_lib.prompts_for("adni") + list(config.sample.prompts):
    table.index(prompt)


def test_adni_phantoms_need_an_adni_table(smoke_config, tmp_path):
  config = _adni(smoke_config)
  config.text.table = "builtin:ms_minilm"
  with pytest.raises(PromptError, match="cognitively normal"):
    prepare(config, str(tmp_path))
  assert not os.path.exists(data_paths(str(tmp_path))["records"])


def test_training_stream_pairs_ad_records_with_their_class_prompts(adni_workdir):
  from cf3d_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  config, workdir = adni_workdir
  config = config.copy_and_resolve_references()
  config.train.batch_size = 8
  paths = data_paths(workdir)
  table = load_table(paths["table"])
  ds = pipeline.make_train_dataset(paths["records"], records.load_index(paths["records"]), table,
                                   config)
  batch = next(iter(ds))
  assert batch["volume"].shape == (8,) + tuple(config.data.shape) + (1,)
  for emb, label, is_null in zip(batch["text_emb"], batch["label"], batch["is_null"]):
    cls = prompt_lib.ADNI_CLASSES[int(label)]
    prompts = ([prompt_lib.NULL_PROMPT] if is_null
               else list(prompt_lib.DEFAULT_TEMPLATES["adni"][cls]))
    rows = table.lookup(prompts)[0]
    assert any(np.array_equal(emb, row) for row in rows), (cls, is_null)
