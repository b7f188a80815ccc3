"""Calibrated guidance: the per-prompt choice of w, and the checks on `calibration.json`.

The end-to-end run (`--mode=all` with `sample.calibrate`, the calibrated set of the index against
the plain scales' volumes) is part of tests/test_main.py's demo test.
"""

import json
import os

import numpy as np
import pytest

from cf3d_jax import calibrate as cal
from cf3d_jax import sample_index
from cf3d_jax.config_base import validate
from cf3d_jax.errors import ConfigError
from cf3d_jax.metrics import phantom


def test_choose_scales_maximises_the_class_hit_rate_per_prompt():
  scales = [1.0, 3.0, 6.0, 10.0]
  # [S, K=4, P=3] mL: minimal stays in class everywhere (tie → smallest w); moderate lands
  # 10–25 mL for 4 of 4 noises only at w = 6; high passes 25 mL for 3 of 4 at w = 6 and 4 of 4 at
  # w = 10.
  values = np.zeros((4, 4, 3))
  values[:, :, 0] = 2.0
  values[:, :, 1] = [[1, 2, 3, 4], [5, 9, 12, 14], [11, 15, 20, 24], [30, 40, 50, 60]]
  values[:, :, 2] = [[1, 2, 3, 4], [10, 12, 14, 20], [20, 30, 35, 40], [40, 50, 60, 70]]
  chosen, table = cal.choose_scales(values, scales, [0, 1, 2])
  assert chosen == [1.0, 6.0, 10.0]
  assert table["per_prompt"][1]["hit_rate"] == [0.0, 0.5, 1.0, 0.0]
  assert table["per_prompt"][2]["class_range_ml"] == [25.0, None]
  assert table["chosen_hit_rate"] == [1.0, 1.0, 1.0]
  # Contrastive guidance: the factual prompt is the conditional model at every w.
  assert cal.choose_scales(values, scales, [0, 1, 2], factual=0)[0] == [1.0, 6.0, 10.0]
  # A given scan of class 2 ("high"), guided against its own prompt: that prompt gets w = 1.
  assert cal.choose_scales(values, scales, [0, 1, 2], factual=2)[0] == [1.0, 6.0, 1.0]
  values[:, :, 0] = [[20] * 4, [2] * 4, [2] * 4, [2] * 4]
  assert cal.choose_scales(values, scales, [0, 1, 2])[0][0] == 3.0
  # Equal hit rates: the smaller distance to the range wins, then the smaller w.
  tie = np.zeros((2, 2, 1))
  tie[0, :, 0] = [5.0, 40.0]     # hit 1/2, 15 mL over on the other noise
  tie[1, :, 0] = [5.0, 26.0]     # hit 1/2, 1 mL over
  assert cal.choose_scales(tie, [2.0, 8.0], [0])[0] == [8.0]
  assert cal.choose_scales(tie[[1, 1]], [2.0, 8.0], [0])[0] == [2.0]
  # A margin: 26 mL just passes "high" (> 25) but not its shrunk range (≥ 27.5 at 10 %).
  edge = np.asarray([[[26.0], [30.0]], [[30.0], [40.0]]])   # [S=2, K=2, P=1]
  assert cal.choose_scales(edge, [5.0, 6.0], [2])[0] == [5.0]
  assert cal.choose_scales(edge, [5.0, 6.0], [2], margin=0.1)[0] == [6.0]
  with pytest.raises(ValueError, match="expected"):
    cal.choose_scales(values, scales[:2], [0, 1, 2])


