"""Inversion → reconstruction on analytic models, and guidance for every objective."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cf3d_jax.objectives import guidance, make_objective

MU, SD = 0.2, 0.3


def _ddpm(**kw):
  base = dict(name="ddpm", num_train_steps=1000, beta_schedule="linear", beta_start=1e-4,
              beta_end=0.02, prediction="x0", num_sample_steps=25, eta=0.0,
              timestep_spacing="leading", sampler="default")
  base.update(kw)
  return make_objective(ml_collections.ConfigDict(base))


def _rflow(**kw):
  base = dict(name="rflow", num_train_steps=1000, num_sample_steps=30, sampler="default",
              time_shift=True)
  base.update(kw)
  return make_objective(ml_collections.ConfigDict(base), (8, 8, 8, 4))


def _analytic_model(objective):
  """The exact denoiser of x0 ~ N(MU, SD²) in the objective's own parameterisation."""
  if objective.final_time == 0.0:            # rectified flow: velocity
    def model_fn(z, t, emb, mask):
      s = (t / 1000).reshape(-1, *([1] * (z.ndim - 1)))
      var = (1 - s) ** 2 * SD ** 2 + s ** 2
      c = z - (1 - s) * MU
      return MU + (1 - s) * SD ** 2 / var * c - s / var * c
    return model_fn
  ab = jnp.asarray(objective.alpha_bar, jnp.float32)

  def model_fn(z, t, emb, mask):               # DDPM: x0, eps or v as configured
    a = ab[t.astype(jnp.int32)].reshape(-1, *([1] * (z.ndim - 1)))
    x0 = MU + jnp.sqrt(a) * SD ** 2 / (a * SD ** 2 + 1 - a) * (z - jnp.sqrt(a) * MU)
    eps = (z - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    return {"x0": x0, "eps": eps, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[
        objective.prediction]
  return model_fn


def _roundtrip(objective, refine_iters):
  n = 16
  x0 = MU + SD * jax.random.normal(jax.random.key(3), (n, 4, 4, 4, 4))
  emb, mask = jnp.zeros((n, 1, 4)), jnp.ones((n, 1), bool)
  model_fn = _analytic_model(objective)
  z_T = jax.jit(lambda x: guidance.invert_loop(objective, model_fn, x, emb, mask,
                                               refine_iters))(x0)
  back = jax.jit(lambda z: guidance.sample_loop(objective, model_fn, z, emb, mask,
                                                jax.random.key(0), deterministic=True))(z_T)
  err = float(jnp.sqrt(jnp.mean((back - x0) ** 2)))
  return x0, z_T, back, err


# Stated tolerances (RMS error of invert → decode; the data std is 0.3). Plain inversion takes
# the model at z_t instead of the unknown z_{t_next}: a first-order error per step (measured: DDIM
# 25 ≈ 0.07, Euler 30 ≈ 0.03). Three fixed-point refinements make each step the sampler's exact
# inverse up to ~1e-4 (float32).
@pytest.mark.parametrize("make,kw,iters,tol", [
    (_ddpm, {}, 0, 0.1),                       # DDIM 25, plain inversion
    (_ddpm, {}, 3, 1e-3),                      # … with 3 fixed-point refinements per step
    (_ddpm, {"prediction": "eps", "timestep_spacing": "trailing"}, 3, 1e-3),
    (_ddpm, {"prediction": "v", "timestep_spacing": "linspace"}, 3, 1e-3),
    (_rflow, {}, 0, 0.05),                     # Euler 30
    (_rflow, {}, 3, 1e-3),
    (_rflow, {"sampler": "heun"}, 3, 1e-3),    # Heun: refinement makes it the exact inverse
])
def test_inversion_then_reconstruction_reproduces_the_input(make, kw, iters, tol):
  objective = make(**kw)
  x0, z_T, back, err = _roundtrip(objective, iters)
  print(type(objective).__name__, kw, iters, "rms", err)
  assert err < tol
  # The inverted noise is close to standard normal (the sampler maps N(0, 1) near the data law;
  # DDIM 25 shrinks the std by ~20%, so its pre-image is wider).
  assert abs(float(z_T.std()) - 1) < 0.25 and abs(float(z_T.mean())) < 0.1


@pytest.mark.parametrize("make", [_ddpm, _rflow])
def test_guidance_is_one_batched_call_and_the_paper_convention(make):
  """Constant outputs u (null) and c (cond): the sampler sees u + w (c − u), for every objective."""
  objective = make()
  calls = []
  u, c, w = 0.1, 0.5, 3.0

  def model_fn(z, t, emb, mask):
    calls.append(z.shape[0])
    return jnp.zeros_like(z) + emb[:, 0, 0].reshape(-1, *([1] * (z.ndim - 1)))

  null_emb, null_mask = jnp.full((1, 4), u), jnp.ones((1,), bool)
  z_T = jax.random.normal(jax.random.key(0), (2, 2, 2, 2, 4))
  emb, mask = jnp.full((2, 1, 4), c), jnp.ones((2, 1), bool)
  guided = guidance.guided(model_fn, w, null_emb, null_mask)
  out = guidance.sample_loop(objective, guided, z_T, emb, mask, jax.random.key(1))
  assert set(calls) == {4}                    # cond and null in one call of 2N, traced once
  g = u + w * (c - u)
  if objective.final_time == 0.0:             # constant velocity g: z0 = z_T + g·(s_0 − 0)
    want = z_T + g
  else:                                       # constant x0 prediction g: the last step returns it
    want = jnp.full_like(z_T, g)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [_ddpm, _rflow])
def test_partial_inversion_reconstructs_and_stops_part_way(make):
  """depth 0.4: invert and decode the last 40% of the grid; the round trip is still exact and
  the inverted state is less noisy than a full inversion (closer to the input)."""
  objective = make()
  n = 8
  x0 = MU + SD * jax.random.normal(jax.random.key(5), (n, 4, 4, 4, 4))
  emb, mask = jnp.zeros((n, 1, 4)), jnp.ones((n, 1), bool)
  model_fn = _analytic_model(objective)
  z_mid = guidance.invert_loop(objective, model_fn, x0, emb, mask, 3, depth=0.4)
  back = guidance.sample_loop(objective, model_fn, z_mid, emb, mask, jax.random.key(0),
                              deterministic=True, depth=0.4)
  assert float(jnp.sqrt(jnp.mean((back - x0) ** 2))) < 1e-3
  z_full = guidance.invert_loop(objective, model_fn, x0, emb, mask, 3)
  assert float(jnp.mean((z_mid - x0) ** 2)) < 0.8 * float(jnp.mean((z_full - x0) ** 2))
  with pytest.raises(ValueError, match="depth"):
    guidance.invert_loop(objective, model_fn, x0, emb, mask, 0, depth=0.0)


@pytest.mark.parametrize("make", [_ddpm, _rflow])
def test_blended_editing_keeps_the_input_outside_the_mask(make):
  objective = make()
  n = 4
  x0 = MU + SD * jax.random.normal(jax.random.key(5), (n, 4, 4, 4, 4))
  emb, mask = jnp.zeros((n, 1, 4)), jnp.ones((n, 1), bool)
  exact = _analytic_model(objective)
  # An "edit" model: the exact denoiser of a law shifted by +1 (another prompt's subjects).
  shifted = lambda z, t, e, m: exact(z, t, e, m) + 1.0
  for depth in (1.0, 0.5):
    z_T, known = guidance.invert_loop(objective, exact, x0, emb, mask, 2, depth,
                                      trajectory=True)
    np.testing.assert_allclose(z_T, guidance.invert_loop(objective, exact, x0, emb, mask, 2,
                                                         depth), atol=1e-6)
    assert known.shape == (max(1, round(depth * len(objective.timesteps()))),) + x0.shape
    np.testing.assert_array_equal(known[-1], x0)
    edit = jnp.zeros((1, 4, 4, 4, 1)).at[:, :2].set(1.0)   # editable: the first half of depth
    out = guidance.sample_loop(objective, shifted, z_T, emb, mask, jax.random.key(0),
                               deterministic=True, depth=depth, known=known, edit_mask=edit)
    np.testing.assert_array_equal(out[:, 2:], x0[:, 2:])   # kept exactly outside
    free = guidance.sample_loop(objective, shifted, z_T, emb, mask, jax.random.key(0),
                                deterministic=True, depth=depth)
    assert float(jnp.mean(out[:, :2] - x0[:, :2])) > 0.1    # moved towards the edit inside
    full = guidance.sample_loop(objective, shifted, z_T, emb, mask, jax.random.key(0),
                                deterministic=True, depth=depth, known=known,
                                edit_mask=jnp.ones((1, 4, 4, 4, 1)))
    np.testing.assert_allclose(full, free, atol=1e-5)        # mask 1 = no blending
  with pytest.raises(ValueError, match="both"):
    guidance.sample_loop(objective, exact, z_T, emb, mask, jax.random.key(0), known=known)


@pytest.mark.parametrize("make", [_ddpm, _rflow])
def test_counterfactual_from_noise_follows_the_factual_trajectory(make):
  objective = make()
  z_T = jax.random.normal(jax.random.key(6), (2, 4, 4, 4, 4))
  emb, mask = jnp.zeros((2, 1, 4)), jnp.ones((2, 1), bool)
  exact = _analytic_model(objective)
  shifted = lambda z, t, e, m: exact(z, t, e, m) + 1.0      # the counterfactual prompt's model
  key = jax.random.key(0)
  factual, states = guidance.sample_loop(objective, exact, z_T, emb, mask, key,
                                         deterministic=True, trajectory=True)
  assert states.shape == (len(objective.timesteps()),) + z_T.shape
  np.testing.assert_array_equal(states[-1], factual)
  np.testing.assert_allclose(factual, guidance.sample_loop(objective, exact, z_T, emb, mask, key,
                                                           deterministic=True), atol=1e-6)
  edit = jnp.zeros((1, 4, 4, 4, 1)).at[:, :2].set(1.0)
  cf = guidance.sample_loop(objective, shifted, z_T, emb, mask, key, deterministic=True,
                            known=states, edit_mask=edit)
  np.testing.assert_array_equal(cf[:, 2:], factual[:, 2:])  # the factual outside the mask
  assert float(jnp.mean(cf[:, :2] - factual[:, :2])) > 0.1  # the other prompt inside it
  same = guidance.sample_loop(objective, exact, z_T, emb, mask, key, deterministic=True,
                              known=states, edit_mask=edit)
  np.testing.assert_allclose(same, factual, atol=1e-5)      # its own trajectory: unchanged


def test_guidance_interval_switches_guidance_off_outside_it():
  cond = lambda z, t, e, m: z + e[:, :1, :1].reshape(-1, 1, 1, 1, 1)
  null_emb, null_mask = jnp.zeros((1, 4)), jnp.ones((1,), bool)
  z = jnp.ones((2, 2, 2, 2, 1))
  emb, mask = jnp.ones((2, 1, 4)), jnp.ones((2, 1), bool)
  fn = guidance.guided(cond, 3.0, null_emb, null_mask, interval=(0.2, 0.6),
                       num_train_steps=1000)
  out = fn(z, jnp.asarray([100.0, 400.0]), emb, mask)   # outside: w = 1; inside: w = 3
  np.testing.assert_allclose(out[0], 2.0)
  np.testing.assert_allclose(out[1], 1.0 + 3.0)
  everywhere = guidance.guided(cond, 3.0, null_emb, null_mask)
  np.testing.assert_allclose(everywhere(z, jnp.asarray([100.0, 400.0]), emb, mask), 4.0)
  with pytest.raises(ValueError, match="interval"):
    guidance.guided(cond, 3.0, null_emb, null_mask, interval=(0.7, 0.2))


# ---- edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024) --------------------------

def _ef_setup(n=4, **kw):
  objective = _ddpm(**kw)
  x0 = MU + SD * jax.random.normal(jax.random.key(7), (n, 4, 4, 4, 4))
  emb, mask = jnp.zeros((n, 1, 4)), jnp.ones((n, 1), bool)
  keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.key(11), k))(jnp.arange(n))
  return objective, x0, emb, mask, keys


