"""DDPM schedules and DDIM steps against diffusers and a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cf3d_jax.errors import ConfigError
from cf3d_jax.objectives import ddpm, guidance, make_objective


def _cfg(**kw):
  base = dict(name="ddpm", num_train_steps=1000, beta_schedule="linear", beta_start=1e-4,
              beta_end=0.02, prediction="x0", num_sample_steps=25, eta=0.0,
              timestep_spacing="leading")
  base.update(kw)
  return ml_collections.ConfigDict(base)


@pytest.mark.parametrize("schedule,start,end", [("linear", 1e-4, 0.02),
                                                ("scaled_linear", 0.0015, 0.0195)])
def test_betas_match_diffusers(schedule, start, end):
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end,
                                beta_schedule=schedule)
  ours = ddpm.make_betas(schedule, 1000, start, end)
  np.testing.assert_allclose(ours, ref.betas.numpy(), rtol=1e-5)
  np.testing.assert_allclose(np.cumprod(1 - ours), ref.alphas_cumprod.numpy(), rtol=1e-4)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers(spacing):
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
  ref.set_timesteps(25)
  np.testing.assert_array_equal(ddpm.sampling_timesteps(1000, 25, spacing), ref.timesteps.numpy())


def test_leading_is_guided_diffusion_ddim25():
  steps = ddpm.sampling_timesteps(1000, 25, "leading")
  np.testing.assert_array_equal(steps, np.arange(0, 1000, 40)[::-1])


def _numpy_ddim(x0_pred, z, t, t_prev, betas, eta, noise, clip):
  """Float64 transcription of guided-diffusion's ddim_sample for an x0-predicting model."""
  ab = np.cumprod(1 - betas)
  x0 = np.clip(x0_pred, -1, 1) if clip else x0_pred
  a_t = ab[t]
  a_p = ab[t_prev] if t_prev >= 0 else 1.0
  eps = (z - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
  sigma = eta * np.sqrt((1 - a_p) / (1 - a_t)) * np.sqrt(1 - a_t / a_p)
  return np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - sigma ** 2) * eps + sigma * noise


@pytest.mark.parametrize("t,t_prev,eta", [(960, 920, 0.0), (40, 0, 0.0), (0, -1, 0.0),
                                          (500, 460, 1.0)])
def test_ddim_step_matches_float64_reference(t, t_prev, eta):
  obj = make_objective(_cfg(eta=eta))
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 4, 4, 4, 8)).astype(np.float32)
  x0 = rng.normal(size=z.shape).astype(np.float32) * 0.8
  key = jax.random.key(3)
  noise = np.asarray(jax.random.normal(key, z.shape, jnp.float32), np.float64)
  n = z.shape[0]
  got = obj.ddim_step(jnp.asarray(x0), jnp.asarray(z), jnp.full((n,), t), jnp.full((n,), t_prev),
                      key, lambda v: jnp.clip(v, -1, 1))
  want = _numpy_ddim(x0.astype(np.float64), z.astype(np.float64), t, t_prev, obj.betas, eta,
                     noise, clip=True)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_ddim_step_matches_diffusers_eps_prediction():
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                beta_start=1e-4, beta_end=0.02, clip_sample=False,
                                set_alpha_to_one=True, timestep_spacing="leading")
  ref.set_timesteps(25)
  obj = make_objective(_cfg(prediction="eps"))
  rng = np.random.default_rng(1)
  z = rng.normal(size=(1, 4, 4, 4, 8)).astype(np.float32)
  eps = rng.normal(size=z.shape).astype(np.float32)
  for t, t_prev in ((960, 920), (40, 0), (0, -1)):
    want = ref.step(torch.from_numpy(eps), t, torch.from_numpy(z), eta=0.0).prev_sample.numpy()
    got = obj.ddim_step(jnp.asarray(eps), jnp.asarray(z), jnp.array([t]), jnp.array([t_prev]),
                        jax.random.key(0))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_target_inverts_to_x0_and_eps(prediction):
  obj = make_objective(_cfg(prediction=prediction))
  rng = np.random.default_rng(2)
  z0 = jnp.asarray(rng.normal(size=(3, 2, 2, 2, 8)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=z0.shape), jnp.float32)
  t = jnp.array([5, 400, 990])
  zt = obj.corrupt(z0, noise, t)
  x0, eps = obj.x0_and_eps(obj.target(z0, noise, t), zt, t)
  np.testing.assert_allclose(x0, z0, atol=2e-3)
  np.testing.assert_allclose(eps, noise, atol=2e-3)


