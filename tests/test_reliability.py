"""Reliability (issue 14): values that would destroy work fail validation before anything is
written, a given path is never ignored, and input problems are one line with exit status 2."""

from __future__ import annotations

import errno
import os

import pytest

from cf3d_jax import config_base, config_ranges, config_reference
from cf3d_jax.errors import ConfigError, DataError
from conftest import load_config, run_cli
import pool_workers


# ---- item 4: range checks for every key, in one pass before any mode writes ------------------
BAD_VALUES = [
    ("train.max_to_keep", 0), ("train.log_every", 0), ("train.checkpoint_every", 0),
    ("train.learning_rate", -1e-4), ("objective.beta_end", 1.5), ("space.lll_scale", 0.0),
    ("sample.batch_size", 0), ("eval.guidance_scales", ()), ("seed", -1),
    ("data.fov_mm", -192.0), ("train.batch_size", 0), ("train.grad_clip_norm", -1.0),
    ("objective.num_train_steps", 0), ("sample.guidance_scales", ()), ("data.shape", (16, 16)),
    ("model.dropout", 1.0), ("classifier.eval_every", 0), ("autoencoder.max_to_keep", 0),
    ("mesh.shape", (0, 1, 1)), ("objective.sampler", "dpm"), ("train.learning_rate", float("nan")),
]


@pytest.mark.parametrize("key,value", BAD_VALUES)
def test_value_out_of_range_is_a_config_error_naming_the_key(key, value):
  c = load_config()
  section, _, name = key.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(ConfigError, match=f"config.{key}="):
    config_base.validate(c)


def test_every_key_has_a_range_and_the_reference_shows_it():
  c = config_base.base_config()
  leaves = {".".join(k) for k in config_reference.leaf_paths(c)}
  assert leaves == set(config_ranges.RANGES)
  assert "| `train.max_to_keep` | `3` | checkpoints kept | an int >= 1 |" in \
      config_reference.reference_markdown()


def test_all_problems_are_listed_at_once():
  c = load_config()
  c.train.log_every, c.seed = 0, -3
  with pytest.raises(ConfigError) as e:
    config_base.validate(c)
  assert "config.seed=-3" in str(e.value) and "config.train.log_every=0" in str(e.value)


def test_unet_grid_is_checked_for_the_diffusion_modes():
  c = load_config()
  c.data.shape = (20, 20, 20)              # 10³ subbands: not divisible by 2**2 levels
  config_base.validate(c)                  # fine for prepare / the autoencoder's modes
  with pytest.raises(ConfigError, match=r"config.data.shape=\(20, 20, 20\).*divisible by 8"):
    config_base.validate(c, "all")


def test_preflight_writes_nothing(tmp_path):
  from cf3d_jax.modes import run
  c = load_config()
  c.data.shape = (20, 20, 20)
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match="data.shape"):
    run(c, str(workdir), "all")
  c = load_config()
  c.mesh.shape = (2, 1, 1)                  # one CPU device here
  with pytest.raises(ConfigError, match="mesh.shape"):
    run(c, str(workdir), "train")
  assert not workdir.exists()
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(ConfigError, match="is a file"):
    run(load_config(), str(afile), "prepare")


# ---- item 2: a manifest path is never ignored -------------------------------------------------
def test_manifest_without_manifest_source_is_an_error():
  c = load_config()
  c.data.manifest = "scans.csv"
  with pytest.raises(ConfigError, match="data.manifest='scans.csv'.*data.source=manifest"):
    config_base.validate(c)


# ---- item 8: one line, exit 2 ------------------------------------------------------------------
def test_missing_checkpoint_step_names_the_saved_steps():
  from cf3d_jax.checkpoints import restore_state

  class Manager:
    directory = "/w/checkpoints"
    def latest_step(self):
      return 4
    def all_steps(self):
      return [2, 4]

  with pytest.raises(DataError, match=r"no checkpoint at step 3.*saved steps: \[2, 4\]"):
    restore_state(Manager(), {}, step=3)


def test_os_errors_are_one_line_naming_the_file():
  from cf3d_jax.main import os_error_message
  full = os_error_message(OSError(errno.ENOSPC, "No space left on device", "/w/ckpt"))
  assert full.startswith("/w/ckpt: no space left") and "\n" not in full


