"""`cf3d_jax.reproduce`: the stage plan, resuming, the tables and orderings, and one end-to-end
run of the command on the smoke budget."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from cf3d_jax import config_base, reproduce
from cf3d_jax.errors import ConfigError


def test_plan_runs_every_model_then_evaluates_with_one_classifier_and_one_autoencoder(tmp_path):
  stages = reproduce.plan("smoke", str(tmp_path))
  assert [s["name"] for s in stages] == [
      "ms/wdm", "ms/classifier", "ms/maisi_linear", "ms/maisi_rflow", "ms/wdm/evaluate",
      "ms/maisi_linear/evaluate", "ms/maisi_rflow/evaluate",
      "adni/wdm", "adni/classifier", "adni/maisi_linear", "adni/maisi_rflow",
      "adni/wdm/evaluate", "adni/maisi_linear/evaluate", "adni/maisi_rflow/evaluate"]
  by = {s["name"]: s for s in stages}
  for dataset in ("ms", "adni"):
    classifier = os.path.join(str(tmp_path), dataset, "wdm", "classifier")
    assert by[f"{dataset}/classifier"]["workdir"] == os.path.join(str(tmp_path), dataset, "wdm")
    for model in reproduce.MODELS:
      config = by[f"{dataset}/{model}/evaluate"]["config"]
      assert config.data.dataset == dataset
      assert config.eval.classifier == classifier
      assert by[f"{dataset}/{model}"]["workdir"] == os.path.join(str(tmp_path), dataset, model)
    rflow = by[f"{dataset}/maisi_rflow"]["config"]
    assert rflow.space.autoencoder == os.path.join(str(tmp_path), dataset, "maisi_linear",
                                                   "autoencoder", "vae")
    assert by[f"{dataset}/maisi_linear"]["config"].space.autoencoder == ""   # trains it
  linear, rflow, wdm = (by[f"ms/{m}"]["config"] for m in ("maisi_linear", "maisi_rflow", "wdm"))
  assert (linear.objective.name, linear.objective.prediction,
          linear.objective.beta_schedule) == ("ddpm", "eps", "scaled_linear")
  assert (linear.space.name, rflow.space.name, wdm.space.name) == ("latent", "latent", "wavelet")
  assert rflow.objective.name == "rflow" and wdm.objective.name == "ddpm"


@pytest.mark.parametrize("budget", reproduce.BUDGETS)
def test_every_budget_builds_valid_configs_with_the_papers_sweep(budget, tmp_path):
  for stage in reproduce.plan(budget, str(tmp_path)):
    config_base.validate(stage["config"], stage["mode"])
    if budget != "smoke":
      assert tuple(stage["config"].eval.guidance_scales) == reproduce.SWEEP
      assert stage["config"].eval.num_per_prompt == reproduce.EVAL_PER_PROMPT[budget]
  paper = {s["name"]: s["config"] for s in reproduce.plan("paper", str(tmp_path))}
  if budget == "paper":   # the paper configs themselves, at 128³
    assert tuple(paper["ms/wdm"].data.shape) == (128, 128, 128)


def test_a_subset_plans_only_its_stages_and_bad_names_are_refused(tmp_path):
  names = [s["name"] for s in reproduce.plan("smoke", str(tmp_path), ["adni"], ["maisi_rflow"])]
  assert names == ["adni/maisi_rflow", "adni/classifier", "adni/maisi_rflow/evaluate"]
  rflow = reproduce.plan("smoke", str(tmp_path), ["adni"], ["maisi_rflow"])[0]["config"]
  assert rflow.space.autoencoder == ""        # no MAISI Linear run to share one with: trains its own
  with pytest.raises(ConfigError, match="brats"):
    reproduce.plan("smoke", str(tmp_path), ["brats"])
  with pytest.raises(ConfigError, match="ldm"):
    reproduce.plan("smoke", str(tmp_path), ["ms"], ["ldm"])
  with pytest.raises(ConfigError, match="budget"):
    reproduce.model_config("tpu", "ms", "wdm")


def test_finished_stages_are_skipped_and_the_rest_run_in_order(tmp_path, monkeypatch):
  ran = []
  monkeypatch.setattr("cf3d_jax.modes.run", lambda config, workdir, mode: ran.append(
      (os.path.relpath(workdir, str(tmp_path)), mode)))
  stages = reproduce.plan("smoke", str(tmp_path), ["ms"], ["wdm", "maisi_rflow"])
  path = str(tmp_path / "reproduce.json")
  state = reproduce._load_state(path, "smoke")
  state["stages"]["ms/wdm"] = {"mode": "all", "workdir": "x", "seconds": 60.0, "finished": "t"}
  state = reproduce.run_stages(stages, path, state)
  assert ran == [("ms/wdm", "train_classifier"), ("ms/maisi_rflow", "all"),
                 ("ms/wdm", "evaluate"), ("ms/maisi_rflow", "evaluate")]
  saved = json.load(open(path))
  assert list(saved["stages"]) == [s["name"] for s in stages]
  assert saved["stages"]["ms/wdm"]["seconds"] == 60.0          # the earlier record is kept
  ran.clear()
  reproduce.run_stages(stages, path, reproduce._load_state(path, "smoke"))
  assert ran == []                                             # everything finished: nothing reruns
  with pytest.raises(ConfigError, match="--budget=smoke"):
    reproduce._load_state(path, "cpu")                         # another budget's workdir
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(ConfigError, match="bad.json"):
    reproduce._load_state(str(tmp_path / "bad.json"), "smoke")


def _evaluation(psnr: float, fid: float, aligns: dict, hit: float | None, change: float) -> dict:
  rows = []
  for w, align in aligns.items():
    rows.append({"guidance_scale": w, "fid": fid * w, "fid_vs_floor": 2.0 * w,
                 "ms_ssim_diversity": 0.9, "ms_ssim_preservation": 0.95 / w,
                 "psnr_preservation": psnr / w, "alignment": align,
                 "ground_truth": {"stat": "lesion_volume_ml", "class_hit_rate_all": hit,
                                  "change_vs_first": {"b": change / 2, "c": change * w},
                                  "ordered_fraction": 1.0, "psnr_outside_wm": 40.0},
                 "texture": {"total": 1.1, "per_level": [1.1 * w, 0.97, 1.04]}})
  return {"checkpoint_step": 4, "num_per_prompt": 2, "num_real": 3, "fid_features": "f",
          "fid_floor": 0.5, "scales": rows}


def test_tables_fill_every_cell_and_check_the_papers_orderings(tmp_path):
  rising, falling = {1.0: 0.5, 0.5: 0.25, 2.0: 0.75, 3.0: 1.0}, {1.0: 0.5, 0.5: 0.6, 2.0: 0.4,
                                                                 3.0: 0.4}
  specs = {("ms", "wdm"): (30.0, 0.2, rising), ("ms", "maisi_linear"): (20.0, 0.3, rising),
           ("ms", "maisi_rflow"): (25.0, 0.25, falling),
           ("adni", "wdm"): (20.0, 0.2, rising), ("adni", "maisi_linear"): (30.0, 0.2, rising),
           ("adni", "maisi_rflow"): (25.0, 0.3, rising)}
  for (dataset, model), (psnr, fid, aligns) in specs.items():
    d = tmp_path / dataset / model / "eval"
    d.mkdir(parents=True)
    hit = 0.75 if dataset == "ms" else None
    (d / "results.json").write_text(json.dumps(_evaluation(psnr, fid, aligns, hit, 10.0)))
  state = {"stages": {"ms/wdm": {"mode": "all", "seconds": 90.0}},
           "machine": {"processor": "cpu", "cpu_count": 2, "devices": ["cpu"]}}
  res = reproduce.collect(str(tmp_path), "cpu", list(reproduce.DATASETS),
                          list(reproduce.MODELS), state)
  for dataset in reproduce.DATASETS:
    for model in reproduce.MODELS:
      row = res["table1"][dataset][model]
      assert row["guidance_scale"] == 1.0 and row["alignment_pct"] == 50.0
      assert row["psnr_preservation"] == specs[(dataset, model)][0]
      assert row["last_minus_first"] == 10.0
  assert res["table1"]["ms"]["wdm"]["class_hit_rate"] == 0.75
  assert res["table1"]["adni"]["wdm"]["class_hit_rate"] is None
  assert sorted(res["table2"]) == ["ms/maisi_rflow", "ms/wdm"]
  assert len(res["table2"]["ms/wdm"]) == 4
  holds = {(o["claim"], o["dataset"]): o["holds"] for o in res["orderings"]}
  assert holds[("WDM preserves the subject best (highest PSNR)", "ms")] is True
  assert holds[("WDM preserves the subject best (highest PSNR)", "adni")] is False
  assert holds[("MAISI RFlow above MAISI Linear in fidelity (lower FID)", "ms")] is True
  assert holds[("MAISI RFlow above MAISI Linear in fidelity (lower FID)", "adni")] is False
  assert holds[("MAISI RFlow above MAISI Linear in preservation (higher PSNR)", "ms")] is True
  assert holds[("MAISI RFlow above MAISI Linear in preservation (higher PSNR)", "adni")] is False
  assert holds[("WDM: alignment rises with guidance", "ms")] is True
  assert holds[("MAISI RFlow: alignment rises with guidance", "ms")] is False
  text = reproduce.results_markdown(res)
  assert "| WDM | 0.2 | 2.00 | 0.9000 | 0.9500 | 30.00 | 50.0 | 75% | +10.0 | " \
         "1.10 / 0.97 / 1.04 | 0.1622 / 0.8684 / 0.968 / 28.47 / 94.58 |" in text
  assert "| 2 | 75.0 | 0.4750 | 15.00 | 4.00 | 75% | +20.0 | 40.0 |" in text      # WDM sweep
  assert "99.39 / 0.926 / 24.39 |" in text                   # the paper's RFlow row at w = 2
  assert "| ms/wdm | all | 1.5 min |" in text


def test_missing_evaluations_leave_empty_cells(tmp_path):
  res = reproduce.collect(str(tmp_path), "cpu", ["ms"], ["wdm"], {"stages": {}})
  assert res["table1"]["ms"]["wdm"] is None
  assert all(o["holds"] is None for o in res["orderings"])
  assert "| WDM | — | — |" in reproduce.results_markdown(res)


def test_the_command_on_the_smoke_budget_end_to_end_resumed_then_calibrated(tmp_path, monkeypatch,
                                                                             capsys):
  """One dataset and one model of the smoke budget, run as a user would (the CLI): every Table 1
  and Table 2 column of `--mode=evaluate`; a second run finds every stage finished; then
  `--mode=calibrate` in the same workdir adds the calibrated set to the evaluation."""
  from cf3d_jax.modes import run
  workdir = str(tmp_path / "paper")
  cmd = [sys.executable, "-m", "cf3d_jax.reproduce", "--budget=smoke", f"--workdir={workdir}",
         "--datasets=ms", "--models=wdm"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.load(open(os.path.join(workdir, "results.json")))
  row = res["table1"]["ms"]["wdm"]
  for key in ("fid", "fid_vs_floor", "ms_ssim_diversity", "ms_ssim_preservation",
              "psnr_preservation", "alignment_pct", "class_hit_rate"):
    assert row[key] is not None, key
  assert [r["guidance_scale"] for r in res["table2"]["ms/wdm"]] == [1.0, 2.0]
  assert list(res["stages"]) == ["ms/wdm", "ms/classifier", "ms/wdm/evaluate"]
  assert res["machine"]["cpu_count"] == os.cpu_count()
  assert "## Table 1, MS" in open(os.path.join(workdir, "results.md")).read()

  wdm = os.path.join(workdir, "ms", "wdm")
  meta = json.load(open(os.path.join(wdm, "classifier", "classifier.json")))
  assert meta["classes"] == ["minimal", "moderate", "high"] and meta["block_config"] == [2, 2]
  assert 0 <= meta["test_accuracy"] <= 1
  result = json.load(open(os.path.join(wdm, "eval", "results.json")))
  assert [r["guidance_scale"] for r in result["scales"]] == [1.0, 2.0]
  assert 0 <= result["classifier"]["real_accuracy"] <= 1
  assert result["fid_floor"] >= 0 and result["num_real_train"] > 0
  for r in result["scales"]:
    assert r["fid"] >= 0 and np.isfinite(r["fid"])
    assert -1 <= r["ms_ssim_diversity"] <= 1 and -1 <= r["ms_ssim_preservation"] <= 1
    assert not np.isnan(r["psnr_preservation"])   # +inf if a 4-step model ignores the text
    assert 0 <= r["alignment"] <= 1 and 0 <= r["alignment_all"] <= 1
    gt = r["ground_truth"]
    assert gt["stat"] == "lesion_volume_ml" and set(gt["mean"]) == set(result["prompts"])
    assert all(0 <= v <= 1 for v in gt["class_hit_rate"].values())
    assert gt["psnr_outside_wm"] > 0
    assert r["fid_vs_floor"] is None or r["fid_vs_floor"] >= 0
    tex = r["texture"]
    assert tex["total"] > 0 and set(tex["per_subband"]) == {"LLH", "LHL", "LHH", "HLL", "HLH",
                                                            "HHL", "HHH"}
  md = open(os.path.join(wdm, "eval", "results.md")).read()
  assert "## Table 1" in md and "## Table 2" in md and "| 2 |" in md
  assert os.path.getsize(os.path.join(wdm, "eval", "guidance.png")) > 1000
  assert "calibrated" not in result

  # Resumed: every stage was recorded, nothing reruns; bad names are refused before anything.
  monkeypatch.setattr("cf3d_jax.modes.run", lambda *a: pytest.fail(f"reran {a[1:]}"))
  again = reproduce.reproduce("smoke", workdir, ["ms"], ["wdm"])
  assert capsys.readouterr().out.count("done earlier") == 3
  assert again["table1"] == res["table1"] and again["stages"] == res["stages"]
  monkeypatch.undo()
  with pytest.raises(ConfigError, match="brats"):
    reproduce.reproduce("smoke", workdir, ["brats"], ["wdm"])

  # With sample.calibrate: the calibrated set on the same evaluation noises, each prompt at the
  # scale --mode=calibrate chose; refused before decoding while no calibration exists.
  c = reproduce.plan("smoke", workdir, ["ms"], ["wdm"])[-1]["config"]
  c.sample.calibrate = True
  c.sample.calibration_scales = (1.0, 2.0)
  c.sample.calibration_noises = 2
  with pytest.raises(ConfigError, match="calibration.json: no calibration"):
    run(c, wdm, "evaluate")
  run(c, wdm, "calibrate")
  chosen = json.load(open(os.path.join(wdm, "calibration.json")))["chosen_scale"]
  run(c, wdm, "evaluate")
  cal = json.load(open(os.path.join(wdm, "eval", "results.json")))
  assert cal["calibrated"]["chosen_scale"] == chosen and cal["calibrated"]["num_noises"] == 2
  assert cal["calibrated"]["fid"] >= 0 and 0 <= cal["calibrated"]["alignment"] <= 1
  assert set(cal["calibrated"]["ground_truth"]["mean"]) == set(result["prompts"])
  # Each prompt at its chosen w measures as that prompt in the sweep's row for that w (the same
  # evaluation noises and sampler keys; the volumes may differ by float rounding in the batches).
  by_w = {r["guidance_scale"]: r["ground_truth"]["mean"] for r in cal["scales"]}
  for p, w in chosen.items():
    assert cal["calibrated"]["ground_truth"]["mean"][p] == pytest.approx(by_w[w][p], abs=0.5)
  md = open(os.path.join(wdm, "eval", "results.md")).read()
  assert "## Calibrated guidance" in md and "| calibrated |" in md
