"""Every shipped config loads, validates and builds its objective; presets carry the paper's values."""

import json
import os

import pytest

from cf3d_jax import config_base, train
from cf3d_jax.errors import ConfigError
from cf3d_jax.objectives import ddpm, rflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg):
  return config_base.load_config_file(os.path.join(ROOT, "configs", name), arg)

CONFIGS = [(name, arg) for name in sorted(os.listdir(os.path.join(ROOT, "configs")))
           if name.endswith(".py") for arg in (None,)]
CONFIGS += [("demo.py", "smoke"), ("demo.py", "adni"), ("demo.py", "smoke,adni"),
            ("demo.py", "long"), ("wdm_ms.py", "res256"), ("wdm_adni.py", "res256"),
            ("maisi_rflow_ms.py", "res128"), ("maisi_linear_adni.py", "res128")]


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_validates_and_builds_its_objective(name, arg):
  c = load_config(name, arg)
  config_base.validate(c)
  _, objective, space = train.build_components(c)
  assert len(objective.timesteps()) == objective.num_sample_steps
  factor = 2 if c.space.name == "wavelet" else c.space.downsample
  latent = space.latent_shape(tuple(c.data.shape))
  assert latent[:3] == tuple(s // factor for s in c.data.shape)
  assert latent[3] == c.model.out_channels


@pytest.mark.parametrize("dataset", ["ms", "adni"])
def test_maisi_configs_are_the_paper_setting(dataset):
  rf = load_config(f"maisi_rflow_{dataset}.py", None)
  lin = load_config(f"maisi_linear_{dataset}.py", None)
  for c in (rf, lin):
    assert c.space.name == "latent" and tuple(c.data.shape) == (256, 256, 256)
    assert c.data.dataset == dataset and c.train.batch_size == 1
    assert tuple(c.model.channel_mult) == (1, 2, 4, 8) and c.model.base_channels == 64
    assert c.model.cross_attention_levels[0]          # text at the highest resolution
  obj = train.build_components(rf)[1]
  assert isinstance(obj, rflow.RectifiedFlow) and obj.num_sample_steps == 30
  assert obj.ratio == pytest.approx(2.0)              # 64³ latents: (64³ / 32³)^(1/3)
  obj = train.build_components(lin)[1]
  assert isinstance(obj, ddpm.DDPM) and obj.num_sample_steps == 1000 and obj.prediction == "eps"
  assert obj.betas[-1] == pytest.approx(0.0195)


def test_wdm_configs_are_the_paper_setting():
  for name in ("wdm_ms.py", "wdm_adni.py"):
    obj = train.build_components(load_config(name, None))[1]
    assert isinstance(obj, ddpm.DDPM) and obj.sampler == "ddim" and obj.num_sample_steps == 25
    assert obj.prediction == "x0" and obj.betas[0] == pytest.approx(1e-4)
    assert obj.betas[-1] == pytest.approx(0.02)
  adni = load_config("wdm_adni.py", None)
  assert adni.data.dataset == "adni" and adni.text.table == "builtin:adni_minilm"
  assert adni.sample.prompts[0] == "Subject is cognitively normal."


def test_objective_presets():
  c = load_config("wdm_ms.py", None)
  config_base.apply_objective_preset(c, "maisi_linear")
  obj = train.build_components(c)[1]
  assert isinstance(obj, ddpm.DDPM) and obj.sampler == "ancestral"
  assert obj.num_sample_steps == 1000 and obj.prediction == "eps"
  assert obj.betas[0] == pytest.approx(0.0015) and obj.betas[-1] == pytest.approx(0.0195)
  config_base.apply_objective_preset(c, "maisi_rflow")
  obj = train.build_components(c)[1]
  assert isinstance(obj, rflow.RectifiedFlow) and obj.sampler == "euler"
  assert obj.num_sample_steps == 30 and obj.loss_kind == "l1"
  assert obj.ratio == pytest.approx(2.0)      # 64³ subband grid: (64³ / 32³)^(1/3)
  with pytest.raises(ConfigError, match="preset"):
    config_base.apply_objective_preset(c, "edm")
  # A preset is the published recipe: the demo's per-subband sigma_data and min-SNR go.
  demo = load_config("demo.py", None)
  assert len(demo.objective.sigma_data_channels) == 8
  config_base.apply_objective_preset(demo, "maisi_rflow")
  assert tuple(demo.objective.sigma_data_channels) == ()
  assert demo.objective.loss_weighting == "none"
  with pytest.raises(ValueError, match="unknown variant"):
    load_config("demo.py", "smoke,tiny")


def test_adni_phantom_demo_runs_end_to_end(tmp_path):
  from cf3d_jax.modes import run
  c = load_config("demo.py", "smoke,adni")
  c.train.num_steps = 2
  run(c, str(tmp_path), "all")
  index = json.load(open(tmp_path / "samples" / "index.json"))
  assert index["prompts"][2] == "Subject has Alzheimer's disease."
  effect = index["prompt_effect"]["g3"]
  assert effect["stat"] == "ventricle_volume_ml" and set(effect["mean"]) == set(index["prompts"])
  assert 0 <= effect["ordered_fraction"] <= 1 and "class_hit_rate" not in effect
  assert "lesion_volume_ml" not in index["items"][0]
  assert all(i["ventricle_volume_ml"] >= 0 for i in index["items"])


@pytest.mark.parametrize("name,dataset,shape", [
    ("wdm_ms.py", "ms", None), ("wdm_adni.py", "adni", None),
    ("maisi_rflow_ms.py", "ms", None), ("maisi_rflow_adni.py", "adni", None),
    ("maisi_linear_ms.py", "ms", None), ("maisi_linear_adni.py", "adni", None),
    ("wdm_adni.py", "adni", "res256"), ("maisi_linear_adni.py", "adni", "res128")])
def test_paper_configs_name_the_biomedclip_table(name, dataset, shape):
  arg = ",".join(filter(None, [shape, "biomedclip"]))
  c = load_config(name, arg)
  assert c.text.table == f"tables/{dataset}_biomedclip.npz"
  assert c.data.dataset == dataset
  assert load_config(name, shape).text.table == f"builtin:{dataset}_minilm"
  if shape:
    assert tuple(c.data.shape) == tuple(load_config(name, shape).data.shape)
  with pytest.raises(ValueError, match="unknown variant"):
    load_config(name, "biomedclip,tiny")