def test_cli_input_problems_are_one_line_exit_2(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  for args, words in [
      (["--config.train.num_step=3"], ["num_step", "num_steps"]),
      (["--config.train.max_to_keep=0"], ["config.train.max_to_keep=0", ">= 1"]),
      (["--config.data.manifest=scans.csv"], ["data.source=manifest"])]:
    proc = run_cli(["--config=configs/demo.py:smoke", f"--workdir={tmp_path / 'w'}", *args])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert all(w in lines[0] for w in words), lines[0]
  proc = run_cli(["--config=configs/demo.py:smoke", f"--workdir={afile}", "--mode=prepare"])
  assert proc.returncode == 2 and "is a file" in proc.stderr
  assert not os.path.exists(tmp_path / "w")


# ---- item 1: a workdir never mixes configs --------------------------------------------------
def test_prepare_refuses_records_made_with_other_data_keys(workdir_with_data):
  from cf3d_jax.data.prepare import prepare
  c = load_config()
  prepare(c, workdir_with_data)                          # same config: reused
  c.data.fov_mm, c.text.table = 150.0, "builtin:adni_minilm"
  with pytest.raises(ConfigError) as e:
    prepare(c, workdir_with_data)
  assert "data.fov_mm: 192.0 → 150.0" in str(e.value)
  assert "text.table: 'builtin:ms_minilm' → 'builtin:adni_minilm'" in str(e.value)
  assert "allow_config_change" in str(e.value)
  c = load_config()
  c.data.shape = (32, 32, 32)
  c.train.allow_config_change = ("data.shape",)
  with pytest.raises(ConfigError, match=r"data.shape: \[16, 16, 16\] → \[32, 32, 32\].*cannot"):
    prepare(c, workdir_with_data)
  c = load_config()
  c.seed = 5
  c.train.allow_config_change = ("seed",)
  prepare(c, workdir_with_data)                          # allowed explicitly: the old records


def _checkpoint(workdir, config, step=4):
  import orbax.checkpoint as ocp
  import numpy as np
  from cf3d_jax import fingerprint
  from cf3d_jax.checkpoints import checkpoint_manager
  mngr = checkpoint_manager(workdir, config.train)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"step": np.int32(step)}),
      meta=ocp.args.JsonSave({"step": step, "seed": config.seed,
                              "config": fingerprint.record(config, "model", "recipe")})))
  mngr.wait_until_finished()
  return mngr


def test_resume_and_sample_refuse_a_checkpoint_of_another_config(tmp_path):
  from cf3d_jax.checkpoints import check_checkpoint_config
  c = load_config()
  mngr = _checkpoint(str(tmp_path), c)
  check_checkpoint_config(c, mngr, None, ("model", "recipe"))
  c.objective.name, c.train.learning_rate, c.seed = "rflow", 0.5, 7
  with pytest.raises(ConfigError) as e:
    check_checkpoint_config(c, mngr, None, ("model", "recipe"), where="runs/x")
  message = str(e.value)
  assert message.startswith("runs/x was made with another config:")
  for part in ("objective.name: 'ddpm' → 'rflow'", "train.learning_rate: 0.002 → 0.5",
               "seed: 0 → 7"):
    assert part in message
  with pytest.raises(ConfigError, match="objective.name"):   # sampling: the wrong sampler
    check_checkpoint_config(c, mngr, -1, ("model",))
  c.train.allow_config_change = ("train.learning_rate", "seed", "objective.name")
  check_checkpoint_config(c, mngr, None, ("model", "recipe"))  # fine-tuning, explicitly
  c = load_config()
  c.model.base_channels = 16
  c.train.allow_config_change = ("model.base_channels",)
  with pytest.raises(ConfigError, match=r"model.base_channels: 8 → 16.*cannot be allowed"):
    check_checkpoint_config(c, mngr, None, ("model",))
  c.train.allow_config_change = ("model.no_such_key",)
  with pytest.raises(ConfigError, match="train.allow_config_change"):
    config_base.validate(c)


# ---- item 3: nothing is written outside the output folder ------------------------------------
def test_manifest_rejects_ids_that_act_as_paths(tmp_path):
  from cf3d_jax.data.ingest import read_manifest
  for bad in ("../../escaped", "/tmp/x/abs", "a\\b", "..", "~root"):
    path = tmp_path / "m.csv"
    path.write_text(f"path,subject_id,lesion_volume_ml\nscan.nii.gz,{bad},3\n")
    with pytest.raises(DataError, match=r"m.csv row 2: subject_id"):
      read_manifest(str(path), "ms")
  path.write_text("path,subject_id,lesion_volume_ml\na.nii.gz,s1,3\nb.nii.gz,../s2,30\n")
  rows = read_manifest(str(path), "ms", collect_errors=True)    # skip mode: the row is skipped
  assert "error" not in rows[0] and "subject_id '../s2'" in rows[1]["error"]


