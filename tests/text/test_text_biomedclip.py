"""Tests for cf3d_jax.text.encoders.BiomedCLIPEncoder.

The real loading path (open_clip `create_model_from_pretrained` / `get_tokenizer` on a
`local-dir:` folder) is exercised offline on a BiomedCLIP-shaped model built here: an
open_clip_config.json whose HF text tower is the packaged all-MiniLM-L6-v2 (BERT, 384-d) with
BiomedCLIP's 'mlp' projection to 512 and CLS-token pooling, a tiny ViT vision tower, and the
weights saved as open_clip_pytorch_model.bin. open_clip sizes the projection's hidden layer as
(width + 512) // 2: 640 for BiomedCLIP's 768-wide BERT, 448 for MiniLM's 384.

These tests need open_clip_torch and a torchvision built for the installed torch. With torch
2.13.0+cpu from a local wheel, PyPI offers no matching CPU torchvision: the newest torchvision
requires a newer torch (with CUDA wheels), and torchvision 0.28.0 (the torch 2.13 release) is a
CUDA build that fails to import on CPU-only torch. They skip in that case.
"""

import json
import os
import shutil

import numpy as np
import pytest

from cf3d_jax.errors import ConfigError, DataError
from cf3d_jax.text import encoders
from cf3d_jax.text.embed import embed_prompts
from cf3d_jax.text.table import load_table

PROMPTS = ['', 'Subject has high lesion load.', "Subject has Alzheimer's disease."]
TOKENIZER_FILES = ('vocab.txt', 'tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json')


def _open_clip_or_skip():
  """The open_clip module, or skip with the reason it cannot be imported."""
  try:
    return encoders._import_open_clip()  # pylint: disable=protected-access
  except ImportError as e:
    pytest.skip(f'open_clip_torch is not usable here, so the real BiomedCLIP path cannot run: '
                f'{e.__cause__ or e}. (With torch 2.13.0+cpu, PyPI has no matching CPU '
                'torchvision; see this module\'s docstring.)')


def test_open_clip_spec(tmp_path):
  hub = encoders.BIOMEDCLIP_HUB
  assert encoders.open_clip_spec(hub) == hub
  assert encoders.open_clip_spec(str(tmp_path)) == f'local-dir:{tmp_path}'
  assert encoders.open_clip_spec(f'local-dir:{tmp_path}') == f'local-dir:{tmp_path}'
  with pytest.raises(DataError, match='nowhere'):
    encoders.open_clip_spec(f'local-dir:{tmp_path}/nowhere')
  with pytest.raises(DataError, match='nowhere'):
    encoders.open_clip_spec(f'{tmp_path}/nowhere')
  with pytest.raises(ConfigError, match='ViT-B-32'):
    encoders.open_clip_spec('ViT-B-32')


def test_bad_output_is_a_config_error():
  with pytest.raises(ConfigError, match='pooled'):
    encoders.BiomedCLIPEncoder(output='pooled')


def test_missing_open_clip_says_how_to_install(monkeypatch):
  monkeypatch.setitem(__import__('sys').modules, 'open_clip', None)
  with pytest.raises(ImportError, match=r'pip install cf3d_jax\[text\]'):
    encoders._import_open_clip()  # pylint: disable=protected-access


@pytest.fixture(scope='module')
def clip_dir(minilm_path, tmp_path_factory):
  """A `local-dir:` open_clip folder with a MiniLM text tower and random projections."""
  open_clip = _open_clip_or_skip()
  import torch  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp('biomedclip_like')
  config = {
      'model_cfg': {
          'embed_dim': 512,
          'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 64, 'head_width': 32,
                         'patch_size': 16},
          'text_cfg': {'hf_model_name': minilm_path, 'hf_tokenizer_name': minilm_path,
                       'hf_proj_type': 'mlp', 'hf_pooler_type': 'cls_last_hidden_state_pooler',
                       'context_length': 256},
      },
      'preprocess_cfg': {'mean': [0.4815, 0.4578, 0.4082], 'std': [0.2686, 0.2613, 0.2758]},
  }
  (folder / 'open_clip_config.json').write_text(json.dumps(config))
  for name in TOKENIZER_FILES:
    shutil.copy(os.path.join(minilm_path, name), folder / name)
  torch.manual_seed(0)
  model = open_clip.create_model(f'local-dir:{folder}')
  torch.save(model.state_dict(), folder / 'open_clip_pytorch_model.bin')
  return str(folder)


