"""The logic behind `notebooks/sample_counterfactuals.ipynb`, as small tested functions.

A notebook session runs:
  `load_generator(WORKDIR, CONFIG)`          restore the trained U-Net (EMA by default) and table;
  `prepare_prompts(gen.table, PROMPTS)`      table rows for known prompts; other prompts encoded
                                             with the table's own encoder (`table_encoder`) when it
                                             can be loaded, else replaced by the closest table
                                             prompt — `PromptSet.describe()` says which happened;
  `generate(gen, prompt_set, GUIDANCE, SEED)` one fixed noise (`generate.subject_noise`)
                                             decoded under every prompt (`generate.generate`);
  `difference_maps`, `show_slices`           side-by-side slice viewer (ipywidgets) with a
                                             static matplotlib montage where no frontend renders
                                             widgets (nbclient, plain consoles);
  `save_nifti`, `offer_download`             NIfTI files written atomically into the workdir,
                                             zipped, downloaded on Colab.
`invert_scan` makes counterfactuals of a given scan (inversion, as `config.sample.source` does).

Volumes are float32 `[D, H, W]` in [-1, 1] (RAS: D = x, H = y, W = z); stacks of them `[P, D, H,
W]`. Sampling itself goes through `cf3d_jax.generate` (no second implementation here), so a
notebook counterfactual of subject k at seed s equals the CLI's `samples/g{w}/subject_k` volume
for the same prompt, checkpoint and config (up to float rounding across batch sizes).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import zipfile
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from cf3d_jax.errors import Cf3dError, ConfigError, DataError, PromptError
from cf3d_jax.figures import (AXES, figure_png, montage_figure, save_montage, short_title,
                              slice_figure)
from cf3d_jax.files import atomic_path, write_text
from cf3d_jax.text.table import EmbeddingTable
from cf3d_jax.workdir import Workdir

if TYPE_CHECKING:
  from cf3d_jax import checkpoints

VIEWER_MODES = ("auto", "widget", "static")


# ---- configuration and checkpoint ------------------------------------------------------------

def repo_root() -> str:
  """The folder holding the cf3d_jax package (a clone or an editable install has `configs/`)."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_path(path: str) -> str:
  """`path` made absolute: as given when it exists there (or is absolute), else under
  `repo_root()` when it exists there (a notebook opened from notebooks/), else as given."""
  path = os.path.expanduser(path)
  if os.path.isabs(path) or os.path.exists(path):
    return os.path.abspath(path)
  in_repo = os.path.join(repo_root(), path)
  return in_repo if os.path.exists(in_repo) else os.path.abspath(path)


def config_spec(spec: str) -> str:
  """'ABSPATH[:ARG]' for `spec` = 'PATH[:ARG]' (e.g. 'configs/demo.py:smoke'), PATH found by
  `find_path`. ConfigError naming the path when there is no such file."""
  path, _, arg = spec.partition(":") if not os.path.exists(spec) else (spec, "", "")
  found = find_path(path)
  if not os.path.isfile(found):
    raise ConfigError(f"config file {path!r} not found (nor under {repo_root()}); give the "
                      f"config the model was trained with, e.g. configs/demo.py from a clone")
  return found + (":" + arg if arg else "")


