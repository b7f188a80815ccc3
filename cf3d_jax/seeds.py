"""Seed spread: the whole job under several seeds, one table, one command.

    python -m cf3d_jax.seeds --config=configs/demo.py --workdir=runs/seeds --seeds=0,1,2

A 900-step CPU model's prompt effect is one draw from a wide distribution: the same command
gives 10 of 12 volumes in their prompted class under one seed and 2 of 12 under another (or on
another CPU, docs/results.md). A claim about a recipe therefore needs several seeds. For each
seed this runs `--mode=all` (prepare → train → sample; the seed drives the phantoms, the
initialisation, the data order and the sampling noises) in `WORKDIR/seed_N/` with the config's
other settings unchanged, then reads the prompt effect that `--mode=sample` wrote
(`samples/index.json`, per guidance scale) and tabulates it per seed and over all seeds: the
class-hit rate over every generated volume, the mean per-noise change of the last prompt
against the first, the fraction of noises whose prompts are ordered, and the PSNR between
factual and counterfactual outside the template white matter.

Outputs: `WORKDIR/seeds.json` (every number, the config name and seeds), `WORKDIR/seeds.md` (the
table, also printed). A seed whose `samples/index.json` already holds the finished run (its
seed, its checkpoint step = `train.num_steps`) is read, not rerun, so a killed command
continues where it stopped; a half-trained seed resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

from absl import app, flags

from cf3d_jax import console
from cf3d_jax.errors import ConfigError
from cf3d_jax.files import write_text
from cf3d_jax.sample_index import set_label, table_cell

SEEDS_FORMAT = "cf3d_jax.seeds/1"
TARGET_CLASS_HIT = 0.9     # issue 13: ≥ 90 % of the volumes in their prompted class


def seed_config(config, seed: int):
  """A copy of `config` with `seed` (everything else unchanged)."""
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.seed = int(seed)
  return out


def _finished_index(workdir: str, seed: int, num_steps: int) -> dict | None:
  """`workdir/samples/index.json` if it holds the finished run of `seed`, else None."""
  path = os.path.join(workdir, "samples", "index.json")
  if not os.path.exists(path):
    return None
  try:
    index = json.load(open(path))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: not a readable sample index ({e}); delete {workdir} to rerun "
                      "this seed") from e
  if index.get("seed") != seed or index.get("checkpoint_step") != num_steps:
    return None
  return index


def seed_rows(seed: int, index: dict, minutes: float | None) -> list[dict]:
  """One row per guidance scale of one seed's `index.json` (its `prompt_effect`)."""
  rows = []
  for key, pe in index["prompt_effect"].items():
    changes = list((pe.get("change_vs_first") or {}).values())
    rows.append({
        "seed": seed, "scale": key, "stat": pe.get("stat"), "num_noises": pe.get("num_noises"),
        "mean": pe.get("mean"), "class_hit_rate_all": pe.get("class_hit_rate_all"),
        "last_minus_first": changes[-1] if changes else None,
        "ordered_fraction": pe.get("ordered_fraction"),
        "psnr_outside_wm": pe.get("mean_psnr_outside_wm_db"), "minutes": minutes,
        "prompt_scales": pe.get("guidance_scale")})   # a named set: each prompt's own w
  return rows


def _mean(values: Sequence) -> float | None:
  vals = [v for v in values if v is not None]
  return sum(vals) / len(vals) if vals else None


def summarise(rows: list[dict]) -> dict:
  """Per guidance scale over the seeds: mean, min and max class-hit rate, the number of seeds at
  or above `TARGET_CLASS_HIT`, and the means of the other columns (None where a column is
  absent, e.g. no class ranges on a dataset)."""
  out = {}
  for key in dict.fromkeys(r["scale"] for r in rows):
    rs = [r for r in rows if r["scale"] == key]
    hits = [r["class_hit_rate_all"] for r in rs if r["class_hit_rate_all"] is not None]
    prompts = list((rs[0]["mean"] or {}).keys())
    out[key] = {
        "seeds": [r["seed"] for r in rs],
        "mean": {p: _mean([(r["mean"] or {}).get(p) for r in rs]) for p in prompts},
        "class_hit_rate_mean": _mean(hits), "class_hit_rate_min": min(hits) if hits else None,
        "class_hit_rate_max": max(hits) if hits else None,
        "seeds_at_target": sum(h >= TARGET_CLASS_HIT for h in hits) if hits else None,
        "last_minus_first": _mean([r["last_minus_first"] for r in rs]),
        "ordered_fraction": _mean([r["ordered_fraction"] for r in rs]),
        "psnr_outside_wm": _mean([r["psnr_outside_wm"] for r in rs])}
  return out


