"""Sharding: rules cover every parameter; layouts are legal; sharded = single-device results.

The multi-device checks need 8 fake CPU devices, which XLA only creates if
`--xla_force_host_platform_device_count=8` is set before jax is imported, so they run this file
as a script in a subprocess (`python tests/test_parallel.py CHECK`); the rest runs in the
test process with its one device.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_FAKE_DEVICES = 8
# One train step, sharded vs one device. Sharded reductions (GroupNorm statistics, the loss psum,
# gradient all-reduces) add in a different order, so agreement is to float32 rounding: the loss
# to 1e-5 relative, the updated parameters (SGD with rate 1: params − grads) to 1e-4 relative of
# the largest update plus 1e-6 absolute.
LOSS_RTOL, PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-4, 1e-6
MESHES = ((8, 1, 1), (2, 4, 1), (1, 2, 4))


# ---- in-process (one device) ------------------------------------------------------------------

def test_every_parameter_is_covered_by_a_rule_and_large_ones_are_sharded():
  import os
  import jax
  from cf3d_jax.config_base import load_config_file
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  load_config = lambda name, arg: load_config_file(os.path.join(root, "configs", name), arg)
  from cf3d_jax import parallel
  from cf3d_jax.models import unet as unet_lib
  c = load_config("wdm_ms.py", None)
  model = unet_lib.build_unet(c.model)
  logical = unet_lib.param_logical_axes(model, (64, 64, 64, 8), (1, 384))
  abstract = unet_lib.abstract_params(model, (64, 64, 64, 8), (1, 384))
  rules = parallel.rules_from_config(c.mesh)
  ruled = {name for name, _ in rules}
  flat_names = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, parallel.P))
  for names in flat_names:
    assert ruled.intersection(names), f"no rule for a parameter named {tuple(names)}"
  sizes = {"data": 2, "fsdp": 16, "spatial": 1}
  total = sharded = 0
  for names, a in zip(flat_names, jax.tree.leaves(abstract)):
    spec = parallel.logical_to_spec(tuple(names), a.shape, rules, sizes)
    n = int(np.prod(a.shape))
    total += n
    sharded += n if "fsdp" in jax.tree.leaves(tuple(spec)) else 0
  assert sharded / total > 0.999, f"only {sharded / total:.4%} of the parameters FSDP-sharded"


def test_logical_to_spec_uses_each_mesh_axis_once_and_only_where_it_divides():
  from cf3d_jax.parallel import DEFAULT_RULES, P, VOLUME_AXES, logical_to_spec
  sizes = {"data": 2, "fsdp": 4, "spatial": 2}
  conv = ("conv_d", "conv_h", "conv_w", "conv_in", "conv_out")
  assert logical_to_spec(conv, (3, 3, 3, 64, 128), DEFAULT_RULES, sizes) == \
      P(None, None, None, None, "fsdp")
  # 6 outputs do not split 4 ways: the input features take fsdp instead.
  assert logical_to_spec(conv, (3, 3, 3, 64, 6), DEFAULT_RULES, sizes) == \
      P(None, None, None, "fsdp", None)
  assert logical_to_spec(VOLUME_AXES, (8, 16, 16, 16, 8), DEFAULT_RULES, sizes) == \
      P(("data", "fsdp"), "spatial", None, None, None)
  # batch 2: only 'data' divides; depth 1: unsplit.
  assert logical_to_spec(VOLUME_AXES, (2, 1, 4, 4, 8), DEFAULT_RULES, sizes) == \
      P("data", None, None, None, None)


def test_bad_rules_and_shapes_are_config_errors():
  import jax
  import ml_collections
  from cf3d_jax import parallel
  from cf3d_jax.errors import ConfigError
  bad = ml_collections.ConfigDict({"shape": (1, 1, 1), "rules": (("conv_out", "model"),)})
  with pytest.raises(ConfigError, match="config.mesh.rules"):
    parallel.rules_from_config(bad)
  with pytest.raises(ConfigError, match="config.mesh.shape"):
    parallel.mesh_shape((3, -1, 1), 8)
  four_way = jax.sharding.AbstractMesh((1, 1, 4), parallel.MESH_AXES)
  parallel.check_spatial_divisible((16, 16, 16), four_way, "data.shape")
  with pytest.raises(ConfigError, match="config.data.shape"):
    parallel.check_spatial_divisible((12, 16, 16), four_way, "data.shape")
  with pytest.raises(ConfigError, match="config.train.batch_size"):
    parallel.check_batch_divisible(3, jax.sharding.AbstractMesh((2, 1, 1), parallel.MESH_AXES),
                                   "train.batch_size")


def test_interleaved_order_restores_stream_order():
  from cf3d_jax.parallel import interleaved_order
  stream = np.arange(12)
  hosts = [stream[p::3] for p in range(3)]     # pipeline: host p takes elements p, p + 3, …
  np.testing.assert_array_equal(np.concatenate(hosts)[interleaved_order(12, 3)], stream)
  np.testing.assert_array_equal(interleaved_order(4, 1), np.arange(4))


def test_distributed_init_is_off_without_a_coordinator(monkeypatch):
  from cf3d_jax import parallel
  from cf3d_jax.errors import ConfigError
  for key in parallel.DISTRIBUTED_ENV + ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                                         "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(key, raising=False)
  assert parallel.initialize_distributed("auto") is False
  assert parallel.initialize_distributed("off", "127.0.0.1:1234", 2, 0) is False
  with pytest.raises(ConfigError, match="num_processes"):
    parallel.initialize_distributed("auto", "127.0.0.1:1234")


def test_multi_device_checks_in_a_subprocess():
  """Runs the checks below with 8 fake CPU devices (see the module docstring)."""
  flags = (os.environ.get("XLA_FLAGS", "")
           + f" --xla_force_host_platform_device_count={NUM_FAKE_DEVICES}")
  env = dict(os.environ, XLA_FLAGS=flags.strip(),
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "tests"))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "all"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  print(proc.stdout[-4000:])
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "sharded haar: ok" in proc.stdout
  for mesh in MESHES:
    assert f"train step {mesh}: ok" in proc.stdout


# ---- run with 8 devices (python tests/test_parallel.py all) -----------------------------------

def check_sharded_haar() -> None:
  """The shard_map Haar transform equals the plain one under several layouts."""
  import jax
  from cf3d_jax import parallel, wavelets
  P = parallel.P
  x = np.random.default_rng(0).normal(size=(4, 16, 8, 8, 2)).astype(np.float32)
  plain = np.asarray(wavelets.haar_dwt3d(x))
  for shape, spec in (((2, 1, 4), P("data", "spatial")),
                      ((2, 2, 2), P(("data", "fsdp"), "spatial")),
                      ((1, 2, 4), P(None, "spatial", "fsdp")),
                      ((1, 1, 8), P(None, "spatial"))):
    mesh = parallel.make_mesh(shape)
    xs = jax.device_put(x, parallel.NamedSharding(mesh, spec))
    z = jax.jit(lambda v: wavelets.haar_dwt3d_sharded(v, mesh, spec))(xs)
    assert z.sharding.spec == spec, (z.sharding.spec, spec)
    np.testing.assert_allclose(np.asarray(z), plain, rtol=0, atol=1e-6)
    back = jax.jit(lambda v: wavelets.haar_idwt3d_sharded(v, mesh, spec))(z)
    np.testing.assert_allclose(np.asarray(back), x, rtol=0, atol=1e-5)
  try:   # odd blocks are refused, not silently wrong
    wavelets.haar_dwt3d_sharded(x[:, :12], parallel.make_mesh((1, 1, 8)), P(None, "spatial"))
  except ValueError as e:
    assert "multiple of 2" in str(e) or "even" in str(e), e
  else:
    raise AssertionError("an odd block was accepted")
  print("sharded haar: ok", flush=True)


def check_train_step_meshes() -> None:
  """One train step on each mesh of MESHES equals the single-device step."""
  import jax
  import jax.numpy as jnp
  import optax
  from conftest import load_config
  from cf3d_jax import parallel, train
  from cf3d_jax.models import unet as unet_lib
  c = load_config()                  # demo smoke: 16³ → 8 × 8³; U-Net levels 8³, 4³, 2³
  c.train.batch_size = 8
  # lax.conv: XLA partitions it along a sharded spatial axis with halo exchanges; the im2col
  # form (27 padded slices) partitions too but compiles minutes longer on CPU.
  c.model.conv_impl = "xla"
  model, objective, space = train.build_components(c)
  tx = optax.sgd(1.0)                # updated params = params − grads: compares the gradients
  b, text_shape = c.train.batch_size, (3, 4)
  rng = np.random.default_rng(1)
  batch = {"volume": rng.uniform(-1, 1, (b,) + tuple(c.data.shape) + (1,)).astype(np.float32),
           "text_emb": rng.normal(size=(b,) + text_shape).astype(np.float32),
           "text_mask": np.tile(np.array([True, True, False]), (b, 1)),
           "label": np.arange(b, dtype=np.int32) % 3}
  z_shape = (b,) + space.latent_shape(tuple(c.data.shape))
  state = train.init_state(model, tx, jax.random.key(0), z_shape, text_shape)
  key = jax.random.key(3)
  single = jax.jit(lambda s, bt: train.train_step(s, bt, key, model=model, tx=tx,
                                                  objective=objective, space=space,
                                                  ema_decay=c.train.ema_decay))
  ref_state, ref_metrics = jax.device_get(single(state, batch))
  ref_loss = float(ref_metrics["loss"])
  for shape in MESHES:
    c.mesh.shape = shape
    mesh = parallel.make_mesh(shape)
    rules = parallel.rules_from_config(c.mesh)
    abstract = jax.eval_shape(lambda: state)
    logical = unet_lib.param_logical_axes(model, z_shape, text_shape)
    state_sh = parallel.state_shardings(
        abstract, parallel.tree_shardings(logical, abstract["params"], mesh, rules), mesh)
    batch_sh = parallel.batch_shardings({k: v.shape for k, v in batch.items()}, mesh, rules)
    step = train.make_train_step(model, tx, objective, space, c, mesh, state_sh, batch_sh)
    sharded_state = jax.device_put(jax.tree.map(jnp.copy, state), state_sh)
    sharded_batch = jax.device_put(batch, batch_sh)
    with parallel.activation_context(mesh, rules):
      new_state, metrics = step(sharded_state, sharded_batch, key)
    specs = {str(a.sharding.spec) for a in jax.tree.leaves(new_state["params"])}
    if shape[1] > 1:
      assert any("fsdp" in s for s in specs), f"{shape}: no parameter FSDP-sharded: {specs}"
    if shape[2] > 1:
      assert "spatial" in str(sharded_batch["volume"].sharding.spec)
    loss = float(metrics["loss"])
    assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), (shape, loss, ref_loss)
    got = jax.device_get(new_state)
    for part in ("params", "ema"):
      for a, r in zip(jax.tree.leaves(got[part]), jax.tree.leaves(ref_state[part])):
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        np.testing.assert_allclose(a, r, rtol=0, atol=PARAM_ATOL + PARAM_RTOL * scale,
                                   err_msg=f"{shape} {part}")
    print(f"train step {shape}: ok (loss {loss:.6f} vs {ref_loss:.6f})", flush=True)


if __name__ == "__main__":
  import jax
  assert len(jax.devices()) == NUM_FAKE_DEVICES, (
      f"needs XLA_FLAGS=--xla_force_host_platform_device_count={NUM_FAKE_DEVICES}")
  which = sys.argv[1] if len(sys.argv) > 1 else "all"
  if which in ("all", "haar"):
    check_sharded_haar()
  if which in ("all", "train"):
    check_train_step_meshes()


@pytest.mark.parametrize("topology,shape", [("v5e:4x4", (1, 4, 4)), ("v4:2x2x4", (2, 4, 4))])
def test_tpu_mesh_follows_the_physical_torus(topology, shape):
  """On TPU devices (AOT topology descriptions, no chip needed; skipped without libtpu) the
  mesh is in physical order: consecutive devices along the last (spatial) axis are one
  interconnect hop apart, and every device appears once."""
  pytest.importorskip("libtpu")
  from cf3d_jax import memory, parallel
  devices = memory.topology_devices(topology)
  mesh = parallel.make_mesh(shape, devices)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
  coords = np.array([[list(d.coords) for d in row]
                     for row in mesh.devices.reshape(-1, mesh.devices.shape[-1])])
  assert np.abs(np.diff(coords, axis=1)).sum(-1).max() <= 1


def test_memory_plan_of_a_latent_step_on_this_cpu():
  """`memory.measure` compiles the train step with abstract inputs (here the latent space's
  record shape) and reports XLA's per-device bytes and FLOPs consistently."""
  from cf3d_jax import config_base, memory
  c = config_base.load_config_file(os.path.join(ROOT, "configs", "demo_latent.py"), "smoke")
  r = memory.measure("demo_latent_smoke", c, "cpu", (-1, 1, 1), (4, 384), "full", "default")
  assert r.batch == 2 and r.remat == "full" and c.model.remat_levels == ("full", "full")
  assert r.per_device_gib >= r.arguments_gib > 0 and r.flops_per_device > 0
  with pytest.raises(config_base.ConfigError, match="--rules"):
    memory.measure("x", c, "cpu", (-1, 1, 1), (4, 384), "none", "no_such_rules")