def test_a_psnr_floor_keeps_only_the_scales_that_preserve_the_subject():
  scales = [2.0, 4.0, 8.0]
  values = np.zeros((3, 2, 3))
  values[:, :, 1] = [[5, 6], [12, 8], [15, 20]]       # moderate: hits 0, 1/2, 2/2
  values[:, :, 2] = [[10, 12], [20, 30], [40, 50]]    # high: hits 0, 1/2, 2/2
  psnr = np.full((3, 2, 3), np.inf)                   # the factual: identical to itself
  psnr[:, :, 1] = [[36, 34], [31, 30], [28, 27]]      # means 35, 30.5, 27.5
  psnr[:, :, 2] = [[29, 28], [27, np.inf], [25, 24]]  # means 28.5, 27 (inf: unchanged), 24.5
  assert cal.mean_psnr(psnr)[:, 2].tolist() == [28.5, 27.0, 24.5]
  assert np.isinf(cal.mean_psnr(psnr)[:, 0]).all()
  free, _ = cal.choose_scales(values, scales, [0, 1, 2], factual=0, psnr=psnr)
  assert free == [1.0, 8.0, 8.0]                       # no floor: the most hits
  chosen, table = cal.choose_scales(values, scales, [0, 1, 2], factual=0, psnr=psnr,
                                    min_psnr=30.0)
  # moderate: w = 8 falls below 30 dB, w = 4 is the best that preserves; high: no scale reaches
  # 30 dB, so the best-preserving one (w = 2) is kept and reported.
  assert chosen == [1.0, 4.0, 2.0]
  assert table["chosen_hit_rate"] == [1.0, 0.5, 0.0]
  assert table["below_min_psnr"] == [2]
  assert table["per_prompt"][1]["mean_psnr_outside_wm_db"] == [35.0, 30.5, 27.5]
  assert table["per_prompt"][0]["mean_psnr_outside_wm_db"] == [None, None, None]
  with pytest.raises(ValueError, match="expected the values' shape"):
    cal.choose_scales(values, scales, [0, 1, 2], psnr=psnr[:2])


def test_prompt_classes_need_ms_ranges(smoke_config):
  prompts = list(smoke_config.sample.prompts)
  assert cal.prompt_classes("ms", prompts) == [0, 1, 2]
  with pytest.raises(ConfigError, match="names an order only"):
    cal.prompt_classes("adni", prompts)
  with pytest.raises(ConfigError, match="name no lesion-load class"):
    cal.prompt_classes("ms", prompts + ["Subject has a brain."])
  smoke_config.sample.calibrate = True
  validate(smoke_config, "all")
  smoke_config.data.dataset = "adni"
  with pytest.raises(ConfigError, match="config.sample.calibrate=True"):
    validate(smoke_config, "all")


def _write(workdir, config, step, **change):
  content = {"format": cal.CALIBRATION_FORMAT, "checkpoint_step": step,
             "settings": cal.settings(config), "num_noises": 2,
             "chosen_scale": {p: 1.0 for p in config.sample.prompts}}
  content.update(change)
  with open(cal.calibration_path(str(workdir)), "w") as f:
    json.dump(content, f)


def test_sampling_refuses_a_calibration_of_another_model_or_setting(smoke_config, tmp_path):
  with pytest.raises(ConfigError, match="calibration.json: no calibration; run --mode=calibrate"):
    cal.load_calibration(smoke_config, str(tmp_path), 4)
  _write(tmp_path, smoke_config, 4)
  assert cal.load_calibration(smoke_config, str(tmp_path), 4)["num_noises"] == 2
  with pytest.raises(ConfigError, match="made for checkpoint step 4, sampling uses step 2"):
    cal.load_calibration(smoke_config, str(tmp_path), 2)
  smoke_config.sample.guidance_negative = "factual"
  smoke_config.sample.guidance_interval = (0.0, 0.3)
  with pytest.raises(ConfigError, match=r"other sampling settings \(guidance_negative, "
                                        r"guidance_interval\)"):
    cal.load_calibration(smoke_config, str(tmp_path), 4)
  _write(tmp_path, smoke_config, 4)
  smoke_config.sample.background_threshold = 0.0        # volumes decoded without the rule
  with pytest.raises(ConfigError, match=r"other sampling settings \(background\)"):
    cal.load_calibration(smoke_config, str(tmp_path), 4)
  smoke_config.sample.background_threshold = 0.25
  smoke_config.sample.calibration_margin = 0.1
  with pytest.raises(ConfigError, match="chosen under calibration_margin=0.0, the config sets 0.1"):
    cal.load_calibration(smoke_config, str(tmp_path), 4)
  smoke_config.sample.calibration_margin = 0.0
  smoke_config.sample.calibration_min_psnr = 30.0
  with pytest.raises(ConfigError, match="chosen under calibration_min_psnr=0.0, the config sets 30.0"):
    cal.load_calibration(smoke_config, str(tmp_path), 4)
  _write(tmp_path, smoke_config, 4, min_psnr_outside_wm_db=30.0)
  assert cal.load_calibration(smoke_config, str(tmp_path), 4)["num_noises"] == 2
  _write(tmp_path, smoke_config, 4, format="other/1")
  with pytest.raises(ConfigError, match="format 'other/1'"):
    cal.load_calibration(smoke_config, str(tmp_path), 4)
  with open(cal.calibration_path(str(tmp_path)), "w") as f:
    f.write("{")
  with pytest.raises(ConfigError, match="unreadable calibration"):
    cal.load_calibration(smoke_config, str(tmp_path), 4)