def test_export_names_files_by_slug_inside_the_output_folder(tmp_path):
  import csv
  import numpy as np
  from cf3d_jax.data import records
  from cf3d_jax.data.export import export_split
  from cf3d_jax.files import check_inside
  ids = ["../../escaped", "/tmp/x/abs", "dup", "dup"]          # e.g. data prepared before the checks
  recs = [{"volume": np.zeros((4, 4, 4, 1), np.float32), "affine": np.eye(4), "subject_id": s,
           "label": i % 3, "clinical_value": float(i)} for i, s in enumerate(ids)]
  data_dir = str(tmp_path / "data")
  records.write_dataset(data_dir, recs, 8, {"dataset": "ms", "shape": [4, 4, 4]})
  out = tmp_path / "deep" / "out"
  csv_path = export_split(data_dir, "train", str(out), fractions=(1.0, 0.0, 0.0))
  rows = list(csv.DictReader(open(csv_path)))
  assert len(rows) == 4 and len({r["path"] for r in rows}) == 4    # no file overwritten
  assert sorted(os.listdir(out)) == sorted([r["path"] for r in rows] + ["sources.csv"])
  assert not (tmp_path / "escaped.nii.gz").exists() and not os.path.exists("/tmp/x/abs.nii.gz")
  with pytest.raises(DataError, match="outside the output folder"):
    check_inside(str(out / ".." / "x.nii.gz"), str(out))


# ---- item 6: NaN never reaches a checkpoint -----------------------------------------------------
def test_non_finite_grad_norm_at_a_save_step_is_refused_naming_the_last_good_step():
  import jax.numpy as jnp
  from cf3d_jax.errors import Cf3dError
  from cf3d_jax.train import check_finite, track_finite
  ok = jnp.ones((), bool)
  good = {"loss": jnp.float32(0.3), "grad_norm": jnp.float32(1.0)}
  ok = track_finite(ok, good)
  check_finite(ok, good, 100, 0)
  # A NaN between two checks is remembered on device, even if later metrics are finite.
  bad = {"loss": jnp.float32(0.3), "grad_norm": jnp.float32(jnp.nan)}
  ok = track_finite(track_finite(ok, bad), good)
  with pytest.raises(Cf3dError, match=r"diverged by step 200.*last good checkpoint is step 100"):
    check_finite(ok, good, 200, 100)


# ---- item 7: one job per workdir; SIGTERM saves and stops ----------------------------------------
def test_workdir_lock_names_the_holder_and_dies_with_it(tmp_path):
  import signal
  import subprocess
  import sys
  import time
  from cf3d_jax.files import workdir_lock
  with workdir_lock(tmp_path):
    with pytest.raises(ConfigError, match=rf"in use by pid {os.getpid()} on host"):
      with workdir_lock(tmp_path):
        pass
  with workdir_lock(tmp_path):                      # released: taken again
    pass
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from cf3d_jax.files import workdir_lock\n"
       "with workdir_lock(sys.argv[1]):\n  print('held', flush=True); time.sleep(60)",
       str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(__file__) + "/..")
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(ConfigError, match=rf"pid {holder.pid}"):
    with workdir_lock(tmp_path):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with workdir_lock(tmp_path):                      # kill -9 leaves no stale lock
    pass


def test_sigterm_sets_the_stop_flag_instead_of_killing():
  import signal
  from cf3d_jax.train import preemption_signal
  before = signal.getsignal(signal.SIGTERM)
  with preemption_signal() as stop:
    assert not stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop()
  assert signal.getsignal(signal.SIGTERM) == before


# ---- item 9: debris of killed writes is recovered or removed -------------------------------------
def test_preemption_in_real_training_resumes_bit_identically(prepared_data, tmp_path):
  """Separate trainer processes (`cf3d_jax.resume_check`, the script users run with 10 trials
  of `kill -9` and SIGTERM): SIGTERM right after a checkpoint commits makes the step in flight
  finish, be saved, and the process exit 143; a resume to the end gives the final state and
  data position of an uninterrupted run bit for bit. (`kill -9` resumption is checked in
  process by tests/test_train.py and across processes by the script.)"""
  from cf3d_jax import resume_check
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  data = os.path.join(prepared_data, "data")
  steps, every = 20, 5
  reference, _, _ = resume_check.reference_run(str(tmp_path / "ref"), data, steps, every, root)
  assert reference[0] == steps
  trial = resume_check.run_trial(str(tmp_path / "trial"), data, steps, every, [0.0], ["TERM"],
                                 root, 900.0)
  (termed,) = trial["runs"]
  log = open(str(tmp_path / "trial" / "train.log")).read()
  assert termed["exit"] == 143, log[-3000:]
  assert 0 < termed["latest_checkpoint"] < steps
  assert f"stopped by SIGTERM at step {termed['latest_checkpoint']}" in log
  assert resume_check.compare(reference, resume_check.final_state(str(tmp_path / "trial"))) == []


