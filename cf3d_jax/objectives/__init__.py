"""Training objectives and samplers, chosen by `config.objective.name`.

Every objective exposes the same methods (see `ddpm.DDPM`): `sample_time`, `corrupt`, `target`,
`loss`, `model_time`, `timesteps`, `sampler_step`; the trainer and sampler never branch on the name.
"""

from __future__ import annotations

from cf3d_jax.errors import ConfigError
from cf3d_jax.objectives import ddpm

OBJECTIVES = {"ddpm": ddpm.DDPM.from_config}


def make_objective(objective_config):
  """Builds the objective named by `config.objective.name`."""
  name = objective_config.name
  if name not in OBJECTIVES:
    raise ConfigError(f"config.objective.name={name!r}: expected one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[name](objective_config)
