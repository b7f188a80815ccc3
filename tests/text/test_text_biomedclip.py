"""Tests for cf3d_jax.text.encoders.BiomedCLIPEncoder (torch + transformers, no open_clip).

Everything runs offline on BiomedCLIP-shaped folders written here: open_clip_config.json like
BiomedCLIP's (hf_proj_type 'mlp', hf_pooler_type 'cls_last_hidden_state_pooler', context length
256, embed_dim 512), the tokenizer files of the packaged all-MiniLM-L6-v2 (an uncased BERT
WordPiece vocab, as PubMedBERT's), and open_clip_pytorch_model.bin holding a tiny random BERT
(128 wide, 2 layers, 2 heads, so heads = width / 64 can be inferred) under open_clip's keys
`text.transformer.*`, `text.proj.0.weight`, `text.proj.2.weight`, plus dummy `visual.*` keys,
`logit_scale` and the `position_ids` buffer older transformers saved. The encoder is checked
against a reference computed here with a plain transformers BertModel and torch ops.

The last test compares with open_clip itself; it is skipped where open_clip does not import
(here: torch 2.13.0+cpu has no matching CPU torchvision on PyPI).
"""

import json
import os
import shutil

import numpy as np
import pytest

from cf3d_jax.errors import ConfigError, DataError, PromptError
from cf3d_jax.text import biomedclip
from cf3d_jax.text import embed
from cf3d_jax.text import encoder_base
from cf3d_jax.text import encoders
from cf3d_jax.text import open_clip_files
from cf3d_jax.text.embed import embed_prompts
from cf3d_jax.text.table import load_table

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

PROMPTS = ['', 'Subject has high lesion load.', "Subject has  Alzheimer's disease."]
WIDTH, LAYERS, INTERMEDIATE, POSITIONS, EMBED_DIM, CONTEXT = 128, 2, 256, 320, 512, 256
MLP_HIDDEN = (WIDTH + EMBED_DIM) // 2
WEIGHTS = 'open_clip_pytorch_model.bin'


def _bert_config(heads=2, width=WIDTH, vocab_size=30522):
  return transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=width, num_hidden_layers=LAYERS,
      num_attention_heads=heads, intermediate_size=INTERMEDIATE,
      max_position_embeddings=POSITIONS, type_vocab_size=2, pad_token_id=0)


def _randn(gen, *shape):
  return torch.randn(*shape, generator=gen)


def _text_state(seed=0, width=WIDTH, proj='mlp', pooling_layer=False):
  """Random text tower tensors under open_clip's checkpoint keys ('text.…')."""
  gen = torch.Generator().manual_seed(seed)
  bert = transformers.BertModel(_bert_config(width=width), add_pooling_layer=pooling_layer)
  state = {}
  for key, value in bert.state_dict().items():
    noise = _randn(gen, *value.shape)
    state['text.transformer.' + key] = 1 + 0.1 * noise if key.endswith('LayerNorm.weight') else (
        0.1 * noise)
  if proj == 'mlp':
    state['text.proj.0.weight'] = 0.1 * _randn(gen, MLP_HIDDEN, width)
    state['text.proj.2.weight'] = 0.1 * _randn(gen, EMBED_DIM, MLP_HIDDEN)
  elif proj == 'linear':
    state['text.proj.weight'] = 0.1 * _randn(gen, EMBED_DIM, width)
  elif proj == 'clap_mlp':
    state['text.proj.0.weight'] = 0.1 * _randn(gen, EMBED_DIM, width)
    state['text.proj.0.bias'] = 0.1 * _randn(gen, EMBED_DIM)
    state['text.proj.2.weight'] = 0.1 * _randn(gen, EMBED_DIM, EMBED_DIM)
    state['text.proj.2.bias'] = 0.1 * _randn(gen, EMBED_DIM)
  return state


def _checkpoint(text_state):
  """The whole-CLIP state dict: text tower, dummy vision tower, logit_scale, position_ids."""
  gen = torch.Generator().manual_seed(99)
  return {
      'visual.trunk.patch_embed.proj.weight': _randn(gen, 8, 3, 4, 4),
      'visual.head.proj.weight': _randn(gen, EMBED_DIM, 8),
      'logit_scale': torch.tensor(4.6052),
      **text_state,
      'text.transformer.embeddings.position_ids': torch.arange(POSITIONS)[None],
  }


