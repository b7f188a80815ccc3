"""`train_and_evaluate(config, workdir)`: the one readable training loop (big_vision style).

State is a plain pytree `{params, ema, opt_state, step}`, donated to a jitted pure
`train_step`; the step's randomness is `fold_in(key(seed), step)`. Orbax checkpoints hold the
state, the grain iterator position and a JSON summary, so a run killed at any point resumes from
its last checkpoint and continues exactly as if it had not stopped (the state layout, manager and
restore live in `cf3d_jax.checkpoints`).

On a mesh (`cf3d_jax.parallel`): the state is created and restored already sharded (params, EMA
and Adam moments FSDP-style by `config.mesh.rules`), the step is jitted with in/out shardings,
each host feeds its own rows, and every host takes part in orbax saves and restores; only
process 0 writes summaries.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from cf3d_jax import config_base, fingerprint, parallel
from cf3d_jax.checkpoints import State, abstract_state, build_components, \
    check_checkpoint_config, checkpoint_manager, init_state, restore_state
from cf3d_jax.data import pipeline, records
from cf3d_jax.errors import Cf3dError, ConfigError, Preempted
from cf3d_jax.models import unet as unet_lib
from cf3d_jax.objectives import Objective
from cf3d_jax.spaces import Space, make_space, placed
from cf3d_jax.text.table import load_table
from cf3d_jax.workdir import Workdir


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Step → learning rate: linear warmup from 0 over `warmup_steps`, then `learning_rate`
  held ('constant') or cosine-decayed to `final_lr_fraction · learning_rate` at step
  `lr_decay_steps` (0: `num_steps`) and held there ('cosine')."""
  peak = train_config.learning_rate
  warmup = train_config.warmup_steps
  if train_config.lr_schedule == "constant":
    if warmup > 0:
      return optax.warmup_constant_schedule(0.0, peak, warmup)
    return optax.constant_schedule(peak)
  horizon = train_config.lr_decay_steps or train_config.num_steps
  if horizon <= warmup:
    raise ConfigError(f"train.lr_schedule='cosine' decays over {horizon} steps "
                      f"(train.lr_decay_steps, 0 = train.num_steps), which must exceed "
                      f"train.warmup_steps={warmup}")
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup, horizon, end_value=peak * train_config.final_lr_fraction)


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW on `learning_rate_schedule(train_config)`, after global-norm clipping."""
  chain = [optax.adamw(learning_rate_schedule(train_config),
                       weight_decay=train_config.weight_decay)]
  if train_config.grad_clip_norm > 0:
    chain.insert(0, optax.clip_by_global_norm(train_config.grad_clip_norm))
  return optax.chain(*chain)


def train_step(state: State, batch: dict[str, jax.Array], base_key: jax.Array, *, model, tx,
               objective, space, ema_decay: float, mesh=None,
               rules: parallel.Rules = parallel.DEFAULT_RULES
               ) -> tuple[State, dict[str, jax.Array]]:
  """One optimisation step. batch: volume `[B, *space.record_shape]` (images `[B, D, H, W, 1]`,
  or unscaled latents for the latent space), text_emb `[B, L, E]`, text_mask `[B, L]`.

  With `mesh`, the batch mean of the per-example loss is an explicit psum of per-device sums
  (`parallel.global_mean`); trace it inside `parallel.activation_context(mesh, rules)` so the
  model's activation constraints apply.
  """
  key = jax.random.fold_in(base_key, state["step"])
  k_time, k_noise, k_drop = jax.random.split(key, 3)
  z0 = space.from_records(batch["volume"])
  t = objective.sample_time(k_time, z0.shape[0])
  noise = jax.random.normal(k_noise, z0.shape, z0.dtype)
  z_t = objective.corrupt(z0, noise, t)
  target = objective.target(z0, noise, t)

  def loss_fn(params):
    out = model.apply({"params": params}, z_t, objective.model_time(t), batch["text_emb"],
                      batch["text_mask"], train=True, rngs={"dropout": k_drop})
    per_example = objective.loss(objective.prediction_from_output(out, z_t, t), target, t,
                                 clean=z0, noisy=z_t)
    return parallel.global_mean(per_example, mesh, rules)

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state["ema"], params)
  new_state = {"params": params, "ema": ema, "opt_state": opt_state, "step": state["step"] + 1}
  return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def params_from_pretrained(params, path: str):
  """`params` (a fresh init) with every param of the converted U-Net at `path` (`python -m
  cf3d_jax.convert wdm-unet`) copied in. Layers the pretrained model lacks keep their init,
  which leaves the function unchanged: attention layers (zero output projection) and middle
  blocks beyond its count (a fresh ResBlock is the identity). Anything else that does not match
  is a DataError naming `path`."""
  from cf3d_jax import convert
  from cf3d_jax.convert import wdm_unet
  _, pretrained = convert.load_converted(path)
  have = set(pretrained)

  def allow_new(p: str) -> bool:
    top = p.split("/")[0]
    return wdm_unet.is_attention_param(p) or (top.startswith("middle_block_")
                                              and top not in have)

  return wdm_unet.merge_pretrained(params, pretrained, source=path, allow_new=allow_new)


def data_config_differences(config, index: dict) -> list:
  """(key, old, new) where the prepared records' recorded data keys differ from `config`."""
  stored = index.get("meta", {}).get("config")
  if stored is None:
    return []
  return fingerprint.differences(stored, config, fingerprint.keys_for(config, "data"))


