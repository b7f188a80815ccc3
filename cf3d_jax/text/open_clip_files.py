"""Reading an open_clip model folder (BiomedCLIP's hub repo) without open_clip.

`open_clip_spec` / `open_clip_folder` find the folder ('hf-hub:ORG/NAME' in the local cache or
'local-dir:PATH'), `find_open_clip_checkpoint` its weights, `load_text_state` the text tower's
tensors, `text_model_config` the text model's transformers config (from a config.json or
`infer_bert_config` from the weight shapes), `load_tokenizer` and `clean_function` the tokenizer
as open_clip's HFTokenizer builds it. Nothing is downloaded. `cf3d_jax.text.biomedclip` builds
the encoder from these.
"""

from __future__ import annotations

import html
import json
import os
import pickle
import re
import string
from typing import Any, Mapping, Sequence

from cf3d_jax.errors import ConfigError, DataError, PromptError
from cf3d_jax.text.encoder_base import import_torch_transformers, looks_like_path

BIOMEDCLIP_REPO = 'microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224'
BIOMEDCLIP_HUB = 'hf-hub:' + BIOMEDCLIP_REPO
# Weights file names in an open_clip folder, in open_clip's order of preference.
OPEN_CLIP_CHECKPOINTS = (
    'open_clip_model.safetensors', 'open_clip_pytorch_model.safetensors',
    'open_clip_pytorch_model.bin', 'open_clip_pytorch_model.pth', 'model.safetensors',
    'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt', 'tokenizer_config.json',
                   'special_tokens_map.json')
TEXT_PREFIX = 'text.'
BERT_HEAD_DIM = 64
# Text that ftfy.fix_text leaves unchanged (printable ASCII and whitespace).
_ASCII_TEXT = re.compile(r'[\x20-\x7e\t\n\r]*')


def open_clip_spec(model: str) -> str:
  """The open_clip model name for `model`: 'hf-hub:...' and 'local-dir:...' pass through; a
  folder becomes 'local-dir:ABSPATH'.

  Raises:
    DataError: a local-dir or path that is not an existing folder.
    ConfigError: anything else (built-in open_clip names need pretrained tags; not supported).
  """
  if model.startswith('hf-hub:'):
    return model
  folder = model[len('local-dir:'):] if model.startswith('local-dir:') else model
  folder = os.path.expanduser(folder)
  if os.path.isdir(folder):
    return 'local-dir:' + os.path.abspath(folder)
  if model.startswith('local-dir:') or looks_like_path(model):
    raise DataError(f'BiomedCLIP model folder {folder!r} does not exist (or is not a folder)')
  raise ConfigError(
      f"BiomedCLIP model {model!r} is neither 'hf-hub:ORG/NAME', 'local-dir:PATH' nor an "
      f'existing folder (default {BIOMEDCLIP_HUB!r})')


def download_hint(repo_id: str = BIOMEDCLIP_REPO) -> str:
  """How to put a copy of the hub repo `repo_id` in a local folder."""
  return (f'download the repo folder with `hf download {repo_id} --local-dir PATH` '
          f'(huggingface_hub < 1.0: `huggingface-cli download {repo_id} --local-dir PATH`) '
          'and pass PATH as the model')


def open_clip_folder(spec: str) -> str:
  """The local folder of an `open_clip_spec` name: the path of 'local-dir:PATH', or the snapshot
  of 'hf-hub:ORG/NAME' in the local Hugging Face cache (nothing is downloaded).

  Raises:
    DataError: the hub repo is not in the local cache (the message says how to download it).
  """
  if spec.startswith('local-dir:'):
    return spec[len('local-dir:'):]
  repo_id = spec[len('hf-hub:'):]
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    return huggingface_hub.snapshot_download(repo_id, local_files_only=True)
  except (ImportError, OSError, ValueError) as e:
    # LocalEntryNotFoundError is an OSError, a malformed repo id a ValueError.
    raise DataError(
        f'{spec} is not in the local Hugging Face cache ({type(e).__name__}) and nothing is '
        f'downloaded here; {download_hint(repo_id)}') from e


def find_open_clip_checkpoint(folder: str) -> str:
  """The weights file of an open_clip folder, chosen as open_clip's `_find_checkpoint_in_dir`:
  the first of OPEN_CLIP_CHECKPOINTS present, else any *.safetensors, *.bin, *.pth (sorted,
  safetensors first).

  Raises:
    DataError: no weights file (the message lists the names looked for and how to get them).
  """
  names = sorted(n for n in os.listdir(folder)
                 if n.endswith(('.safetensors', '.bin', '.pth')) and
                 os.path.isfile(os.path.join(folder, n)))
  preferred = [n for n in OPEN_CLIP_CHECKPOINTS if n in names]
  others = sorted(names, key=lambda n: not n.endswith('.safetensors'))
  if preferred or others:
    return os.path.join(folder, (preferred or others)[0])
  raise DataError(
      f'no open_clip weights in {folder}: looked for {", ".join(OPEN_CLIP_CHECKPOINTS[:3])} and '
      f'any *.safetensors, *.bin or *.pth; {download_hint()}')


