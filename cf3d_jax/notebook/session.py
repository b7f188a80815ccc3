"""Notebook session, part 1: finding the config and the workdir, restoring the generator.

`load_generator(WORKDIR, CONFIG)` restores the trained U-Net (EMA by default) and its embedding
table as a `Generator`, which compiles each sampler and inverter once per session.
`run_cli` runs `python -m cf3d_jax.main` (e.g. to train) with its output echoed into the notebook.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from cf3d_jax.errors import Cf3dError, ConfigError, DataError
from cf3d_jax.text.table import EmbeddingTable
from cf3d_jax.workdir import Workdir

if TYPE_CHECKING:
  from cf3d_jax import checkpoints


def repo_root() -> str:
  """The folder holding the cf3d_jax package (a clone or an editable install has `configs/`)."""
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # cf3d_jax/
  return os.path.dirname(package)


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

  def sampler(self, scale: float, deterministic: bool = False, depth: float = 1.0,
              residuals: bool = False):
    """`generate.make_sampler` for this guidance scale (the config's background regularization;
    `residuals`: decoding an edit-friendly inversion), built (and jit-compiled) once per
    session."""
    from cf3d_jax.background import background_of
    from cf3d_jax.generate import make_sampler
    deterministic = deterministic and not (depth == 1.0 and self.sampler_is_ode())
    key = ("sample", float(scale), deterministic, float(depth), bool(residuals))
    if key not in self._cache:
      r = self.restored
      self._cache[key] = make_sampler(r.model, r.objective, r.space, float(scale), *r.null,
                                      deterministic=deterministic, depth=depth,
                                      background=background_of(self.config),
                                      residuals=bool(residuals))
    return self._cache[key]

  def inverter(self, refine_iters: int, depth: float, method: str = "ddim"):
    """`generate.make_inverter` (conditional model), built once per (refinements, depth,
    method: `config.sample.inversion`)."""
    from cf3d_jax.generate import make_inverter
    key = ("invert", int(refine_iters), float(depth), str(method))
    if key not in self._cache:
      r = self.restored
      self._cache[key] = make_inverter(r.model, r.objective, r.space, int(refine_iters),
                                       float(depth), method=str(method))
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
