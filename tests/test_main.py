"""The CLI end to end at smoke size, and its answers to bad input (exit code, message, no debris)."""

import json
import os

import nibabel as nib
import numpy as np

from conftest import run_cli


def test_demo_all_mode_end_to_end(tmp_path):
  workdir = str(tmp_path / "run")
  calibrated = ["--config.sample.calibrate=True", "--config.sample.calibration_scales=(1.0,3.0)",
                "--config.sample.calibration_noises=1"]
  proc = run_cli(["--config=configs/demo.py:smoke", f"--workdir={workdir}", "--mode=all",
                  *calibrated])
  assert proc.returncode == 0, proc.stderr[-3000:]
  # A quiet console: our own lines and progress bars; the libraries' INFO only in the log file.
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert len(lines) <= 48, proc.stderr   # calibration adds 5 lines
  assert not any("checkpoint_manager" in ln or "CheckpointManager" in ln for ln in lines)
  assert any(ln.startswith("training:") for ln in proc.stderr.replace("\r", "\n").splitlines())
  assert any(ln.startswith("trained to step 4") for ln in lines)
  (log,) = os.listdir(os.path.join(workdir, "logs"))
  assert log.startswith("all-") and "CheckpointManager" in open(os.path.join(workdir, "logs", log)).read()
  index = json.load(open(os.path.join(workdir, "samples", "index.json")))
  prompts = index["prompts"]
  assert len(prompts) == 3 and index["guidance_scales"] == [1.0, 3.0]
  assert index["guidance"]["background"] == {"threshold": 0.25, "margin": 0, "min_island": 27}
  assert len(index["items"]) == 1 * 3 * 3          # scales 1 and 3, and the calibrated set
  for item in index["items"]:
    img = nib.load(os.path.join(workdir, "samples", item["nifti"]))
    assert img.shape == (16, 16, 16)
    data = np.asarray(img.dataobj)
    assert np.isfinite(data).all() and data.min() >= -1 and data.max() <= 1
    assert item["lesion_volume_ml"] >= 0
  # The text reaches the output: the same noise under two prompts gives two volumes.
  by_prompt = {item["prompt"]: np.asarray(nib.load(os.path.join(
      workdir, "samples", item["nifti"])).dataobj) for item in index["items"]
      if item["subject"] == 0 and item["guidance_scale"] == 3.0 and "set" not in item}
  assert float(np.abs(by_prompt[prompts[0]] - by_prompt[prompts[2]]).max()) > 1e-5  # float noise ~4e-7
  assert set(index["prompt_effect"]) == {"g1", "g3", "calibrated"}
  # Calibration: each prompt's w chosen from its class-hit rates on the held-out noise.
  calib = json.load(open(os.path.join(workdir, "calibration.json")))
  from cf3d_jax.calibrate import choose_scales
  chosen, _ = choose_scales(calib["lesion_volume_ml"], [1.0, 3.0], [0, 1, 2])
  assert [calib["chosen_scale"][p] for p in prompts] == chosen
  psnr = np.array(calib["psnr_outside_wm_db"], dtype=float)   # None (identical) → nan
  assert psnr.shape == (2, 1, 3) and np.isnan(psnr[:, :, 0]).all()   # the factual vs itself
  assert calib["min_psnr_outside_wm_db"] == 0.0 and calib["below_min_psnr"] == []
  assert index["prompt_effect"]["calibrated"]["guidance_scale"] == calib["chosen_scale"]
  effect = index["prompt_effect"]["g3"]
  assert effect["stat"] == "lesion_volume_ml" and set(effect["mean"]) == set(prompts)
  assert set(effect["class_hit_rate"]) == set(prompts)
  assert all(0 <= v <= 1 for v in effect["class_hit_rate"].values())
  assert os.path.exists(os.path.join(workdir, "samples", "g3", "subject_000.png"))
  # The montages end with a real held-out scan of the factual class, named in the index.
  from cf3d_jax.data import records
  from cf3d_jax.data.export import split_entries
  from cf3d_jax.sample_index import real_comparison
  data_index = records.load_index(os.path.join(workdir, "data", "records"))
  test_ids = [e["subject_id"] for e in split_entries(data_index, "test", 0, (0.7, 0.15, 0.15))]
  assert index["real_comparison"]["split"] == "test"
  assert index["real_comparison"]["subject_id"] in test_ids
  from cf3d_jax.config_base import base_config
  cfg = base_config()
  cfg.data.shape = (16, 16, 16)
  ref = real_comparison(cfg, workdir, prompts[0])
  assert ref["subject_id"] == index["real_comparison"]["subject_id"] and ref["volume"].shape == (16,) * 3
  assert -1 <= ref["volume"].min() and ref["volume"].max() <= 1
  cfg.data.shape = (32, 32, 32)
  assert real_comparison(cfg, workdir, prompts[0]) is None         # not the sampling grid
  assert real_comparison(cfg, str(tmp_path / "empty"), prompts[0]) is None   # no dataset
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  # Re-running sample mode from the same checkpoint reproduces the index exactly, and replaces
  # the whole folder: files of an earlier run (here another guidance scale) do not survive.
  stale = os.path.join(workdir, "samples", "g15", "subject_000", "old.nii.gz")
  os.makedirs(os.path.dirname(stale))
  open(stale, "w").close()
  # The calibrated set decodes each prompt at its own scale: with the scales set by hand to
  # 1 / 3 / 3 its volumes are the plain sets' volumes of those scales.
  calib["chosen_scale"] = dict(zip(prompts, [1.0, 3.0, 3.0]))
  with open(os.path.join(workdir, "calibration.json"), "w") as f:
    json.dump(calib, f)
  again = run_cli(["--config=configs/demo.py:smoke", f"--workdir={workdir}", "--mode=sample",
                   *calibrated])
  assert again.returncode == 0, again.stderr[-3000:]
  index2 = json.load(open(os.path.join(workdir, "samples", "index.json")))
  plain = [i for i in index["items"] if "set" not in i]
  assert [i for i in index2["items"] if "set" not in i] == plain
  assert index2["prompt_effect"]["g3"] == index["prompt_effect"]["g3"]
  for item in (i for i in index2["items"] if i.get("set") == "calibrated"):
    w = item["guidance_scale"]
    assert w == calib["chosen_scale"][item["prompt"]]
    same = item["nifti"].replace("calibrated/", f"g{w:g}/")
    np.testing.assert_array_equal(
        np.asarray(nib.load(os.path.join(workdir, "samples", item["nifti"])).dataobj),
        np.asarray(nib.load(os.path.join(workdir, "samples", same)).dataobj))
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
      "calibrated", "g1", "g3", "index.json"]
  assert not [n for n in os.listdir(workdir) if n.startswith(".tmp-")]
  # Real-subject counterfactuals: invert two scans (comma-separated), decode under every prompt.
  # With sample.calibrate, --mode=all (prepare and training already done) first calibrates on
  # validation phantoms (calibration_scans.json), then adds the calibrated set.
  scans = [os.path.join(workdir, "samples", index["items"][i]["nifti"]) for i in (0, 2)]
  proc = run_cli(["--config=configs/demo.py:smoke", f"--workdir={workdir}", "--mode=all",
                  "--config.sample.source=" + ",".join(scans),
                  "--config.sample.guidance_scales=(1.0,3.0)",
                  "--config.sample.guidance_negative=factual", *calibrated[:2],
                  "--config.sample.calibration_noises=2"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  real = json.load(open(os.path.join(workdir, "samples_source", "index.json")))
  assert [s["path"] for s in real["sources"]] == scans
  assert all(s["factual_prompt"] == prompts[0] for s in real["sources"])
  assert all(np.isfinite(s["reconstruction_psnr_db"]) for s in real["sources"])
  scan_cal = json.load(open(os.path.join(workdir, "calibration_scans.json")))
  assert scan_cal["scans"]["split"] == "val" and len(set(scan_cal["scans"]["class"])) == 2
  # Per factual class, each prompt's w chosen on that class's validation scans alone.
  values = np.asarray(scan_cal["lesion_volume_ml"])
  for k, c in enumerate(scan_cal["scans"]["class"]):
    chosen, _ = choose_scales(values[:, [k]], [1.0, 3.0], [0, 1, 2], factual=c)
    assert [scan_cal["chosen_scale"][prompts[c]][p] for p in prompts] == chosen
  assert scan_cal["settings"]["inversion_depth"] == 1.0
  assert real["calibration"] == {"file": "calibration_scans.json", "num_scans": 2}
  # The given scans' factual prompt is "minimal": its row of the choice applies.
  assert real["prompt_effect"]["calibrated"]["guidance_scale"] == scan_cal["chosen_scale"][prompts[0]]
  assert len(real["items"]) == 2 * 3 * 3           # scales 1 and 3, and the calibrated set
  for item in (i for i in real["items"] if i.get("set") == "calibrated"):
    same = item["nifti"].replace("calibrated/", f"g{item['guidance_scale']:g}/")
    np.testing.assert_allclose(
        np.asarray(nib.load(os.path.join(workdir, "samples_source", item["nifti"])).dataobj),
        np.asarray(nib.load(os.path.join(workdir, "samples_source", same)).dataobj), atol=1e-5)
  for item in real["items"]:
    assert os.path.exists(os.path.join(workdir, "samples_source", item["nifti"]))
    assert np.isfinite(item["psnr_vs_input_db"])
  assert os.path.exists(os.path.join(workdir, "samples_source", "calibrated", "subject_001",
                                     "input.nii.gz"))
  assert os.path.exists(os.path.join(workdir, "samples_source", "g3", "subject_001.png"))
  assert index["guidance"]["negative"] == "null" and real["guidance"]["negative"] == "factual"
  # Edit-friendly inversion: the factual decode retraces each scan exactly (DDIM inversion
  # only approximately); edits stay inside the template WM.
  proc = run_cli(["--config=configs/demo.py:smoke", f"--workdir={workdir}", "--mode=sample",
                  "--config.sample.source=" + ",".join(scans),
                  "--config.sample.guidance_scales=(3.0,)", "--config.sample.inversion=edit_friendly",
                  "--config.sample.guidance_negative=factual", "--config.sample.edit_mask=template_wm"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  ef = json.load(open(os.path.join(workdir, "samples_source", "index.json")))
  assert ef["inversion"]["method"] == "edit_friendly"
  assert min(s["reconstruction_psnr_db"] for s in ef["sources"]) > 60
  assert ef["mean_reconstruction_psnr_db"] > real["mean_reconstruction_psnr_db"]
  for item in ef["items"]:
    x = np.asarray(nib.load(os.path.join(workdir, "samples_source", item["nifti"])).dataobj)
    given = np.asarray(nib.load(scans[item["subject"]]).dataobj)
    if item["prompt"] == prompts[0]:
      np.testing.assert_allclose(x, given, atol=1e-3)


def test_demo_switches_to_rectified_flow_with_one_override(tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_cli(["--config=configs/demo.py:smoke", f"--workdir={workdir}", "--mode=all",
                  "--config.objective.name=rflow"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  index = json.load(open(os.path.join(workdir, "samples", "index.json")))
  assert len(index["items"]) == 1 * 3 * 2
  for item in index["items"]:
    data = np.asarray(nib.load(os.path.join(workdir, "samples", item["nifti"])).dataobj)
    assert data.shape == (16, 16, 16) and np.isfinite(data).all()
  # A source CSV gives each scan its factual prompt from its clinical value; a missing scan is
  # an error naming the CSV row, and nothing is written.
  scan = os.path.join(workdir, "samples", index["items"][0]["nifti"])
  csv_path = tmp_path / "sources.csv"
  csv_path.write_text(f"path,lesion_volume_ml\n{scan},30\n")
  rflow = ["--config=configs/demo.py:smoke", f"--workdir={workdir}", "--mode=sample",
           "--config.objective.name=rflow"]
  proc = run_cli(rflow + [f"--config.sample.source={csv_path}",
                          "--config.sample.guidance_scales=(3.0,)"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  real = json.load(open(os.path.join(workdir, "samples_source", "index.json")))
  assert real["objective"] == "rflow"
  assert real["sources"][0]["factual_prompt"] == "Subject has high lesion load."
  assert {i["guidance_scale"] for i in real["items"]} == {3.0}
  csv_path.write_text("path,lesion_volume_ml\nmissing.nii.gz,30\n")
  os.remove(os.path.join(workdir, "samples_source", "index.json"))
  proc = run_cli(rflow + [f"--config.sample.source={csv_path}"])
  assert proc.returncode == 2 and "sources.csv row 2" in proc.stderr and "not found" in proc.stderr
  assert not os.path.exists(os.path.join(workdir, "samples_source", "index.json"))


def test_misspelt_config_key_is_an_error_naming_it(tmp_path):
  proc = run_cli(["--config=configs/demo.py:smoke", f"--workdir={tmp_path}",
                  "--config.train.num_step=3"])
  assert proc.returncode != 0
  assert "num_step" in proc.stderr
  assert os.listdir(tmp_path) == []


def test_unknown_prompt_is_an_error_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  proc = run_cli(["--config=configs/demo.py:smoke", f"--workdir={workdir}", "--mode=prepare",
                  "--config.sample.prompts=('Subject has purple lesions.',)"])
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Subject has purple lesions." in proc.stderr
  assert not os.path.exists(workdir / "data" / "records")


def _manifest(tmp_path, rows):
  lines = ["path,subject_id,lesion_volume_ml"] + [",".join(r) for r in rows]
  path = tmp_path / "scans.csv"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _scan(path, nan=False):
  data = np.random.default_rng(0).uniform(0, 100, (20, 20, 20)).astype(np.float32)
  if nan:
    data[3, 3, 3] = np.nan
  nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
  return str(path)


def test_bad_scan_in_manifest_fails_cleanly_or_is_skipped(tmp_path):
  good = _scan(tmp_path / "good.nii.gz")
  bad = _scan(tmp_path / "bad.nii.gz", nan=True)
  manifest = _manifest(tmp_path, [(good, "a", "3.5"), (bad, "b", "30")])
  args = ["--config=configs/demo.py:smoke", "--mode=prepare", "--config.data.source=manifest",
          f"--config.data.manifest={manifest}"]
  workdir = tmp_path / "fail"
  proc = run_cli(args + [f"--workdir={workdir}"])
  assert proc.returncode == 2
  assert "bad.nii.gz" in proc.stderr and "row 3" in proc.stderr and "NaN/Inf" in proc.stderr
  assert not os.path.exists(workdir / "data" / "records")
  assert os.listdir(workdir / "data" / "records.staging") == ["staging.json"]  # no shard
  workdir = tmp_path / "skip"
  proc = run_cli(args + [f"--workdir={workdir}", "--on_error=skip"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  index = json.load(open(workdir / "data" / "records" / "dataset.json"))
  assert [r["subject_id"] for r in index["records"]] == ["a"]
  assert index["skipped"][0]["row"] == 3 and "NaN/Inf" in index["skipped"][0]["error"]
  assert index["summary"]["rows"] == 2 and index["summary"]["skipped"] == 1
  assert "1 records from 2 manifest rows; 1 skipped" in proc.stdout
  assert "skipped " in proc.stdout and "scans.csv row 3" in proc.stdout and "bad.nii.gz" in proc.stdout


def test_manifest_missing_column_and_bad_value(tmp_path):
  path = tmp_path / "m.csv"
  path.write_text("path,subject\nx.nii.gz,a\n")
  proc = run_cli(["--config=configs/demo.py:smoke", f"--workdir={tmp_path / 'w'}",
                  "--mode=prepare", "--config.data.source=manifest",
                  f"--config.data.manifest={path}"])
  assert proc.returncode == 2 and "lacks column" in proc.stderr and "m.csv" in proc.stderr
  good = _scan(tmp_path / "g.nii.gz")
  manifest = _manifest(tmp_path, [(good, "a", "-4")])
  proc = run_cli(["--config=configs/demo.py:smoke", f"--workdir={tmp_path / 'w2'}",
                  "--mode=prepare", "--config.data.source=manifest",
                  f"--config.data.manifest={manifest}"])
  assert proc.returncode == 2 and "row 2" in proc.stderr and "-4" in proc.stderr
