"""Speed: `python -m cf3d_jax.benchmark --config=configs/demo.py --what=train,sample,wavelets,conv`.

Prints one table per benchmark and writes JSON (`--output`, default `benchmark.json`):
`{"device", "platform", "cpu", "jax", "rows": [{"bench": NAME, ...}, ...]}`. Timings are the
median of `--repeats` runs after compilation and one warm-up run, each ended by
`jax.block_until_ready`. Times are in the column's unit; rates use 1 GB = 10⁹ bytes.

  train     the trainer's jitted train step (`train.make_train_step` on one device, state
            donated) of the config's model in the config's space, at `train.batch_size`, for
            each U-Net `conv_impl` (`--conv_impls`; each on a copy of the config); the batch's
            `volume` is what the space's records hold (`space.record_shape`: images for the
            wavelet space, unscaled latents for the latent space). Columns: space,
            conv_impl, dtype, batch, shape (image D, H, W), compile_s (`lower().compile()`),
            first_step_ms (the first run after compiling), ms_per_step, voxels_per_s (image
            voxels per second), flops_per_step (XLA `cost_analysis()` of the compiled step),
            flops_per_s (achieved: flops_per_step / median time), peak_flops_per_s (the device's
            peak for the model's dtype: `--peak_flops`, else `PEAK_FLOPS` for known accelerators,
            else empty), of_peak (flops_per_s / peak), peak_memory_mib (`memory_analysis()` of the
            compiled step: arguments + outputs + temporaries − donated aliases). XLA counts
            a `lax.conv` without the taps that fall on zero padding, while im2col multiplies
            them, so conv_impl rows differ in flops_per_step; compare formulations by time.
  sample    one counterfactual pair: the factual prompt (`sample.prompts[0]`) and one
            counterfactual (`sample.prompts[1]`) from the same noise, batch 2, with the config's
            sampler and steps, classifier-free guidance on (the first `sample.guidance_scales`
            entry ≠ 1, else 3), decoded to images. Columns: space, objective, sampler, steps,
            guidance_scale, batch, decode (IDWT, or the latent space's VAE — randomly
            initialised from `config.autoencoder`, since the benchmark has no trained one: same
            cost, meaningless images), compile_s (trace + lower + XLA compile of the first call),
            first_call_s, s_per_pair (median), ms_per_step (s_per_pair / steps).
  wavelets  Haar DWT and IDWT (`cf3d_jax.wavelets`) of the config's image batch
            `[train.batch_size, D, H, W, 1]` float32 (the IDWT of its DWT), next to a plain
            `jnp.copy` of the same array as the memory-bandwidth reference. Columns: batch, shape,
            bytes (input read + output written by one transform; the same for the copy),
            dwt_ms, idwt_ms, copy_ms, dwt_gb_per_s, idwt_gb_per_s, copy_gb_per_s, dwt_of_copy,
            idwt_of_copy (transform GB/s ÷ copy GB/s).
  conv      the dominant primitive, a 3×3×3 conv fwd+bwd at each U-Net level's real shape in the
            config's space (batch, spatial size of the diffused tensor halved per level, channels
            base × mult), for each JAX conv formulation, and PyTorch channels-first and
            channels-last when torch is installed. Columns: space, level, batch, size (d, h, w),
            channels, jax_{conv_impl}_ms, torch_ms, torch_channels_last_ms.
  data      the input pipeline alone (`cf3d_jax.data.bench`; flags --data_*): size, workers,
            batch, warmup_s, volumes_per_s, mb_per_s.
  memory    per-device memory and FLOPs of the AOT-compiled train step of the paper configs on
            any mesh, no timing (`cf3d_jax.memory`; flags --memory_configs, --topology, --mesh,
            --remat, --dtype, --rules, --memory_batch).
  vs_torch  the train step of wdm-3d's run.sh U-Net without text (the converter's architecture at
            base `--vs_torch_base`, batch 1, AdamW, MSE on x0) in our trainer and in a PyTorch
            transcription with the same weights and thread count, per image size in
            `--vs_torch_sizes` (`cf3d_jax.bench_torch`; needs torch; sets OMP_WAIT_POLICY=PASSIVE
            unless set). Columns: size, grid, base, params_jax, params_torch, jax_ms, torch_ms,
            torch_channels_last_ms, ratio (jax_ms / the faster torch layout), conv_impl,
            threads, torch_device, torch, omp_wait_policy, note.
  efficiency  the paper's claim that MAISI RFlow needs 65 % less memory and compute than WDM:
            per generator (WDM, MAISI Linear, MAISI RFlow on MS at 128³, or
            `--efficiency_configs`), FLOPs and one device's peak memory of the compiled train
            step at batch 1, of one sampler network call and of the decode, and per generated
            volume with the config's sampler and steps, with and without CFG; ratios and
            savings against the first row (`cf3d_jax.efficiency`; no timing). Columns: model,
            space, image, latent, train_gflops, train_peak_mib, encode_gflops, sampler, steps,
            forward_gflops, decode_gflops, sample_gflops, sample_peak_mib, sample_cfg_gflops,
            sample_cfg_peak_mib, {key}_vs_first, {key}_saving.

The benchmark functions take plain arguments (no flags), so tests and notebooks call them
in-process; the flags are defined only when this module runs as a program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import statistics
import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from cf3d_jax.data import bench as data_bench
from cf3d_jax.errors import ConfigError
from cf3d_jax.files import write_text
from cf3d_jax.models import layers

# Dense peak FLOP/s per chip (no structured sparsity) by the model's compute dtype, for
# `jax.devices()[0].device_kind` containing the key (lower case; the first match wins). float32
# is at JAX's default matmul precision: TF32 tensor cores on NVIDIA Ampere and later, one bf16
# pass on TPU (so the bf16 peak).
PEAK_FLOPS = (
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): BF16 1,513 / TF32 756 TFLOPS
    # with sparsity for PCIe, 1,671 / 835 for NVL, 1,979 / 989 for SXM; dense is half.
    ("h100 pcie", {"bfloat16": 756e12, "float32": 378e12}),
    ("h100 nvl", {"bfloat16": 835.5e12, "float32": 417.5e12}),
    ("h100", {"bfloat16": 989.5e12, "float32": 494.5e12}),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): BF16 1,671 / TF32 835 TFLOPS
    # with sparsity for NVL, 1,979 / 989 for SXM; dense is half.
    ("h200 nvl", {"bfloat16": 835.5e12, "float32": 417.5e12}),
    ("h200", {"bfloat16": 989.5e12, "float32": 494.5e12}),
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): BF16 312, TF32 156 TFLOPS dense.
    ("a100", {"bfloat16": 312e12, "float32": 156e12}),
    # Cloud TPU system architecture (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): peak bf16
    # per chip 275 (v4), 197 (v5e, device_kind 'TPU v5 lite'), 459 (v5p), 918 (v6e, 'TPU v6 lite').
    ("tpu v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("tpu v5 lite", {"bfloat16": 197e12, "float32": 197e12}),
    ("tpu v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("tpu v5", {"bfloat16": 459e12, "float32": 459e12}),     # v5p ('TPU v5p' / 'TPU v5')
    ("tpu v6 lite", {"bfloat16": 918e12, "float32": 918e12}),
    ("tpu v6e", {"bfloat16": 918e12, "float32": 918e12}),
)

# jax.monitoring events whose durations add up to the compile time of a jitted call.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def peak_flops_for(device_kind: str, dtype: str, override: float = 0.0) -> float | None:
  """Peak FLOP/s of one `device_kind` chip for compute `dtype`: `override` if > 0, else the
  `PEAK_FLOPS` entry, else None (unknown, e.g. CPUs)."""
  if override > 0:
    return float(override)
  kind = device_kind.lower()
  for key, peaks in PEAK_FLOPS:
    if key in kind:
      return peaks.get(str(dtype), peaks["bfloat16"] if dtype == "float16" else None)
  return None


def _sig(x: float, digits: int = 4) -> float:
  """`x` rounded to `digits` significant digits (never to 0 unless it is 0)."""
  return float(f"{x:.{digits}g}")


def time_fn(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
  """(seconds of the first call, median seconds of `repeats` later calls)."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  runs = []
  for _ in range(max(1, repeats)):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    runs.append(time.perf_counter() - t)
  return first, statistics.median(runs)