def test_whole_ddim_run_on_analytic_gaussian_model():
  """Data ~ N(mu, s²) i.i.d.; the optimal x0 predictor is closed form; DDIM lands on the data law.

  DDIM is first order: with 25 steps the std comes out ~20% low, with 1000 within 1%."""
  obj = make_objective(_cfg(num_sample_steps=1000))
  ab = jnp.asarray(obj.alpha_bar, jnp.float32)
  mu, s = 0.3, 0.2

  def model_fn(z, t, emb, mask):
    a = ab[t.astype(jnp.int32)].reshape(-1, *([1] * (z.ndim - 1)))
    # E[x0 | z_t] for x0 ~ N(mu, s²), z_t = √a x0 + √(1-a) ε.
    return mu + jnp.sqrt(a) * s ** 2 / (a * s ** 2 + 1 - a) * (z - jnp.sqrt(a) * mu)

  z_T = jax.random.normal(jax.random.key(0), (64, 4, 4, 4, 8))
  emb, mask = jnp.zeros((64, 1, 4)), jnp.ones((64, 1), bool)
  z0 = guidance.sample_loop(obj, model_fn, z_T, emb, mask, jax.random.key(1))
  assert abs(float(z0.mean()) - mu) < 0.01
  assert abs(float(z0.std()) - s) < 0.01


def test_guidance_batches_cond_and_null_in_one_call():
  calls = []

  def model_fn(z, t, emb, mask):
    calls.append(z.shape[0])
    return z * 0 + emb[:, :1, :1, None, None]  # [N,1,1,1,1] broadcast: output = emb[...,0]

  null = jnp.full((1, 1), 2.0)
  fn = guidance.guided(model_fn, 3.0, null, jnp.ones((1,), bool))
  out = fn(jnp.zeros((2, 1, 1, 1, 1)), jnp.zeros((2,)), jnp.full((2, 1, 1), 5.0),
           jnp.ones((2, 1), bool))
  assert calls == [4]
  np.testing.assert_allclose(out, 2.0 + 3.0 * (5.0 - 2.0))
  assert guidance.guided(model_fn, 1.0, null, jnp.ones((1,), bool)) is model_fn


def test_guidance_takes_a_negative_text_per_item():
  """Contrastive guidance: item i is guided against its own negative text (out = n + w (c − n))."""
  def model_fn(z, t, emb, mask):
    return z * 0 + emb[:, :1, :1, None, None]

  neg = jnp.asarray([[[2.0]], [[4.0]]])                      # [N, L, E]: one per item
  fn = guidance.guided(model_fn, 3.0, neg, jnp.ones((2, 1), bool))
  out = fn(jnp.zeros((2, 1, 1, 1, 1)), jnp.zeros((2,)), jnp.full((2, 1, 1), 5.0),
           jnp.ones((2, 1), bool))
  np.testing.assert_allclose(out[:, 0, 0, 0, 0], [2.0 + 3.0 * 3.0, 4.0 + 3.0 * 1.0])