def _write_folder(folder, minilm_path, text_state, text_cfg=None, config_json=None,
                  weights=WEIGHTS, whole=None):
  """An open_clip folder as the hub repo holds it; returns its path as a string."""
  os.makedirs(folder, exist_ok=True)
  cfg = {'hf_model_name': 'microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract',
         'hf_tokenizer_name': 'microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract',
         'hf_proj_type': 'mlp', 'hf_pooler_type': 'cls_last_hidden_state_pooler',
         'context_length': CONTEXT}
  cfg.update(text_cfg or {})
  config = {'model_cfg': {
      'embed_dim': EMBED_DIM,
      'vision_cfg': {'timm_model_name': 'vit_base_patch16_224', 'timm_model_pretrained': False,
                     'timm_pool': '', 'timm_proj': 'linear', 'image_size': 224},
      'text_cfg': {k: v for k, v in cfg.items() if v is not None}},
      'preprocess_cfg': {'mean': [0.48145466, 0.4578275, 0.40821073],
                         'std': [0.26862954, 0.26130258, 0.27577711]}}
  with open(os.path.join(folder, 'open_clip_config.json'), 'w') as f:
    json.dump(config, f)
  for name in open_clip_files.TOKENIZER_FILES:
    shutil.copy(os.path.join(minilm_path, name), os.path.join(folder, name))
  if config_json is not None:
    config_json.to_json_file(os.path.join(folder, 'config.json'))
  if weights:
    state = whole if whole is not None else _checkpoint(text_state)
    if weights.endswith('.safetensors'):
      from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
      save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, weights))
    else:
      torch.save(state, os.path.join(folder, weights))
  return str(folder)


