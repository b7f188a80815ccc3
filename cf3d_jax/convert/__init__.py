"""Importers of PyTorch checkpoints into cf3d_jax param trees, and their on-disk format.

`python -m cf3d_jax.convert NAME IN OUT [options]` runs the converter NAME (`CONVERTERS`):
it reads a torch state dict (`load_torch_state_dict`), maps it onto the flax params, and writes
OUT as a folder, atomically (built under a temporary name, renamed when complete):

  OUT/params/       orbax checkpoint (StandardCheckpointer) of the param pytree
  OUT/config.json   {"format", "converter", "model": architecture hyperparameters,
                     "num_params", "source": {"path", "sha256", "bytes"}}

`load_converted(OUT)` returns `(model_config, params)`. torch is imported only inside
`load_torch_state_dict` for `.pt`/`.pth`/`.bin`/`.ckpt` files, safetensors only for
`.safetensors`; importing this package imports neither.

Adding a converter: write `cf3d_jax/convert/<name>.py` defining `CONVERTER = Converter(...)`
and add one line to `CONVERTERS`. Each module also holds its state-dict mapping
(`medicalnet.convert_medicalnet_state_dict`, …); `monai_densenet` (MONAI DenseNet-121 → the
classifier's variables) is used in-process and has no CLI entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from cf3d_jax import files
from cf3d_jax.errors import ConfigError, DataError

__all__ = ['CONVERTERS', 'FORMAT', 'Converter', 'flatten_params', 'get_converter',
           'load_converted', 'load_torch_state_dict', 'save_converted', 'to_numpy',
           'unflatten_params', 'unwrap_state_dict']

FORMAT = 'cf3d_jax.convert/1'
CONFIG_NAME = 'config.json'
PARAMS_NAME = 'params'

# name → module defining `CONVERTER` (imported on first use). One line per converter.
CONVERTERS: dict[str, str] = {
    'maisi-vae': 'cf3d_jax.convert.maisi_vae',
    'medicalnet': 'cf3d_jax.convert.medicalnet',
    'wdm-unet': 'cf3d_jax.convert.wdm_unet',
}

TORCH_SUFFIXES = ('.pt', '.pth', '.bin', '.ckpt')
SAFETENSORS_SUFFIXES = ('.safetensors',)
# Keys under which training scripts nest the weights, tried in this order.
WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model', 'module', 'autoencoder',
                'autoencoder_state_dict', 'net', 'network')
# Prefixes stripped when every key has them: DistributedDataParallel, torch.compile.
STRIPPED_PREFIXES = ('module.', '_orig_mod.')


@dataclasses.dataclass(frozen=True)
class Converter:
  """One checkpoint importer.

  add_arguments(parser): adds the architecture options to the CLI subcommand.
  model_config(args): the parsed options → a JSON-ready model config (the hyperparameters).
  convert(state_dict, model_config, source): → param pytree of numpy arrays; errors name
    `source` (the file) and the keys at fault.
  abstract_params(model_config): → `jax.ShapeDtypeStruct` tree, the restore target.
  """
  name: str
  description: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  model_config: Callable[[argparse.Namespace], dict[str, Any]]
  convert: Callable[[Mapping[str, Any], Mapping[str, Any], str], Any]
  abstract_params: Callable[[Mapping[str, Any]], Any]


def flatten_params(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
                   ) -> dict[tuple[str, ...], Any]:
  """Nested param dict → {path tuple: leaf}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten_params(value, prefix + (str(key),)))
    else:
      out[prefix + (str(key),)] = value
  return out