def read_open_clip_config(folder: str) -> dict:
  """`model_cfg` of FOLDER/open_clip_config.json; DataError when absent or malformed."""
  path = os.path.join(folder, 'open_clip_config.json')
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  except FileNotFoundError as e:
    raise DataError(f'{folder} has no open_clip_config.json, so it is not an open_clip model '
                    f'folder; {download_hint()}') from e
  except (OSError, ValueError) as e:
    raise DataError(f'cannot read {path}: {e}') from e
  model_cfg = config.get('model_cfg') if isinstance(config, dict) else None
  if not isinstance(model_cfg, dict):
    raise DataError(f'{path} has no "model_cfg" object')
  return model_cfg


def _unprefixed(keys: Sequence[str]) -> dict[str, str]:
  """Checkpoint key → key without open_clip's DataParallel 'module.' prefix (open_clip strips the
  first 7 characters of every key when the first key starts with 'module')."""
  keys = list(keys)
  if keys and keys[0].startswith('module'):
    return {k: k[7:] for k in keys}
  return {k: k for k in keys}


def load_text_state(path: str) -> dict[str, Any]:
  """The text tower tensors of an open_clip checkpoint, keys without 'text.' (e.g.
  'transformer.embeddings.word_embeddings.weight', 'proj.0.weight'). The vision tower,
  logit_scale and other keys are skipped; safetensors files are read key by key.

  Raises:
    DataError: an unreadable file.
    ImportError: a .safetensors file without the safetensors package.
  """
  torch, _ = import_torch_transformers()
  if path.endswith('.safetensors'):
    try:
      from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'{path} needs the safetensors package: pip install safetensors') from e
    try:
      with safe_open(path, framework='pt', device='cpu') as f:
        names = _unprefixed(f.keys())
        return {new[len(TEXT_PREFIX):]: f.get_tensor(old) for old, new in names.items()
                if new.startswith(TEXT_PREFIX)}
    except (OSError, RuntimeError, ValueError) as e:
      raise DataError(f'cannot read the weights file {path}: {e}') from e
  try:
    try:  # memory-mapped, so the vision tower is never read; legacy (non-zip) files cannot be
      checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError:
      checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
    raise DataError(f'cannot read the weights file {path} as a torch state dict: {e}') from e
  if isinstance(checkpoint, dict) and 'state_dict' in checkpoint:
    checkpoint = checkpoint['state_dict']
  if not isinstance(checkpoint, Mapping):
    raise DataError(f'{path} holds a {type(checkpoint).__name__}, not a state dict')
  names = _unprefixed(checkpoint.keys())
  return {new[len(TEXT_PREFIX):]: checkpoint[old] for old, new in names.items()
          if new.startswith(TEXT_PREFIX)}


def infer_bert_config(state: Mapping[str, Any], pad_token_id: int | None = 0) -> Any:
  """A transformers.BertConfig read off the shapes of a text tower state (keys 'transformer.*'):
  vocab size, hidden size, number of layers, intermediate size, max positions and type vocab
  size; heads = hidden // 64 (the BERT convention: PubMedBERT-base has 768 wide, 12 heads).
  Everything else keeps BertConfig's defaults (GELU, layer norm eps 1e-12, absolute positions),
  which are PubMedBERT's.

  Raises:
    ConfigError: the state is not a BERT, or its width is not a multiple of 64.
  """
  _, transformers = import_torch_transformers()

  def shape(key: str) -> tuple[int, ...]:
    tensor = state.get('transformer.' + key)
    if tensor is None:
      raise ConfigError(f'cannot infer a BERT config: the text tower has no transformer.{key}; '
                        'put the text model\'s config.json in the model folder')
    return tuple(tensor.shape)

  vocab_size, hidden = shape('embeddings.word_embeddings.weight')
  layers = {int(m.group(1)) for k in state
            if (m := re.match(r'transformer\.encoder\.layer\.(\d+)\.', k))}
  if hidden % BERT_HEAD_DIM:
    raise ConfigError(
        f'cannot infer the number of attention heads of a {hidden}-wide text tower (BERT '
        f'convention: width / {BERT_HEAD_DIM}); put the text model\'s config.json in the model '
        'folder')
  return transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=hidden,
      num_hidden_layers=max(layers) + 1 if layers else 0,
      num_attention_heads=hidden // BERT_HEAD_DIM,
      intermediate_size=shape('encoder.layer.0.intermediate.dense.weight')[0],
      max_position_embeddings=shape('embeddings.position_embeddings.weight')[0],
      type_vocab_size=shape('embeddings.token_type_embeddings.weight')[0],
      pad_token_id=0 if pad_token_id is None else pad_token_id)