def _reference(minilm_path, text_state, prompts, config, pooler='cls_last_hidden_state_pooler',
               proj='mlp', context=CONTEXT):
  """Independent computation: (token ids, mask, last hidden states, projected embedding)."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
  cleaned = [' '.join(p.split()) for p in prompts]
  ids = tokenizer(cleaned, padding='max_length', max_length=context, truncation=True,
                  return_tensors='pt')['input_ids']
  mask = ids != 0
  bert = transformers.BertModel(config, add_pooling_layer=pooler == 'cls_pooler').eval()
  prefix = 'text.transformer.'
  bert.load_state_dict({k[len(prefix):]: v for k, v in text_state.items()
                        if k.startswith(prefix)}, strict=True)
  with torch.no_grad():
    out = bert(input_ids=ids, attention_mask=mask.long())
  hidden = out.last_hidden_state
  if pooler == 'mean_pooler':
    m = mask[..., None].float()
    pooled = (hidden * m).sum(1) / m.sum(1)
  elif pooler == 'max_pooler':
    pooled = torch.where(mask[..., None], hidden, torch.tensor(-float('inf'))).max(1).values
  elif pooler == 'cls_pooler':
    pooled = torch.tanh(hidden[:, 0] @ text_state['text.transformer.pooler.dense.weight'].T +
                        text_state['text.transformer.pooler.dense.bias'])
  else:
    pooled = hidden[:, 0]
  s = text_state
  if proj == 'mlp':
    emb = torch.nn.functional.gelu(pooled @ s['text.proj.0.weight'].T) @ s['text.proj.2.weight'].T
  elif proj == 'linear':
    emb = pooled @ s['text.proj.weight'].T
  else:  # clap_mlp
    emb = torch.relu(pooled @ s['text.proj.0.weight'].T + s['text.proj.0.bias'])
    emb = emb @ s['text.proj.2.weight'].T + s['text.proj.2.bias']
  return ids.numpy(), mask.numpy(), hidden.numpy(), emb.detach().numpy()


@pytest.fixture(scope='module')
def text_state():
  return _text_state()


@pytest.fixture(scope='module')
def clip_dir(minilm_path, text_state, tmp_path_factory):
  return _write_folder(tmp_path_factory.mktemp('biomedclip_like'), minilm_path, text_state)


@pytest.fixture(scope='module')
def reference(minilm_path, text_state):
  return _reference(minilm_path, text_state, PROMPTS, _bert_config(heads=2))


@pytest.fixture(scope='module')
def tokens_encoder(clip_dir):
  return biomedclip.BiomedCLIPEncoder(clip_dir, output='tokens')


def test_open_clip_spec(tmp_path):
  hub = open_clip_files.BIOMEDCLIP_HUB
  assert open_clip_files.open_clip_spec(hub) == hub
  assert open_clip_files.open_clip_spec(str(tmp_path)) == f'local-dir:{tmp_path}'
  assert open_clip_files.open_clip_spec(f'local-dir:{tmp_path}') == f'local-dir:{tmp_path}'
  with pytest.raises(DataError, match='nowhere'):
    open_clip_files.open_clip_spec(f'local-dir:{tmp_path}/nowhere')
  with pytest.raises(DataError, match='nowhere'):
    open_clip_files.open_clip_spec(f'{tmp_path}/nowhere')
  with pytest.raises(ConfigError, match='ViT-B-32'):
    open_clip_files.open_clip_spec('ViT-B-32')


def test_bad_output_is_a_config_error():
  with pytest.raises(ConfigError, match='pooled'):
    biomedclip.BiomedCLIPEncoder(output='pooled')


def test_tokens_match_reference(tokens_encoder, reference):
  ids, ref_mask, hidden, _ = reference
  emb, mask = tokens_encoder.encode(PROMPTS, batch_size=2)
  assert tokens_encoder.kind == 'tokens' and tokens_encoder.model.startswith('local-dir:')
  assert (tokens_encoder.dim, tokens_encoder.length) == (WIDTH, CONTEXT)
  assert emb.shape == (3, CONTEXT, WIDTH) and emb.dtype == np.float32
  assert mask.shape == (3, CONTEXT) and mask.dtype == bool
  np.testing.assert_array_equal(mask, ref_mask)
  np.testing.assert_array_equal(mask, ids != 0)
  assert mask[0].sum() == 2 and mask.sum(1).tolist() == [2, 9, 9]  # [CLS] … [SEP]
  assert (emb[~mask] == 0).all()
  np.testing.assert_allclose(emb, hidden * mask[..., None], atol=1e-5)
  assert tokens_encoder.describe()['text_config'] == 'inferred from the weights'


def test_projected_matches_reference(clip_dir, tokens_encoder, reference):
  encoder = biomedclip.BiomedCLIPEncoder(f'local-dir:{clip_dir}', output='projected')
  emb, mask = encoder.encode(PROMPTS)
  assert emb.shape == (3, 1, EMBED_DIM) and mask.shape == (3, 1) and mask.all()
  assert (encoder.kind, encoder.dim, encoder.length) == ('projected', EMBED_DIM, 1)
  assert encoder.weights_sha256 == tokens_encoder.weights_sha256
  np.testing.assert_allclose(emb[:, 0], reference[3], atol=1e-5)
  unit_encoder = biomedclip.BiomedCLIPEncoder(clip_dir, output='projected', normalize=True)
  unit, _ = unit_encoder.encode(PROMPTS)
  np.testing.assert_allclose(unit, emb / np.linalg.norm(emb, axis=-1, keepdims=True), atol=1e-6)
  assert unit_encoder.describe()['normalized'] and not encoder.describe()['normalized']


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
  meta = loaded.meta
  assert (meta['encoder'], meta['kind'], meta['model']) == (
      'biomedclip', 'tokens', f'local-dir:{clip_dir}')
  assert (loaded.length, loaded.dim) == (CONTEXT, WIDTH)
  assert (meta['pad_token_id'], meta['pooler'], meta['projection'], meta['checkpoint']) == (
      0, 'cls_last_hidden_state_pooler', 'mlp', WEIGHTS)
  np.testing.assert_array_equal(loaded.mask, mask)


def test_weights_hash_is_the_text_tower(tokens_encoder, text_state):
  # The checkpoint's text.* tensors (not position_ids, the vision tower or logit_scale).
  assert tokens_encoder.weights_sha256 == encoder_base.state_dict_sha256(text_state)


def test_cli_embeds_with_biomedclip(clip_dir, tmp_path):
  output = tmp_path / 'ms.npz'
  status = embed.main(['--encoder=biomedclip', f'--model={clip_dir}', '--dataset=ms',
                       '--output_kind=projected', f'--output={output}'])
  assert status == 0
  table = load_table(output)
  assert table.embeddings.shape[1:] == (1, EMBED_DIM)
  assert table.meta['model'] == f'local-dir:{clip_dir}'


@pytest.mark.parametrize('where', ['folder', 'hf_model_name'])
def test_text_config_json_wins_over_inference(where, minilm_path, text_state, reference,
                                              tmp_path):
  config = _bert_config(heads=4)  # inference would say 128 / 64 = 2 heads
  if where == 'folder':
    folder = _write_folder(tmp_path / 'clip', minilm_path, text_state, config_json=config)
    label = 'config.json'
  else:
    bert_dir = tmp_path / 'bert'
    os.makedirs(bert_dir)
    config.to_json_file(bert_dir / 'config.json')
    folder = _write_folder(tmp_path / 'clip', minilm_path, text_state,
                           text_cfg={'hf_model_name': str(bert_dir)})
    label = str(bert_dir)
  encoder = biomedclip.BiomedCLIPEncoder(folder, output='tokens')
  assert encoder.describe()['text_config'] == label
  emb, mask = encoder.encode(PROMPTS)
  _, _, hidden, _ = _reference(minilm_path, text_state, PROMPTS, config)
  np.testing.assert_allclose(emb, hidden * mask[..., None], atol=1e-5)
  assert np.abs(emb - reference[2] * mask[..., None]).max() > 1e-3  # 2 heads differ


@pytest.mark.parametrize('pooler,proj', [
    ('mean_pooler', 'linear'), ('max_pooler', 'clap_mlp'), ('cls_pooler', 'mlp'),
    (None, 'linear'),  # BERT's default, open_clip's 'cls_pooler' without a pooling layer
])
def test_other_poolers_and_projections(pooler, proj, minilm_path, tmp_path):
  state = _text_state(seed=1, proj=proj, pooling_layer=pooler == 'cls_pooler')
  folder = _write_folder(tmp_path, minilm_path, state,
                         text_cfg={'hf_pooler_type': pooler, 'hf_proj_type': proj})
  encoder = biomedclip.BiomedCLIPEncoder(folder, output='projected')
  emb, _ = encoder.encode(PROMPTS)
  _, _, _, expected = _reference(minilm_path, state, PROMPTS, _bert_config(),
                                 pooler=pooler or 'cls_last_hidden_state_pooler', proj=proj)
  np.testing.assert_allclose(emb[:, 0], expected, atol=1e-5)
  assert encoder.describe()['pooler'] == (pooler or 'cls_pooler')


def test_safetensors_weights_are_read_and_preferred(minilm_path, text_state, tmp_path,
                                                   tokens_encoder):
  pytest.importorskip('safetensors')
  folder = _write_folder(tmp_path, minilm_path, text_state, weights='open_clip_model.safetensors')
  torch.save({'garbage': torch.zeros(1)}, os.path.join(folder, WEIGHTS))  # not chosen
  encoder = biomedclip.BiomedCLIPEncoder(folder)
  assert encoder.describe()['checkpoint'] == 'open_clip_model.safetensors'
  assert encoder.weights_sha256 == tokens_encoder.weights_sha256
  np.testing.assert_array_equal(encoder.encode(PROMPTS)[0], tokens_encoder.encode(PROMPTS)[0])


def test_nested_state_dict_with_module_prefix(minilm_path, text_state, tmp_path,
                                              tokens_encoder):
  whole = {'state_dict': {'module.' + k: v for k, v in _checkpoint(text_state).items()}}
  folder = _write_folder(tmp_path, minilm_path, text_state, whole=whole)
  assert biomedclip.BiomedCLIPEncoder(folder).weights_sha256 == tokens_encoder.weights_sha256


def test_context_length_pads_and_too_long_prompt_is_an_error(clip_dir, tokens_encoder):
  short = biomedclip.BiomedCLIPEncoder(clip_dir, context_length=9)
  emb, mask = short.encode(PROMPTS)
  assert emb.shape == (3, 9, WIDTH) and mask.sum(1).tolist() == [2, 9, 9]
  np.testing.assert_allclose(emb, tokens_encoder.encode(PROMPTS)[0][:, :9], atol=1e-5)
  with pytest.raises(PromptError, match=r'lesion load.*10 tokens.*context length 9'):
    short.encode(['Subject has high lesion load today.'])
  with pytest.raises(ConfigError, match=f'exceeds the text tower limit {POSITIONS}'):
    biomedclip.BiomedCLIPEncoder(clip_dir, context_length=POSITIONS + 1)


def test_cleaning_like_open_clip(clip_dir, tokens_encoder):
  emb, _ = tokens_encoder.encode(['  Subject has\thigh lesion\n load.  '])
  np.testing.assert_array_equal(emb, tokens_encoder.encode(['Subject has high lesion load.'])[0])
  clean = open_clip_files.clean_function('canonicalize', None)
  assert clean(" Hello_World,  it's &amp; ok ") == 'hello world its ok'
  plain = open_clip_files.clean_function('whitespace', None)
  with pytest.raises(PromptError, match='ftfy'):
    plain('Alzheimer\u2019s disease')
  try:
    import ftfy  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  fixed = open_clip_files.clean_function('whitespace', ftfy)
  assert fixed('Alzheimer\u2019s  disease') == "Alzheimer's disease"


def test_strip_sep_token(minilm_path, text_state, tmp_path):
  folder = _write_folder(tmp_path, minilm_path, text_state,
                         text_cfg={'tokenizer_kwargs': {'strip_sep_token': True}})
  _, mask = biomedclip.BiomedCLIPEncoder(folder).encode(PROMPTS)
  assert mask.sum(1).tolist() == [1, 8, 8]  # [SEP] became padding


def test_missing_folder_config_or_weights(minilm_path, text_state, tmp_path):
  with pytest.raises(DataError, match='nowhere'):
    biomedclip.BiomedCLIPEncoder(str(tmp_path / 'nowhere'))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(DataError, match=f'{empty} has no open_clip_config.json'):
    biomedclip.BiomedCLIPEncoder(str(empty))
  folder = _write_folder(tmp_path / 'noweights', minilm_path, text_state, weights=None)
  with pytest.raises(DataError, match=r'no open_clip weights in .*noweights: looked for '
                     r'open_clip_model.safetensors.*open_clip_pytorch_model.bin.*hf download '
                     + open_clip_files.BIOMEDCLIP_REPO):
    biomedclip.BiomedCLIPEncoder(folder)


def test_hub_name_not_in_local_cache_says_how_to_download():
  with pytest.raises(DataError, match=r'not in the local Hugging Face cache.*hf download '
                     r'nobody-cf3d/no-such-biomedclip --local-dir PATH'):
    biomedclip.BiomedCLIPEncoder('hf-hub:nobody-cf3d/no-such-biomedclip')


def test_keys_must_match_the_text_tower(minilm_path, text_state, tmp_path):
  missing = {k: v for k, v in text_state.items() if k != 'text.proj.2.weight'}
  folder = _write_folder(tmp_path / 'a', minilm_path, missing)
  with pytest.raises(DataError, match=r'do not fit the text tower of .*a \(.*missing keys: '
                     r'text.proj.2.weight; unexpected keys: none'):
    biomedclip.BiomedCLIPEncoder(folder)
  extra = {**text_state, 'text.transformer.pooler.dense.weight': torch.zeros(WIDTH, WIDTH)}
  folder = _write_folder(tmp_path / 'b', minilm_path, extra)
  with pytest.raises(DataError, match=r'missing keys: none; unexpected keys: '
                     r'text.transformer.pooler.dense.weight'):
    biomedclip.BiomedCLIPEncoder(folder)
  wrong = {**text_state, 'text.proj.2.weight': torch.zeros(EMBED_DIM, 7)}
  folder = _write_folder(tmp_path / 'c', minilm_path, wrong)
  with pytest.raises(DataError, match=r'do not fit .*proj.2.weight'):
    biomedclip.BiomedCLIPEncoder(folder)


def test_no_hf_text_tower_is_a_config_error(minilm_path, text_state, tmp_path):
  folder = _write_folder(tmp_path / 'a', minilm_path, text_state, text_cfg={'hf_model_name': None})
  with pytest.raises(ConfigError, match='no Hugging Face text tower'):
    biomedclip.BiomedCLIPEncoder(folder)
  native = {'text.token_embedding.weight': torch.zeros(10, 8), 'visual.proj': torch.zeros(8, 8)}
  folder = _write_folder(tmp_path / 'b', minilm_path, text_state, whole=native)
  with pytest.raises(ConfigError, match=r'has no Hugging Face text tower \(no text.transformer'):
    biomedclip.BiomedCLIPEncoder(folder)


@pytest.mark.parametrize('text_cfg,message', [
    ({'hf_pooler_type': 'last_pooler'}, 'hf_pooler_type'),
    ({'hf_proj_type': 'conv'}, 'hf_proj_type'),
    ({'hf_proj_type': None}, 'differs from embed_dim'),
    ({'tokenizer_kwargs': {'clean': 'shout'}}, 'clean'),
])
def test_bad_text_cfg_is_a_config_error(text_cfg, message, minilm_path, text_state, tmp_path):
  folder = _write_folder(tmp_path, minilm_path, text_state, text_cfg=text_cfg)
  with pytest.raises(ConfigError, match=message):
    biomedclip.BiomedCLIPEncoder(folder)


def test_heads_not_inferable_asks_for_config_json(minilm_path, tmp_path):
  state = _text_state(width=96, proj='linear')
  folder = _write_folder(tmp_path, minilm_path, state, text_cfg={'hf_proj_type': 'linear'})
  with pytest.raises(ConfigError, match=r'96-wide.*config.json'):
    biomedclip.BiomedCLIPEncoder(folder)


def test_infer_bert_config(text_state):
  config = open_clip_files.infer_bert_config({k[len('text.'):]: v for k, v in text_state.items()})
  assert (config.vocab_size, config.hidden_size, config.num_hidden_layers,
          config.num_attention_heads, config.intermediate_size, config.max_position_embeddings,
          config.type_vocab_size, config.pad_token_id) == (
              30522, WIDTH, LAYERS, 2, INTERMEDIATE, POSITIONS, 2, 0)


# Not max_pooler (open_clip 3.3.0's fails on its long mask; fixed later, as done here) nor
# clap_mlp (newer than 3.3.0).
@pytest.mark.parametrize('pooler,proj', [
    ('cls_last_hidden_state_pooler', 'mlp'), ('cls_pooler', 'linear'), ('mean_pooler', 'mlp')])
def test_matches_open_clip(pooler, proj, minilm_path, tmp_path):
  """The same folder through open_clip (create_model_from_pretrained, get_tokenizer)."""
  try:
    import open_clip  # pylint: disable=g-import-not-at-top
  except (ImportError, RuntimeError, OSError) as e:
    pytest.skip(f'open_clip_torch is not importable here ({type(e).__name__}: {e}); with torch '
                '2.13.0+cpu PyPI has no matching CPU torchvision')
  bert_dir = tmp_path / 'bert'
  torch.manual_seed(0)
  transformers.BertModel(_bert_config(), add_pooling_layer=False).save_pretrained(bert_dir)
  folder = tmp_path / 'clip'
  folder.mkdir()
  config = {'model_cfg': {
      'embed_dim': EMBED_DIM,
      'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 64, 'head_width': 32,
                     'patch_size': 16},
      'text_cfg': {'hf_model_name': str(bert_dir), 'hf_tokenizer_name': str(bert_dir),
                   'hf_proj_type': proj, 'hf_pooler_type': pooler,
                   'context_length': CONTEXT}}}
  (folder / 'open_clip_config.json').write_text(json.dumps(config))
  for name in open_clip_files.TOKENIZER_FILES:
    shutil.copy(os.path.join(minilm_path, name), folder / name)
  model = open_clip.create_model(f'local-dir:{folder}')
  torch.save(model.state_dict(), folder / WEIGHTS)
  model = open_clip.create_model_from_pretrained(f'local-dir:{folder}', return_transform=False)
  model.eval()
  tokenizer = open_clip.get_tokenizer(f'local-dir:{folder}')
  ids = tokenizer(PROMPTS)
  with torch.no_grad():
    expected = model.encode_text(ids).numpy()
    hidden = model.text.transformer(input_ids=ids,
                                    attention_mask=(ids != 0).long()).last_hidden_state.numpy()
  projected = biomedclip.BiomedCLIPEncoder(str(folder), output='projected')
  assert projected.describe()['text_config'] == str(bert_dir)
  np.testing.assert_allclose(projected.encode(PROMPTS)[0][:, 0], expected, atol=1e-5)
  emb, mask = biomedclip.BiomedCLIPEncoder(str(folder)).encode(PROMPTS)
  np.testing.assert_array_equal(mask, ids.numpy() != 0)
  np.testing.assert_allclose(emb, hidden * mask[..., None], atol=1e-5)