def test_a_named_set_is_summarised_with_each_prompt_scale():
  prompts = ["Subject has minimal lesion load.", "Subject has high lesion load."]
  entries = []
  for k, (lo, hi) in enumerate([(2.0, 30.0), (3.0, 20.0)]):
    for set_name, w, vols in ((None, 3.0, (lo, lo + 1)), ("calibrated", None, (lo, hi))):
      for p, v in zip(prompts, vols):
        e = {"subject": k, "prompt": p, "lesion_volume_ml": v,
             "guidance_scale": w if w else (1.0 if p == prompts[0] else 9.0)}
        if set_name:
          e["set"] = set_name
        entries.append(e)

  class Rule:
    stat, dataset, description = "lesion_volume_ml", "ms", "rule"
  result = {}
  effects = sample_index.summarise(result, entries, prompts, [3.0], Rule())
  assert list(effects) == ["g3", "calibrated"]
  assert effects["g3"]["class_hit_rate"][prompts[1]] == 0.0
  assert effects["calibrated"]["class_hit_rate"][prompts[1]] == 0.5
  assert effects["calibrated"]["guidance_scale"] == {prompts[0]: 1.0, prompts[1]: 9.0}
  assert "guidance_scale" not in effects["g3"]
  table = phantom.format_table(effects, prompts)
  assert "calibrated" in table and "w = 9" in table
  assert [sample_index.set_label(k) for k in effects] == ["3", "calibrated"]
  # Given scans of two factual classes: a prompt decoded at two scales lists both.
  entries[-1]["guidance_scale"] = 4.0
  effects = sample_index.summarise({}, entries, prompts, [3.0], Rule())
  assert effects["calibrated"]["guidance_scale"] == {prompts[0]: 1.0, prompts[1]: [4.0, 9.0]}
  assert "w = 4/9" in phantom.format_table(effects, prompts)


def test_given_scan_calibration_needs_validation_phantoms_of_two_classes(smoke_config, tmp_path,
                                                                        monkeypatch):
  from cf3d_jax.data import export, records
  entries = [{"subject_id": f"s{i}", "label": 1, "shard": "a", "position": i} for i in range(3)]
  monkeypatch.setattr(records, "load_index", lambda path: {"records": entries})
  monkeypatch.setattr(export, "split_entries", lambda index, split, seed, fractions: entries)
  with pytest.raises(ConfigError, match="holds phantoms of 1 of the prompts' classes"):
    cal.validation_scans(smoke_config, str(tmp_path), 8, [0, 1, 2])
  # Round-robin over the classes, so a limit of 3 takes one of each before a second of any.
  mixed = [dict(e, label=c, subject_id=f"{c}{i}") for i, e in enumerate(entries) for c in (0, 2)]
  monkeypatch.setattr(export, "split_entries", lambda index, split, seed, fractions: mixed)
  monkeypatch.setattr(export, "read_records", lambda d, index, picked: [
      {"volume": np.zeros((2, 2, 2, 1), np.float32)} for _ in picked])
  volumes, labels, ids = cal.validation_scans(smoke_config, str(tmp_path), 3, [0, 1, 2])
  assert labels == [0, 2, 0] and ids == ["00", "20", "01"] and volumes.shape == (3, 2, 2, 2, 1)
