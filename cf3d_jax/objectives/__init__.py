"""Training objectives and samplers, chosen by `config.objective.name`.

Every objective (`ddpm.DDPM`, `rflow.RectifiedFlow`) exposes the same members, so the trainer and
the sampler never branch on the name:
  training   `sample_time(key, n) → t [N]`, `corrupt(z0, noise, t) → z_t`,
             `target(z0, noise, t)`, `prediction_from_output(out, z_t, t)`, `loss(pred, target) → [N]`,
             `model_time(t)` (what the network sees);
  sampling   `timesteps()` (descending grid), `final_time` (the clean end),
             `sampler_step(model_eval, z, t, t_next, key, clip_x0)` (the configured sampler),
             `ode_step(model_eval, z, t, t_next, clip_x0)` (its deterministic ODE form),
             `inversion_step(model_eval, z, t, t_next)` (one step of the ODE run backwards),
where `model_eval(z, t)` is the (guided) network with the text bound (`guidance.sample_loop`).
"""

from __future__ import annotations

from cf3d_jax.errors import ConfigError
from cf3d_jax.objectives import ddpm, rflow

OBJECTIVES = {"ddpm": ddpm.DDPM.from_config, "rflow": rflow.RectifiedFlow.from_config}


def make_objective(objective_config, latent_shape=None):
  """Builds the objective named by `config.objective.name`.

  latent_shape: `(D, H, W, C)` of the diffused tensor (the rectified flow's resolution shift).
  """
  name = objective_config.name
  if name not in OBJECTIVES:
    raise ConfigError(f"config.objective.name={name!r}: expected one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[name](objective_config, latent_shape)
