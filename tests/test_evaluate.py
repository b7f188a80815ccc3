"""--mode=train_classifier and --mode=evaluate at toy size: every Table 1/2 column is produced."""

import json
import os

import numpy as np
import pytest

from cf3d_jax import config_base
from cf3d_jax.errors import ConfigError
from cf3d_jax.evaluate import ms_ssim_settings
from cf3d_jax.text.prompts import prompt_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny():
  c = config_base.load_config_file(os.path.join(ROOT, "configs", "demo.py"), "smoke")
  c.train.num_steps = 2
  c.classifier.block_config = (2, 2)    # a 2-block DenseNet (≥ 5 voxels per side): fast to compile
  c.classifier.num_steps = 2
  c.classifier.eval_every = 1
  c.classifier.batch_size = 2
  c.eval.num_per_prompt = 2
  c.eval.batch_size = 6
  c.eval.guidance_scales = (1.0, 3.0)
  c.eval.ms_ssim_kernel = 3
  c.eval.ms_ssim_scales = 3
  c.eval.diversity_pairs = 0
  return c


def test_prompt_class_and_ms_ssim_settings():
  assert prompt_class("ms", "Subject has high lesion load.") == 2
  assert prompt_class("adni", "Subject is cognitively normal.") == 0
  assert prompt_class("ms", "A purple brain.") is None
  c = _tiny()
  kw = ms_ssim_settings(c, (16, 16, 16))
  assert kw["kernel_size"] == 3 and abs(sum(kw["weights"]) - 1) < 1e-9
  c.eval.ms_ssim_kernel, c.eval.ms_ssim_scales = 7, 5
  with pytest.raises(ConfigError, match="at least 112"):
    ms_ssim_settings(c, (32, 32, 32))


def test_train_classifier_then_evaluate(tmp_path):
  from cf3d_jax.modes import run
  c = _tiny()
  workdir = str(tmp_path)
  run(c, workdir, "prepare")
  run(c, workdir, "train")
  run(c, workdir, "train_classifier")
  meta = json.load(open(tmp_path / "classifier" / "classifier.json"))
  assert meta["classes"] == ["minimal", "moderate", "high"] and meta["block_config"] == [2, 2]
  assert 0 <= meta["test_accuracy"] <= 1 and meta["step"] in (1, 2)
  run(c, workdir, "evaluate")
  result = json.load(open(tmp_path / "eval" / "results.json"))
  assert [row["guidance_scale"] for row in result["scales"]] == [1.0, 3.0]
  assert 0 <= result["classifier"]["real_accuracy"] <= 1
  assert result["fid_floor"] >= 0 and result["num_real_train"] > 0
  for row in result["scales"]:
    assert row["fid"] >= 0 and np.isfinite(row["fid"])
    assert -1 <= row["ms_ssim_diversity"] <= 1 and -1 <= row["ms_ssim_preservation"] <= 1
    assert not np.isnan(row["psnr_preservation"])   # +inf if a 2-step model ignores the text
    assert 0 <= row["alignment"] <= 1 and 0 <= row["alignment_all"] <= 1
    gt = row["ground_truth"]
    assert gt["stat"] == "lesion_volume_ml" and set(gt["mean"]) == set(result["prompts"])
    assert all(0 <= v <= 1 for v in gt["class_hit_rate"].values())
    assert gt["psnr_outside_wm"] > 0
    assert row["fid_vs_floor"] is None or row["fid_vs_floor"] >= 0
  md = open(tmp_path / "eval" / "results.md").read()
  assert "## Table 1" in md and "## Table 2" in md and "| 3 |" in md
  assert os.path.getsize(tmp_path / "eval" / "guidance.png") > 1000
  assert "calibrated" not in result

  # With sample.calibrate: the calibrated set on the same evaluation noises, each prompt at the
  # scale --mode=calibrate chose; refused before decoding while no calibration exists.
  c.sample.calibrate = True
  c.sample.calibration_scales = (1.0, 3.0)
  c.sample.calibration_noises = 2
  with pytest.raises(ConfigError, match="calibration.json: no calibration"):
    run(c, workdir, "evaluate")
  run(c, workdir, "calibrate")
  chosen = json.load(open(tmp_path / "calibration.json"))["chosen_scale"]
  run(c, workdir, "evaluate")
  again = json.load(open(tmp_path / "eval" / "results.json"))
  cal = again["calibrated"]
  assert cal["chosen_scale"] == chosen and cal["num_noises"] == 2
  assert cal["fid"] >= 0 and 0 <= cal["alignment"] <= 1
  assert set(cal["ground_truth"]["mean"]) == set(result["prompts"])
  # Each prompt at its chosen w measures as that prompt in the sweep's row for that w (the same
  # evaluation noises and sampler keys; the volumes may differ by float rounding in the batches).
  by_w = {row["guidance_scale"]: row["ground_truth"]["mean"] for row in again["scales"]}
  for p, w in chosen.items():
    assert cal["ground_truth"]["mean"][p] == pytest.approx(by_w[w][p], abs=0.5)
  md = open(tmp_path / "eval" / "results.md").read()
  assert "## Calibrated guidance" in md and "| calibrated |" in md


def test_results_markdown_sorts_the_sweep_and_keeps_table1_first():
  from cf3d_jax.evaluate import results_markdown
  row = lambda w, pres: {"guidance_scale": w, "fid": 0.1, "ms_ssim_diversity": 0.5,
                         "ms_ssim_preservation": pres, "psnr_preservation": 30.0,
                         "alignment": 0.5}
  result = {"objective": "ddpm", "dataset": "ms", "checkpoint_step": 9, "num_per_prompt": 2,
            "fid_features": "f", "num_real": 3, "real_split": "test",
            "scales": [row(1.0, 0.97), row(0.5, 0.99), row(3.0, 0.90)]}
  md = results_markdown(result)
  assert "## Table 1 (guidance w = 1)" in md and "| 0.1000 | 0.5000 | 0.9700 |" in md
  sweep = md.split("## Table 2")[1]
  assert sweep.index("| 0.5 |") < sweep.index("| 1 |") < sweep.index("| 3 |")