@pytest.fixture(scope='module')
def tokens_encoder(clip_dir):
  return encoders.BiomedCLIPEncoder(clip_dir, output='tokens')


def test_tokens_shapes_mask_and_values(tokens_encoder, minilm_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  emb, mask = tokens_encoder.encode(PROMPTS, batch_size=2)
  assert tokens_encoder.kind == 'tokens' and tokens_encoder.model.startswith('local-dir:')
  assert emb.shape == (3, 256, 384) and emb.dtype == np.float32
  assert mask.shape == (3, 256) and mask.dtype == bool
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
  enc = tokenizer(PROMPTS, padding='max_length', max_length=256, return_tensors='pt')
  np.testing.assert_array_equal(mask, enc['input_ids'].numpy() != tokenizer.pad_token_id)
  assert mask[0].sum() == 2
  bert = transformers.AutoModel.from_pretrained(minilm_path).eval()
  with torch.no_grad():
    hidden = bert(input_ids=enc['input_ids'], attention_mask=enc['attention_mask'])
  expected = hidden.last_hidden_state.numpy() * mask[..., None]
  np.testing.assert_allclose(emb, expected, atol=1e-4)


def test_projected_is_the_mlp_of_the_cls_state(clip_dir, tokens_encoder, monkeypatch):
  import torch  # pylint: disable=g-import-not-at-top
  encoder = encoders.BiomedCLIPEncoder(clip_dir, output='projected')
  emb, mask = encoder.encode(PROMPTS)
  assert emb.shape == (3, 1, 512) and mask.all() and encoder.kind == 'projected'
  assert encoder.weights_sha256 == tokens_encoder.weights_sha256
  state = torch.load(os.path.join(clip_dir, 'open_clip_pytorch_model.bin'))
  w0, w2 = state['text.proj.0.weight'].numpy(), state['text.proj.2.weight'].numpy()
  assert w0.shape == (448, 384) and w2.shape == (512, 448)
  tokens, _ = tokens_encoder.encode(PROMPTS)
  hidden = torch.nn.functional.gelu(torch.from_numpy(tokens[:, 0] @ w0.T)).numpy()
  np.testing.assert_allclose(emb[:, 0], hidden @ w2.T, atol=1e-4)
  monkeypatch.setattr(encoder, 'normalize', True)
  unit, _ = encoder.encode(PROMPTS)
  np.testing.assert_allclose(unit, emb / np.linalg.norm(emb, axis=-1, keepdims=True), atol=1e-5)


def test_deterministic_and_table_round_trip(clip_dir, tokens_encoder, tmp_path):
  first, mask = tokens_encoder.encode(PROMPTS)
  again = encoders.make_encoder('biomedclip', model=f'local-dir:{clip_dir}')
  second, mask2 = again.encode(PROMPTS, batch_size=1)
  np.testing.assert_allclose(first, second, atol=1e-5)
  np.testing.assert_array_equal(mask, mask2)
  assert again.weights_sha256 == tokens_encoder.weights_sha256
  table = embed_prompts(tokens_encoder, PROMPTS)
  table.save(tmp_path / 'clip.npz')
  loaded = load_table(tmp_path / 'clip.npz')
  assert (loaded.meta['encoder'], loaded.meta['kind']) == ('biomedclip', 'tokens')
  assert (loaded.length, loaded.dim) == (256, 384)
  assert loaded.meta['pad_token_id'] == 0
  np.testing.assert_array_equal(loaded.mask, mask)