def test_guidance_rescale_matches_diffusers_rescale_noise_cfg():
  """φ-mix of the guided output rescaled to the conditional std, as diffusers computes it."""
  torch = pytest.importorskip("torch")
  sd = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
  rng = np.random.default_rng(0)
  cond = rng.normal(size=(3, 4, 4, 4, 8)).astype(np.float32)
  out = (3.0 * cond + rng.normal(size=cond.shape)).astype(np.float32)
  for phi in (0.0, 0.3, 0.7, 1.0):
    ref = sd.rescale_noise_cfg(torch.from_numpy(out), torch.from_numpy(cond), guidance_rescale=phi)
    got = guidance.rescale_guided(jnp.asarray(out), jnp.asarray(cond), phi)
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="rescale"):
    guidance.rescale_guided(jnp.asarray(out), jnp.asarray(cond), 1.5)


def test_guided_rescale_keeps_the_conditional_std_where_guidance_acts():
  """φ = 1: every guided item has its conditional output's std; outside the interval the
  conditional output itself comes back."""
  rng = np.random.default_rng(1)
  table = jnp.asarray(rng.normal(size=(2, 2, 2, 2, 1)), jnp.float32)

  def model_fn(z, t, emb, mask):   # output depends on the text: 0 = null, 1 = prompt
    return z + table[emb[:, 0, 0].astype(jnp.int32)]

  z = jnp.asarray(rng.normal(size=(2, 2, 2, 2, 1)), jnp.float32)
  emb, msk = jnp.ones((2, 1, 1)), jnp.ones((2, 1), bool)
  null, null_m = jnp.zeros((1, 1)), jnp.ones((1,), bool)
  cond = model_fn(z, None, emb, msk)
  fn = guidance.guided(model_fn, 7.0, null, null_m, interval=(0.0, 0.5), num_train_steps=10,
                       rescale=1.0)
  inside = fn(z, jnp.asarray([2, 2]), emb, msk)
  np.testing.assert_allclose(np.std(np.asarray(inside), axis=(1, 2, 3, 4), ddof=1),
                             np.std(np.asarray(cond), axis=(1, 2, 3, 4), ddof=1), rtol=1e-5)
  plain = guidance.guided(model_fn, 7.0, null, null_m, interval=(0.0, 0.5), num_train_steps=10)
  assert not np.allclose(np.asarray(inside), np.asarray(plain(z, jnp.asarray([2, 2]), emb, msk)))
  outside = fn(z, jnp.asarray([8, 8]), emb, msk)
  np.testing.assert_allclose(np.asarray(outside), np.asarray(cond), rtol=1e-6, atol=1e-6)


def test_bad_config_values_name_the_key():
  with pytest.raises(ConfigError, match="config.objective.prediction"):
    make_objective(_cfg(prediction="score"))
  with pytest.raises(ConfigError, match="config.objective.name"):
    make_objective(_cfg(name="flow"))
  with pytest.raises(ConfigError, match="timestep_spacing"):
    make_objective(_cfg(timestep_spacing="odd"))


def test_skip_preconditioning_matches_float64_formula_and_is_optimal_for_gaussians():
  obj = make_objective(_cfg(preconditioning="skip", sigma_data=0.3))
  rng = np.random.default_rng(5)
  z = rng.normal(size=(3, 2, 2, 2, 8)).astype(np.float32)
  out = rng.normal(size=z.shape).astype(np.float32)
  t = np.array([0, 300, 999])
  got = np.asarray(obj.prediction_from_output(jnp.asarray(out), jnp.asarray(z), jnp.asarray(t)))
  ab = np.cumprod(1 - obj.betas)[t].reshape(-1, 1, 1, 1, 1)
  a, s, sd = np.sqrt(ab), np.sqrt(1 - ab), 0.3
  want = a * sd ** 2 / (a ** 2 * sd ** 2 + s ** 2) * z + sd * s / np.sqrt(a ** 2 * sd ** 2 + s ** 2) * out
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # With F = 0 the prediction is E[x0 | z_t] for x0 ~ N(0, σ_d²): DDIM lands on that law.
  def zero_model(zz, tt, emb, mask):
    return jnp.zeros_like(zz)
  obj1000 = make_objective(_cfg(preconditioning="skip", sigma_data=0.3, num_sample_steps=1000))
  z0 = guidance.sample_loop(obj1000, zero_model, jax.random.normal(jax.random.key(0), (64, 4, 4, 4, 8)),
                            jnp.zeros((64, 1, 4)), jnp.ones((64, 1), bool), jax.random.key(1))
  assert abs(float(z0.std()) - 0.3) < 0.01 and abs(float(z0.mean())) < 0.01
  with pytest.raises(ConfigError, match="preconditioning"):
    make_objective(_cfg(preconditioning="skip", prediction="eps"))


