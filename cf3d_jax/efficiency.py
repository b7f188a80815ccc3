"""The paper's efficiency claim, checked: WDM against MAISI Linear and MAISI RFlow, from the
compiled programs (no step is run, no array of the model's size is allocated).

`python -m cf3d_jax.benchmark --what=efficiency` (default: the three MS paper configs at 128³,
`--efficiency_configs` to choose others).

The paper says MAISI RFlow needs 65 % less memory and compute than WDM (and, elsewhere, 65 %
less training time). For each generator this module lowers and compiles, with abstract inputs
(`jax.ShapeDtypeStruct`s), on one device of this machine:

- the trainer's train step (`memory.compile_train_step`) at batch 1: XLA's FLOPs
  (`cost_analysis()`) and peak bytes (`memory_analysis()`: arguments + outputs + temporaries −
  donated aliases). The latent models' step runs on prepared latents: the frozen VAE's encoding
  is done once, offline, and is listed separately (`encode_gflops`, per training volume);
- one sampler network evaluation of one volume (`model.apply` at batch 1, and at batch 2 — the
  conditional and null passes of classifier-free guidance run as one batched call);
- the decode of one volume to the image (the inverse Haar transform, or the VAE decoder).

From these, per generated volume, with the config's own sampler and step count (WDM DDIM 25,
MAISI Linear DDPM 1000, MAISI RFlow Euler 30): `sample_gflops` = steps × forward FLOPs at
batch 1 + decode FLOPs, and `sample_cfg_gflops` the same with classifier-free guidance (the
forward at batch 2); `sample_peak_mib` / `sample_cfg_peak_mib` = the larger of that forward's
and the decode's peak. Ratios (`{key}_vs_first`) are against the first row (WDM) for the train
step and guided sampling, and `{key}_saving` = 1 − ratio: the paper's "65 % less" is a saving
of 0.65.

FLOPs are XLA's count for this machine's backend (a `lax.conv` counted without the taps that
fall on zero padding); peaks are one device's, for the compute dtype the config names. The VAE
of a latent config is built from `config.autoencoder` (its cost does not depend on trained
weights).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp

from cf3d_jax import memory as memory_lib
from cf3d_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's three generators on MS at 128³ (name, config file, get_config argument).
PAPER_MODELS = (
    ("WDM", "configs/wdm_ms.py", None),
    ("MAISI Linear", "configs/maisi_linear_ms.py", "res128"),
    ("MAISI RFlow", "configs/maisi_rflow_ms.py", "res128"),
)


@dataclasses.dataclass(frozen=True)
class Cost:
  """One compiled program: XLA FLOPs and one device's peak bytes."""
  flops: float
  peak_bytes: int


def compiled_cost(fn, *args) -> Cost:
  """Cost of `jax.jit(fn)` lowered with `args` (arrays or `jax.ShapeDtypeStruct`s) and
  compiled for this machine's default device."""
  compiled = jax.jit(fn).lower(*args).compile()
  return Cost(memory_lib.compiled_flops(compiled), memory_lib.peak_bytes(compiled))


def parse_model(spec: str) -> tuple[str, str, str | None]:
  """'NAME=configs/x.py[:arg]' or 'configs/x.py[:arg]' → (name, path, arg)."""
  name, _, target = spec.rpartition("=")
  path, _, arg = target.partition(":")
  if not path.endswith(".py"):
    raise ConfigError(f"--efficiency_configs: {spec!r} is not NAME=configs/FILE.py[:ARG]")
  return name or os.path.basename(path)[:-3], path, arg or None


def _text_shape(config) -> tuple[int, int]:
  from cf3d_jax.data.prepare import table_source
  from cf3d_jax.text.table import load_table
  return tuple(load_table(table_source(config)).embeddings.shape[1:])


