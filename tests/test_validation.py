"""The one validation pass (cf3d_jax.validation): names against the real registries, the ranges'
names agreeing with them, and each check group run once per config content."""

from __future__ import annotations

import pytest

from cf3d_jax import config_base, config_ranges, validation
from cf3d_jax.errors import ConfigError
from cf3d_jax.objectives import common, ddpm, rflow
from conftest import load_config


def _names(key: str) -> tuple:
  return config_ranges.RANGES[key][0].names


def test_allowed_names_are_registry_names():
  """docs/configs.md's *allowed* names (config_ranges) are names the registries resolve."""
  for key, tables in validation.registries().items():
    for table in tables:
      assert set(_names(key)) <= set(table), (key, _names(key), sorted(table))
  objective = {
      "objective.prediction": ddpm.PREDICTIONS, "objective.beta_schedule": ddpm.BETA_SCHEDULES,
      "objective.timestep_spacing": ddpm.SPACINGS, "objective.ancestral_variance": ddpm.VARIANCES,
      "objective.time_sampling": rflow.TIME_SAMPLINGS, "objective.loss_weighting": ddpm.LOSS_WEIGHTS,
      "objective.preconditioning": ddpm.PRECONDITIONINGS,
      "objective.sampler": {"default": 0, **ddpm.SAMPLERS, **rflow.SAMPLERS},
      "objective.loss": {"default": 0, **common.LOSSES},
  }
  for key, table in objective.items():
    assert set(_names(key)) == set(table), key
  assert set(rflow.LOSS_WEIGHTS) == set(ddpm.LOSS_WEIGHTS)
  assert set(rflow.PRECONDITIONINGS) == set(ddpm.PRECONDITIONINGS)


def test_unknown_builtin_table_names_the_key():
  c = load_config()
  c.text.table = "builtin:nope"
  with pytest.raises(ConfigError, match=r"config\.text\.table='builtin:nope'.*ms_minilm"):
    config_base.validate(c)


def test_objective_conditions_name_the_key():
  c = load_config()
  c.objective.name, c.objective.sampler = "rflow", "ancestral"
  with pytest.raises(ConfigError, match=r"config\.objective\.sampler='ancestral'.*'rflow'"):
    config_base.validate(c)


def test_each_check_runs_once_per_config_content(monkeypatch):
  calls = []
  for group, check in list(validation.CHECKS.items()):
    monkeypatch.setitem(validation.CHECKS, group,
                        lambda c, check=check, group=group: (calls.append(group), check(c)))
  c = load_config()
  c.seed = 12345                         # content no other test has validated
  config_base.validate(c, "train")
  assert calls == ["ranges", "between", "grid", "names"]
  config_base.validate(c, "sample")      # what train checked covers sample
  config_base.validate(c)
  assert len(calls) == 4
  c.train.learning_rate = 3e-5           # new content: checked again
  config_base.validate(c)
  assert calls[4:] == ["ranges", "between", "names"]
  c.train.log_every = 0
  with pytest.raises(ConfigError, match="config.train.log_every=0"):
    config_base.validate(c)
  with pytest.raises(ConfigError, match="config.train.log_every=0"):
    config_base.validate(c)              # a failed pass is not remembered