@contextlib.contextmanager
def compile_timer() -> Iterator[list[float]]:
  """Collects the durations of JAX's trace / lower / compile events inside the block."""
  spent: list[float] = []

  def listener(event, duration, **kwargs):
    del kwargs
    if event in COMPILE_EVENTS:
      spent.append(float(duration))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield spent
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _text_inputs(config, n: int) -> tuple[np.ndarray, np.ndarray, object]:
  """(emb `[n, L, E]`, mask `[n, L]`, table): the config's sample prompts in turn."""
  from cf3d_jax.data.prepare import table_source
  from cf3d_jax.text.table import load_table
  table = load_table(table_source(config))
  prompts = list(config.sample.prompts)
  emb, mask = table.lookup([prompts[i % len(prompts)] for i in range(n)])
  return emb, mask, table


# ---- train ---------------------------------------------------------------------------------

def with_conv_impl(config, impl: str):
  """A copy of `config` whose U-Net uses the conv formulation `impl` (`config` is unchanged)."""
  copy = config.copy_and_resolve_references()
  with copy.unlocked():
    copy.model.conv_impl = impl
  return copy


def bench_train(config, repeats: int, conv_impls: Sequence[str] | None = None,
                peak_flops: float = 0.0) -> list[dict]:
  """Train-step rows (module docstring) for each conv formulation in `conv_impls` (default
  all of `layers.CONV_IMPLS`; 'auto' is timed as what it resolves to on this backend, and the
  row names that) at the config's batch and shape, in the config's space."""
  from cf3d_jax import checkpoints, memory, train
  from cf3d_jax.models import unet as unet_lib
  b, shape = config.train.batch_size, tuple(config.data.shape)
  emb, mask, _ = _text_inputs(config, b)
  text_shape = emb.shape[1:]
  kind = str(jax.devices()[0].device_kind)
  peak = peak_flops_for(kind, str(config.model.dtype), peak_flops)
  rows = []
  for impl in conv_impls or layers.CONV_IMPLS:
    if impl not in layers.CONV_CHOICES:
      raise ConfigError(f"conv_impls: {impl!r} is not one of {layers.CONV_CHOICES}")
    impl = layers.resolve_conv_impl(impl)
    run_config = with_conv_impl(config, impl)
    model, objective, space = checkpoints.build_components(run_config)
    tx = train.make_optimizer(run_config.train)
    z_shape = (b,) + space.latent_shape(shape)
    init = jax.jit(lambda k: checkpoints.init_state(model, tx, k, z_shape, text_shape))
    state = init.lower(jax.random.key(0)).compile(
        compiler_options=unet_lib.INIT_COMPILER_OPTIONS)(jax.random.key(0))
    volume = jax.random.uniform(jax.random.key(2), (b,) + space.record_shape(shape),
                                jnp.float32, -1.0, 1.0)
    batch = {"volume": volume, "text_emb": jnp.asarray(emb), "text_mask": jnp.asarray(mask)}
    step = train.make_train_step(model, tx, objective, space, run_config)
    key = jax.random.key(1)
    t = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t
    carry = [state]

    def run(compiled=compiled, carry=carry):
      carry[0], metrics = compiled(carry[0], batch, key)
      return carry[0], metrics

    first, median = time_fn(run, repeats)
    flops = memory.compiled_flops(compiled)
    achieved = flops / median
    rows.append({
        "bench": "train", "space": config.space.name, "conv_impl": impl,
        "dtype": str(config.model.dtype), "batch": b, "shape": list(shape),
        "compile_s": _sig(compile_s), "first_step_ms": _sig(first * 1e3),
        "ms_per_step": _sig(median * 1e3), "voxels_per_s": round(b * math.prod(shape) / median),
        "flops_per_step": flops, "flops_per_s": _sig(achieved),
        "peak_flops_per_s": peak, "of_peak": _sig(achieved / peak) if peak else None,
        "peak_memory_mib": _sig(memory.peak_bytes(compiled) / 2 ** 20)})
    print(f"train: {rows[-1]}", flush=True)
  return rows


