"""`train_and_evaluate(config, workdir)`: the one readable training loop (big_vision style).

State is a plain pytree `{params, ema, opt_state, step}`, donated to a jitted pure
`train_step`; the step's randomness is `fold_in(key(seed), step)`. Orbax checkpoints hold the
state, the grain iterator position and a JSON summary, so a run killed at any point resumes from
its last checkpoint and continues exactly as if it had not stopped.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from cf3d_jax import config_base, parallel
from cf3d_jax.data import pipeline, records
from cf3d_jax.data.prepare import data_paths
from cf3d_jax.errors import Cf3dError, DataError
from cf3d_jax.models import unet as unet_lib
from cf3d_jax.objectives import make_objective
from cf3d_jax.spaces import make_space
from cf3d_jax.text.table import load_table

State = dict[str, Any]


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW with linear warmup to a constant rate, after global-norm clipping."""
  if train_config.warmup_steps > 0:
    lr = optax.warmup_constant_schedule(0.0, train_config.learning_rate,
                                        train_config.warmup_steps)
  else:
    lr = optax.constant_schedule(train_config.learning_rate)
  chain = [optax.adamw(lr, weight_decay=train_config.weight_decay)]
  if train_config.grad_clip_norm > 0:
    chain.insert(0, optax.clip_by_global_norm(train_config.grad_clip_norm))
  return optax.chain(*chain)


def init_state(model, tx, key: jax.Array, z_shape, text_shape) -> State:
  """Fresh state; z_shape `(N, d, h, w, C)`, text_shape `(L, E)`."""
  params = unet_lib.make_init_fn(model, z_shape, text_shape)(key)
  return {"params": params, "ema": jax.tree.map(jnp.copy, params),
          "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def train_step(state: State, batch: dict[str, jax.Array], base_key: jax.Array, *, model, tx,
               objective, space, ema_decay: float) -> tuple[State, dict[str, jax.Array]]:
  """One optimisation step. batch: volume `[B, D, H, W, 1]`, text_emb `[B, L, E]`, text_mask."""
  key = jax.random.fold_in(base_key, state["step"])
  k_time, k_noise, k_drop = jax.random.split(key, 3)
  z0 = space.encode(batch["volume"])
  t = objective.sample_time(k_time, z0.shape[0])
  noise = jax.random.normal(k_noise, z0.shape, z0.dtype)
  z_t = objective.corrupt(z0, noise, t)
  target = objective.target(z0, noise, t)

  def loss_fn(params):
    out = model.apply({"params": params}, z_t, objective.model_time(t), batch["text_emb"],
                      batch["text_mask"], train=True, rngs={"dropout": k_drop})
    return jnp.mean(objective.loss(objective.prediction_from_output(out, z_t, t), target))

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state["ema"], params)
  new_state = {"params": params, "ema": ema, "opt_state": opt_state, "step": state["step"] + 1}
  return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def checkpoint_manager(workdir: str, train_config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=train_config.max_to_keep,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


def restore_state(mngr: ocp.CheckpointManager, abstract_state: State, step: int | None = None,
                  data_iterator=None) -> State:
  """Restores state (and the iterator in place) from `step` (default: latest)."""
  step = mngr.latest_step() if step is None or step < 0 else step
  if step is None:
    raise DataError(f"{mngr.directory}: no checkpoint to restore; train first")
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  return mngr.restore(step, args=ocp.args.Composite(**items))["state"]


def build_components(config):
  """(model, objective, space) named by the config."""
  space = make_space(config.space)
  objective = make_objective(config.objective, space.latent_shape(tuple(config.data.shape)))
  return unet_lib.build_unet(config.model), objective, space


def abstract_state(model, tx, config, text_shape) -> State:
  """Shapes and dtypes of the train state, with no memory allocated."""
  space = make_space(config.space)
  z_shape = (1,) + space.latent_shape(tuple(config.data.shape))
  return jax.eval_shape(
      lambda k: init_state(model, tx, k, z_shape, text_shape), jax.random.key(0))


def train_and_evaluate(config, workdir: str) -> State:
  """Trains to `config.train.num_steps`, resuming from `workdir/checkpoints` if present."""
  # ---- config and logging ------------------------------------------------------------------
  config_base.validate(config)
  from clu import metric_writers, periodic_actions
  writer = metric_writers.create_default_writer(
      os.path.join(workdir, "tensorboard"), just_logging=jax.process_index() > 0)
  # ---- mesh and input ----------------------------------------------------------------------
  mesh = parallel.make_mesh(config.mesh.shape)
  parallel.check_batch_divisible(config.train.batch_size, mesh, "train.batch_size")
  paths = data_paths(workdir)
  index = records.load_index(paths["records"])
  table = load_table(paths["table"])
  dataset = pipeline.make_train_dataset(paths["records"], index, table, config)
  data_iter = iter(dataset)
  # ---- model, objective, optimizer ---------------------------------------------------------
  model, objective, space = build_components(config)
  tx = make_optimizer(config.train)
  base_key = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(base_key)
  z_shape = (config.train.batch_size,) + space.latent_shape(tuple(config.data.shape))
  text_shape = table.embeddings.shape[1:]
  init_fn = jax.jit(lambda k: init_state(model, tx, k, z_shape, text_shape),
                    out_shardings=parallel.replicated(mesh))
  state = init_fn.lower(init_key).compile(
      compiler_options=unet_lib.INIT_COMPILER_OPTIONS)(init_key)
  # ---- resume ------------------------------------------------------------------------------
  mngr = checkpoint_manager(workdir, config.train)
  if mngr.latest_step() is not None:
    state = restore_state(mngr, jax.tree.map(ocp.utils.to_shape_dtype_struct, state),
                          data_iterator=data_iter)
    logging.info("resumed from step %d", int(state["step"]))
  # ---- the step ----------------------------------------------------------------------------
  step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, objective=objective,
                                      space=space, ema_decay=config.train.ema_decay),
                    donate_argnums=0)
  report = periodic_actions.ReportProgress(num_train_steps=config.train.num_steps,
                                           writer=writer, every_steps=config.train.log_every)
  step = int(state["step"])
  if step == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items() if k != "sample"})
  t0, in_flight = time.time(), None
  while step < config.train.num_steps:
    batch = parallel.put_batch({k: v for k, v in next(data_iter).items() if k != "is_null"}, mesh)
    state, metrics = step_fn(state, batch, step_key)
    if in_flight is not None:   # at most two steps in flight: bounded memory, honest timing
      jax.block_until_ready(in_flight)
    in_flight = metrics["loss"]
    step += 1
    report(step, time.time())
    if step % config.train.log_every == 0 or step == config.train.num_steps:
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(values["loss"]):
        raise Cf3dError(f"training diverged at step {step}: loss {values['loss']}; lower "
                        "config.train.learning_rate or enable config.train.grad_clip_norm")
      values["steps_per_sec"] = config.train.log_every / max(time.time() - t0, 1e-9)
      writer.write_scalars(step, values)
      t0 = time.time()
    if step % config.train.checkpoint_every == 0 or step == config.train.num_steps:
      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iter),
          meta=ocp.args.JsonSave({"step": step, "seed": config.seed})))
  mngr.wait_until_finished()
  writer.flush()
  return state
