"""Checkpoints: the orbax manager, the train state's abstract layout and shardings, restore; and
`Generator`, a trained U-Net restored for inference by `load_generator(config, workdir)`.

The train state is a plain pytree `{params, ema, opt_state, step}` (`init_state`), saved by
`train.py` as the orbax item `state` next to `data` (the grain iterator) and `meta` (JSON: step,
seed and the config fingerprint, `fingerprint.record`). Every restore goes against an abstract
target whose leaves carry their shardings, so a checkpoint lands laid out for the current mesh
whatever mesh wrote it. Inference (`load_generator`) restores only the parameters it samples
with (EMA or raw) and the step — never the optimizer state, and it builds no optimizer.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from cf3d_jax import config_base, fingerprint, parallel
from cf3d_jax.data import records
from cf3d_jax.errors import DataError
from cf3d_jax.models import unet as unet_lib
from cf3d_jax.objectives import Objective, make_objective
from cf3d_jax.spaces import Space, make_space
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.text.table import EmbeddingTable, load_table
from cf3d_jax.workdir import Workdir

State = dict[str, Any]
PARAM_ITEMS = ("params", "ema")   # the state's parameter trees a generator can sample with


# ---- components and the state layout ----------------------------------------------------------

def build_components(config, workdir: str | None = None, load_autoencoder: bool = False
                     ) -> tuple[Any, Objective, Space]:
  """(model, objective, space) named by the config; `workdir` and `load_autoencoder` are passed
  to `spaces.make_space` (the latent space's recorded scale factor and its VAE)."""
  space = make_space(config.space, workdir, load_autoencoder=load_autoencoder)
  objective = make_objective(config.objective, space.latent_shape(tuple(config.data.shape)))
  return unet_lib.build_unet(config.model), objective, space


def init_state(model, tx: optax.GradientTransformation, key: jax.Array, z_shape,
               text_shape) -> State:
  """Fresh state; z_shape `(N, d, h, w, C)`, text_shape `(L, E)`."""
  params = unet_lib.make_init_fn(model, z_shape, text_shape)(key)
  return {"params": params, "ema": jax.tree.map(jnp.copy, params),
          "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def _one_latent(config) -> tuple[int, ...]:
  """`(1, d, h, w, C)`: one item of the config's space, the shape parameters are made for."""
  return (1,) + make_space(config.space).latent_shape(tuple(config.data.shape))


def param_shardings(model, abstract_params: Any, config, text_shape, mesh) -> Any:
  """NamedShardings of the U-Net parameters under `config.mesh.rules` (FSDP-style by default)."""
  rules = parallel.rules_from_config(config.mesh)
  logical = unet_lib.param_logical_axes(model, _one_latent(config), text_shape)
  return parallel.tree_shardings(logical, abstract_params, mesh, rules)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def abstract_params(model, config, text_shape, mesh=None) -> Any:
  """Shapes and dtypes of the U-Net parameters (= of the EMA), with no memory allocated; with
  `mesh`, each leaf carries its sharding (`param_shardings`)."""
  init = unet_lib.make_init_fn(model, _one_latent(config), text_shape)
  abstract = jax.eval_shape(init, jax.random.key(0))
  if mesh is None:
    return abstract
  return _with_shardings(abstract, param_shardings(model, abstract, config, text_shape, mesh))


def abstract_state(model, tx: optax.GradientTransformation, config, text_shape,
                   mesh=None) -> State:
  """Shapes and dtypes of the train state, with no memory allocated; with `mesh`, each leaf
  carries its sharding (`state_shardings`), so a restore lands laid out for this mesh."""
  abstract = jax.eval_shape(
      lambda k: init_state(model, tx, k, _one_latent(config), text_shape), jax.random.key(0))
  if mesh is None:
    return abstract
  return _with_shardings(abstract, state_shardings(model, abstract, config, text_shape, mesh))


def state_shardings(model, abstract: State, config, text_shape, mesh) -> State:
  """NamedShardings of the train state under `config.mesh.rules` (FSDP-style by default)."""
  return parallel.state_shardings(
      abstract, param_shardings(model, abstract["params"], config, text_shape, mesh), mesh)


# ---- the manager -------------------------------------------------------------------------------

def remove_unfinished_saves(folder: str) -> list[str]:
  """Deletes orbax's `STEP.orbax-checkpoint-tmp*` folders (saves killed before they committed)
  in `folder` (process 0 only; the workdir lock keeps other jobs out); returns their names."""
  if jax.process_index() != 0 or not os.path.isdir(folder):
    return []
  names = sorted(n for n in os.listdir(folder) if ".orbax-checkpoint-tmp" in n)
  for name in names:
    logging.warning("removing an unfinished checkpoint save: %s", os.path.join(folder, name))
    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
  return names


def make_manager(folder: str, max_to_keep: int) -> ocp.CheckpointManager:
  """An orbax manager of `folder` keeping the last `max_to_keep` steps, saving asynchronously."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(folder), options=options)


def checkpoint_manager(workdir: str, train_config) -> ocp.CheckpointManager:
  """The diffusion trainer's manager of `WORKDIR/checkpoints` (`train.max_to_keep`), after
  removing the saves a killed run left unfinished."""
  folder = Workdir(workdir).checkpoints
  remove_unfinished_saves(folder)
  return make_manager(folder, train_config.max_to_keep)


# ---- restore -----------------------------------------------------------------------------------

def saved_step(mngr: ocp.CheckpointManager, step: int | None = None) -> int:
  """`step` (None or < 0: the latest); DataError naming the folder when it was not saved."""
  step = mngr.latest_step() if step is None or step < 0 else step
  if step is None:
    raise DataError(f"{mngr.directory}: no checkpoint to restore; train first")
  if step not in mngr.all_steps():
    raise DataError(f"{mngr.directory}: no checkpoint at step {step} (config.sample."
                    f"checkpoint_step); saved steps: {sorted(mngr.all_steps())} (-1 = latest)")
  return step


def restore_state(mngr: ocp.CheckpointManager, abstract_state: State, step: int | None = None,
                  data_iterator=None) -> State:
  """Restores state (and the iterator in place) from `step` (default: latest)."""
  step = saved_step(mngr, step)
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  return mngr.restore(step, args=ocp.args.Composite(**items))["state"]


def restore_params(mngr: ocp.CheckpointManager, abstract: Any, which: str = "ema",
                   step: int | None = None) -> tuple[Any, int]:
  """(parameters, step) of checkpoint `step` (default: latest): only the state's `which` tree
  ('params' or 'ema', shaped and laid out as `abstract`) and its step are read (an orbax partial
  restore); the optimizer state stays on disk."""
  if which not in PARAM_ITEMS:
    raise ValueError(f"which={which!r}: expected one of {PARAM_ITEMS}")
  step = saved_step(mngr, step)
  replicated = getattr(jax.tree.leaves(abstract)[0], "sharding", None)
  if isinstance(replicated, jax.sharding.NamedSharding):
    replicated = parallel.replicated(replicated.mesh)
  target = {which: abstract, "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)))["state"]
  return state[which], int(state["step"])


def checkpoint_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The JSON `meta` item of checkpoint `step` (step, seed and, since fingerprints, `config`)."""
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def check_checkpoint_config(config, mngr: ocp.CheckpointManager, step: int | None,
                            groups=("model",), more=(), where: str | None = None) -> None:
  """ConfigError listing the keys of `groups` (`fingerprint`) that differ between `config` and
  the config checkpoint `step` (default latest) was trained with, and the differences `more`
  found in the prepared data; `where` names the workdir in the message."""
  step = mngr.latest_step() if step is None or step < 0 else step
  stored = {}
  if step is not None and step in mngr.all_steps():
    stored = checkpoint_meta(mngr, step).get("config")
    where = where or os.path.join(str(mngr.directory), str(step))
  fingerprint.check(stored, config, groups, where or str(mngr.directory), more)


# ---- the generator ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Generator:
  """A trained U-Net restored for sampling: what `generate.make_sampler` and the jobs need.

  Attributes:
    model, objective, space: the components the config names (`build_components`; the latent
      space with its VAE loaded).
    params: the U-Net parameters sampled with — the EMA when `config.sample.use_ema`, else the
      raw ones — restored onto `mesh` (FSDP by `rules`), whatever mesh trained them.
    step: the training step of the restored checkpoint.
    table: the workdir's embedding table (`data/text_table.npz`).
    null: the null prompt's (embedding `[L, E]`, mask `[L]`), what classifier-free guidance
      guides against.
    affine: the data grid's 4×4 voxel-to-world affine (written into every NIfTI).
    data_shape: the volume grid `(D, H, W)` (`config.data.shape`).
    mesh, rules: the device mesh (`config.mesh.shape`) and its logical-axis rules.
  """
  model: Any
  objective: Objective
  space: Space
  params: Any
  step: int
  table: EmbeddingTable
  null: tuple[np.ndarray, np.ndarray]
  affine: np.ndarray
  data_shape: tuple[int, ...]
  mesh: Any
  rules: parallel.Rules

  @property
  def latent_shape(self) -> tuple[int, ...]:
    """Shape of one starting noise, without batch (e.g. `(16, 16, 16, 8)` for WDM at 32³)."""
    return tuple(self.space.latent_shape(tuple(self.data_shape)))


def load_generator(config, workdir: str) -> Generator:
  """Restores the generator of `workdir` for `config` (validated for sampling).

  Checkpoint `config.sample.checkpoint_step` (-1 = latest); the config must match the one it was
  trained with in the model keys (`check_checkpoint_config`, ConfigError otherwise). DataError
  names what is missing (prepared data, table, checkpoint).
  """
  config_base.validate(config, "sample")
  wd = Workdir(workdir)
  index = records.load_index(wd.records)
  table = load_table(wd.table)
  null_emb, null_mask = table.lookup([prompt_lib.NULL_PROMPT])
  model, objective, space = build_components(config, workdir, load_autoencoder=True)
  mesh = parallel.make_mesh(config.mesh.shape)
  parallel.check_spatial_divisible(tuple(config.data.shape), mesh, "data.shape")
  mngr = checkpoint_manager(workdir, config.train)
  check_checkpoint_config(config, mngr, config.sample.checkpoint_step, ("model",))
  # Restored straight onto the mesh (FSDP by config.mesh.rules), whatever mesh trained it.
  params, step = restore_params(
      mngr, abstract_params(model, config, table.embeddings.shape[1:], mesh),
      "ema" if config.sample.use_ema else "params", step=config.sample.checkpoint_step)
  return Generator(model=model, objective=objective, space=space, params=params, step=step,
                   table=table, null=(null_emb[0], null_mask[0]),
                   affine=np.asarray(index["meta"].get("affine", np.eye(4))),
                   data_shape=tuple(config.data.shape), mesh=mesh,
                   rules=parallel.rules_from_config(config.mesh))