# ---- sample --------------------------------------------------------------------------------

def _space_with_decoder(config, space):
  """(space able to decode, description). The latent space gets a randomly initialised VAE
  from `config.autoencoder` (the benchmark has no trained one; decoding costs the same)."""
  from cf3d_jax.spaces import LatentSpace
  if not isinstance(space, LatentSpace):
    return space, "haar_idwt3d"
  if space.autoencoder is not None:
    return space, "VAE decode"
  from cf3d_jax.autoencoder_train import build_space_vae
  from cf3d_jax.models import autoencoder as ae_lib
  vae = build_space_vae(config)
  params = ae_lib.init_params(vae, jax.random.key(3))
  return (dataclasses.replace(space, autoencoder=vae, params=params),
          "VAE decode (random init from config.autoencoder, no trained VAE)")


def bench_sample(config, repeats: int) -> list[dict]:
  """One row: the time of one counterfactual pair (module docstring) with
  `generate.make_sampler`, the sampler `--mode=sample` uses."""
  from cf3d_jax import checkpoints
  from cf3d_jax import generate as generate_lib
  from cf3d_jax.models import unet as unet_lib
  from cf3d_jax.text import prompts as prompt_lib
  model, objective, space = checkpoints.build_components(config)
  space, decode = _space_with_decoder(config, space)
  prompts = list(config.sample.prompts)
  pair = [prompts[0], prompts[1 if len(prompts) > 1 else 0]]
  _, _, table = _text_inputs(config, 1)
  emb, mask = table.lookup(pair)
  null_emb, null_mask = table.lookup([prompt_lib.NULL_PROMPT])
  scale = next((float(g) for g in config.sample.guidance_scales if float(g) != 1.0), 3.0)
  z_shape = space.latent_shape(tuple(config.data.shape))
  params = unet_lib.init_params(model, jax.random.key(0), (1,) + z_shape, emb.shape[1:])
  z = jnp.stack([generate_lib.subject_noise(config.seed, 0, z_shape)] * 2)
  emb, mask = jnp.asarray(emb), jnp.asarray(mask)
  key = jax.random.key(config.seed + generate_lib.SAMPLE_STREAM)
  sampler = generate_lib.make_sampler(model, objective, space, scale, null_emb[0], null_mask[0])
  with compile_timer() as spent:
    t = time.perf_counter()
    jax.block_until_ready(sampler(params, z, emb, mask, key))
    first = time.perf_counter() - t
  _, median = time_fn(lambda: sampler(params, z, emb, mask, key), repeats)
  steps = int(len(objective.timesteps()))
  row = {"bench": "sample", "space": config.space.name, "objective": config.objective.name,
         "sampler": str(objective.sampler), "steps": steps, "guidance_scale": scale, "batch": 2,
         "decode": decode, "compile_s": _sig(sum(spent)) if spent else None,
         "first_call_s": _sig(first), "s_per_pair": _sig(median),
         "ms_per_step": _sig(median / steps * 1e3)}
  print(f"sample: {row}", flush=True)
  return [row]


