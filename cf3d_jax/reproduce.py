"""The paper's comparison from one command: Table 1 for WDM, MAISI Linear and MAISI RFlow on both
phantom datasets, Table 2 (the guidance sweep), the phantom ground truth, the paper's numbers.

    python -m cf3d_jax.reproduce --budget=cpu --workdir=runs/paper

For each dataset (MS lesion load, ADNI-like atrophy) this runs, in `WORKDIR/DATASET/MODEL/`:
  1. `wdm`: `--mode=all` (prepare → train → sample) with the budget's WDM config;
  2. `classifier`: `--mode=train_classifier` in the WDM folder: the text-alignment classifier every
     model of the dataset is scored with (`eval.classifier`);
  3. `maisi_linear`: `--mode=all` of the latent config with the MAISI Linear objective (trains the
     KL autoencoder, encodes the dataset, trains the latent DDPM);
  4. `maisi_rflow`: the same with the rectified-flow objective, on the same autoencoder;
  5. `evaluate` for each model: FID (and FID / real-vs-real floor), MS-SSIM diversity, subject
     preservation (MS-SSIM, PSNR), alignment, the phantom ground truth, at every scale of the
     sweep (`eval.guidance_scales`; w = 1 is the paper's "none", the conditional model alone).
Then `WORKDIR/results.json` and `WORKDIR/results.md`: both tables, the published numbers beside
ours, which of the paper's orderings hold on the phantoms, the wall time of every stage and the
machine.

Budgets: `smoke` (16³ toy models, a few steps: the test), `cpu` (the 32³ demo configs,
`configs/demo.py` and `configs/demo_latent.py`, 24 noises per prompt; about 2-3 h on 2 cores),
`paper` (the paper configs `configs/{wdm,maisi_linear,maisi_rflow}_{ms,adni}.py`, 333 noises per
prompt = 1,000 evaluation volumes; for accelerators).

Resumable: each finished stage is recorded in `WORKDIR/reproduce.json` and skipped when the command
runs again; a stage that was killed reruns, its training continuing from its last checkpoint.
`--datasets` and `--models` run a subset (the tables leave the other cells empty).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Sequence

from absl import app, flags

from cf3d_jax.errors import ConfigError
from cf3d_jax.files import write_text
from cf3d_jax.metrics.texture import format_per_level

REPRODUCE_FORMAT = "cf3d_jax.reproduce/1"
BUDGETS = ("smoke", "cpu", "paper")
DATASETS = ("ms", "adni")
MODELS = ("wdm", "maisi_linear", "maisi_rflow")
MODEL_NAMES = {"wdm": "WDM", "maisi_linear": "MAISI Linear", "maisi_rflow": "MAISI RFlow"}
# The paper's Table 2 sweep: w = 1 is its "none" (the conditional model alone), then 0.5, 2, 3.
SWEEP = (1.0, 0.5, 2.0, 3.0)
EVAL_PER_PROMPT = {"smoke": 2, "cpu": 24, "paper": 333}
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(HERE, "configs")

# The paper's published numbers (Table 1: FID, MS-SSIM diversity, MS-SSIM preservation, PSNR,
# alignment %; Table 2: MAISI RFlow on MS, alignment % / MS-SSIM preservation / PSNR).
PAPER_TABLE1 = {
    "ms": {"maisi_linear": (0.1734, 0.8626, 0.8614, 21.18, 92.64),
           "maisi_rflow": (0.1625, 0.8715, 0.9638, 27.92, 89.19),
           "wdm": (0.1622, 0.8684, 0.9680, 28.47, 94.58)},
    "adni": {"maisi_linear": (0.1752, 0.8362, 0.8635, 22.16, 62.26),
             "maisi_rflow": (0.1690, 0.8357, 0.9864, 34.86, 72.01),
             "wdm": (0.1647, 0.7485, 0.9895, 34.77, 71.17)},
}
PAPER_TABLE2_RFLOW_MS = {1.0: (89.17, 0.964, 27.92), 0.5: (70.08, 0.985, 32.30),
                         2.0: (99.39, 0.926, 24.39), 3.0: (100.0, 0.898, 22.75)}


def model_config(budget: str, dataset: str, model: str):
  """The config one model of one dataset trains and is evaluated with under `budget`."""
  from cf3d_jax.config_base import apply_objective_preset, load_config_file
  if budget not in BUDGETS:
    raise ConfigError(f"--budget={budget!r}: expected one of {BUDGETS}")
  if dataset not in DATASETS:
    raise ConfigError(f"dataset {dataset!r}: expected one of {DATASETS}")
  if model not in MODELS:
    raise ConfigError(f"model {model!r}: expected one of {MODELS}")
  if budget == "paper":
    config = load_config_file(os.path.join(CONFIGS, f"{model}_{dataset}.py"))
  else:
    variants = [v for v in ("smoke" if budget == "smoke" else "",
                            "adni" if dataset == "adni" else "") if v]
    name = "demo.py" if model == "wdm" else "demo_latent.py"
    config = load_config_file(os.path.join(CONFIGS, name), ",".join(variants) or None)
    if model == "maisi_linear":
      # The latent demo is MAISI RFlow; MAISI Linear swaps in its published objective (latent
      # DDPM, scaled-linear betas, epsilon, ancestral sampling over all 1,000 steps).
      apply_objective_preset(config, "maisi_linear")
      if budget == "smoke":
        config.objective.num_sample_steps = 3
  config.eval.guidance_scales = SWEEP
  config.eval.num_per_prompt = EVAL_PER_PROMPT[budget]
  if budget == "smoke":
    config.eval.ms_ssim_scales = 3            # 16³ holds 3 scales of a 3-voxel window
    config.eval.guidance_scales = (1.0, 2.0)
    config.eval.batch_size = 6
  return config


def plan(budget: str, workdir: str, datasets: Sequence[str] = DATASETS,
         models: Sequence[str] = MODELS) -> list[dict]:
  """The stages in order: `{"name", "mode", "workdir", "config"}` (configs built, not run)."""
  for d in datasets:
    if d not in DATASETS:
      raise ConfigError(f"--datasets: {d!r} is not one of {DATASETS}")
  for m in models:
    if m not in MODELS:
      raise ConfigError(f"--models: {m!r} is not one of {MODELS}")
  if not datasets or not models:
    raise ConfigError("--datasets and --models: give at least one of each")
  stages, workdir = [], os.path.abspath(workdir)
  for dataset in DATASETS:
    if dataset not in datasets:
      continue
    root = os.path.join(workdir, dataset)
    chosen = [m for m in MODELS if m in models]
    # The alignment classifier of the dataset, trained once on the phantoms of the first model
    # (WDM when it runs). The latent demo draws larger lesions than the WDM demo: the classifier
    # then scores the MAISI volumes on the WDM phantoms' classes (docs/reproduce.md).
    classifier_dir = os.path.join(root, chosen[0], "classifier")
    vae_dir = os.path.join(root, "maisi_linear", "autoencoder", "vae")
    configs = {}
    for model in chosen:
      config = model_config(budget, dataset, model)
      config.eval.classifier = classifier_dir
      if model == "maisi_rflow" and "maisi_linear" in chosen:
        config.space.autoencoder = vae_dir     # one autoencoder per dataset, trained once
      configs[model] = config
    for model, config in configs.items():
      stages.append({"name": f"{dataset}/{model}", "mode": "all",
                     "workdir": os.path.join(root, model), "config": config})
      if model == chosen[0]:
        classifier_config = model_config(budget, dataset, model)
        stages.append({"name": f"{dataset}/classifier", "mode": "train_classifier",
                       "workdir": os.path.join(root, model), "config": classifier_config})
    for model, config in configs.items():
      stages.append({"name": f"{dataset}/{model}/evaluate", "mode": "evaluate",
                     "workdir": os.path.join(root, model), "config": config})
  return stages


def _load_state(path: str, budget: str) -> dict:
  if not os.path.exists(path):
    return {"format": REPRODUCE_FORMAT, "budget": budget, "stages": {}}
  try:
    state = json.load(open(path, encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: not a readable reproduce state ({e}); delete it to rerun every "
                      "stage") from e
  if state.get("format") != REPRODUCE_FORMAT:
    raise ConfigError(f"{path}: format {state.get('format')!r}, expected {REPRODUCE_FORMAT!r}")
  if state.get("budget") != budget:
    raise ConfigError(f"{path}: this workdir was made with --budget={state.get('budget')}; give "
                      f"that budget or another --workdir")
  return state


def machine() -> dict:
  """Where the stages ran: the platform, the CPU count and JAX's devices."""
  import jax
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "devices": [str(d.device_kind) for d in jax.devices()]}


