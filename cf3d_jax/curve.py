"""Training curve: prompt faithfulness and realism against training time, one command.

    python -m cf3d_jax.curve --config=configs/demo.py:showcase --workdir=runs/showcase \
        --every=900 --scales=3,7,15 --num_per_prompt=4

Trains the config's model in segments of `--every` steps up to `train.num_steps` (each segment
resumes the last: the optimiser runs at a constant rate after warm-up and the data order depends
only on the seed and the step, so the checkpoints are those of one uninterrupted run), and after
each segment runs `--mode=evaluate` on that checkpoint with the given guidance scales and
evaluation noises per prompt. Per point it records the cumulative training wall time (each
segment's time includes its own compile and restore, a few tens of seconds on a CPU), FID and
FID / floor (the real-train vs real-test FID of the same features), and on phantoms the
class-hit rate over all volumes, the mean change against the first prompt, the ordered fraction
and the PSNR to the factual outside the template white matter.

Outputs in `WORKDIR/curve/`: `curve.json` (every row), `curve.md` (a table) and `curve.png`
(class-hit rate and FID / floor against training minutes, the targets dashed), and `step_NNNNNN/` with each point's
full evaluation (`results.json`, `results.md`). A rerun skips the points already in
`curve.json`, so a killed curve continues where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from cf3d_jax import console
from cf3d_jax.errors import ConfigError
from cf3d_jax.figures import pyplot, save_png
from cf3d_jax.files import write_text
from cf3d_jax.sample_index import set_label, table_cell
from cf3d_jax.workdir import Workdir

CURVE_FORMAT = "cf3d_jax.curve/1"
# Dashed reference lines of the plot: the demo's targets (docs/results.md, "What makes the
# prompt act"): ≥ 90 % of the volumes in their prompted class, FID ≤ 2 × the real-vs-real floor.
TARGET_CLASS_HIT = 0.9
TARGET_FID_VS_FLOOR = 2.0


def segment_config(config, step: int, every: int, scales: Sequence[float],
                   num_per_prompt: int):
  """The config that trains the curve's segment ending at `step` and evaluates it: the same
  run continued (one learning-rate schedule, whose cosine decay ends at the curve's last step,
  not the segment's)."""
  seg = config.copy_and_resolve_references()
  with seg.unlocked():
    seg.train.num_steps = step
    seg.train.lr_decay_steps = config.train.lr_decay_steps or config.train.num_steps
    seg.train.checkpoint_every = every
    seg.sample.checkpoint_step = step
    seg.eval.guidance_scales = tuple(float(s) for s in scales)
    seg.eval.num_per_prompt = num_per_prompt
  return seg


def curve_steps(num_steps: int, every: int) -> list[int]:
  """Evaluation points: every `every` steps up to `num_steps`, `num_steps` always included."""
  if every <= 0 or num_steps <= 0:
    raise ConfigError(f"--every={every} with train.num_steps={num_steps}: both must be > 0")
  steps = list(range(every, num_steps + 1, every))
  return steps if steps and steps[-1] == num_steps else steps + [num_steps]


def curve_row(step: int, train_minutes: float, result: dict) -> dict:
  """One point of the curve from an evaluation `result` (`evaluate.evaluate`'s dict)."""
  row = {"step": step, "train_minutes": round(train_minutes, 2),
         "fid_floor": result.get("fid_floor"), "scales": {}}
  for s in result["scales"]:
    gt = s.get("ground_truth", {})
    row["scales"][f"g{s['guidance_scale']:g}"] = {
        "fid": s["fid"], "fid_vs_floor": s.get("fid_vs_floor"),
        "class_hit_rate_all": gt.get("class_hit_rate_all"),
        "mean": gt.get("mean"), "change_vs_first": gt.get("change_vs_first"),
        "ordered_fraction": gt.get("ordered_fraction"),
        "psnr_outside_wm": gt.get("psnr_outside_wm")}
  return row


def curve_markdown(curve: dict) -> str:
  """The curve as a table: one row per (step, guidance scale)."""
  lines = [f"Training curve of `{curve['config']}` (seed {curve['seed']}, "
           f"{curve['num_per_prompt']} evaluation noises per prompt; FID floor = real train vs "
           "real test). Minutes: cumulative training wall time, each segment's compile included.",
           "",
           "| step | train min | w | mean per prompt | in class | last − first | ordered | "
           "PSNR outside WM | FID | FID / floor |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for row in curve["rows"]:
    for key, s in row["scales"].items():
      means = " / ".join(f"{v:.1f}" for v in (s["mean"] or {}).values()) or "—"
      changes = list((s["change_vs_first"] or {}).values())
      lines.append(
          f"| {row['step']} | {row['train_minutes']:.1f} | {set_label(key)} | {means} | "
          f"{table_cell(s['class_hit_rate_all'], '.0%')} | "
          f"{table_cell(changes[-1] if changes else None, '+.1f')} | "
          f"{table_cell(s['ordered_fraction'], '.0%')} | "
          f"{table_cell(s['psnr_outside_wm'], '.1f')} | "
          f"{table_cell(s['fid'], '.4f')} | {table_cell(s['fid_vs_floor'], '.1f')} |")
  return "\n".join(lines) + "\n"


def plot_curve(curve: dict, path: str) -> None:
  """Class-hit rate and FID / floor against training minutes, one line per guidance scale."""
  plt = pyplot()
  rows = curve["rows"]
  keys = list(rows[0]["scales"]) if rows else []
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
  minutes = [r["train_minutes"] for r in rows]
  for key in keys:
    hit = [r["scales"][key]["class_hit_rate_all"] for r in rows]
    if all(h is not None for h in hit):
      axes[0].plot(minutes, hit, "o-", label=f"w = {set_label(key)}")
    axes[1].plot(minutes, [r["scales"][key]["fid_vs_floor"] or float("nan") for r in rows],
                 "o-", label=f"w = {set_label(key)}")
  axes[0].axhline(TARGET_CLASS_HIT, color="0.6", ls="--", lw=0.8)
  axes[1].axhline(TARGET_FID_VS_FLOOR, color="0.6", ls="--", lw=0.8)
  axes[0].set_ylabel("in prompted class")
  axes[0].set_ylim(0, 1.02)
  axes[1].set_ylabel("FID / floor")
  axes[1].set_yscale("log")
  for ax in axes:
    ax.set_xlabel("training minutes")
    ax.legend(fontsize=7)
  fig.tight_layout()
  save_png(fig, path)


def _load(path: str, header: dict) -> dict:
  """The curve so far at `path`, or a new one; ConfigError if it was made with other settings."""
  if not os.path.exists(path):
    return {**header, "rows": []}
  try:
    curve = json.load(open(path))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: not a readable curve file ({e}); move it away to start over") \
        from e
  old = {k: curve.get(k) for k in header}
  if old != header:
    diff = {k: (old[k], header[k]) for k in header if old[k] != header[k]}
    raise ConfigError(f"{path} was made with other settings {diff} (old, new); use another "
                      "workdir or move the curve folder away")
  return curve


def training_curve(config, workdir: str, config_name: str, every: int,
                   scales: tuple[float, ...], num_per_prompt: int) -> dict:
  """Trains in segments and evaluates after each (see the module docstring); returns the curve."""
  from cf3d_jax import config_base
  from cf3d_jax.data.prepare import prepare
  from cf3d_jax.evaluate import evaluate
  from cf3d_jax.train import train_and_evaluate
  if not scales or num_per_prompt < 2:
    raise ConfigError(f"--scales={scales} --num_per_prompt={num_per_prompt}: need at least one "
                      "scale and two noises per prompt (the diversity column compares pairs)")
  config_base.validate(config)
  steps = curve_steps(config.train.num_steps, every)
  out_dir = Workdir(workdir).curve
  path = os.path.join(out_dir, "curve.json")
  header = {"format": CURVE_FORMAT, "config": config_name, "seed": config.seed, "every": every,
            "scales": [float(s) for s in scales], "num_per_prompt": num_per_prompt}
  curve = _load(path, header)
  done = {r["step"] for r in curve["rows"]}
  minutes = curve["rows"][-1]["train_minutes"] if curve["rows"] else 0.0
  prepare(config, workdir)
  for step in steps:
    if step in done:
      continue
    seg = segment_config(config, step, every, scales, num_per_prompt)
    t0 = time.time()
    train_and_evaluate(seg, workdir)
    minutes += (time.time() - t0) / 60.0
    result = evaluate(seg, workdir, out_dir=os.path.join(out_dir, f"step_{step:06d}"))
    curve["rows"].append(curve_row(step, minutes, result))
    write_text(path, json.dumps(curve, indent=1))
    write_text(os.path.join(out_dir, "curve.md"), curve_markdown(curve))
    plot_curve(curve, os.path.join(out_dir, "curve.png"))
    logging.info("curve: step %d after %.1f training minutes written to %s", step, minutes,
                 out_dir)
  print(curve_markdown(curve))
  return curve


def define_flags() -> None:
  """The command's flags; defined only when it runs as a program (other modules, e.g.
  `cf3d_jax.main`, define `--config` too)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run folder (as for cf3d_jax.main).")
  flags.DEFINE_integer("every", 900, "Training steps between evaluation points.")
  flags.DEFINE_list("scales", ["3", "7", "15"], "Guidance scales evaluated at each point.")
  flags.DEFINE_integer("num_per_prompt", 4, "Evaluation noises per prompt at each point (>= 2).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    scales = tuple(float(s) for s in f.scales)
  except ValueError:
    print(f"error: --scales={','.join(f.scales)}: expected numbers", file=sys.stderr)
    sys.exit(2)
  console.run_on_config(training_curve, f, f.every, scales, f.num_per_prompt)


if __name__ == "__main__":
  define_flags()
  app.run(main)