# ---- wavelets ------------------------------------------------------------------------------

def bench_wavelets(config, repeats: int) -> list[dict]:
  """One row: Haar DWT / IDWT throughput on the config's image batch vs a plain copy."""
  from cf3d_jax import wavelets
  b, shape = config.train.batch_size, tuple(config.data.shape)
  x = jax.random.uniform(jax.random.key(0), (b,) + shape + (1,), jnp.float32, -1.0, 1.0)
  dwt, idwt, copy = jax.jit(wavelets.haar_dwt3d), jax.jit(wavelets.haar_idwt3d), jax.jit(jnp.copy)
  z = jax.block_until_ready(dwt(x))
  nbytes = int(x.nbytes + z.nbytes)      # read the input once, write the output once
  times = {"dwt": time_fn(lambda: dwt(x), repeats)[1],
           "idwt": time_fn(lambda: idwt(z), repeats)[1],
           "copy": time_fn(lambda: copy(x), repeats)[1]}
  row = {"bench": "wavelets", "batch": b, "shape": list(shape), "bytes": nbytes}
  row.update({f"{k}_ms": _sig(v * 1e3) for k, v in times.items()})
  row.update({f"{k}_gb_per_s": _sig(nbytes / v / 1e9) for k, v in times.items()})
  row.update({f"{k}_of_copy": _sig(times["copy"] / times[k]) for k in ("dwt", "idwt")})
  print(f"wavelets: {row}", flush=True)
  return [row]


# ---- conv ----------------------------------------------------------------------------------

