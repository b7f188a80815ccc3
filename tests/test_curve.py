"""The training curve (cf3d_jax.curve): segment points, rows, table, resume and a smoke run."""

import json
import os

import pytest

from cf3d_jax import config_base, curve
from cf3d_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_curve_steps():
  assert curve.curve_steps(4500, 900) == [900, 1800, 2700, 3600, 4500]
  assert curve.curve_steps(1000, 300) == [300, 600, 900, 1000]
  assert curve.curve_steps(200, 900) == [200]
  with pytest.raises(ConfigError, match="every"):
    curve.curve_steps(100, 0)


def test_training_curve_needs_two_noises(tmp_path):
  c = config_base.load_config_file(os.path.join(ROOT, "configs", "demo.py"), "smoke")
  with pytest.raises(ConfigError, match="two noises"):
    curve.training_curve(c, str(tmp_path), "x", every=2, scales=(3.0,), num_per_prompt=1)
  assert not os.listdir(tmp_path)     # refused before anything is written


def _result(hit: float) -> dict:
  prompts = ["a", "b", "c"]
  gt = {"mean": dict(zip(prompts, (1.0, 12.0, 30.0))),
        "change_vs_first": dict(zip(prompts, (0.0, 11.0, 29.0))),
        "class_hit_rate_all": hit, "ordered_fraction": 1.0, "psnr_outside_wm": 31.5}
  return {"fid_floor": 0.001, "scales": [
      {"guidance_scale": 3.0, "fid": 0.004, "fid_vs_floor": 4.0, "ground_truth": gt},
      {"guidance_scale": 7.0, "fid": 0.002, "fid_vs_floor": 2.0}]}


def test_curve_row_and_markdown():
  row = curve.curve_row(900, 11.234, _result(0.75))
  assert row["step"] == 900 and row["train_minutes"] == 11.23
  assert row["scales"]["g3"]["class_hit_rate_all"] == 0.75
  assert row["scales"]["g7"]["class_hit_rate_all"] is None   # no phantom rule: no hit rate
  table = curve.curve_markdown({"config": "configs/demo.py", "seed": 0, "num_per_prompt": 4,
                                "rows": [row]})
  assert "| 900 | 11.2 | 3 | 1.0 / 12.0 / 30.0 | 75% | +29.0 | 100% | 31.5 | 0.0040 | 4.0 |" \
      in table
  assert "| 900 | 11.2 | 7 | — | — | — | — | — | 0.0020 | 2.0 |" in table


def test_curve_refuses_other_settings(tmp_path):
  path = str(tmp_path / "curve.json")
  header = {"format": curve.CURVE_FORMAT, "config": "configs/demo.py", "seed": 0, "every": 900,
            "scales": [3.0], "num_per_prompt": 4}
  assert curve._load(path, header) == {**header, "rows": []}
  json.dump({**header, "rows": [{"step": 900}]}, open(path, "w"))
  assert curve._load(path, header)["rows"] == [{"step": 900}]
  with pytest.raises(ConfigError, match="every"):
    curve._load(path, {**header, "every": 300})
  open(path, "w").write("{")
  with pytest.raises(ConfigError, match="not a readable curve"):
    curve._load(path, header)


def test_training_curve_smoke(tmp_path):
  """Two segments of the smoke demo: the checkpoints of steps 2 and 4 are each evaluated, the
  curve's rows grow with the training time, and a rerun adds nothing."""
  c = config_base.load_config_file(os.path.join(ROOT, "configs", "demo.py"), "smoke")
  workdir = str(tmp_path / "run")
  out = curve.training_curve(c, workdir, "configs/demo.py:smoke", every=2, scales=(3.0,),
                             num_per_prompt=2)
  assert [r["step"] for r in out["rows"]] == [2, 4]
  assert 0 < out["rows"][0]["train_minutes"] < out["rows"][1]["train_minutes"]
  for r in out["rows"]:
    s = r["scales"]["g3"]
    assert s["fid"] >= 0 and 0 <= s["class_hit_rate_all"] <= 1
    assert s["psnr_outside_wm"] is None or s["psnr_outside_wm"] > 0
  for name in ("curve.json", "curve.md", "curve.png", "step_000002/results.json",
               "step_000004/results.json"):
    assert os.path.exists(os.path.join(workdir, "curve", name)), name
  assert json.load(open(os.path.join(workdir, "curve", "step_000004", "results.json")))[
      "checkpoint_step"] == 4
  again = curve.training_curve(c, workdir, "configs/demo.py:smoke", every=2, scales=(3.0,),
                               num_per_prompt=2)
  assert again["rows"] == out["rows"]


def test_importing_defines_no_flags_and_the_cli_errors_in_one_line(tmp_path):
  """cf3d_jax.main defines --config too: the curve's flags exist only when it runs."""
  import subprocess
  import sys
  from absl import flags
  assert not {"every", "scales", "num_per_prompt"} & set(flags.FLAGS)
  proc = subprocess.run([sys.executable, "-m", "cf3d_jax.curve", "--config=configs/demo.py:smoke",
                         f"--workdir={tmp_path / 'run'}", "--num_per_prompt=1"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "two noises per prompt" in proc.stderr
  assert not (tmp_path / "run").exists()


def test_a_segment_continues_one_schedule_to_the_curve_end():
  from conftest import load_config
  config = load_config()
  config.train.num_steps, config.train.lr_schedule = 4500, "cosine"
  seg = curve.segment_config(config, 900, 900, (3, 7), 2)
  assert seg.train.num_steps == 900 and seg.train.lr_decay_steps == 4500
  assert seg.sample.checkpoint_step == 900 and seg.eval.guidance_scales == (3.0, 7.0)
  assert seg.eval.num_per_prompt == 2 and config.train.num_steps == 4500   # input untouched
  config.train.lr_decay_steps = 6000
  assert curve.segment_config(config, 1800, 900, (3,), 2).train.lr_decay_steps == 6000