def run_stages(stages: list[dict], state_path: str, state: dict) -> dict:
  """Runs every stage not yet recorded as finished in `state`; writes the state after each."""
  from cf3d_jax.modes import run
  for stage in stages:
    if stage["name"] in state["stages"]:
      print(f"[reproduce] {stage['name']}: done earlier "
            f"({state['stages'][stage['name']]['seconds']:.0f} s), skipped", flush=True)
      continue
    print(f"[reproduce] {stage['name']}: --mode={stage['mode']} in {stage['workdir']}",
          flush=True)
    t0 = time.time()
    run(stage["config"], stage["workdir"], stage["mode"])
    state["stages"][stage["name"]] = {"mode": stage["mode"], "workdir": stage["workdir"],
                                      "seconds": round(time.time() - t0, 1),
                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime())}
    write_text(state_path, json.dumps(state, indent=1))
  return state


def _eval_result(workdir: str) -> dict | None:
  path = os.path.join(workdir, "eval", "results.json")
  if not os.path.exists(path):
    return None
  try:
    return json.load(open(path, encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: not a readable evaluation ({e}); delete it and rerun") from e


def _row_at(result: dict | None, scale: float) -> dict | None:
  for row in (result or {}).get("scales", []):
    if abs(row["guidance_scale"] - scale) < 1e-9:
      return row
  return None


def _summary_row(row: dict | None) -> dict | None:
  """The columns of one evaluated scale that the tables show."""
  if row is None:
    return None
  gt = row.get("ground_truth") or {}
  changes = list((gt.get("change_vs_first") or gt.get("mean_change_vs_factual") or {}).values())
  alignment = row.get("alignment")
  return {"guidance_scale": row["guidance_scale"], "fid": row["fid"],
          "fid_vs_floor": row.get("fid_vs_floor"),
          "ms_ssim_diversity": row["ms_ssim_diversity"],
          "ms_ssim_preservation": row["ms_ssim_preservation"],
          "psnr_preservation": row["psnr_preservation"],
          "alignment_pct": None if alignment is None else 100.0 * alignment,
          "class_hit_rate": gt.get("class_hit_rate_all"),
          "stat": gt.get("stat"), "last_minus_first": changes[-1] if changes else None,
          "ordered_fraction": gt.get("ordered_fraction"),
          "psnr_outside_wm": gt.get("psnr_outside_wm"),
          "texture_per_level": (row.get("texture") or {}).get("per_level")}


def orderings(table1: dict, table2: dict) -> list[dict]:
  """The paper's orderings, checked on our numbers: `{"claim", "dataset", "holds"}` (None when a
  number is missing)."""
  out = []
  for dataset, rows in table1.items():
    def col(model, key):
      r = rows.get(model)
      return None if r is None else r.get(key)
    psnr = {m: col(m, "psnr_preservation") for m in MODELS}
    if all(v is not None for v in psnr.values()):
      holds = psnr["wdm"] >= max(psnr["maisi_linear"], psnr["maisi_rflow"])
    else:
      holds = None
    out.append({"claim": "WDM preserves the subject best (highest PSNR)", "dataset": dataset,
                "holds": holds})
    fid_l, fid_r = col("maisi_linear", "fid"), col("maisi_rflow", "fid")
    out.append({"claim": "MAISI RFlow above MAISI Linear in fidelity (lower FID)",
                "dataset": dataset,
                "holds": None if None in (fid_l, fid_r) else fid_r < fid_l})
    p_l, p_r = psnr["maisi_linear"], psnr["maisi_rflow"]
    out.append({"claim": "MAISI RFlow above MAISI Linear in preservation (higher PSNR)",
                "dataset": dataset, "holds": None if None in (p_l, p_r) else p_r > p_l})
  for (dataset, model), rows in table2.items():
    aligns = [r["alignment_pct"] for r in sorted(rows, key=lambda r: r["guidance_scale"])]
    holds = (None if len(aligns) < 2 or None in aligns else
             all(b >= a for a, b in zip(aligns, aligns[1:])))
    out.append({"claim": f"{MODEL_NAMES[model]}: alignment rises with guidance",
                "dataset": dataset, "holds": holds})
  return out


def collect(workdir: str, budget: str, datasets: Sequence[str], models: Sequence[str],
            state: dict) -> dict:
  """Reads every evaluation under `workdir` into Table 1 (w = 1), Table 2 (every w; WDM and
  MAISI RFlow on MS, as the paper) and the ground truth."""
  table1, table2, evals = {}, {}, {}
  for dataset in datasets:
    table1[dataset] = {}
    for model in models:
      result = _eval_result(os.path.join(workdir, dataset, model))
      evals[f"{dataset}/{model}"] = None if result is None else {
          k: result.get(k) for k in ("checkpoint_step", "num_per_prompt", "num_real",
                                     "fid_features", "fid_floor", "classifier")}
      table1[dataset][model] = _summary_row(_row_at(result, 1.0))
      if result is not None and (dataset, model) in {("ms", "wdm"), ("ms", "maisi_rflow")}:
        table2[(dataset, model)] = [_summary_row(r) for r in result["scales"]]
  return {"format": REPRODUCE_FORMAT, "budget": budget, "datasets": list(datasets),
          "models": list(models), "table1": table1,
          "table2": {f"{d}/{m}": rows for (d, m), rows in table2.items()},
          "orderings": orderings(table1, table2), "evaluations": evals,
          "stages": state["stages"], "machine": state.get("machine"),
          "paper": {"table1": PAPER_TABLE1,
                    "table2_maisi_rflow_ms": {str(k): v for k, v in
                                              PAPER_TABLE2_RFLOW_MS.items()}}}


def _f(v, spec: str) -> str:
  return "—" if v is None else format(v, spec)


def results_markdown(res: dict) -> str:
  """The tables of `collect` as markdown, ours beside the paper's."""
  m = res.get("machine") or {}
  total = sum(s["seconds"] for s in res["stages"].values())
  lines = [f"# The paper's comparison on the phantoms (`--budget={res['budget']}`)", "",
           f"Machine: {m.get('processor', '?')}, {m.get('cpu_count', '?')} CPUs, "
           f"{', '.join(m.get('devices', [])) or '?'}; {m.get('platform', '?')}, JAX "
           f"{m.get('jax', '?')}. Stage wall time {total / 60:.1f} min in all.", "",
           "Ours are synthetic phantoms at the budget's size; the paper's are real 128³-256³ "
           "scans and 1M-step models. FID uses the evaluation's feature network (see each "
           "evaluation's `fid_features`): compare FID between our rows and against the "
           "real-vs-real floor (FID / floor), not with the paper's values. Alignment is the "
           "accuracy of the dataset's classifier on the counterfactuals (the label being the "
           "prompt's class); 'in class' is the phantom ground truth: the fraction of all "
           "generated volumes whose measured lesion volume lies in the prompted class range "
           "(MS only), and Δ the mean per-noise change of the last prompt against the first "
           "(lesion mL for MS, ventricle mL for ADNI). Texture is the generated volumes' "
           "Haar detail energy over the real test volumes' at 2, 4 and 8 voxels (1 = the data's "
           "texture; `cf3d_jax.metrics.texture`).", ""]
  for dataset in res["datasets"]:
    lines += [f"## Table 1, {dataset.upper()} (w = 1, the paper's setting)", "",
              "| model | FID ↓ | FID / floor ↓ | MS-SSIM div ↓ | MS-SSIM pres ↑ | PSNR ↑ | "
              "align % ↑ | in class | Δ | texture | paper: FID / div / pres / PSNR / align |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in MODELS:
      if model not in res["models"]:
        continue
      r = res["table1"][dataset].get(model) or {}
      paper = " / ".join(f"{v:g}" for v in PAPER_TABLE1[dataset][model])
      lines.append(
          f"| {MODEL_NAMES[model]} | {_f(r.get('fid'), '.4g')} | {_f(r.get('fid_vs_floor'), '.2f')} | "
          f"{_f(r.get('ms_ssim_diversity'), '.4f')} | {_f(r.get('ms_ssim_preservation'), '.4f')} | "
          f"{_f(r.get('psnr_preservation'), '.2f')} | {_f(r.get('alignment_pct'), '.1f')} | "
          f"{_f(r.get('class_hit_rate'), '.0%')} | {_f(r.get('last_minus_first'), '+.1f')} | "
          f"{format_per_level(r.get('texture_per_level'))} | {paper} |")
    lines.append("")
  for key, rows in res["table2"].items():
    dataset, model = key.split("/")
    paper = model == "maisi_rflow" and dataset == "ms"
    lines += [f"## Table 2, {MODEL_NAMES[model]} on {dataset.upper()} (guidance sweep; w = 1 is "
              "the paper's 'none')", "",
              "| w | align % ↑ | MS-SSIM pres ↑ | PSNR ↑ | FID / floor ↓ | in class | Δ | "
              "PSNR outside WM |" + (" paper: align / pres / PSNR |" if paper else ""),
              "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if paper else "")]
    for r in sorted(rows, key=lambda r: r["guidance_scale"]):
      ref = PAPER_TABLE2_RFLOW_MS.get(r["guidance_scale"]) if paper else None
      lines.append(
          f"| {r['guidance_scale']:g} | {_f(r['alignment_pct'], '.1f')} | "
          f"{_f(r['ms_ssim_preservation'], '.4f')} | {_f(r['psnr_preservation'], '.2f')} | "
          f"{_f(r['fid_vs_floor'], '.2f')} | {_f(r['class_hit_rate'], '.0%')} | "
          f"{_f(r['last_minus_first'], '+.1f')} | {_f(r['psnr_outside_wm'], '.1f')} |"
          + ((" " + " / ".join(f"{v:g}" for v in ref) + " |") if paper and ref else
             (" — |" if paper else "")))
    lines.append("")
  lines += ["## The paper's orderings on the phantoms", "", "| claim | dataset | holds |",
            "| --- | --- | --- |"]
  for o in res["orderings"]:
    holds = {True: "yes", False: "no", None: "— (not measured)"}[o["holds"]]
    lines.append(f"| {o['claim']} | {o['dataset'].upper()} | {holds} |")
  lines += ["", "## Stages", "", "| stage | mode | wall time |", "| --- | --- | --- |"]
  for name, s in res["stages"].items():
    lines.append(f"| {name} | {s['mode']} | {s['seconds'] / 60:.1f} min |")
  return "\n".join(lines) + "\n"


def reproduce(budget: str, workdir: str, datasets: Sequence[str] = DATASETS,
              models: Sequence[str] = MODELS) -> dict:
  """Runs (or resumes) every stage and writes `WORKDIR/results.{json,md}`; returns the results."""
  if not workdir:
    raise ConfigError("--workdir is empty: give the run folder")
  stages = plan(budget, workdir, datasets, models)          # ConfigError for unknown names
  datasets = [d for d in DATASETS if d in datasets]
  os.makedirs(workdir, exist_ok=True)
  state_path = os.path.join(workdir, "reproduce.json")
  state = _load_state(state_path, budget)
  state = run_stages(stages, state_path, state)
  state["machine"] = machine()
  write_text(state_path, json.dumps(state, indent=1))
  res = collect(workdir, budget, datasets, [m for m in MODELS if m in models], state)
  write_text(os.path.join(workdir, "results.json"), json.dumps(res, indent=1))
  text = results_markdown(res)
  write_text(os.path.join(workdir, "results.md"), text)
  print(text)
  return res


def define_flags() -> None:
  """The command's flags (defined only when it runs as a program)."""
  flags.DEFINE_enum("budget", "cpu", list(BUDGETS), "smoke (test), cpu (2 cores, the demo "
                    "configs) or paper (the paper configs, accelerators).")
  flags.DEFINE_string("workdir", None, "Folder of every run: WORKDIR/DATASET/MODEL/.")
  flags.DEFINE_list("datasets", list(DATASETS), "Datasets, comma-separated.")
  flags.DEFINE_list("models", list(MODELS), "Models, comma-separated.")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from cf3d_jax.errors import Cf3dError
  f = flags.FLAGS
  try:
    reproduce(f.budget, f.workdir, f.datasets, f.models)
  except Cf3dError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