def test_per_channel_sigma_data_is_the_per_channel_optimal_linear_denoiser():
  sds = (0.8, 0.2, 0.1)
  obj = make_objective(_cfg(preconditioning="skip", sigma_data_channels=sds))
  rng = np.random.default_rng(6)
  z = rng.normal(size=(3, 2, 2, 2, 3)).astype(np.float32)
  out = rng.normal(size=z.shape).astype(np.float32)
  t = np.array([0, 300, 999])
  got = np.asarray(obj.prediction_from_output(jnp.asarray(out), jnp.asarray(z), jnp.asarray(t)))
  ab = np.cumprod(1 - obj.betas)[t].reshape(-1, 1, 1, 1, 1)
  a, s, sd = np.sqrt(ab), np.sqrt(1 - ab), np.asarray(sds)
  want = a * sd ** 2 / (a ** 2 * sd ** 2 + s ** 2) * z + sd * s / np.sqrt(a ** 2 * sd ** 2 + s ** 2) * out
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # F = 0: DDIM lands on N(0, σ_c²) in each channel c.
  obj = make_objective(_cfg(preconditioning="skip", sigma_data_channels=sds, num_sample_steps=1000))
  z0 = guidance.sample_loop(obj, lambda zz, tt, e, m: jnp.zeros_like(zz),
                            jax.random.normal(jax.random.key(0), (64, 4, 4, 4, 3)),
                            jnp.zeros((64, 1, 4)), jnp.ones((64, 1), bool), jax.random.key(1))
  np.testing.assert_allclose(np.asarray(z0).reshape(-1, 3).std(0), sds, rtol=0.03)
  with pytest.raises(ConfigError, match="sigma_data_channels has 3 values"):
    obj.prediction_from_output(jnp.zeros((1, 2, 2, 2, 8)), jnp.zeros((1, 2, 2, 2, 8)),
                               jnp.zeros((1,), jnp.int32))
  with pytest.raises(ConfigError, match="sigma_data_channels"):
    make_objective(_cfg(preconditioning="skip", sigma_data_channels=(0.5, 0.0)))


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ancestral_step_matches_diffusers_ddpm_scheduler(variance):
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                beta_end=0.02, clip_sample=False, variance_type=variance,
                                prediction_type="epsilon", timestep_spacing="leading")
  ref.set_timesteps(25)     # respaced grid: 960, 920, …, 0 (prev = t − 40)
  obj = make_objective(_cfg(prediction="eps", sampler="ancestral", ancestral_variance=variance))
  rng = np.random.default_rng(3)
  z = rng.normal(size=(1, 3, 3, 3, 8)).astype(np.float32)
  eps = rng.normal(size=z.shape).astype(np.float32)
  for t, t_prev in ((960, 920), (520, 480), (40, 0)):
    want = ref.step(torch.from_numpy(eps), t, torch.from_numpy(z),
                    generator=torch.Generator().manual_seed(7)).prev_sample.numpy()
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(7)).numpy()
    x0, _ = obj.x0_and_eps(jnp.asarray(eps), jnp.asarray(z), jnp.array([t]))
    mean, var = obj.posterior(x0, jnp.asarray(z), jnp.array([t]), jnp.array([t_prev]))
    np.testing.assert_allclose(np.asarray(mean + jnp.sqrt(var) * noise), want, rtol=1e-4,
                               atol=1e-5)
  # The last step (t = 0 → clean) adds no noise; diffusers likewise at t = 0.
  mean, var = obj.posterior(jnp.asarray(z), jnp.asarray(z), jnp.array([0]), jnp.array([-1]))
  assert float(var.max()) == 0.0