def model_costs(config) -> dict:
  """The compiled costs of one generator `config` (module docstring): keys train, forward1,
  forward2, decode (`Cost`s), encode (`Cost` or None), steps, sampler, space, latent_shape."""
  from cf3d_jax import checkpoints
  from cf3d_jax.spaces import LatentSpace
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.train.batch_size = 1
  text_shape = _text_shape(config)
  device = jax.devices()[:1]
  train = memory_lib.compile_train_step(config, device, (1, 1, 1), text_shape)
  model, objective, space = checkpoints.build_components(config)
  z_shape = space.latent_shape(tuple(config.data.shape))
  params = checkpoints.abstract_params(model, config, text_shape)

  def forward(p, z, t, e, m):
    return model.apply({"params": p}, z, t, e, m, train=False)

  def fwd_cost(b: int) -> Cost:
    return compiled_cost(forward, params, jax.ShapeDtypeStruct((b,) + z_shape, jnp.float32),
                         jax.ShapeDtypeStruct((b,), jnp.float32),
                         jax.ShapeDtypeStruct((b,) + text_shape, jnp.float32),
                         jax.ShapeDtypeStruct((b, text_shape[0]), jnp.bool_))

  image = jax.ShapeDtypeStruct((1,) + tuple(config.data.shape) + (1,), jnp.float32)
  z1 = jax.ShapeDtypeStruct((1,) + z_shape, jnp.float32)
  encode = None
  if isinstance(space, LatentSpace):
    from cf3d_jax.autoencoder_train import build_space_vae
    from cf3d_jax.models import autoencoder as ae_lib
    vae = build_space_vae(config)
    vae_params = ae_lib.abstract_params(vae)
    latent = dataclasses.replace(space, autoencoder=vae)
    decode = compiled_cost(lambda p, z: latent.with_params(p).decode(z), vae_params, z1)
    encode = compiled_cost(lambda p, x: latent.with_params(p).encode(x), vae_params, image)
  else:
    decode = compiled_cost(space.decode, z1)
  return {"train": Cost(memory_lib.compiled_flops(train), memory_lib.peak_bytes(train)),
          "forward1": fwd_cost(1), "forward2": fwd_cost(2), "decode": decode, "encode": encode,
          "steps": int(len(objective.timesteps())),
          "sampler": f"{config.objective.name}/{objective.sampler}", "space": config.space.name,
          "latent_shape": list(z_shape)}


def _mib(n: float) -> float:
  return round(float(n) / 2 ** 20, 1)


def _g(n: float) -> float:
  return float(f"{float(n) / 1e9:.4g}")


def row_of(name: str, config, costs: dict) -> dict:
  """The table row of one generator (per training example / per generated volume): sampling
  without guidance (`sample_*`) and with classifier-free guidance (`sample_cfg_*`: the
  conditional and null passes batched, what the paper's counterfactuals use)."""
  f1, f2, dec = costs["forward1"], costs["forward2"], costs["decode"]
  return {"bench": "efficiency", "model": name, "space": costs["space"],
          "image": list(config.data.shape), "latent": costs["latent_shape"],
          "train_gflops": _g(costs["train"].flops),
          "train_peak_mib": _mib(costs["train"].peak_bytes),
          "encode_gflops": None if costs["encode"] is None else _g(costs["encode"].flops),
          "sampler": costs["sampler"], "steps": costs["steps"],
          "forward_gflops": _g(f1.flops), "decode_gflops": _g(dec.flops),
          "sample_gflops": _g(costs["steps"] * f1.flops + dec.flops),
          "sample_peak_mib": _mib(max(f1.peak_bytes, dec.peak_bytes)),
          "sample_cfg_gflops": _g(costs["steps"] * f2.flops + dec.flops),
          "sample_cfg_peak_mib": _mib(max(f2.peak_bytes, dec.peak_bytes))}


RATIO_KEYS = ("train_gflops", "train_peak_mib", "sample_cfg_gflops", "sample_cfg_peak_mib")


def with_ratios(rows: list[dict]) -> list[dict]:
  """Each row with `{key}_vs_first` (its value ÷ the first row's) and `{key}_saving`
  (1 − that ratio) for the train and sample FLOPs and peaks."""
  base = rows[0]
  out = []
  for r in rows:
    r = dict(r)
    for k in RATIO_KEYS:
      ratio = r[k] / base[k] if base[k] else float("nan")
      r[f"{k}_vs_first"] = round(ratio, 4)
      r[f"{k}_saving"] = round(1.0 - ratio, 4)
    out.append(r)
  return out


def bench_efficiency(configs: Sequence[str] = ()) -> list[dict]:
  """Rows for each generator of `configs` ('NAME=path.py[:arg]'; () = `PAPER_MODELS`), ratios
  against the first."""
  from cf3d_jax.config_base import load_config_file
  specs = [parse_model(s) for s in configs] or list(PAPER_MODELS)
  rows = []
  for name, path, arg in specs:
    full = path if os.path.isabs(path) else os.path.join(ROOT, path)
    if not os.path.exists(full):
      raise ConfigError(f"--efficiency_configs: {path} does not exist")
    config = load_config_file(full, arg)
    rows.append(row_of(name, config, model_costs(config)))
    print(f"efficiency: {rows[-1]}", flush=True)
  return with_ratios(rows)