def test_atomic_dir_recovers_a_kill_between_its_renames(tmp_path):
  from cf3d_jax.files import atomic_dir
  target = tmp_path / "records"
  (tmp_path / ".tmp-records-abc.old").mkdir()          # killed after `path → .old`
  (tmp_path / ".tmp-records-abc.old" / "dataset.json").write_text("old")
  with atomic_dir(target) as tmp:
    assert (target / "dataset.json").read_text() == "old"   # the old folder is back first
    open(os.path.join(tmp, "dataset.json"), "w").write("new")
  assert (target / "dataset.json").read_text() == "new"
  assert sorted(os.listdir(tmp_path)) == ["records"]


def test_unfinished_orbax_saves_are_removed(tmp_path):
  from cf3d_jax.checkpoints import remove_unfinished_saves
  folder = tmp_path / "checkpoints"
  (folder / "4").mkdir(parents=True)
  (folder / "6.orbax-checkpoint-tmp-1733").mkdir()
  assert remove_unfinished_saves(str(folder)) == ["6.orbax-checkpoint-tmp-1733"]
  assert os.listdir(folder) == ["4"]


# ---- item 5: a size cap from the header; any per-row failure is a recorded skip ------------------
def test_scan_header_is_checked_before_reading(tmp_path):
  import nibabel as nib
  import numpy as np
  from cf3d_jax.data import nifti
  path = str(tmp_path / "big.nii.gz")
  nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), path)
  with pytest.raises(DataError, match=r"big.nii.gz: header claims shape \(20, 20, 20\).*max_scan_gb"):
    nifti.load_volume(path, max_bytes=20 ** 3 * 8 - 1)
  assert nifti.load_volume(path, max_bytes=20 ** 3 * 8)[0].shape == (20, 20, 20)
  # The file: a few hundred bytes of gzip whose header claims 512³ float32 (1.07 GB
  # to read) is refused at the default cap without decompressing anything.
  import gzip
  from cf3d_jax import config_base
  hdr = nib.Nifti1Header()
  hdr.set_data_shape((512,) * 3)
  hdr.set_data_dtype(np.float32)
  hdr["vox_offset"] = 352
  path = str(tmp_path / "claims512.nii.gz")
  with gzip.open(path, "wb") as f:
    f.write(hdr.binaryblock + bytes(4 + 4096))
  cap = int(config_base.base_config().data.max_scan_gb * 1e9)
  with pytest.raises(DataError, match=r"claims512.nii.gz: header claims shape \(512, 512, 512\) of "
                                      r"float32 \(1.07 GB"):
    nifti.load_volume(path, max_bytes=cap)
  path = str(tmp_path / "complex.nii.gz")
  nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.complex64), np.eye(4)), path)
  with pytest.raises(DataError, match="complex voxels"):
    nifti.load_volume(path)


def test_memory_error_while_conforming_becomes_a_row_error(monkeypatch):
  from cf3d_jax.data import ingest

  def boom(*args):
    raise MemoryError("cannot allocate 1.13 GB")

  monkeypatch.setattr(ingest, "conform_scan", boom)
  result = ingest._try_conform({"path": "x.nii.gz", "row": 3}, (16,) * 3, 48.0, (0.5, 99.5))
  assert isinstance(result, DataError) and "x.nii.gz: MemoryError" in str(result)


def test_a_dead_prepare_worker_fails_only_its_row_and_the_pool_restarts():
  from cf3d_jax.data import ingest
  # The slow first row is still running when the poison row kills its worker: it must not be
  # blamed for a death that was not its own.
  rows = [{"path": f"scan{i}.nii.gz"} for i in range(7)]
  rows[0]["path"], rows[1]["path"] = "slow.nii.gz", "poison.nii.gz"
  pool = ingest._Pool(2, (), fn=pool_workers.conform_or_die)
  try:
    out = list(pool.results(rows))
  finally:
    pool.close()
  assert [r["path"] for r, _ in out] == [r["path"] for r in rows]   # every row, in order
  for row, result in out:
    if row["path"] == "poison.nii.gz":
      assert isinstance(result, DataError) and "poison.nii.gz: the worker process died" in str(result)
    else:   # the rows in flight when the worker died were run again, not blamed
      assert result == ("ok", row["path"])


def test_tpu_pod_launcher_quotes_config_and_workdir(tmp_path):
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "gcloud").write_text('#!/usr/bin/env bash\nfor a in "$@"; do case "$a" in '
                               '--command=*) printf "%s" "${a#--command=}";; esac; done\n')
  (fake / "gcloud").chmod(0o755)
  env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
  proc = subprocess.run(["bash", os.path.join(root, "launch", "tpu_pod.sh"), "tpu", "zone",
                         "v5e-8", "configs/demo.py", "w; touch PWNED", "train"],
                        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=30)
  assert proc.returncode == 0, proc.stderr
  command = proc.stdout
  assert "--workdir=w\\;\\ touch\\ PWNED" in command and "; touch PWNED" not in command