@contextlib.contextmanager
def preemption_signal() -> Iterator[Callable[[], bool]]:
  """Within the block SIGTERM (SLURM, TPU preemption) does not kill the process: it sets a flag
  that the yielded function reads, so the loop can save and stop. Restores the old handler."""
  if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
    # Signal handlers live in the main thread; on several hosts a SIGTERM seen by some of them
    # would make them save alone (orbax saves are collective): keep the periodic checkpoints.
    yield lambda: False
    return
  got = []
  old = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
  try:
    yield lambda: bool(got)
  finally:
    signal.signal(signal.SIGTERM, old)


@jax.jit
def track_finite(finite: jax.Array, metrics: dict[str, jax.Array]) -> jax.Array:
  """`finite` and-ed with this step's loss and gradient norm being finite (on device)."""
  return finite & jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])


def check_finite(finite: jax.Array, metrics: dict[str, jax.Array], step: int,
                 last_good: int | None) -> None:
  """Cf3dError if a loss or gradient norm since the last save was NaN/Inf (`track_finite`),
  naming the last good checkpoint; nothing is saved after it."""
  if bool(jax.device_get(finite)):
    return
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  resume = (f"the last good checkpoint is step {last_good} (a resume starts there)"
            if last_good is not None else "no checkpoint was saved (a rerun starts over)")
  raise Cf3dError(f"training diverged by step {step} (loss {values['loss']}, grad norm "
                  f"{values['grad_norm']}; non-finite since the last check): not saved; "
                  f"{resume}. Lower config.train.learning_rate or enable "
                  "config.train.grad_clip_norm")


def make_train_step(model, tx, objective: Objective, space: Space, config, mesh=None,
                    state_sh: State | None = None, batch_sh: dict[str, Any] | None = None,
                    interleaved_hosts: int = 1):
  """`train_step` jitted on `mesh`: state in and out with `state_sh` (donated), batch with
  `batch_sh`, metrics replicated. Call it inside `parallel.activation_context`.

  mesh=None: jitted for the default device with the state donated and no shardings (the
  benchmark times one chip this way).

  interleaved_hosts=n > 1: the batch arrives as n per-host blocks of the element-interleaved
  global stream (host p holds elements p, p + n, …; `pipeline.make_train_dataset`); its rows
  are put back in stream order first, so each example meets the same time and noise draw as in
  a one-process run; it needs `mesh` and `batch_sh` (ValueError otherwise).
  """
  if interleaved_hosts > 1 and (mesh is None or batch_sh is None):
    raise ValueError(f"make_train_step: interleaved_hosts={interleaved_hosts} reorders a batch "
                     "sharded over hosts; give the mesh and batch_sh it is sharded with")
  rules = parallel.rules_from_config(config.mesh)
  step = functools.partial(train_step, model=model, tx=tx, objective=objective,
                           space=space if mesh is None else placed(space, mesh, rules),
                           ema_decay=config.train.ema_decay, mesh=mesh, rules=rules)

  def run(state, batch, key):
    if interleaved_hosts > 1:
      order = parallel.interleaved_order(config.train.batch_size, interleaved_hosts)
      batch = {k: jax.lax.with_sharding_constraint(jnp.take(v, order, axis=0), batch_sh[k])
               for k, v in batch.items()}
    return step(state, batch, key)

  if mesh is None:
    return jax.jit(run, donate_argnums=0)
  rep = parallel.replicated(mesh)
  return jax.jit(run, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                 donate_argnums=0)


