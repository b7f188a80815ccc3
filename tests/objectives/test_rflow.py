"""Rectified flow against MONAI's RFlowScheduler, a float64 NumPy transcription, and an analytic model."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cf3d_jax.errors import ConfigError
from cf3d_jax.objectives import guidance, make_objective, rflow


def _cfg(**kw):
  base = dict(name="rflow", num_train_steps=1000, num_sample_steps=30, sampler="default",
              time_sampling="uniform", logit_normal=(0.0, 1.0), time_shift=True,
              shift_base_numel=32 ** 3, shift_scale=1.0, preconditioning="none", sigma_data=0.5,
              loss="default")
  base.update(kw)
  return ml_collections.ConfigDict(base)


LATENT = (64, 64, 48, 4)     # a MAISI latent: numel / 32³ = 6 → r = 6^(1/3)


def test_defaults_are_maisi():
  obj = make_objective(_cfg(num_sample_steps=0), LATENT)
  assert obj.num_sample_steps == 30 and obj.sampler == "euler" and obj.loss_kind == "l1"
  np.testing.assert_allclose(obj.ratio, 6 ** (1 / 3))
  assert make_objective(_cfg(time_shift=False), LATENT).ratio == 1.0


def test_add_noise_and_shift_match_monai():
  torch = pytest.importorskip("torch")
  sched_mod = pytest.importorskip("monai.networks.schedulers.rectified_flow")
  ref = sched_mod.RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False,
                                 use_timestep_transform=True, base_img_size_numel=32 ** 3,
                                 spatial_dim=3)
  obj = make_objective(_cfg(), LATENT)
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(3, 4, 6, 6, 4)).astype(np.float32)       # torch NCDHW
  noise = rng.normal(size=x0.shape).astype(np.float32)
  t = np.array([0.0, 433.7, 999.0], np.float32)
  want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  got = obj.corrupt(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  numel = int(np.prod(LATENT[:3]))
  want_shift = sched_mod.timestep_transform(torch.from_numpy(t.astype(np.float64)), numel,
                                            base_img_size_numel=32 ** 3, spatial_dim=3).numpy()
  np.testing.assert_allclose(rflow.shift_time(t.astype(np.float64), obj.ratio, 1000), want_shift,
                             rtol=1e-10)


@pytest.mark.parametrize("steps", [30, 7])
def test_inference_grid_matches_monai(steps):
  pytest.importorskip("torch")
  sched_mod = pytest.importorskip("monai.networks.schedulers.rectified_flow")
  ref = sched_mod.RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False,
                                 use_timestep_transform=True, base_img_size_numel=32 ** 3,
                                 spatial_dim=3)
  ref.set_timesteps(steps, input_img_size_numel=int(np.prod(LATENT[:3])))
  ours = make_objective(_cfg(num_sample_steps=steps), LATENT).timesteps()
  # MONAI keeps its grid in float16 (|error| ≤ 0.5 near t = 1000).
  np.testing.assert_allclose(ours, ref.timesteps.numpy().astype(np.float64), atol=0.5)
  np.testing.assert_allclose(ours.astype(np.float16), ref.timesteps.numpy())
  assert ours[0] == 1000.0 and np.all(np.diff(ours) < 0)


def test_euler_step_matches_monai_step():
  torch = pytest.importorskip("torch")
  sched_mod = pytest.importorskip("monai.networks.schedulers.rectified_flow")
  ref = sched_mod.RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False)
  ref.set_timesteps(30)
  obj = make_objective(_cfg(time_shift=False))
  rng = np.random.default_rng(1)
  z = rng.normal(size=(2, 4, 4, 4, 4)).astype(np.float32)
  v = rng.normal(size=z.shape).astype(np.float32)
  for t, t_next in ((1000, 967), (500, 433), (33, 0)):      # ints: MONAI truncates next_t to int
    want = ref.step(torch.from_numpy(v), t, torch.from_numpy(z), t_next)[0].numpy()
    got = obj.sampler_step(lambda zz, tt: jnp.asarray(v), jnp.asarray(z), jnp.full((2,), float(t)),
                           jnp.full((2,), float(t_next)), jax.random.key(0))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def _numpy_heun(velocity, z, t, t_next, T=1000):
  """Float64 Heun step of dz/ds = −v (s = t/T) from s to s_next."""
  ds = (t - t_next) / T
  v1 = velocity(z, t)
  z_e = z + v1 * ds
  v2 = velocity(z_e, t_next)
  return z + 0.5 * (v1 + v2) * ds


def test_heun_step_matches_float64_transcription():
  obj = make_objective(_cfg(sampler="heun"), LATENT)
  rng = np.random.default_rng(2)
  w = rng.normal(size=(4,))
  z = rng.normal(size=(3, 2, 2, 2, 4))

  def velocity(zz, tt):          # a smooth nonlinear field depending on z and t
    s = np.asarray(tt, np.float64).reshape(-1, 1, 1, 1, 1) / 1000
    return np.tanh(zz * w) * (1 + s) - s * zz

  def model_eval(zz, tt):
    s = (tt / 1000).reshape(-1, 1, 1, 1, 1)
    return jnp.tanh(zz * jnp.asarray(w, jnp.float32)) * (1 + s) - s * zz

  for t, t_next in ((1000.0, 950.0), (300.0, 120.5), (40.0, 0.0)):
    got = obj.sampler_step(model_eval, jnp.asarray(z, jnp.float32), jnp.full((3,), t),
                           jnp.full((3,), t_next), jax.random.key(0))
    want = _numpy_heun(velocity, z, t, t_next)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _gaussian_velocity(mu, sd, T=1000):
  """E[x0 − ε | z_t] for x0 ~ N(mu, sd²), z_t = (1 − s) x0 + s ε (closed form, finite at s = 0)."""
  def model_fn(z, t, emb, mask):
    s = (t / T).reshape(-1, *([1] * (z.ndim - 1)))
    var = (1 - s) ** 2 * sd ** 2 + s ** 2
    centred = z - (1 - s) * mu
    x0 = mu + (1 - s) * sd ** 2 / var * centred
    eps = s / var * centred
    return x0 - eps
  return model_fn


@pytest.mark.parametrize("sampler,steps,tol", [("euler", 30, 0.06), ("euler", 400, 0.005),
                                               ("heun", 30, 0.005)])
def test_whole_run_on_analytic_gaussian_model_lands_on_the_data_law(sampler, steps, tol):
  """Exact velocity of a Gaussian data law: the ODE maps N(0, 1) onto N(mu, sd²).

  Euler is first order (30 steps: std 4% low), Heun second order (30 steps: within 0.5%)."""
  mu, sd = 0.3, 0.2
  obj = make_objective(_cfg(sampler=sampler, num_sample_steps=steps), (8, 8, 8, 4))
  n = 128
  z_T = jax.random.normal(jax.random.key(0), (n, 4, 4, 4, 8))
  z0 = jax.jit(lambda z: guidance.sample_loop(
      obj, _gaussian_velocity(mu, sd), z, jnp.zeros((n, 1, 4)), jnp.ones((n, 1), bool),
      jax.random.key(1)))(z_T)
  assert abs(float(z0.mean()) - mu) < 0.005
  assert abs(float(z0.std()) / sd - 1) < tol, float(z0.std())


def test_skip_preconditioning_zero_output_is_the_optimal_gaussian_velocity():
  obj = make_objective(_cfg(preconditioning="skip", sigma_data=0.3, sampler="heun"), (8, 8, 8, 4))
  rng = np.random.default_rng(4)
  z = jnp.asarray(rng.normal(size=(4, 2, 2, 2, 4)), jnp.float32)
  t = jnp.asarray([0.0, 1.0, 500.0, 1000.0])
  want = _gaussian_velocity(0.0, 0.3)(z, t, None, None)
  got = obj.prediction_from_output(jnp.zeros_like(z), z, t)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  z0 = guidance.sample_loop(obj, lambda zz, tt, e, m: jnp.zeros_like(zz),
                            jax.random.normal(jax.random.key(0), (64, 4, 4, 4, 8)),
                            jnp.zeros((64, 1, 4)), jnp.ones((64, 1), bool), jax.random.key(1))
  assert abs(float(z0.std()) / 0.3 - 1) < 0.01 and abs(float(z0.mean())) < 0.01


def test_per_channel_sigma_data_lands_each_channel_on_its_own_law():
  sds = (0.6, 0.2, 0.1, 0.05)
  obj = make_objective(_cfg(preconditioning="skip", sigma_data_channels=sds, sampler="heun"),
                       (8, 8, 8, 4))
  z0 = guidance.sample_loop(obj, lambda zz, tt, e, m: jnp.zeros_like(zz),
                            jax.random.normal(jax.random.key(0), (64, 4, 4, 4, 4)),
                            jnp.zeros((64, 1, 4)), jnp.ones((64, 1), bool), jax.random.key(1))
  np.testing.assert_allclose(np.asarray(z0).reshape(-1, 4).std(0), sds, rtol=0.03)


def test_training_time_sampling_is_shifted_uniform_or_logit_normal():
  obj = make_objective(_cfg(), LATENT)
  t = np.asarray(obj.sample_time(jax.random.key(0), 20000))
  assert t.min() >= 0 and t.max() < 1000
  # shift⁻¹(t)/T is uniform: its mean is 1/2 and its quartiles 1/4, 3/4.
  r = obj.ratio
  u = (t / 1000) / (r - (r - 1) * t / 1000)
  np.testing.assert_allclose(np.quantile(u, [0.25, 0.5, 0.75]), [0.25, 0.5, 0.75], atol=0.01)
  ln = make_objective(_cfg(time_sampling="logit-normal", time_shift=False), LATENT)
  s = np.asarray(ln.sample_time(jax.random.key(1), 20000)) / 1000
  logit = np.log(s / (1 - s))
  assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03


def test_target_loss_and_model_time():
  obj = make_objective(_cfg(), LATENT)
  z0, noise = jnp.ones((2, 2, 2, 2, 4)), jnp.zeros((2, 2, 2, 2, 4))
  np.testing.assert_allclose(obj.target(z0, noise, jnp.asarray([1.0, 2.0])), 1.0)
  np.testing.assert_allclose(obj.loss(jnp.full((2, 3), 0.5), jnp.zeros((2, 3))), [0.5, 0.5])
  mse = make_objective(_cfg(loss="mse"), LATENT)
  np.testing.assert_allclose(mse.loss(jnp.full((2, 3), 0.5), jnp.zeros((2, 3))), [0.25, 0.25])
  assert obj.model_time(jnp.asarray([12.5])).dtype == jnp.float32


def test_clipping_rederives_velocity_like_ddim():
  obj = make_objective(_cfg(time_shift=False))
  z = jnp.full((1, 2, 2, 2, 1), 0.5)
  v = jnp.full((1, 2, 2, 2, 1), 4.0)                # x0̂ = z + s v = 0.5 + 0.5·4 = 2.5 at s = 0.5
  clip = lambda x: jnp.clip(x, -1, 1)
  out = obj.sampler_step(lambda zz, tt: v, z, jnp.asarray([500.0]), jnp.asarray([0.0]),
                         jax.random.key(0), clip)
  np.testing.assert_allclose(np.asarray(out), 1.0)  # lands on the clipped x0 at t = 0


def test_bad_config_values_name_the_key():
  with pytest.raises(ConfigError, match="config.objective.sampler"):
    make_objective(_cfg(sampler="ddim"), LATENT)
  with pytest.raises(ConfigError, match="time_sampling"):
    make_objective(_cfg(time_sampling="beta"), LATENT)
  with pytest.raises(ConfigError, match="config.objective.loss"):
    make_objective(_cfg(loss="huber"), LATENT)
  with pytest.raises(ConfigError, match="sampler steps"):
    make_objective(_cfg(num_sample_steps=5000), LATENT)
  with pytest.raises(ConfigError, match="time_shift"):
    make_objective(_cfg())


def test_min_snr_weighting_is_the_x0_weight_carried_to_the_velocity():
  obj = make_objective(_cfg(loss_weighting="min_snr", time_shift=False), LATENT)
  t = jnp.asarray([100.0, 500.0, 900.0])
  s = np.asarray(t) / 1000
  want = np.minimum(((1 - s) / s) ** 2, 5.0) * s ** 2
  got = np.asarray(obj.loss_weight(t, jnp.zeros((3, 2, 2, 2, 4))))[:, 0, 0, 0, 0]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The weighted loss is the x0-space min-SNR loss: |x0 error|² = s²·|v error|².
  pred, target = jnp.ones((3, 2, 2, 2, 4)), jnp.zeros((3, 2, 2, 2, 4))
  obj_mse = make_objective(_cfg(loss_weighting="min_snr", time_shift=False, loss="mse"), LATENT)
  np.testing.assert_allclose(obj_mse.loss(pred, target, t), want, rtol=1e-5)
