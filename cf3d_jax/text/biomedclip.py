"""BiomedCLIP's text tower as a `TorchTextEncoder`, rebuilt with torch + transformers alone
(open_clip's HFTextEncoder and HFTokenizer reproduced; neither open_clip nor torchvision is
needed). The folder is read by `cf3d_jax.text.open_clip_files`; `make_encoder('biomedclip', ...)`
in `cf3d_jax.text.encoders` builds it by name.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Mapping, Sequence

import numpy as np

from cf3d_jax.errors import ConfigError, DataError
from cf3d_jax.text.encoder_base import (TorchTextEncoder, check_token_counts,
                                        import_torch_transformers, state_dict_sha256)
from cf3d_jax.text.open_clip_files import (BIOMEDCLIP_HUB, TEXT_PREFIX, clean_function,
                                           find_open_clip_checkpoint, load_text_state,
                                           load_tokenizer, open_clip_folder, open_clip_spec,
                                           read_open_clip_config, text_model_config)

# open_clip's default pooler per architecture (hf_configs.arch_dict) for a text_cfg without
# hf_pooler_type, and the architectures whose AutoModel takes add_pooling_layer.
_ARCH_POOLERS = {'bert': 'cls_pooler', 'roberta': 'mean_pooler', 'xlm-roberta': 'mean_pooler',
                 'modernbert': 'mean_pooler'}
_POOLING_LAYER_TYPES = ('bert', 'roberta', 'xlm-roberta')


class BiomedCLIPEncoder(TorchTextEncoder):
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
    self._torch, _ = import_torch_transformers()
    folder = open_clip_folder(self.model)
    model_cfg = read_open_clip_config(folder)
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
    self._tokenizer, self.clean, self.strip_sep_token = load_tokenizer(folder, text_cfg)
    try:
      self._ftfy = importlib.import_module('ftfy')
    except ImportError:
      self._ftfy = None
    self._clean = clean_function(self.clean, self._ftfy)
    self.checkpoint = find_open_clip_checkpoint(folder)
    state = load_text_state(self.checkpoint)
    if not any(k.startswith('transformer.') for k in state):
      raise ConfigError(
          f'the checkpoint {self.checkpoint} has no Hugging Face text tower (no '
          f'text.transformer.* keys; e.g. {sorted(state)[:3] or "no text.* keys at all"})')
    config, self.text_config = text_model_config(
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
    torch, transformers = import_torch_transformers()
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

  def _token_ids(self, batch: Sequence[str]) -> Any:
    """Token ids [B, context_length] as open_clip's HFTokenizer makes them: cleaned, padded to
    the context length (PromptError for a prompt that would be truncated)."""
    torch = self._torch
    cleaned = [self._clean(p) for p in batch]
    counts = [len(ids) for ids in self._tokenizer(cleaned)['input_ids']]
    check_token_counts(batch, counts, self.context_length)
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