def _cached_hub_config(name: str) -> str | None:
  """Folder holding `name`'s config.json in the local Hugging Face cache, or None."""
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    path = huggingface_hub.try_to_load_from_cache(name, 'config.json')
  except (ImportError, OSError, ValueError):
    return None
  return os.path.dirname(path) if isinstance(path, str) and os.path.isfile(path) else None


def text_model_config(folder: str, text_cfg: Mapping[str, Any], state: Mapping[str, Any],
                       pad_token_id: int | None) -> tuple[Any, str]:
  """(transformers config of the text model, where it came from): FOLDER/config.json; else
  hf_model_name's config.json when it is a local folder or in the local Hugging Face cache;
  else `infer_bert_config` from the weights."""
  _, transformers = import_torch_transformers()
  name = str(text_cfg['hf_model_name'])
  sources = [(folder, 'config.json')]
  if os.path.isfile(os.path.join(os.path.expanduser(name), 'config.json')):
    sources.append((os.path.abspath(os.path.expanduser(name)), os.path.expanduser(name)))
  elif not looks_like_path(name) and (cached := _cached_hub_config(name)):
    sources.append((cached, f'hf-cache:{name}'))
  for source, label in sources:
    if os.path.isfile(os.path.join(source, 'config.json')):
      try:
        return transformers.AutoConfig.from_pretrained(source), label
      except (OSError, ValueError, KeyError) as e:
        raise DataError(f'cannot read {os.path.join(source, "config.json")}: {e}') from e
  return infer_bert_config(state, pad_token_id), 'inferred from the weights'


def _basic_clean(text: str, ftfy: Any) -> str:
  """open_clip's basic_clean: ftfy.fix_text, HTML unescaped twice, stripped. Without ftfy,
  printable ASCII (which fix_text leaves alone) is cleaned the same; other text is refused."""
  if ftfy is not None:
    text = ftfy.fix_text(text)
  elif not _ASCII_TEXT.fullmatch(text):
    raise PromptError(
        f'prompt {text!r} has characters beyond printable ASCII, which open_clip cleans with '
        'ftfy; install it (pip install ftfy) or rewrite the prompt in ASCII')
  return html.unescape(html.unescape(text)).strip()


def _whitespace_clean(text: str) -> str:
  """Runs of whitespace become one space."""
  return ' '.join(text.split()).strip()


def clean_function(clean: str, ftfy: Any) -> Any:
  """open_clip's `get_clean_fn(clean)` (tokenizer.py), with ftfy passed in (or None)."""
  punctuation = str.maketrans('', '', string.punctuation)
  functions = {
      'whitespace': lambda s: _whitespace_clean(_basic_clean(s, ftfy)),
      'lower': lambda s: _whitespace_clean(_basic_clean(s, ftfy)).lower(),
      'canonicalize': lambda s: _whitespace_clean(
          _basic_clean(s, ftfy).replace('_', ' ').translate(punctuation).lower()),
      'whitespace_underscore': lambda s: _whitespace_clean(
          _basic_clean(s, ftfy).replace('_', ' ')),
  }
  if clean not in functions:
    raise ConfigError(f'unknown tokenizer clean {clean!r}; expected one of {sorted(functions)}')
  return functions[clean]


def load_tokenizer(folder: str, text_cfg: Mapping[str, Any]) -> tuple[Any, str, bool]:
  """(Hugging Face tokenizer, clean name, strip_sep_token) as open_clip's HFTokenizer builds
  them: from the folder's tokenizer files (else hf_tokenizer_name, local folder or cache),
  padding on the right, text_cfg.tokenizer_kwargs 'clean' and 'strip_sep_token' honoured."""
  _, transformers = import_torch_transformers()
  kwargs = dict(text_cfg.get('tokenizer_kwargs') or {})
  clean = kwargs.pop('clean', 'whitespace')
  strip_sep = bool(kwargs.pop('strip_sep_token', False))
  kwargs.pop('trust_remote_code', None)
  mode = text_cfg.get('tokenizer_mode')
  if mode or 'language' in kwargs:
    raise ConfigError(f'{folder}: tokenizer_mode {mode!r} / language '
                      f'{kwargs.get("language")!r} are not supported by BiomedCLIPEncoder')
  has_files = any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES)
  source = folder if has_files else text_cfg.get('hf_tokenizer_name')
  if not source:
    raise DataError(f'{folder} has no tokenizer files (looked for {", ".join(TOKENIZER_FILES)}) '
                    'and its text_cfg names no hf_tokenizer_name')
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        source, **kwargs, **({} if has_files else {'local_files_only': True}))
  except (OSError, ValueError, TypeError) as e:
    where = folder if has_files else (
        f'{source!r} (hf_tokenizer_name; {folder} has none of {", ".join(TOKENIZER_FILES)})')
    raise DataError(f'cannot load the tokenizer from {where}: {e}') from e
  tokenizer.padding_side = 'right'
  return tokenizer, clean, strip_sep
