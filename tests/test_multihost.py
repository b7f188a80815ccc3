"""Two processes joined by jax.distributed on 127.0.0.1 train, checkpoint, restore, sample, and
agree with a one-process run (launch/local_multiprocess.sh, the script a user runs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np

from conftest import ROOT, load_config

# Two processes (mesh (2, 1, 1): each feeds its own rows) against one device: the gradients are
# all-reduced across processes instead of summed on one device, so they agree to float32
# rounding; after 4 AdamW steps (lr 2e-3 → the step is ~lr·sign(grad)) the parameters agree to
# 1e-5 absolute (observed: ~1e-7) and the losses to 1e-5 relative.
PARAM_ATOL = 1e-5
STEPS = 4
# Sampled volumes (3 DDIM steps, images in [-1, 1]): partitioned vs one device, observed ~1e-7.
SAMPLE_ATOL = 1e-5


def _launch(workdir: str, *flags: str, mode: str = "train") -> None:
  env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
  proc = subprocess.run(
      ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2",
       "configs/demo.py:smoke", workdir, mode, "--config.mesh.shape=2,1,1",
       f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=2", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  logs = "".join(open(os.path.join(workdir, f"log.proc{i}.txt")).read()[-3000:]
                 for i in range(2) if os.path.exists(os.path.join(workdir, f"log.proc{i}.txt")))
  assert proc.returncode == 0, proc.stderr[-3000:] + logs
  for i in range(2):
    log = open(os.path.join(workdir, f"log.proc{i}.txt")).read()
    if mode in ("train", "all"):
      assert f"process {i} of 2" in log, log[-2000:]   # train.py logs its place in the job


def _restore(workdir: str, step: int, config) -> dict:
  """The step-`step` train state of `workdir`, restored onto this process's one device."""
  from cf3d_jax import checkpoints, parallel, train
  from cf3d_jax.data.prepare import data_paths
  from cf3d_jax.text.table import load_table
  model, _, _ = checkpoints.build_components(config)
  table = load_table(data_paths(workdir)["table"])
  mesh = parallel.make_mesh((1, 1, 1))
  abstract = checkpoints.abstract_state(model, train.make_optimizer(config.train), config,
                                        table.embeddings.shape[1:], mesh)
  mngr = checkpoints.checkpoint_manager(workdir, config.train)
  return jax.device_get(checkpoints.restore_state(mngr, abstract, step=step))


def _assert_close(a: dict, b: dict, what: str) -> None:
  assert int(a["step"]) == int(b["step"]) == STEPS
  for part in ("params", "ema"):
    for x, y in zip(jax.tree.leaves(a[part]), jax.tree.leaves(b[part])):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=PARAM_ATOL,
                                 err_msg=f"{what}: {part}")


def test_two_processes_train_checkpoint_restore_and_match_one_process(prepared_data, tmp_path):
  config = load_config()
  config.train.num_steps = STEPS
  config.train.checkpoint_every = 2
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  for d in (one, two):
    shutil.copytree(os.path.join(prepared_data, "data"), os.path.join(d, "data"))
  # Two processes, straight to step 4 (checkpoints 2 and 4, written by both hosts).
  _launch(two)
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["2", "4"]
  straight = _restore(two, STEPS, config)
  # Kill after step 2: both hosts restore step 2 (state and their data iterators) and go on to
  # step 4, then sample (one launch of --mode=all, so one start-up for both): both processes
  # restore the checkpoint sharded onto the 2-device mesh, each holds half of every sampler
  # batch, process 0 writes.
  shutil.rmtree(os.path.join(two, "checkpoints", str(STEPS)))
  _launch(two, "--config.sample.guidance_scales=(1.0,)", mode="all")
  resumed = _restore(two, STEPS, config)
  # The same job in this one process, on one device.
  from cf3d_jax import train
  single = jax.device_get(train.train_and_evaluate(config, one))
  _assert_close(straight, single, "two processes vs one")
  _assert_close(resumed, single, "two processes resumed vs one")
  # The two processes' samples equal a one-process run's.
  from cf3d_jax.sample import sample_counterfactuals
  config.sample.guidance_scales = (1.0,)
  one_index = sample_counterfactuals(config, one)
  two_index = json.load(open(os.path.join(two, "samples", "index.json")))
  assert [e["nifti"] for e in two_index["items"]] == [e["nifti"] for e in one_index["items"]]
  assert len(two_index["items"]) == 3
  for e in one_index["items"]:
    a = nib.load(os.path.join(one, "samples", e["nifti"])).get_fdata()
    b = nib.load(os.path.join(two, "samples", e["nifti"])).get_fdata()
    np.testing.assert_allclose(b, a, rtol=0, atol=SAMPLE_ATOL, err_msg=e["nifti"])