def test_ancestral_equals_ddim_eta_one_and_whole_run_lands_on_data_law():
  """DDPM's fixed-small ancestral step is DDIM with η = 1; 1000 ancestral steps on the analytic
  Gaussian model reproduce the data law."""
  anc = make_objective(_cfg(sampler="ancestral", num_sample_steps=1000))
  ddim1 = make_objective(_cfg(eta=1.0))
  rng = np.random.default_rng(4)
  z = jnp.asarray(rng.normal(size=(2, 2, 2, 2, 8)), jnp.float32)
  x0 = jnp.asarray(rng.normal(size=z.shape), jnp.float32)
  key = jax.random.key(9)
  a = anc.ancestral_step(x0, z, jnp.array([500, 500]), jnp.array([460, 460]), key)
  b = ddim1.ddim_step(x0, z, jnp.array([500, 500]), jnp.array([460, 460]), key)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  ab = jnp.asarray(anc.alpha_bar, jnp.float32)
  mu, s = -0.2, 0.25

  def model_fn(zz, t, emb, mask):
    al = ab[t.astype(jnp.int32)].reshape(-1, *([1] * (zz.ndim - 1)))
    return mu + jnp.sqrt(al) * s ** 2 / (al * s ** 2 + 1 - al) * (zz - jnp.sqrt(al) * mu)

  n = 64
  z0 = jax.jit(lambda zz: guidance.sample_loop(anc, model_fn, zz, jnp.zeros((n, 1, 4)),
                                               jnp.ones((n, 1), bool), jax.random.key(1)))(
      jax.random.normal(jax.random.key(0), (n, 4, 4, 4, 8)))
  assert abs(float(z0.mean()) - mu) < 0.01
  assert abs(float(z0.std()) / s - 1) < 0.02


def test_sampler_config_errors():
  with pytest.raises(ConfigError, match="config.objective.sampler"):
    make_objective(_cfg(sampler="heun"))
  with pytest.raises(ConfigError, match="ancestral_variance"):
    make_objective(_cfg(ancestral_variance="learned"))
  with pytest.raises(ConfigError, match="config.objective.eta"):
    make_objective(_cfg(eta=2.0))
  assert make_objective(_cfg(num_sample_steps=0)).num_sample_steps == 25


def test_training_timesteps_uniform_unchanged_or_logit_normal():
  uniform = make_objective(_cfg())
  key = jax.random.key(3)
  # 'uniform' is the draw the objective always made (resumed runs continue identically).
  np.testing.assert_array_equal(uniform.sample_time(key, 64),
                                jax.random.randint(key, (64,), 0, 1000))
  ln = make_objective(_cfg(time_sampling="logit-normal", logit_normal=(-1.0, 0.5)))
  t = np.asarray(ln.sample_time(jax.random.key(1), 40000))
  assert t.dtype == np.int32 and t.min() >= 0 and t.max() < 1000
  # floor(T s) with logit(s) ~ N(-1, 0.5): the median timestep is T·sigmoid(-1) ≈ 269, and the
  # fraction below T·sigmoid(-1 + 0.5) is Φ(1) ≈ 0.841.
  assert abs(np.median(t) - 1000 / (1 + np.e)) < 3
  assert abs(np.mean(t < 1000 / (1 + np.exp(0.5))) - 0.8413) < 0.01
  with pytest.raises(ConfigError, match="config.objective.time_sampling"):
    make_objective(_cfg(time_sampling="beta"))