@pytest.mark.parametrize("kw", [{}, {"prediction": "eps", "timestep_spacing": "trailing"},
                                {"prediction": "v", "timestep_spacing": "linspace"}])
@pytest.mark.parametrize("depth", [1.0, 0.4])
def test_edit_friendly_inversion_reconstructs_exactly(kw, depth):
  objective, x0, emb, mask, keys = _ef_setup(**kw)
  exact = _analytic_model(objective)
  z, known, res = guidance.edit_friendly_inversion(objective, exact, x0, emb, mask, keys,
                                                   depth=depth)
  s = max(1, round(depth * len(objective.timesteps())))
  assert z.shape == x0.shape and known.shape == res.shape == (s,) + x0.shape
  np.testing.assert_array_equal(known[-1], x0)
  back, states = guidance.sample_loop(objective, exact, z, emb, mask, jax.random.key(0),
                                      depth=depth, residuals=res, trajectory=True)
  np.testing.assert_allclose(back, x0, atol=1e-5)            # float32 round-off only
  np.testing.assert_allclose(states, known, atol=1e-5)       # every state retraced
  # The start is the grid's first noisy copy: √ᾱ z0 + √(1 − ᾱ) ε, ε from the item's own key
  # (float64 oracle of ᾱ from the betas).
  t0 = int(objective.timesteps()[-s])
  ab = float(np.cumprod(1.0 - np.asarray(objective.betas, np.float64))[t0])
  eps = np.stack([np.asarray(jax.random.normal(k, (s,) + x0.shape[1:]))[0] for k in keys])
  np.testing.assert_allclose(z, np.sqrt(ab) * np.asarray(x0) + np.sqrt(1 - ab) * eps,
                             atol=1e-5)


