"""The training loop: loss goes down on a fixed batch; a resumed run continues exactly."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cf3d_jax import train


@pytest.mark.parametrize("name, contrast", [("ddpm", 0.0), ("rflow", 0.0), ("ddpm", 0.5)])
def test_train_step_decreases_loss_on_a_fixed_batch(smoke_config, name, contrast):
  c = smoke_config
  c.objective.name = name
  c.objective.contrast_weight = contrast   # > 0: the step hands z0 to the contrast-weighted loss
  c.objective.preconditioning = "none"   # plain network output: the loss starts high
  model, objective, space = train.build_components(c)
  tx = optax.adam(3e-3)
  state = train.init_state(model, tx, jax.random.key(0), (2, 8, 8, 8, 8), (1, 4))
  rng = np.random.default_rng(0)
  grid = np.linspace(-1, 1, 16)
  blob = np.exp(-(grid[:, None, None] ** 2 + grid[None, :, None] ** 2 + grid[None, None] ** 2) * 3)
  volume = np.stack([blob * 1.6 - 0.8, 0.8 - blob * 1.6])[..., None]
  batch = {"volume": jnp.asarray(volume, jnp.float32),
           "text_emb": jnp.asarray(rng.normal(size=(2, 1, 4)), jnp.float32),
           "text_mask": jnp.ones((2, 1), bool), "label": jnp.zeros((2,), jnp.int32)}
  step = jax.jit(lambda s, b: train.train_step(s, b, jax.random.key(1), model=model, tx=tx,
                                               objective=objective, space=space, ema_decay=0.9))
  # Evaluate at one fixed key so the losses differ only by the parameters.
  fixed = jax.jit(lambda s: train.train_step(
      dict(s, step=jnp.zeros((), jnp.int32)), batch, jax.random.key(2), model=model, tx=tx,
      objective=objective, space=space, ema_decay=0.9)[1]["loss"])
  first = float(fixed(state))
  for _ in range(60):
    state, metrics = step(state, batch)
  print("fixed-key loss", first, "→", float(fixed(state)))
  # Both targets are fixed at a fixed key: x0 is learnt fast, the velocity (mostly noise) slower.
  assert float(fixed(state)) < {"ddpm": 0.5, "rflow": 0.85}[name] * first
  assert int(state["step"]) == 60
  # EMA moved towards the params but lags them.
  leaf = lambda t: jax.tree.leaves(t)[0]
  assert not np.allclose(leaf(state["ema"]), leaf(state["params"]))


def test_resume_after_kill_continues_exactly(workdir_with_data, smoke_config):
  c = smoke_config
  c.train.num_steps = 4
  c.train.checkpoint_every = 2
  straight = train.train_and_evaluate(c, workdir_with_data)
  ckpt = os.path.join(workdir_with_data, "checkpoints")
  assert sorted(os.listdir(ckpt)) == ["2", "4"]
  # A kill anywhere after step 2 loses what came after the step-2 checkpoint:
  shutil.rmtree(os.path.join(ckpt, "4"))
  resumed = train.train_and_evaluate(c, workdir_with_data)
  assert int(resumed["step"]) == 4
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert os.path.isdir(os.path.join(workdir_with_data, "tensorboard"))
  # The workdir's checkpoints were made with this config: another objective or seed stops at once.
  from cf3d_jax.errors import ConfigError
  c.objective.name, c.seed = "rflow", 7
  with pytest.raises(ConfigError, match=r"objective.name: 'ddpm' → 'rflow'.*seed: 0 → 7"):
    train.train_and_evaluate(c, workdir_with_data)


def test_init_from_a_converted_text_free_unet(workdir_with_data, smoke_config, tmp_path):
  """config.train.init_from: a text-free U-Net (as `convert wdm-unet` writes) fills every param
  it has; the new cross-attention and the extra middle block keep their identity init, so the
  text model starts as the pretrained function (checked through one step at learning rate 0)."""
  from cf3d_jax import convert
  from cf3d_jax.convert import wdm_unet
  from cf3d_jax.errors import DataError
  from cf3d_jax.models import unet
  c = smoke_config
  c.model.scale_shift_norm = False          # wdm-3d's ResBlocks (use_scale_shift_norm=False)
  c.model.text_time_embedding = False
  c.model.num_middle_blocks = 2
  m = c.model
  pre_config = dict(in_channels=8, out_channels=8, base_channels=m.base_channels,
                    channel_mult=tuple(m.channel_mult), num_res_blocks=m.num_res_blocks,
                    num_middle_blocks=1, num_groups=m.num_groups, text_dim=0)
  pre_model = wdm_unet.build_model(pre_config)
  pre = unet.init_params(pre_model, jax.random.key(7), (8, 8, 8, 8))
  pre = jax.tree.map(lambda x: x + 0.01, pre)          # no zero output convs: a real function
  folder = str(tmp_path / "pretrained")
  convert.save_converted(folder, pre, "wdm-unet", pre_config)
  c.train.init_from = folder
  c.train.num_steps = 1
  c.train.learning_rate = 0.0
  c.train.warmup_steps = 0
  state = train.train_and_evaluate(c, workdir_with_data)
  model = unet.build_unet(c.model)
  z = jax.random.normal(jax.random.key(3), (2, 8, 8, 8, 8))
  t = jnp.array([10, 500])
  emb = jax.random.normal(jax.random.key(4), (2, 3, 384))
  mask = jnp.ones((2, 3), bool)
  want = pre_model.apply({"params": pre}, z, t, None, None, train=False)
  got = model.apply({"params": state["params"]}, z, t, emb, mask, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  c.model.num_res_blocks = 2                            # an architecture the folder does not fit
  with pytest.raises(DataError, match="pretrained"):
    train.params_from_pretrained(unet.init_params(unet.build_unet(c.model), jax.random.key(0),
                                                  (8, 8, 8, 8), (3, 384)), folder)


def _cosine_reference(step: int, peak: float, warmup: int, horizon: int, final: float) -> float:
  """Float64 reference: linear warmup from 0, then half a cosine from peak to final·peak."""
  if step < warmup:
    return peak * step / warmup
  progress = min(step - warmup, horizon - warmup) / (horizon - warmup)
  return peak * (final + (1 - final) * 0.5 * (1 + np.cos(np.pi * progress)))


@pytest.mark.parametrize("warmup,decay_steps,final", [(0, 0, 0.0), (10, 0, 0.1), (5, 60, 0.0)])
def test_cosine_learning_rate_schedule_matches_the_formula(smoke_config, warmup, decay_steps,
                                                           final):
  c = smoke_config.train
  c.learning_rate, c.num_steps, c.warmup_steps = 2e-3, 100, warmup
  c.lr_schedule, c.lr_decay_steps, c.final_lr_fraction = "cosine", decay_steps, final
  schedule = train.learning_rate_schedule(c)
  horizon = decay_steps or c.num_steps
  for step in [0, 1, 4, 5, 9, 10, 30, 59, 60, 61, 99, 100, 150]:
    want = _cosine_reference(step, 2e-3, warmup, horizon, final)
    assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step


def test_constant_schedule_and_the_optimizer_state_does_not_depend_on_the_schedule(smoke_config):
  c = smoke_config.train
  c.learning_rate, c.warmup_steps, c.num_steps = 1e-3, 4, 100
  schedule = train.learning_rate_schedule(c)
  assert [float(schedule(s)) for s in (0, 2, 4, 1000)] == pytest.approx([0, 5e-4, 1e-3, 1e-3])
  params = {"w": jnp.ones((3,))}
  constant = jax.tree.structure(train.make_optimizer(c).init(params))
  c.lr_schedule = "cosine"
  # A checkpoint restores under either schedule (sample builds the optimizer only to shape it).
  assert jax.tree.structure(train.make_optimizer(c).init(params)) == constant


def test_cosine_horizon_not_after_warmup_is_a_config_error(smoke_config):
  from cf3d_jax import config_base
  from cf3d_jax.errors import ConfigError
  c = smoke_config
  c.train.lr_schedule, c.train.warmup_steps, c.train.lr_decay_steps = "cosine", 50, 40
  with pytest.raises(ConfigError, match="train.lr_decay_steps"):
    config_base.validate(c)
  with pytest.raises(ConfigError, match="train.lr_decay_steps"):
    train.learning_rate_schedule(c.train)


def test_interleaved_hosts_need_the_batch_sharding(smoke_config):
  with pytest.raises(ValueError, match="interleaved_hosts=2 reorders a batch sharded over hosts"):
    train.make_train_step(None, None, None, None, smoke_config, mesh=None, interleaved_hosts=2)
