"""`cf3d_jax.seeds`: the whole job under several seeds, tabulated per seed and over the seeds."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from cf3d_jax import config_base, seeds
from cf3d_jax.errors import ConfigError


def _index(seed: int, hit: float, change: float, scale: str = "g3") -> dict:
  prompts = ["a", "b", "c"]
  return {"seed": seed, "checkpoint_step": 4, "prompt_effect": {scale: {
      "stat": "lesion_volume_ml", "num_noises": 4,
      "mean": dict(zip(prompts, [1.0 + seed, 2.0, 3.0 + change])),
      "change_vs_first": {"b": 0.5, "c": change}, "class_hit_rate_all": hit,
      "ordered_fraction": 0.5 * seed, "mean_psnr_outside_wm_db": 30.0 + seed}}}


def test_summary_over_seeds_is_the_mean_min_max_and_count_at_target():
  rows = (seeds.seed_rows(0, _index(0, 1.0, 20.0), 1.0)
          + seeds.seed_rows(1, _index(1, 0.5, 10.0), 2.0)
          + seeds.seed_rows(2, _index(2, 11 / 12, 6.0), None))
  (key, s), = seeds.summarise(rows).items()
  assert key == "g3" and s["seeds"] == [0, 1, 2]
  assert s["class_hit_rate_mean"] == pytest.approx((1.0 + 0.5 + 11 / 12) / 3)
  assert (s["class_hit_rate_min"], s["class_hit_rate_max"]) == (0.5, 1.0)
  assert s["seeds_at_target"] == 2                      # 100 % and 92 % ≥ 90 %; 50 % not
  assert s["last_minus_first"] == pytest.approx(12.0)
  assert s["ordered_fraction"] == pytest.approx(0.5)
  assert s["psnr_outside_wm"] == pytest.approx(31.0)
  assert s["mean"] == pytest.approx({"a": 2.0, "b": 2.0, "c": 15.0})
  table = seeds.seeds_markdown({"config": "configs/demo.py", "seeds": [0, 1, 2], "rows": rows,
                                "summary": seeds.summarise(rows)})
  assert "| **3** | **all** | **2.0 / 2.0 / 15.0** | **81%** (50%–100%; 2 of 3 seeds ≥ 90%)" in table
  assert "| 3 | 1 | 2.0 / 2.0 / 13.0 | 50% | +10.0 | 50% | 31.0 |" in table


def test_a_dataset_without_class_ranges_leaves_the_hit_columns_empty():
  index = _index(0, 1.0, 5.0)
  index["prompt_effect"]["g3"]["class_hit_rate_all"] = None
  s = seeds.summarise(seeds.seed_rows(0, index, None))["g3"]
  assert s["class_hit_rate_mean"] is None and s["seeds_at_target"] is None
  assert s["last_minus_first"] == 5.0


def test_only_a_finished_run_of_the_same_seed_is_reused(tmp_path):
  d = tmp_path / "seed_3"
  (d / "samples").mkdir(parents=True)
  path = d / "samples" / "index.json"
  assert seeds._finished_index(str(d), 3, 4) is None            # nothing yet
  path.write_text(json.dumps({"seed": 3, "checkpoint_step": 2}))
  assert seeds._finished_index(str(d), 3, 4) is None            # stopped at step 2
  path.write_text(json.dumps({"seed": 4, "checkpoint_step": 4}))
  assert seeds._finished_index(str(d), 3, 4) is None            # another seed's run
  path.write_text(json.dumps({"seed": 3, "checkpoint_step": 4}))
  assert seeds._finished_index(str(d), 3, 4)["seed"] == 3
  path.write_text("{")
  with pytest.raises(ConfigError, match="not a readable sample index"):
    seeds._finished_index(str(d), 3, 4)


def test_two_seeds_of_the_smoke_demo_and_a_rerun_that_trains_nothing(tmp_path):
  c = config_base.load_config_file(os.path.join(ROOT, "configs", "demo.py"), "smoke")
  with c.unlocked():
    c.sample.guidance_scales = (3.0,)
  workdir = str(tmp_path / "runs")
  out = seeds.run_seeds(c, workdir, "configs/demo.py:smoke", [0, 1])
  assert [(r["seed"], r["scale"]) for r in out["rows"]] == [(0, "g3"), (1, "g3")]
  for r in out["rows"]:
    index = json.load(open(os.path.join(workdir, f"seed_{r['seed']}", "samples", "index.json")))
    assert index["seed"] == r["seed"]
    assert r["class_hit_rate_all"] == index["prompt_effect"]["g3"]["class_hit_rate_all"]
    assert r["minutes"] > 0
  # Different seeds: different phantoms, weights and noises, so different volumes.
  means = [tuple(r["mean"].values()) for r in out["rows"]]
  assert means[0] != means[1]
  assert json.load(open(os.path.join(workdir, "seeds.json")))["summary"] == out["summary"]
  assert "| **3** | **all** |" in open(os.path.join(workdir, "seeds.md")).read()
  mtime = os.path.getmtime(os.path.join(workdir, "seed_1", "samples", "index.json"))
  again = seeds.run_seeds(c, workdir, "configs/demo.py:smoke", [0, 1])
  assert [r["minutes"] for r in again["rows"]] == [None, None]     # read, not rerun
  assert os.path.getmtime(os.path.join(workdir, "seed_1", "samples", "index.json")) == mtime
  assert again["summary"] == out["summary"]


def test_the_cli_rejects_bad_seeds_in_one_line(tmp_path):
  from absl import flags
  assert "seeds" not in flags.FLAGS
  for arg, message in (("--seeds=0,x", "expected integers"), ("--seeds=1,1", "distinct seeds")):
    proc = subprocess.run([sys.executable, "-m", "cf3d_jax.seeds",
                           "--config=configs/demo.py:smoke", f"--workdir={tmp_path / 'r'}", arg],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "r").exists()
