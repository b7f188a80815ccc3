"""--mode=train_classifier and --mode=evaluate at toy size: every Table 1/2 column is produced."""

import os

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


# `--mode=train_classifier`, `--mode=evaluate` (every Table 1 / Table 2 column) and the calibrated
# set run end to end in tests/test_reproduce.py, inside the reproduce command's smoke run.


def test_results_markdown_sorts_the_sweep_and_keeps_table1_first():
  from cf3d_jax.evaluate import results_markdown
  row = lambda w, pres: {"guidance_scale": w, "fid": 0.1, "ms_ssim_diversity": 0.5,
                         "ms_ssim_preservation": pres, "psnr_preservation": 30.0,
                         "alignment": 0.5}
  result = {"objective": "ddpm", "dataset": "ms", "checkpoint_step": 9, "num_per_prompt": 2,
            "fid_features": "f", "num_real": 3, "real_split": "test",
            "scales": [row(1.0, 0.97), row(0.5, 0.99), row(3.0, 0.90)]}
  result["scales"][2]["texture"] = {"total": 1.234, "per_subband": {}, "per_level": [1.234, 0.9]}
  md = results_markdown(result)
  assert "| 3 | 50.00 | 0.9000 | 30.00 | 0.1000 | — | 1.23 / 0.90 |" in md   # older rows: texture —
  assert "| 0.5 | 50.00 | 0.9900 | 30.00 | 0.1000 | — | — |" in md
  assert "## Table 1 (guidance w = 1)" in md and "| 0.1000 | 0.5000 | 0.9700 |" in md
  sweep = md.split("## Table 2")[1]
  assert sweep.index("| 0.5 |") < sweep.index("| 1 |") < sweep.index("| 3 |")
