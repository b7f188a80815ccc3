"""`mesh.cpu_devices`: splitting a CPU host into several JAX devices before the backend starts."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from cf3d_jax import parallel
from cf3d_jax.config_base import validate
from cf3d_jax.errors import ConfigError
from conftest import ROOT, load_config


@pytest.mark.parametrize("requested, batches, cores, processes, expected", [
    (0, [4], 2, 1, 0),            # JAX's own
    (3, [4], 2, 1, 3),            # as given, even when it does not divide (preflight says so)
    (-1, [4, 12], 2, 1, 2),       # the demo on 2 cores
    (-1, [4, 12], 16, 1, 4),      # capped by the smallest batch
    (-1, [4, 6], 16, 1, 2),       # a common divisor of every batch
    (-1, [1], 8, 1, 1),           # batch 1: one device
    (-1, [8], 8, 2, 4),           # per-process batch in a 2-process job
    (-1, [5], 4, 1, 1),           # a prime batch above the cores
])
def test_cpu_device_count(requested, batches, cores, processes, expected):
  assert parallel.cpu_device_count(requested, batches, cores, processes) == expected


def _run(code: str, env_extra: dict) -> str:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(env_extra)
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip().splitlines()[-1]


def test_configure_splits_a_fresh_backend_and_defers_to_xla_flags():
  code = """
    import jax
    from cf3d_jax import parallel
    n = parallel.configure_cpu_devices(2, [4])
    print(n, jax.device_count(), jax.devices()[0].platform)
  """
  assert _run(code, {"JAX_PLATFORMS": "cpu"}) == "2 2 cpu"
  # An explicit XLA flag wins: nothing is set, the flag's count stays.
  forced = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
  assert _run(code, forced) == "None 3 cpu"
  # 0 leaves JAX's single CPU device.
  assert _run(code.replace("(2, [4])", "(0, [4])"), {"JAX_PLATFORMS": "cpu"}) == "None 1 cpu"


def test_configure_after_the_backend_started_keeps_its_devices():
  before = jax.device_count()                      # starts the backend in this process
  wanted = before + 1
  assert parallel.configure_cpu_devices(wanted, [wanted]) is None
  assert jax.device_count() == before


def test_mode_all_picks_a_divisor_of_train_and_sample_batches():
  code = """
    import jax
    from cf3d_jax import modes
    from cf3d_jax.config_base import load_config_file
    config = load_config_file({path!r}, None)
    config.mesh.cpu_devices = -1
    config.train.batch_size, config.sample.batch_size = 4, 6
    print(modes.cpu_devices(config, "all"), jax.device_count())
  """.format(path=os.path.join(ROOT, "configs", "demo.py"))
  # The child sees as many cores as this machine; the answer is a divisor of gcd(4, 6) = 2.
  n = min(parallel.usable_cores(), 2)
  assert _run(code, {"JAX_PLATFORMS": "cpu"}) == f"{n} {n}"


def test_config_range():
  config = load_config()
  config.mesh.cpu_devices = -2
  with pytest.raises(ConfigError, match="mesh.cpu_devices"):
    validate(config, "train")
