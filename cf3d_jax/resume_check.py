"""Kill training at random moments, resume it, and check the final state is bit-identical.

    python -m cf3d_jax.resume_check --workdir=runs/resume_check --trials=10

The check a user runs to trust resumption on their machine (docs/reliability.md). It trains the
smoke config (`configs/demo.py:smoke`, 16³, a few seconds per run after compile) as separate
`python -m cf3d_jax.main --mode=train` processes:

1. `WORKDIR/data`: phantoms prepared once (`--mode=prepare`), copied into every run below.
2. `WORKDIR/reference`: one uninterrupted run of `--steps` steps.
3. `WORKDIR/trial_NN`: per trial, start training, send the signal at a random moment drawn
   from `--seed`, and start again — `--kills` times — then let the last run finish.
   `--signal=KILL` is `kill -9`, sent uniformly between 0 and the reference's wall time, so
   kills land during start-up, compile, steps and checkpoint writes alike (nothing runs in the
   process: a resume starts from the last committed checkpoint). `--signal=TERM` is a
   scheduler's preemption, sent once the run has committed a checkpoint, uniformly within the
   reference's training span (the step in flight finishes, a checkpoint is saved at that step
   and the process exits with status 143). `mixed` alternates them.
4. Per trial: the final checkpoint (`params`, `opt_state`, `ema`, `step`) and the data
   iterator position must equal the reference's exactly, array by array.

Prints one line per trial and a summary; writes `WORKDIR/resume_check.json`. Exit status 0
when every trial is bit-identical, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Sequence

import numpy as np
from absl import app, flags

from cf3d_jax.files import write_text
from cf3d_jax.workdir import Workdir

SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}


def train_command(workdir: str, steps: int, every: int, extra: Sequence[str] = ()) -> list[str]:
  """The trainer's command line: the smoke config run for `steps` steps, saving every `every`."""
  return [sys.executable, "-m", "cf3d_jax.main", "--config=configs/demo.py:smoke",
          f"--workdir={workdir}", "--mode=train", f"--config.train.num_steps={steps}",
          f"--config.train.checkpoint_every={every}", f"--config.train.log_every={every}",
          *extra]


def _run(cmd: list[str], log: str, cwd: str) -> subprocess.Popen:
  with open(log, "ab") as f:
    return subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def final_state(workdir: str) -> tuple[int, dict, str]:
  """(step, {leaf path: array} of the latest checkpoint's state, its data iterator json)."""
  import jax
  import orbax.checkpoint as ocp
  ckpt = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())
  if not steps:
    raise RuntimeError(f"{ckpt}: no checkpoint")
  tree = ocp.StandardCheckpointer().restore(os.path.join(ckpt, str(steps[-1]), "state"))
  leaves = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  with open(os.path.join(ckpt, str(steps[-1]), "data", "process_0-of-1.json")) as f:
    data = f.read()
  return steps[-1], leaves, data


def compare(reference: tuple[int, dict, str], other: tuple[int, dict, str]) -> list[str]:
  """What differs between two `final_state`s (empty when bit-identical)."""
  diffs = []
  if reference[0] != other[0]:
    diffs.append(f"final step {other[0]} != {reference[0]}")
  if set(reference[1]) != set(other[1]):
    diffs.append("different state leaves")
  for k in sorted(set(reference[1]) & set(other[1])):
    a, b = reference[1][k], other[1][k]
    if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
      diffs.append(f"{k} differs")
  if json.loads(reference[2]) != json.loads(other[2]):
    diffs.append(f"data iterator {other[2].strip()} != {reference[2].strip()}")
  return diffs