def seeds_markdown(result: dict) -> str:
  """Per scale: one row per seed, then the mean over the seeds (bold)."""
  lines = [f"`{result['config']}` under seeds {', '.join(map(str, result['seeds']))} "
           "(`python -m cf3d_jax.seeds`). Per seed: mean per prompt, volumes in their prompted "
           "class, mean per-noise change last − first prompt, noises ordered, PSNR factual vs "
           "counterfactual outside the template WM.", "",
           "| w | seed | mean per prompt | in class | last − first | ordered | PSNR outside WM |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for key, s in result["summary"].items():
    for r in (r for r in result["rows"] if r["scale"] == key):
      means = " / ".join(f"{v:.1f}" for v in (r["mean"] or {}).values()) or "—"
      label = set_label(key) + ("" if not r.get("prompt_scales") else
                                " (w " + " / ".join(f"{w:g}" for w in r["prompt_scales"].values())
                                + ")")
      lines.append(f"| {label} | {r['seed']} | {means} | "
                   f"{table_cell(r['class_hit_rate_all'], '.0%')} | "
                   f"{table_cell(r['last_minus_first'], '+.1f')} | "
                   f"{table_cell(r['ordered_fraction'], '.0%')} | "
                   f"{table_cell(r['psnr_outside_wm'], '.1f')} |")
    means = " / ".join(table_cell(v, ".1f") for v in s["mean"].values()) or "—"
    spread = ("" if s["class_hit_rate_min"] is None else
              f" ({s['class_hit_rate_min']:.0%}–{s['class_hit_rate_max']:.0%}; "
              f"{s['seeds_at_target']} of {len(s['seeds'])} seeds ≥ {TARGET_CLASS_HIT:.0%})")
    lines.append(f"| **{set_label(key)}** | **all** | **{means}** | "
                 f"**{table_cell(s['class_hit_rate_mean'], '.0%')}**{spread} | "
                 f"**{table_cell(s['last_minus_first'], '+.1f')}** | "
                 f"**{table_cell(s['ordered_fraction'], '.0%')}** | "
                 f"**{table_cell(s['psnr_outside_wm'], '.1f')}** |")
  return "\n".join(lines) + "\n"


def run_seeds(config, workdir: str, config_name: str, seeds: Sequence[int]) -> dict:
  """Runs (or reads) every seed's job and writes `seeds.json` / `seeds.md`; returns the result."""
  from cf3d_jax import config_base
  from cf3d_jax.modes import run
  seeds = [int(s) for s in seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ConfigError(f"--seeds={seeds}: give one or more distinct seeds")
  config_base.validate(config)
  rows = []
  for seed in seeds:
    seed_dir = os.path.join(workdir, f"seed_{seed}")
    cfg = seed_config(config, seed)
    index, minutes = _finished_index(seed_dir, seed, int(cfg.train.num_steps)), None
    if index is None:
      t0 = time.time()
      run(cfg, seed_dir, "all")
      minutes = round((time.time() - t0) / 60.0, 2)
      index = _finished_index(seed_dir, seed, int(cfg.train.num_steps))
      if index is None:
        raise ConfigError(f"{seed_dir}: --mode=all finished without a sample index for seed "
                          f"{seed} at step {cfg.train.num_steps}")
    rows.extend(seed_rows(seed, index, minutes))
  result = {"format": SEEDS_FORMAT, "config": config_name, "seeds": seeds, "rows": rows,
            "summary": summarise(rows)}
  write_text(os.path.join(workdir, "seeds.json"), json.dumps(result, indent=1))
  text = seeds_markdown(result)
  write_text(os.path.join(workdir, "seeds.md"), text)
  print(text)
  return result


def define_flags() -> None:
  """The command's flags (defined only when it runs as a program)."""
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Folder of the runs: WORKDIR/seed_N/ per seed.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, comma-separated.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    seeds = [int(s) for s in f.seeds]
  except ValueError:
    print(f"error: --seeds={','.join(f.seeds)}: expected integers", file=sys.stderr)
    sys.exit(2)
  console.run_on_config(run_seeds, f, seeds)


if __name__ == "__main__":
  define_flags()
  app.run(main)