def make_host_batches(data_iter, config, mesh, rules, per_host: bool):
  """Yields global batches from this host's stream.

  per_host: the stream's batches hold this host's rows only (`pipeline.make_train_dataset`
  sharded by process), placed as block `process_index` of the global batch. Otherwise they
  hold the whole global batch and every host keeps the rows its devices hold.
  """
  global_b = config.train.batch_size
  expected = global_b // jax.process_count() if per_host else global_b
  for host in data_iter:
    host = {k: v for k, v in host.items() if k != "is_null"}
    if len(host["volume"]) != expected:
      raise Cf3dError(f"input pipeline gave {len(host['volume'])} rows; expected {expected} "
                      f"(config.train.batch_size={global_b}, {jax.process_count()} processes)")
    yield parallel.put_batch(host, mesh, rules, global_rows=not per_host)


def _make_dataset(records_dir: str, index, table, config, mesh, rules) -> tuple[Any, bool]:
  """(train stream, whether it is per-host). Per-host when the pipeline shards by process and
  the batch layout gives each process one contiguous block of rows in process order (else
  every host reads the global stream and keeps its rows)."""
  n = jax.process_count()
  b = config.train.batch_size
  volume = (b,) + make_space(config.space).record_shape(tuple(config.data.shape))
  sharding = parallel.NamedSharding(mesh, parallel.batch_spec(volume, mesh, rules))
  rows = parallel.host_rows(sharding, volume)
  blocked = b % n == 0 and rows == slice(jax.process_index() * (b // n),
                                         (jax.process_index() + 1) * (b // n))
  if "shard_index" not in inspect.signature(pipeline.make_train_dataset).parameters:
    return pipeline.make_train_dataset(records_dir, index, table, config), False
  per_host = n > 1 and blocked
  shard = (jax.process_index(), n) if per_host else (0, 1)
  return pipeline.make_train_dataset(records_dir, index, table, config,
                                     shard_index=shard[0], shard_count=shard[1]), per_host


def train_and_evaluate(config, workdir: str) -> State:
  """Trains to `config.train.num_steps`, resuming from `workdir/checkpoints` if present."""
  # ---- config and logging ------------------------------------------------------------------
  config_base.validate(config, "train")
  # ---- the workdir holds this config's data and checkpoints (else one error, nothing run) ----
  wd = Workdir(workdir)
  mngr = checkpoint_manager(workdir, config.train)
  prepared = os.path.join(wd.records, records.INDEX_NAME)
  check_checkpoint_config(config, mngr, None, ("model", "recipe"), where=workdir,
                          more=data_config_differences(config, records.load_index(
                              wd.records)) if os.path.exists(prepared) else ())
  from clu import metric_writers, periodic_actions
  writer = metric_writers.create_default_writer(
      wd.tensorboard, just_logging=jax.process_index() > 0)
  # ---- mesh and input ----------------------------------------------------------------------
  mesh = parallel.make_mesh(config.mesh.shape)
  rules = parallel.rules_from_config(config.mesh)
  parallel.check_batch_divisible(config.train.batch_size, mesh, "train.batch_size")
  parallel.check_spatial_divisible(tuple(config.data.shape), mesh, "data.shape")
  records_dir = wd.train_records(config.space.name)
  index = records.load_index(records_dir)
  table = load_table(wd.table)
  if jax.process_count() == 1 and mesh.devices.size == 1:   # nothing to partition: one line
    logging.info("one process on one %s device", mesh.devices.flat[0].platform)
  else:
    logging.info("process %d of %d; mesh %s over %d devices; rules %s", jax.process_index(),
                 jax.process_count(), dict(mesh.shape), mesh.devices.size, rules)
  dataset, per_host = _make_dataset(records_dir, index, table, config, mesh, rules)
  data_iter = iter(dataset)
  # ---- model, objective, optimizer ---------------------------------------------------------
  model, objective, space = build_components(config, workdir)
  tx = make_optimizer(config.train)
  base_key = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(base_key)
  z_shape = (config.train.batch_size,) + space.latent_shape(tuple(config.data.shape))
  text_shape = table.embeddings.shape[1:]
  # ---- sharding: params, EMA and Adam moments FSDP-style, the batch over data × fsdp -------
  abstract = abstract_state(model, tx, config, text_shape, mesh)
  state_sh = jax.tree.map(lambda a: a.sharding, abstract)
  volume_shape = (config.train.batch_size,) + space.record_shape(tuple(config.data.shape))
  batch_sh = parallel.batch_shardings(
      {"volume": volume_shape, "text_emb": (config.train.batch_size,) + tuple(text_shape),
       "text_mask": (config.train.batch_size, text_shape[0]),
       "label": (config.train.batch_size,)}, mesh, rules)
  init_fn = jax.jit(lambda k: init_state(model, tx, k, z_shape, text_shape),
                    out_shardings=state_sh)
  state = init_fn.lower(init_key).compile(
      compiler_options=unet_lib.INIT_COMPILER_OPTIONS)(init_key)
  # ---- resume, or start from a pretrained U-Net ---------------------------------------------
  if mngr.latest_step() is None and config.train.init_from:
    params = params_from_pretrained(state["params"], config.train.init_from)
    state = {**state, "params": params, "ema": jax.tree.map(jnp.copy, params)}
    logging.info("initialised from %s", config.train.init_from)
  if mngr.latest_step() is not None:
    state = restore_state(mngr, abstract, data_iterator=data_iter)
    logging.info("resumed from step %d", int(state["step"]))
  # ---- the step ----------------------------------------------------------------------------
  step_fn = make_train_step(model, tx, objective, space, config, mesh, state_sh, batch_sh,
                            interleaved_hosts=jax.process_count() if per_host else 1)
  batches = make_host_batches(data_iter, config, mesh, rules, per_host)
  report = periodic_actions.ReportProgress(num_train_steps=config.train.num_steps,
                                           writer=writer, every_steps=config.train.log_every)
  step = int(state["step"])
  if step == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items() if k != "sample"})
  from tqdm import tqdm
  bar = tqdm(total=config.train.num_steps, initial=step, desc="training", unit="step",
             disable=jax.process_index() > 0, dynamic_ncols=True, mininterval=2.0)
  started = time.time()
  t0, in_flight = time.time(), None
  finite = jnp.ones((), bool)           # on device: every loss and grad norm since the last save
  last_good = mngr.latest_step()
  with preemption_signal() as preempted:
    while step < config.train.num_steps:
      with parallel.activation_context(mesh, rules):
        state, metrics = step_fn(state, next(batches), step_key)
      if in_flight is not None:   # at most two steps in flight: bounded memory, honest timing
        jax.block_until_ready(in_flight)
      in_flight = metrics["loss"]
      finite = track_finite(finite, metrics)
      step += 1
      bar.update(1)
      report(step, time.time())
      if step % config.train.log_every == 0 or step == config.train.num_steps:
        check_finite(finite, metrics, step, last_good)
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        values["steps_per_sec"] = config.train.log_every / max(time.time() - t0, 1e-9)
        writer.write_scalars(step, values)
        bar.set_postfix(loss=f"{values['loss']:.3g}", refresh=False)
        t0 = time.time()
      stop = preempted()
      if step % config.train.checkpoint_every == 0 or step == config.train.num_steps or stop:
        check_finite(finite, metrics, step, last_good)      # never save a non-finite state
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave({"step": step, "seed": config.seed,
                                    "config": fingerprint.record(config, "model", "recipe")})),
            force=stop)
        last_good = step
      if stop:
        bar.close()
        mngr.wait_until_finished()
        writer.flush()
        raise Preempted(f"stopped by SIGTERM at step {step}: checkpoint {step} saved in "
                        f"{mngr.directory}; rerun the same command to resume from it")
  bar.close()
  mngr.wait_until_finished()
  writer.flush()
  logging.info("trained to step %d (%.1f min this run); checkpoints %s in %s; TensorBoard: "
               "tensorboard --logdir %s", step, (time.time() - started) / 60,
               sorted(mngr.all_steps()), mngr.directory, Workdir(workdir).tensorboard)
  return state