def saved_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps of a workdir (orbax's unfinished `*.orbax-checkpoint-tmp*`
  folders are not digits), ascending."""
  ckpt = Workdir(workdir).checkpoints
  return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) if os.path.isdir(ckpt) else []


def wait_for_new_checkpoint(proc: subprocess.Popen, workdir: str, timeout: float) -> float:
  """Polls until the run commits a checkpoint beyond those present now (or exits); returns the
  seconds waited."""
  before, t0 = saved_steps(workdir), time.time()
  while proc.poll() is None and time.time() - t0 < timeout:
    now = saved_steps(workdir)
    if now and (not before or now[-1] > before[-1]):
      break
    time.sleep(0.05)
  return time.time() - t0


def run_trial(workdir: str, data: str, steps: int, every: int, delays: Sequence[float],
              signals: Sequence[str], root: str, timeout: float,
              anchors: Sequence[str] | None = None) -> dict:
  """One trial: interrupt once per (delay, signal), then run to the end. A delay counts from
  its anchor: 'start' (the process start; KILL's default) or 'checkpoint' (the run's first new
  committed checkpoint; TERM's default). Returns a record of every interrupted run (when,
  signal, exit status, last checkpoint after it)."""
  anchors = anchors or ["checkpoint" if n == "TERM" else "start" for n in signals]
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.copytree(data, Workdir(workdir).data)
  log = os.path.join(workdir, "train.log")
  runs = []
  for delay, name, anchor in zip(delays, signals, anchors):
    t0 = time.time()
    proc = _run(train_command(workdir, steps, every), log, root)
    if anchor == "checkpoint":
      wait_for_new_checkpoint(proc, workdir, timeout)
    try:
      proc.wait(delay)
    except subprocess.TimeoutExpired:
      proc.send_signal(SIGNALS[name])
    sent = time.time() - t0
    rc = proc.wait(timeout)
    saved = saved_steps(workdir)
    runs.append({"signal_at_s": round(sent, 2), "signal": name, "exit": rc,
                 "latest_checkpoint": saved[-1] if saved else None})
    if rc == 0:      # finished before the signal: nothing left to interrupt
      break
  else:
    proc = _run(train_command(workdir, steps, every), log, root)
    rc = proc.wait(timeout)
    if rc != 0:
      raise RuntimeError(f"{workdir}: the final resume exited with {rc}; see {log}")
  return {"runs": runs}


def reference_run(ref_dir: str, data: str, steps: int, every: int, root: str,
                  timeout: float = 900.0) -> tuple[tuple[int, dict, str], float, float]:
  """The uninterrupted run: (its `final_state`, wall seconds, seconds to its first checkpoint)."""
  shutil.rmtree(ref_dir, ignore_errors=True)
  shutil.copytree(data, os.path.join(ref_dir, "data"))
  t0 = time.time()
  proc = _run(train_command(ref_dir, steps, every), os.path.join(ref_dir, "train.log"), root)
  startup = wait_for_new_checkpoint(proc, ref_dir, timeout)   # import, compile, first steps
  rc = proc.wait(timeout)
  wall = time.time() - t0
  if rc != 0:
    raise RuntimeError(f"the reference run exited with {rc}; see {ref_dir}/train.log")
  return final_state(ref_dir), wall, startup


def check(workdir: str, trials: int, kills: int, steps: int, every: int, signal_name: str,
          seed: int, root: str = ".", timeout: float = 900.0) -> dict:
  """Runs the whole check (module docstring) and returns its record."""
  os.makedirs(workdir, exist_ok=True)
  data_run = os.path.join(workdir, "prepared")
  if not os.path.isdir(os.path.join(data_run, "data")):
    cmd = [sys.executable, "-m", "cf3d_jax.main", "--config=configs/demo.py:smoke",
           f"--workdir={data_run}", "--mode=prepare"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
      raise RuntimeError(f"prepare failed:\n{proc.stderr[-3000:]}")
  data = os.path.join(data_run, "data")
  reference, ref_wall, startup = reference_run(os.path.join(workdir, "reference"), data, steps,
                                               every, root, timeout)
  rng = np.random.default_rng(seed)
  record = {"steps": steps, "checkpoint_every": every, "signal": signal_name, "seed": seed,
            "reference_wall_s": round(ref_wall, 1),
            "reference_first_checkpoint_s": round(startup, 1), "trials": []}
  for t in range(trials):
    names = [("KILL", "TERM")[(t + i) % 2] if signal_name == "mixed" else signal_name
             for i in range(kills)]
    delays = [rng.uniform(0.0, ref_wall) if n == "KILL" else rng.uniform(0.0, ref_wall - startup)
              for n in names]
    trial = run_trial(os.path.join(workdir, f"trial_{t:02d}"), data, steps, every, delays,
                      names, root, timeout)
    trial["differences"] = compare(reference, final_state(os.path.join(workdir,
                                                                       f"trial_{t:02d}")))
    trial["identical"] = not trial["differences"]
    record["trials"].append(trial)
    print(f"trial {t}: " + ", ".join(
        f"{r['signal']} at {r['signal_at_s']:.1f} s → exit {r['exit']}, resume from "
        f"{r['latest_checkpoint']}" for r in trial["runs"]) +
          (" · final state bit-identical" if trial["identical"] else
           " · DIFFERS: " + "; ".join(trial["differences"][:5])), flush=True)
  record["identical"] = sum(t["identical"] for t in record["trials"])
  write_text(os.path.join(workdir, "resume_check.json"), json.dumps(record, indent=1))
  print(f"{record['identical']} of {trials} trials bit-identical to the uninterrupted run "
        f"({steps} steps, checkpoint every {every}; {os.path.join(workdir, 'resume_check.json')})")
  return record


def define_flags() -> None:
  flags.DEFINE_string("workdir", "runs/resume_check", "Folder for the runs (replaced per trial).")
  flags.DEFINE_integer("trials", 10, "Kill-and-resume trials.")
  flags.DEFINE_integer("kills", 2, "Interruptions per trial before the run may finish.")
  flags.DEFINE_integer("steps", 60, "Training steps of every run.")
  flags.DEFINE_integer("every", 5, "Checkpoint (and log) every this many steps.")
  flags.DEFINE_enum("signal", "KILL", ["KILL", "TERM", "mixed"], "Signal sent to the trainer.")
  flags.DEFINE_integer("seed", 0, "Seed of the kill times.")


def main(argv):
  del argv
  f = flags.FLAGS
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  record = check(os.path.abspath(f.workdir), f.trials, f.kills, f.steps, f.every, f.signal,
                 f.seed, root)
  sys.exit(0 if record["identical"] == f.trials else 1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