def unflatten_params(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  """Inverse of `flatten_params`."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def get_converter(name: str) -> Converter:
  """The registered converter `name`; ConfigError listing the known names otherwise."""
  if name not in CONVERTERS:
    raise ConfigError(f'unknown converter {name!r}; known: {sorted(CONVERTERS)}')
  return importlib.import_module(CONVERTERS[name]).CONVERTER


# ---------------------------------------------------------------------------------------------
# Reading torch checkpoints

def to_numpy(value: Any, key: str, source: str) -> np.ndarray:
  """A numpy array or torch tensor (duck-typed, no torch import) → numpy; bfloat16 → float32."""
  if hasattr(value, 'detach') and hasattr(value, 'numpy'):  # a torch.Tensor
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':  # numpy has no bfloat16 of its own
      value = value.float()
    value = value.numpy()
  elif isinstance(value, (bool, int, float, np.number)):
    value = np.asarray(value)
  if not isinstance(value, np.ndarray):
    raise DataError(f'{source}: key {key!r} holds a {type(value).__name__}, not an array.')
  if value.dtype.name == 'bfloat16':  # ml_dtypes' bfloat16 (e.g. from safetensors)
    value = value.astype(np.float32)
  return value


def listing(items: list[str], limit: int = 8, sep: str = ', ') -> str:
  """Up to `limit` items joined by `sep`, then the number left out (for error messages)."""
  shown = sep.join(items[:limit])
  return shown + (f'{sep}… ({len(items) - limit} more)' if len(items) > limit else '')


def strip_module_prefix(state_dict: Mapping[str, Any], what: str, error: type[Exception],
                        ignore: Callable[[str], bool] = lambda key: False) -> dict[str, Any]:
  """`state_dict` with DataParallel's 'module.' prefix removed and the keys `ignore` names
  dropped; `error` naming `what` when a key appears both with and without the prefix."""
  found: dict[str, Any] = {}
  for raw_key, value in state_dict.items():
    key = raw_key[len('module.'):] if raw_key.startswith('module.') else raw_key
    if ignore(key):
      continue
    if key in found:
      raise error(f"{what} holds {key!r} twice (with and without the 'module.' prefix).")
    found[key] = value
  return found


def key_mismatch(expected: Iterable[str], found: Iterable[str]) -> list[str]:
  """'N missing keys (…)' / 'M unexpected keys (…)' for the keys that differ; [] when equal."""
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  parts = []
  if missing:
    parts.append(f'{len(missing)} missing keys ({listing(missing)})')
  if unexpected:
    parts.append(f'{len(unexpected)} unexpected keys ({listing(unexpected)})')
  return parts


def _is_array(value: Any) -> bool:
  return isinstance(value, np.ndarray) or (hasattr(value, 'detach') and hasattr(value, 'shape'))


def unwrap_state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
  """Finds the flat `{key: array}` state dict inside a loaded checkpoint object.

  Descends through `WRAPPER_KEYS` (e.g. `{'state_dict': ..., 'epoch': 3}`), then strips a
  prefix in `STRIPPED_PREFIXES` that every key carries (repeatedly: `module._orig_mod.`).
  Values become numpy arrays (`to_numpy`).
  """
  path = []
  while isinstance(obj, Mapping) and not all(_is_array(v) for v in obj.values()):
    inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      where = ''.join(f'[{k!r}]' for k in path)
      bad = [k for k, v in obj.items() if not _is_array(v)][:10]
      raise DataError(
          f'{source}{where}: not a state dict (entries {bad} are not tensors) and none of the '
          f'wrapper keys {list(WRAPPER_KEYS)} holds one; top-level keys: {list(obj)[:20]}.')
    path.append(inner)
    obj = obj[inner]
  if not isinstance(obj, Mapping):
    raise DataError(f'{source}: expected a state dict (a mapping of names to tensors), got a '
                    f'{type(obj).__name__}. Save `model.state_dict()`, not the module.')
  if not obj:
    raise DataError(f'{source}: the state dict is empty.')
  state = {str(k): to_numpy(v, str(k), source) for k, v in obj.items()}
  stripped = True
  while stripped:
    stripped = False
    for prefix in STRIPPED_PREFIXES:
      if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
        stripped = True
  return state


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file  # lazy: an optional dependency
  except ImportError as e:
    raise DataError(f'{path}: reading .safetensors needs the safetensors package '
                    f'(pip install safetensors); import failed: {e}') from e
  import ml_dtypes  # noqa: F401  (a jax dependency; registers bfloat16 with numpy)
  try:
    return dict(load_file(path))
  except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
    raise DataError(f'{path}: cannot read as safetensors: {e}') from e


def _load_torch(path: str) -> Any:
  try:
    import torch  # lazy: torch is only needed to read pickled checkpoints
  except ImportError as e:
    raise DataError(f'{path}: reading {os.path.splitext(path)[1]} checkpoints needs torch '
                    f'(pip install torch==2.13.0, the CPU wheel), or convert the file to '
                    f'.safetensors; import failed: {e}') from e
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:
    raise DataError(f'{path}: torch.load(weights_only=True) failed ({type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else ""}). Only plain tensors and '
                    f'containers are loaded; re-save with torch.save(model.state_dict()).') from e


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads `.pt`/`.pth`/`.bin`/`.ckpt` (torch, weights_only) or `.safetensors` → `{key: array}`.

  Wrappers (`{'state_dict': ...}`, `{'model': ...}`, ...) are unwrapped and `module.` /
  `_orig_mod.` prefixes stripped (`unwrap_state_dict`); bfloat16 becomes float32.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f'{path}: checkpoint file not found.')
  suffix = os.path.splitext(path)[1].lower()
  if suffix in SAFETENSORS_SUFFIXES:
    return unwrap_state_dict(_load_safetensors(path), path)
  if suffix in TORCH_SUFFIXES:
    return unwrap_state_dict(_load_torch(path), path)
  raise DataError(f'{path}: unsupported checkpoint suffix {suffix!r}; expected one of '
                  f'{TORCH_SUFFIXES + SAFETENSORS_SUFFIXES}.')


# ---------------------------------------------------------------------------------------------
# The converted format

def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def save_converted(out: str | os.PathLike, params: Any, converter: str,
                   model_config: Mapping[str, Any], *, source: str | None = None,
                   overwrite: bool = False) -> str:
  """Writes `out/params` (orbax) and `out/config.json` atomically; returns the absolute path.

  An existing `out` is a DataError unless `overwrite`, and is then replaced only once the new
  folder is complete.
  """
  import jax
  import orbax.checkpoint as ocp

  out = os.path.abspath(os.fspath(out)).rstrip('/')
  if os.path.exists(out) and not overwrite:
    raise DataError(f'{out} already exists; pass --overwrite (overwrite=True) to replace it.')
  num_params = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
  meta = {'format': FORMAT, 'converter': converter, 'model': dict(model_config),
          'num_params': num_params}
  if source is not None:
    meta['source'] = {'path': os.path.abspath(source), 'sha256': _sha256(source),
                      'bytes': os.path.getsize(source)}
  with files.atomic_dir(out) as tmp:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, PARAMS_NAME), params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    with open(os.path.join(tmp, CONFIG_NAME), 'w', encoding='utf-8') as f:
      json.dump(meta, f, indent=2)
      f.write('\n')
  return out


def read_converted_config(path: str | os.PathLike) -> dict[str, Any]:
  """The parsed `config.json` of a converted checkpoint folder, validated."""
  path = os.fspath(path)
  config_path = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise DataError(f'{path}: not a converted checkpoint ({CONFIG_NAME} is missing); create '
                    f'one with python -m cf3d_jax.convert.')
  try:
    with open(config_path, encoding='utf-8') as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f'{config_path}: invalid JSON: {e}') from e
  if meta.get('format') != FORMAT:
    raise DataError(f'{config_path}: format {meta.get("format")!r}, expected {FORMAT!r}.')
  for key in ('converter', 'model'):
    if key not in meta:
      raise DataError(f'{config_path}: missing key {key!r}.')
  return meta


def load_converted(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
  """Reads a folder written by `save_converted` → `(model_config, params)`.

  The params are restored against the converter's abstract param tree for `model_config`
  (so a mismatched or truncated checkpoint is an error, not a partial tree), on the default
  device. `model_config` is the JSON dict, e.g. for `build_autoencoder`.
  """
  import jax
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  meta = read_converted_config(path)
  converter = get_converter(meta['converter'])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      converter.abstract_params(meta['model']))
  params_path = os.path.join(path, PARAMS_NAME)
  if not os.path.isdir(params_path):
    raise DataError(f'{path}: the params folder {PARAMS_NAME}/ is missing.')
  checkpointer = ocp.StandardCheckpointer()
  try:
    params = checkpointer.restore(params_path, target)
  except Exception as e:
    raise DataError(f'{params_path}: cannot restore params for {meta["converter"]} with model '
                    f'{meta["model"]}: {e}') from e
  finally:
    checkpointer.close()
  return meta['model'], params