def load_config(spec: str) -> Any:
  """The ConfigDict of `spec` = 'PATH[:ARG]', as `--config=PATH:ARG` reads it (`config_spec`)."""
  from cf3d_jax.config_base import load_config_file
  path, _, arg = config_spec(spec).partition(":")
  return load_config_file(path, arg or None)


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir/checkpoints/` holds a finished checkpoint (a folder named by its step)."""
  folder = Workdir(workdir).checkpoints
  return os.path.isdir(folder) and any(n.isdigit() for n in os.listdir(folder))


def resolve_workdir(path: str) -> tuple[str, int | None]:
  """(workdir, checkpoint step or None = latest) from a workdir, its `checkpoints/` folder or one
  checkpoint folder `WORKDIR/checkpoints/STEP`. DataError when the path does not exist."""
  path = find_path(path)
  if not os.path.isdir(path):
    raise DataError(f"workdir {path} does not exist (or is not a folder); train first "
                    f"(python -m cf3d_jax.main --config=... --workdir={path})")
  parent, name = os.path.split(path.rstrip(os.sep))
  if name.isdigit() and os.path.basename(parent) == "checkpoints":
    return os.path.dirname(parent), int(name)
  if name == "checkpoints":
    return parent, None
  return path, None


def run_cli(args: Sequence[str]) -> None:
  """Runs `python -m cf3d_jax.main ARGS` (e.g. to train a workdir), echoing its output line by
  line into the notebook. Cf3dError with the command and exit status when it fails."""
  import subprocess
  cmd = [sys.executable, "-m", "cf3d_jax.main", *args]
  print("$", " ".join(cmd), flush=True)
  with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        env=dict(os.environ, PYTHONUNBUFFERED="1")) as proc:
    for line in proc.stdout:
      print(line, end="", flush=True)
  if proc.returncode:
    raise Cf3dError(f"{' '.join(cmd)} exited with status {proc.returncode}")


@dataclasses.dataclass
class Generator:
  """A restored generator in a notebook session: its config and workdir, and the samplers
  compiled for it so far.

  Attributes:
    config: the ConfigDict (its `sample.checkpoint_step` set to the restored step's request).
    workdir: the workdir the checkpoint and `data/` come from.
    restored: `checkpoints.Generator`: model, objective, space, params, table, null text, affine.
  """
  config: Any
  workdir: str
  restored: checkpoints.Generator
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def step(self) -> int:
    """The training step restored."""
    return self.restored.step

  @property
  def table(self) -> EmbeddingTable:
    """The workdir's embedding table (`data/text_table.npz`)."""
    return self.restored.table

  @property
  def latent_shape(self) -> tuple[int, ...]:
    """Shape of one starting noise, without batch (e.g. `[16, 16, 16, 8]` for WDM at 32³)."""
    return self.restored.latent_shape

  @property
  def affine(self) -> np.ndarray:
    """The data grid's 4×4 voxel-to-world affine (written into every NIfTI)."""
    return np.asarray(self.restored.affine)

  def sampler_is_ode(self) -> bool:
    """Whether the configured sampler already is the objective's deterministic ODE step (DDIM
    with η = 0, or rectified flow): then sampling after an inversion needs no second sampler."""
    o = self.config.objective
    return o.name == "rflow" or (o.sampler in ("default", "ddim") and float(o.eta) == 0.0)

  def sampler(self, scale: float, deterministic: bool = False, depth: float = 1.0):
    """`generate.make_sampler` for this guidance scale, built (and jit-compiled) once per
    session."""
    from cf3d_jax.generate import make_sampler
    deterministic = deterministic and not (depth == 1.0 and self.sampler_is_ode())
    key = ("sample", float(scale), deterministic, float(depth))
    if key not in self._cache:
      r = self.restored
      self._cache[key] = make_sampler(r.model, r.objective, r.space, float(scale), *r.null,
                                      deterministic=deterministic, depth=depth)
    return self._cache[key]

  def inverter(self, refine_iters: int, depth: float):
    """`generate.make_inverter` (conditional model), built once per (refinements, depth)."""
    from cf3d_jax.generate import make_inverter
    key = ("invert", int(refine_iters), float(depth))
    if key not in self._cache:
      r = self.restored
      self._cache[key] = make_inverter(r.model, r.objective, r.space, int(refine_iters),
                                       float(depth))
    return self._cache[key]


def load_generator(path: str, config: Any) -> Generator:
  """Restores the generator of a workdir (or of `WORKDIR/checkpoints[/STEP]`).

  config: a ConfigDict or a 'PATH[:ARG]' spec (`load_config`); it must describe the trained model
  (same config file and variant as training). The latest checkpoint is used unless `path` names
  one; `config.sample.use_ema` picks EMA or raw parameters. Errors (`DataError`) name the missing
  folder or file (no checkpoint, no prepared data/).
  """
  from cf3d_jax import checkpoints
  if isinstance(config, str):
    config = load_config(config)
  workdir, step = resolve_workdir(path)
  if step is not None:
    config.sample.checkpoint_step = step
  return Generator(config=config, workdir=workdir,
                   restored=checkpoints.load_generator(config, workdir))


# ---- prompts ---------------------------------------------------------------------------------

def split_prompts(text: str) -> list[str]:
  """Prompts from one string, separated by '|' or newlines (a Colab form field); blanks dropped."""
  return [p.strip() for p in text.replace("\n", "|").split("|") if p.strip()]


def table_encoder(table: EmbeddingTable) -> tuple[Any | None, str]:
  """The encoder the table was made with, rebuilt from its meta, and a line saying what happened.

  Returns (encoder, message) when the same model loads (torch/transformers and the weights
  present, offline is fine) and its `weights_sha256` equals the table's; else (None, why not).
  """
  from cf3d_jax.text import encoders as enc_lib
  meta = table.meta
  name, model = meta.get("encoder"), meta.get("model")
  if name == "hf":
    kwargs = {"model": model, "pooling": meta.get("pooling", "mean"),
              "max_length": int(meta.get("max_length", 77)),
              "normalize": bool(meta.get("normalized", True))}
  elif name == "biomedclip":
    kwargs = {"model": model, "output": meta.get("kind", "tokens"),
              "context_length": int(meta.get("context_length", 256)),
              "normalize": bool(meta.get("normalized", False))}
  else:
    return None, f"the table's encoder {name!r} is unknown to cf3d_jax.text.encoders"
  try:
    encoder = enc_lib.make_encoder(name, **kwargs)
  except (ImportError, Cf3dError, OSError, ValueError, RuntimeError) as e:
    return None, f"its encoder ({name}: {model}) is not available here: {e}"
  if encoder.weights_sha256 != meta.get("weights_sha256"):
    return None, (f"the loadable {name}: {model} has weights {encoder.weights_sha256[:12]}…, the "
                  f"table was made with {str(meta.get('weights_sha256'))[:12]}…")
  return encoder, f"encoded with the table's own encoder ({name}: {model})"


def encode_prompts(encoder: Any, table: EmbeddingTable,
                   prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Embeds prompts with `encoder`: float32 `[P, L, E]`, bool mask `[P, L]`, checked against the
  table's (L, E) so they can stand in for table rows. DataError naming the table otherwise."""
  emb, mask = encoder.encode(list(prompts))
  if emb.shape[1:] != table.embeddings.shape[1:]:
    raise DataError(f"encoder output [P, L, E] = {list(emb.shape)} does not match embedding table "
                    f"{table.path} ({list(table.embeddings.shape[1:])} per prompt)")
  return emb.astype(np.float32), mask.astype(bool)


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """Prompts ready for the sampler.

  Attributes:
    prompts: the P prompts used (after any fallback), the first the factual reference.
    requested: the P prompts as typed.
    emb: float32 `[P, L, E]`; mask: bool `[P, L]`.
    sources: per prompt, 'table', 'encoded' or 'closest' (a table prompt stood in for it).
    note: why prompts were or were not encoded (from `table_encoder`).
  """
  prompts: tuple[str, ...]
  requested: tuple[str, ...]
  emb: np.ndarray
  mask: np.ndarray
  sources: tuple[str, ...]
  note: str = ""

  def describe(self) -> str:
    """Lines saying, per prompt, where its embedding came from."""
    lines = []
    for req, used, src in zip(self.requested, self.prompts, self.sources):
      if src == "table":
        lines.append(f"  {used!r}: from the embedding table")
      elif src == "encoded":
        lines.append(f"  {used!r}: {self.note}")
      else:
        lines.append(f"  {req!r}: not in the table and not encodable ({self.note}); "
                     f"using the closest table prompt {used!r}")
    return "\n".join(lines)


def closest_table_prompt(table: EmbeddingTable, prompt: str) -> str:
  """The table's non-null prompt most similar to `prompt` as text (difflib ratio, ties: first)."""
  candidates = [p for p in table.prompts if p] or list(table.prompts)
  scores = [difflib.SequenceMatcher(None, prompt.lower(), c.lower()).ratio() for c in candidates]
  return candidates[int(np.argmax(scores))]


def choose_prompts(table: EmbeddingTable, prompts: Sequence[str], encoder: Any | None = None,
                   note: str = "", strict: bool = False) -> PromptSet:
  """Embeddings for `prompts`: table rows where the table holds the prompt (bit-identical to
  training), the encoder's output for the others, or — without an encoder — the closest table
  prompt's row (`strict=True`: PromptError naming the table instead).

  note: the message of `table_encoder` (why there is or is no encoder), shown by `describe()`.
  """
  if isinstance(prompts, str):
    raise TypeError(f"choose_prompts takes a sequence of prompts, got the string {prompts!r}")
  prompts = list(prompts)
  if not prompts:
    raise PromptError("no prompts given; type at least one (the first is the factual reference)")
  used, sources = [], []
  for p in prompts:
    if p in table:
      used.append(p)
      sources.append("table")
    elif encoder is not None:
      used.append(p)
      sources.append("encoded")
    elif strict:
      table.index(p)                                    # PromptError naming the table
    else:
      used.append(closest_table_prompt(table, p))
      sources.append("closest")
  emb = np.zeros((len(used),) + table.embeddings.shape[1:], np.float32)
  mask = np.zeros((len(used),) + table.mask.shape[1:], bool)
  rows = [i for i, s in enumerate(sources) if s != "encoded"]
  new = [i for i, s in enumerate(sources) if s == "encoded"]
  if rows:
    emb[rows], mask[rows] = table.lookup([used[i] for i in rows])
  if new:
    emb[new], mask[new] = encode_prompts(encoder, table, [used[i] for i in new])
  return PromptSet(tuple(used), tuple(prompts), emb, mask, tuple(sources), note)


def prepare_prompts(table: EmbeddingTable, prompts: Sequence[str],
                    strict: bool = False) -> PromptSet:
  """`choose_prompts` that loads the table's encoder (`table_encoder`) only when some prompt is
  not in the table; `PromptSet.describe()` then says whether it was encoded or replaced."""
  missing = [p for p in prompts if p not in table]
  encoder, note = table_encoder(table) if missing else (None, "")
  return choose_prompts(table, prompts, encoder, note, strict=strict)


# ---- counterfactuals -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Counterfactuals:
  """Volumes of one subject under several prompts.

  Attributes:
    volumes: float32 `[P, D, H, W]` in [-1, 1], one per prompt of `prompt_set`.
    prompt_set: the prompts and where their embeddings came from.
    guidance: the classifier-free guidance scale w.
    seed, subject: the noise `generate.subject_noise(seed, subject)` (synthetic subjects).
    step: the checkpoint's training step.
    affine: 4×4 voxel-to-world affine of the data grid.
    source: for an inverted scan, its path; `input` its conformed volume `[D, H, W]`.
  """
  volumes: np.ndarray
  prompt_set: PromptSet
  guidance: float
  seed: int
  subject: int
  step: int
  affine: np.ndarray
  source: str | None = None
  input: np.ndarray | None = None

  @property
  def reference(self) -> np.ndarray:
    """What the differences are taken against: the input scan, else the first prompt's volume."""
    return self.input if self.input is not None else self.volumes[0]


def _guided_against(gen: Generator, prompt_set: PromptSet, factual: PromptSet | None):
  """The text each prompt is guided against (`generate.guidance_negatives` for
  `config.sample.guidance_negative`): `[P, L, E]`, `[P, L]`; 'factual' = `factual` (one prompt),
  else the first prompt."""
  from cf3d_jax.generate import guidance_negatives
  n, ref = len(prompt_set.prompts), factual or prompt_set
  return guidance_negatives(gen.config.sample.guidance_negative, prompt_set.emb, prompt_set.mask,
                            np.repeat(ref.emb[:1], n, 0), np.repeat(ref.mask[:1], n, 0),
                            gen.restored.null)


def _batch_size(gen: Generator, prompt_set: PromptSet, batch_size: int | None) -> int:
  return min(int(batch_size or gen.config.sample.batch_size), len(prompt_set.prompts))


def generate(gen: Generator, prompt_set: PromptSet, guidance: float, seed: int,
             subject: int = 0, batch_size: int | None = None) -> Counterfactuals:
  """Decodes ONE fixed noise (`generate.subject_noise(seed, subject)`) under every prompt at
  guidance scale w: `volumes [P, D, H, W]`. With the deterministic samplers (DDIM η = 0,
  rectified flow: the defaults) a volume depends only on (noise, prompt, w), so the factual
  (first) prompt gives the same volume in every call. Ancestral samplers also draw per-step noise
  from the CLI's key `fold_in(key(seed + SAMPLE_STREAM), 0)`, one draw per batch position: the
  same prompt at the same position (the factual always) gives the same volume."""
  import jax
  from cf3d_jax import generate as generate_lib
  key = jax.random.fold_in(jax.random.key(int(seed) + generate_lib.SAMPLE_STREAM), 0)
  ((_, x),) = generate_lib.generate(
      gen.restored, [int(subject)], prompt_set.emb, prompt_set.mask, [guidance],
      noise_seed=int(seed), key=key, batch_size=_batch_size(gen, prompt_set, batch_size),
      negative=gen.config.sample.guidance_negative, sampler_for=gen.sampler,
      per_batch_keys=False)
  return Counterfactuals(np.asarray(x[0, ..., 0], np.float32), prompt_set, float(guidance),
                         int(seed), int(subject), gen.step, gen.affine)


def invert_scan(gen: Generator, path: str, factual: PromptSet, prompt_set: PromptSet,
                guidance: float, refine_iters: int | None = None,
                depth: float | None = None) -> Counterfactuals:
  """Counterfactuals of a given scan (as `config.sample.source` makes them): the scan conformed
  to the training grid (`invert.load_source`), inverted under its factual prompt (one-prompt
  `factual`) by the conditional model, decoded from that noise under every prompt at guidance w
  with the deterministic sampler. Differences are against the input."""
  import jax
  from cf3d_jax.generate import SAMPLE_STREAM, batched
  from cf3d_jax.invert import load_source
  if len(factual.prompts) != 1:
    raise PromptError(f"invert_scan takes one factual prompt, got {list(factual.prompts)}")
  cfg = gen.config.sample
  refine = cfg.inversion_refine if refine_iters is None else refine_iters
  depth = float(cfg.inversion_depth if depth is None else depth)
  volume = load_source(path, gen.config, gen.affine)                    # [D, H, W]
  invert = gen.inverter(refine, depth)
  params = gen.restored.params
  z_t = np.asarray(invert(params, volume[None, ..., None], factual.emb, factual.mask))
  n = len(prompt_set.prompts)
  zs = np.broadcast_to(z_t[0], (n,) + z_t.shape[1:])
  key = jax.random.key(int(gen.config.seed) + SAMPLE_STREAM)
  run = gen.sampler(guidance, deterministic=True, depth=depth)
  x = batched(lambda _, z, e, m, ne, nm: run(params, z, e, m, key, ne, nm), n,
              _batch_size(gen, prompt_set, None), zs, prompt_set.emb, prompt_set.mask,
              *_guided_against(gen, prompt_set, factual))
  return Counterfactuals(np.asarray(x[..., 0], np.float32), prompt_set, float(guidance),
                         int(gen.config.seed), 0, gen.step, gen.affine,
                         source=os.path.abspath(path), input=volume)


def difference_maps(volumes: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
  """Differences `[P', D, H, W]`: volumes[1:] − volumes[0] (P' = P − 1), or with `reference`
  `[D, H, W]` given, every volume − reference (P' = P). Positive = brighter than the reference."""
  volumes = np.asarray(volumes, np.float32)
  if volumes.ndim != 4:
    raise ValueError(f"volumes must be [P, D, H, W], got shape {volumes.shape}")
  if reference is None:
    return volumes[1:] - volumes[:1]
  reference = np.asarray(reference, np.float32)
  if reference.shape != volumes.shape[1:]:
    raise ValueError(f"reference shape {reference.shape} != volume shape {volumes.shape[1:]}")
  return volumes - reference[None]


def psnr_to(volumes: np.ndarray, reference: np.ndarray, data_range: float = 2.0) -> np.ndarray:
  """PSNR (dB) of each volume `[P, D, H, W]` against `reference [D, H, W]`: `[P]`."""
  mse = np.mean((np.asarray(volumes) - np.asarray(reference)[None]) ** 2, axis=(1, 2, 3))
  return 10.0 * np.log10(data_range ** 2 / np.maximum(mse, 1e-12))


# ---- slice viewers ---------------------------------------------------------------------------

def panels(cf: Counterfactuals) -> tuple[list[np.ndarray], list[str], list[np.ndarray], list[str]]:
  """(volumes, titles, differences, titles) to show: the input first for an inverted scan;
  differences against the input, else against the first prompt's volume."""
  titles = list(cf.prompt_set.prompts)
  vols = list(cf.volumes)
  if cf.input is not None:
    vols, titles = [cf.input] + vols, ["input"] + titles
    diffs = list(difference_maps(cf.volumes, cf.input))
    dtitles = [f"Δ {short_title(t, 24)} − input" for t in cf.prompt_set.prompts]
  else:
    diffs = list(difference_maps(cf.volumes))
    dtitles = [f"Δ {short_title(t, 24)} − first" for t in titles[1:]]
  return vols, titles, diffs, dtitles


def _importable(module: str) -> bool:
  """Whether `module` can be imported (without importing it)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def frontend_renders_widgets() -> bool:
  """Whether widgets will be drawn: ipywidgets importable and a widget frontend known to be
  attached (Colab, a Jupyter server session, VS Code). False under nbclient/nbconvert and in
  plain consoles, where a widget would show only its text form."""
  if not _importable("ipywidgets"):
    return False
  if "google.colab" in sys.modules:
    return True
  return bool(os.environ.get("JPY_SESSION_NAME") or os.environ.get("VSCODE_PID")
              or any(k.startswith("VSCODE_") for k in os.environ))


def viewer_mode(mode: str = "auto") -> str:
  """'widget' or 'static' for `mode` ('auto' asks `frontend_renders_widgets`). ConfigError for
  an unknown mode; 'widget' without ipywidgets falls back to 'static'."""
  if mode not in VIEWER_MODES:
    raise ConfigError(f"viewer mode {mode!r}: expected one of {list(VIEWER_MODES)}")
  if mode == "static":
    return "static"
  if mode == "widget":
    return "widget" if _importable("ipywidgets") else "static"
  return "widget" if frontend_renders_widgets() else "static"


def slice_widget(cf: Counterfactuals, axis: str = "axial"):
  """ipywidgets VBox: view and slice controls above a PNG of `slice_figure`, redrawn on change."""
  import ipywidgets as w  # pylint: disable=g-import-not-at-top
  vols, titles, diffs, dtitles = panels(cf)
  view = w.Dropdown(options=list(AXES), value=axis, description="view")
  sizes = {a: vols[0].shape[AXES[a]] for a in AXES}
  slider = w.IntSlider(value=sizes[axis] // 2, min=0, max=sizes[axis] - 1, description="slice",
                       continuous_update=False)
  image = w.Image(format="png")

  def redraw(*_):
    image.value = figure_png(slice_figure(vols, titles, diffs, dtitles, view.value, slider.value))

  def on_view(change):
    slider.max = sizes[change["new"]] - 1
    slider.value = min(slider.value, slider.max)
    redraw()

  view.observe(on_view, names="value")
  slider.observe(redraw, names="value")
  redraw()
  return w.VBox([w.HBox([view, slider]), image])


def show_slices(cf: Counterfactuals, mode: str = "auto", axis: str = "axial") -> str:
  """Displays the volumes side by side with their difference maps in the notebook: a slider
  viewer (mode 'widget') or a static montage of five slices (mode 'static'); 'auto' picks by
  `frontend_renders_widgets`. Returns the mode used."""
  from IPython.display import Image, display  # pylint: disable=g-import-not-at-top
  mode = viewer_mode(mode)
  if mode == "widget":
    if "google.colab" in sys.modules:
      from google.colab import output  # pylint: disable=g-import-not-at-top
      output.enable_custom_widget_manager()
    display(slice_widget(cf, axis))
  else:
    display(Image(data=figure_png(montage_figure(*panels(cf), axis=axis))))
  return mode


# ---- files -----------------------------------------------------------------------------------

def output_dir(gen: Generator, cf: Counterfactuals) -> str:
  """`WORKDIR/notebook/{synthetic|inverted}_g{w}_seed{s}_subject{k}` (inverted: the scan's name)."""
  if cf.source is None:
    name = f"synthetic_g{cf.guidance:g}_seed{cf.seed}_subject{cf.subject:03d}"
  else:
    base = os.path.basename(cf.source).removesuffix(".gz").removesuffix(".nii")
    name = f"inverted_{base}_g{cf.guidance:g}"
  return os.path.join(Workdir(gen.workdir).notebook, name)


def save_nifti(cf: Counterfactuals, out_dir: str) -> list[str]:
  """Writes, each atomically: `{i:02d}_{prompt-slug}.nii.gz` per volume, `diff_{i:02d}_...` per
  difference map, `input.nii.gz` (inverted scans), `montage.png` (mid-slices, `figures.save_montage`)
  and `prompts.json` (prompts, where each embedding came from, guidance, seed, step). Returns
  the paths written."""
  from cf3d_jax.data.nifti import save_volume
  from cf3d_jax.files import slug
  ps = cf.prompt_set
  paths = []
  for i, (p, v) in enumerate(zip(ps.prompts, cf.volumes)):
    paths.append(os.path.join(out_dir, f"{i:02d}_{slug(p)}.nii.gz"))
    save_volume(paths[-1], v, cf.affine)
  first = 0 if cf.input is not None else 1
  for i, d in enumerate(difference_maps(cf.volumes, cf.input), start=first):
    paths.append(os.path.join(out_dir, f"diff_{i:02d}_{slug(ps.prompts[i])}.nii.gz"))
    save_volume(paths[-1], d, cf.affine)
  if cf.input is not None:
    paths.append(os.path.join(out_dir, "input.nii.gz"))
    save_volume(paths[-1], cf.input, cf.affine)
  vols, titles, _, _ = panels(cf)
  paths.append(os.path.join(out_dir, "montage.png"))
  save_montage(paths[-1], vols, titles)
  info = {"prompts": list(ps.prompts), "requested": list(ps.requested),
          "embedding_sources": list(ps.sources), "encoder_note": ps.note,
          "guidance_scale": cf.guidance, "seed": cf.seed, "subject": cf.subject,
          "checkpoint_step": cf.step, "source": cf.source,
          "difference": "volume − input" if cf.input is not None else "volume − prompt 0",
          "files": [os.path.basename(p) for p in paths]}
  if cf.input is not None:
    info["psnr_vs_input_db"] = [float(x) for x in psnr_to(cf.volumes, cf.input)]
  paths.append(os.path.join(out_dir, "prompts.json"))
  write_text(paths[-1], json.dumps(info, indent=1))
  return paths


def zip_files(paths: Sequence[str], zip_path: str) -> str:
  """Zips `paths` (flat, by base name) into `zip_path` atomically; returns `zip_path`."""
  with atomic_path(zip_path) as tmp:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
      for p in paths:
        z.write(p, arcname=os.path.basename(p))
  return zip_path


def offer_download(path: str) -> str:
  """Offers `path` for download: `google.colab.files.download` on Colab, else a link (Jupyter)
  and the absolute path. Returns what was done, as one line."""
  path = os.path.abspath(path)
  if "google.colab" in sys.modules:
    from google.colab import files  # pylint: disable=g-import-not-at-top
    files.download(path)
    return f"download started: {path}"
  try:
    from IPython.display import FileLink, display  # pylint: disable=g-import-not-at-top
    rel = os.path.relpath(path)
    if not rel.startswith(".."):
      display(FileLink(rel))
  except ImportError:
    pass
  return f"files at {path}"