def test_stochastic_mean_is_the_ddpm_posterior_mean():
  """η = 1 DDIM = DDPM's posterior q(z_prev | z_t, x0̂) with the 'fixed_small' variance
  (diffusers' DDPMScheduler; `DDPM.posterior` is checked against it in test_ddpm)."""
  objective = _ddpm(ancestral_variance="fixed_small")
  exact = _analytic_model(objective)
  z = jax.random.normal(jax.random.key(2), (3, 4, 4, 4, 4))
  model_eval = lambda zz, tt: exact(zz, tt.astype(jnp.float32), None, None)
  for t, tp in ((960, 920), (400, 360), (40, -1)):
    tt, tpp = jnp.full((3,), t), jnp.full((3,), tp)
    mean = objective.stochastic_mean(model_eval, z, tt, tpp)
    x0, _ = objective.x0_and_eps(model_eval(z, tt), z, tt)
    post_mean, post_var = objective.posterior(x0, z, tt, tpp)
    np.testing.assert_allclose(mean, post_mean, atol=2e-5)
    _, sigma = objective.ddim_mean_sigma(model_eval(z, tt), z, tt, tpp, 1.0)
    np.testing.assert_allclose(np.broadcast_to(sigma ** 2, post_var.shape), post_var,
                               rtol=1e-4, atol=1e-9)


