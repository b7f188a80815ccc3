"""The training loop: loss goes down on a fixed batch; a resumed run continues exactly."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cf3d_jax import train


@pytest.mark.parametrize("name", ["ddpm", "rflow"])
def test_train_step_decreases_loss_on_a_fixed_batch(smoke_config, name):
  c = smoke_config
  c.objective.name = name
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
