"""cf3d_jax.efficiency: the WDM vs MAISI cost comparison from compiled programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cf3d_jax import efficiency
from cf3d_jax.errors import ConfigError


def test_compiled_cost_counts_a_matmul_and_its_buffers():
  m, k, n = 64, 48, 32
  cost = efficiency.compiled_cost(lambda a, b: a @ b, jax.ShapeDtypeStruct((m, k), jnp.float32),
                                  jax.ShapeDtypeStruct((k, n), jnp.float32))
  assert cost.flops == pytest.approx(2 * m * k * n, rel=0.01)   # the analytic count
  assert cost.peak_bytes >= 4 * (m * k + k * n + m * n)          # inputs + output, float32


def _costs(encode=None):
  c = efficiency.Cost
  return {"train": c(6e9, 3 * 2 ** 20), "forward1": c(1e9, 2 ** 20),
          "forward2": c(2e9, 2 * 2 ** 20), "decode": c(0.5e9, 5 * 2 ** 20), "encode": encode,
          "steps": 10, "sampler": "ddpm/ddim", "space": "wavelet",
          "latent_shape": [8, 8, 8, 8]}


class _Config:
  class data:
    shape = (16, 16, 16)


def test_row_counts_steps_guidance_and_decode():
  row = efficiency.row_of("a", _Config, _costs())
  assert row["sample_gflops"] == pytest.approx(10 * 1 + 0.5)
  assert row["sample_cfg_gflops"] == pytest.approx(10 * 2 + 0.5)
  assert row["sample_peak_mib"] == row["sample_cfg_peak_mib"] == 5.0   # the decode's peak
  assert row["encode_gflops"] is None
  assert efficiency.row_of("a", _Config, _costs(efficiency.Cost(3e9, 0)))["encode_gflops"] == 3.0
  assert row["train_gflops"] == 6.0 and row["train_peak_mib"] == 3.0


def test_ratios_and_savings_against_the_first_row():
  rows = efficiency.with_ratios([
      {"train_gflops": 10.0, "train_peak_mib": 4.0, "sample_cfg_gflops": 100.0,
       "sample_cfg_peak_mib": 8.0},
      {"train_gflops": 3.5, "train_peak_mib": 1.0, "sample_cfg_gflops": 150.0,
       "sample_cfg_peak_mib": 8.0}])
  assert rows[0]["train_gflops_saving"] == 0.0
  assert rows[1]["train_gflops_vs_first"] == 0.35 and rows[1]["train_gflops_saving"] == 0.65
  assert rows[1]["train_peak_mib_saving"] == 0.75
  assert rows[1]["sample_cfg_gflops_saving"] == -0.5
  assert rows[1]["sample_cfg_peak_mib_saving"] == 0.0


def test_model_specs():
  assert efficiency.parse_model("WDM=configs/wdm_ms.py") == ("WDM", "configs/wdm_ms.py", None)
  assert efficiency.parse_model("configs/maisi_rflow_ms.py:res128") == (
      "maisi_rflow_ms", "configs/maisi_rflow_ms.py", "res128")
  with pytest.raises(ConfigError, match="NAME=configs"):
    efficiency.parse_model("WDM=wdm")
  with pytest.raises(ConfigError, match="does not exist"):
    efficiency.bench_efficiency(["X=configs/nope.py"])


def test_smoke_generators_end_to_end():
  """The wavelet and the latent smoke configs: every cell filled, CFG doubling the forward
  FLOPs, the latent model's tensor 16× smaller than the wavelet grid (4³ × 4 against 8³ × 8)."""
  rows = efficiency.bench_efficiency(["WDM=configs/demo.py:smoke",
                                      "RFlow=configs/demo_latent.py:smoke"])
  wdm, rflow = rows
  assert [r["model"] for r in rows] == ["WDM", "RFlow"]
  assert wdm["space"] == "wavelet" and rflow["space"] == "latent"
  assert wdm["encode_gflops"] is None and rflow["encode_gflops"] > 0
  assert wdm["sampler"] == "ddpm/ddim" and rflow["sampler"] == "rflow/euler"
  for r in rows:
    assert r["train_gflops"] > r["forward_gflops"] > 0
    assert r["sample_gflops"] == pytest.approx(
        r["steps"] * r["forward_gflops"] + r["decode_gflops"], rel=1e-3)
    assert r["sample_cfg_gflops"] == pytest.approx(     # CFG: the forward at batch 2
        r["steps"] * 2 * r["forward_gflops"] + r["decode_gflops"], rel=0.05)
    assert r["train_peak_mib"] > 0 and r["sample_cfg_peak_mib"] >= r["sample_peak_mib"] > 0
  assert np.prod(rflow["latent"]) * 16 == np.prod(wdm["latent"])
  assert rflow["train_gflops_vs_first"] < 1.0 == wdm["train_gflops_vs_first"]