def _torch_conv_ms(n: int, size: Sequence[int], c: int, repeats: int, channels_last: bool
                   ) -> float | None:
  """Median seconds of a PyTorch 3×3×3 conv fwd+bwd (None without torch)."""
  try:
    import torch
  except ImportError:
    return None
  x = torch.randn(n, c, *size, requires_grad=True)
  conv = torch.nn.Conv3d(c, c, 3, padding=1)
  if channels_last:
    x = x.detach().to(memory_format=torch.channels_last_3d).requires_grad_()
    conv = conv.to(memory_format=torch.channels_last_3d)

  def run():
    (conv(x) ** 2).sum().backward()

  run()
  times = []
  for _ in range(max(1, repeats)):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bench_conv(config, repeats: int) -> list[dict]:
  """3×3×3 conv fwd+bwd at each U-Net level's (batch, size, channels) in the config's space."""
  from cf3d_jax.spaces import make_space
  b = config.train.batch_size
  top = make_space(config.space).latent_shape(tuple(config.data.shape))[:3]
  rows = []
  for level, mult in enumerate(config.model.channel_mult):
    c, size = config.model.base_channels * mult, tuple(s // 2 ** level for s in top)
    x = jax.random.normal(jax.random.key(0), (b,) + size + (c,))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, c, c)) * 0.05
    row = {"bench": "conv", "space": config.space.name, "level": level, "batch": b,
           "size": list(size), "channels": c}
    for impl in layers.CONV_IMPLS:
      grad = jax.jit(jax.grad(lambda x, w, impl=impl: jnp.sum(layers.conv3d(x, w, 1, 1, impl) ** 2),
                              argnums=(0, 1)))
      row[f"jax_{impl}_ms"] = _sig(time_fn(lambda: grad(x, w), repeats)[1] * 1e3)
    for name, cl in (("torch_ms", False), ("torch_channels_last_ms", True)):
      sec = _torch_conv_ms(b, size, c, repeats, cl)
      if sec is not None:
        row[name] = _sig(sec * 1e3)
    rows.append(row)
  return rows


# ---- the program ---------------------------------------------------------------------------

def bench_memory(config, repeats: int, memory_configs: Sequence[str] = ("wdm128",),
                 topology: str = "cpu", mesh: Sequence[int] = (-1, 1, 1),
                 remat: Sequence[str] = ("none",), dtype: str = "bfloat16",
                 rules: str = "default", memory_batch: int = 0) -> list[dict]:
  """Per-device memory and FLOPs of the compiled train step of the paper configs
  (`cf3d_jax.memory.bench_memory`); no timing, and not the `--config`."""
  del config, repeats
  from cf3d_jax import memory
  return memory.bench_memory(memory_configs, topology, [int(s) for s in mesh], remat, dtype,
                             rules, memory_batch)


def bench_vs_torch(config, repeats: int, sizes: Sequence[int] = (32, 64),
                   base_channels: int = 64) -> list[dict]:
  """wdm-3d's U-Net train step here and in PyTorch (`cf3d_jax.bench_torch.bench_vs_torch`)."""
  from cf3d_jax import bench_torch
  return bench_torch.bench_vs_torch(config, repeats, [int(s) for s in sizes], int(base_channels))


def bench_efficiency(config, repeats: int, configs: Sequence[str] = ()) -> list[dict]:
  """WDM against MAISI Linear and MAISI RFlow: train and sample FLOPs and peak memory from the
  compiled programs (`cf3d_jax.efficiency`); no timing, and not the `--config`."""
  del config, repeats
  from cf3d_jax import efficiency
  return efficiency.bench_efficiency(configs)


# name → fn(config, repeats, **options); the options come from flags (`_options`).
BENCHES = {"train": bench_train, "sample": bench_sample, "wavelets": bench_wavelets,
           "conv": bench_conv, "data": data_bench.bench_data, "memory": bench_memory,
           "vs_torch": bench_vs_torch, "efficiency": bench_efficiency}


def _options(what: str, f) -> dict:
  """The keyword arguments of benchmark `what` from the parsed flags `f`."""
  if what == "train":
    return {"conv_impls": f.conv_impls, "peak_flops": f.peak_flops}
  if what == "memory":
    return {"memory_configs": f.memory_configs, "topology": f.topology, "mesh": f.mesh,
            "remat": f.remat, "dtype": f.dtype, "rules": f.rules, "memory_batch": f.memory_batch}
  if what == "vs_torch":
    return {"sizes": f.vs_torch_sizes, "base_channels": f.vs_torch_base}
  if what == "efficiency":
    return {"configs": f.efficiency_configs}
  return {}


def _cell(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float) and abs(v) >= 1e6:
    return f"{v:.4g}"
  return str(v)


def print_table(rows: list[dict]) -> None:
  for bench in dict.fromkeys(r["bench"] for r in rows):
    sub = [r for r in rows if r["bench"] == bench]
    keys = list(dict.fromkeys(k for r in sub for k in r if k != "bench"))
    print(f"\n[{bench}]")
    print(" | ".join(keys))
    for r in sub:
      print(" | ".join(_cell(r.get(k)) for k in keys))