def test_edit_friendly_edit_moves_inside_the_mask_and_keys_are_per_item():
  objective, x0, emb, mask, keys = _ef_setup()
  exact = _analytic_model(objective)
  shifted = lambda z, t, e, m: exact(z, t, e, m) + 1.0       # another prompt's model
  z, known, res = guidance.edit_friendly_inversion(objective, exact, x0, emb, mask, keys)
  free = guidance.sample_loop(objective, shifted, z, emb, mask, jax.random.key(0), residuals=res)
  assert float(jnp.mean(free - x0)) > 0.5                     # the edit acts
  edit = jnp.zeros((1, 4, 4, 4, 1)).at[:, :2].set(1.0)
  out = guidance.sample_loop(objective, shifted, z, emb, mask, jax.random.key(0), known=known,
                             edit_mask=edit, residuals=res)
  np.testing.assert_array_equal(out[:, 2:], x0[:, 2:])        # kept exactly outside
  assert float(jnp.mean(out[:, :2] - x0[:, :2])) > 0.3
  # Item 2 alone, with its own key, gets the same noisy copies as in the batch of 4.
  z2, known2, res2 = guidance.edit_friendly_inversion(objective, exact, x0[2:3], emb[2:3],
                                                      mask[2:3], keys[2:3])
  np.testing.assert_allclose(known2, known[:, 2:3], atol=1e-6)
  np.testing.assert_allclose(res2, res[:, 2:3], atol=1e-5)
  with pytest.raises(ValueError, match="residuals has shape"):
    guidance.sample_loop(objective, exact, z, emb, mask, jax.random.key(0), residuals=res[1:])


def test_edit_friendly_needs_ddpm():
  objective = _rflow()
  x0 = jnp.zeros((1, 8, 8, 8, 4))
  emb, mask = jnp.zeros((1, 1, 4)), jnp.ones((1, 1), bool)
  with pytest.raises(ValueError, match="stochastic"):
    guidance.edit_friendly_inversion(objective, _analytic_model(objective), x0, emb, mask,
                                     jax.random.split(jax.random.key(0), 1))