def define_flags() -> None:
  """The program's flags (defined only when run as a program; see the module docstring)."""
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file (configs/*.py[:arg]).",
                                  lock_config=False)
  flags.DEFINE_list(
      "what", ["train", "sample", "wavelets", "conv"],
      "Benchmarks to run, comma-separated (columns in the module docstring): "
      "train (compile_s, first_step_ms, ms_per_step, voxels_per_s, flops_per_step, flops_per_s, "
      "peak_flops_per_s, of_peak, peak_memory_mib per conv_impl); "
      "sample (compile_s, first_call_s, s_per_pair, ms_per_step of a factual + counterfactual "
      "pair with CFG); wavelets (bytes, {dwt,idwt,copy}_ms, _gb_per_s, {dwt,idwt}_of_copy); "
      "conv (jax_{impl}_ms, torch_ms, torch_channels_last_ms per U-Net level); "
      "data (volumes_per_s, mb_per_s; --data_* flags); memory (per_device_gib, flops_per_device "
      "of the paper configs; --memory_* flags); vs_torch (jax_ms, torch_ms, ratio of wdm-3d's "
      "U-Net train step against PyTorch; --vs_torch_* flags, needs torch); efficiency "
      "(train/sample GFLOPs and peak MiB of WDM, MAISI Linear and MAISI RFlow, ratios to the "
      "first; --efficiency_configs).")
  flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
  flags.DEFINE_string("output", "benchmark.json", "Where to write the JSON results.")
  flags.DEFINE_list("conv_impls", list(layers.CONV_IMPLS), "train: U-Net conv formulations.")
  flags.DEFINE_float("peak_flops", 0.0, "train: the device's peak FLOP/s for the of_peak column; "
                     "0 = PEAK_FLOPS for known accelerators, else unknown (empty).")
  # --what=memory (cf3d_jax.memory): AOT-compiled train step, per-device memory and FLOPs.
  flags.DEFINE_list("memory_configs", ["wdm128", "wdm256"],
                    "memory: paper configs (cf3d_jax.memory.PAPER_CONFIGS).")
  flags.DEFINE_string("topology", "cpu", "memory: 'cpu' (this machine's devices) or a TPU "
                      "topology such as v5e:4x4 or v4:2x2x4 (needs libtpu).")
  flags.DEFINE_list("mesh", ["-1", "1", "1"], "memory: mesh shape (data, fsdp, spatial).")
  flags.DEFINE_list("remat", ["none", "full"], "memory: remat policies to compare.")
  flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"],
                    "memory: compute dtype (params stay float32).")
  flags.DEFINE_string("rules", "default", "memory: rule set (cf3d_jax.memory.RULE_SETS).")
  flags.DEFINE_integer("memory_batch", 0, "memory: global batch (0 = the config's).")
  # --what=vs_torch (cf3d_jax.bench_torch): wdm-3d's U-Net train step, JAX against PyTorch.
  flags.DEFINE_list("vs_torch_sizes", ["32", "64"], "vs_torch: image sizes S (S³ images, "
                    "(S/2)³ × 8 wavelet grids); multiples of 32 at wdm-3d's 5 levels.")
  flags.DEFINE_integer("vs_torch_base", 64, "vs_torch: U-Net base channels (wdm-3d: 64).")
  # --what=efficiency (cf3d_jax.efficiency): the paper's WDM vs MAISI cost claim, AOT-compiled.
  flags.DEFINE_list("efficiency_configs", [], "efficiency: generators as NAME=configs/FILE.py[:ARG] "
                    "(the first is the reference of the ratios); empty = WDM, MAISI Linear and "
                    "MAISI RFlow on MS at 128³ (cf3d_jax.efficiency.PAPER_MODELS).")


def main(argv):
  del argv
  f = flags.FLAGS
  unknown = set(f.what) - set(BENCHES)
  if unknown:
    raise app.UsageError(f"--what: unknown {sorted(unknown)}; known {sorted(BENCHES)}")
  rows = []
  for what in f.what:
    rows += BENCHES[what](f.config, f.repeats, **_options(what, f))
  print_table(rows)
  result = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
            "cpu": platform.processor() or platform.machine(), "jax": jax.__version__,
            "rows": rows}
  write_text(f.output, json.dumps(result, indent=1))
  print(f"\nwrote {f.output}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
