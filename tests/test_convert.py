"""MONAI AutoencoderKlMaisi → flax: numerical agreement, the CLI round trip, clear errors.

torch and monai are test-only oracles (the `[test]` extra); the tests skip without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cf3d_jax import convert
from cf3d_jax.convert import maisi_vae
from cf3d_jax.convert.__main__ import main as convert_main
from cf3d_jax.errors import ConfigError, DataError
from cf3d_jax.models import autoencoder

torch = pytest.importorskip('torch')
maisi_net = pytest.importorskip('monai.apps.generation.maisi.networks.autoencoderkl_maisi')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(channels=(8, 16, 16), num_res_blocks=(1, 2, 1), norm_num_groups=4,
            latent_channels=4)
TINY_CLI = ['--channels', '8', '16', '16', '--num-res-blocks', '1', '2', '1',
            '--norm-num-groups', '4']


def _monai_model(num_splits: int = 1, dim_split: int = 0, **overrides):
  """MONAI's AutoencoderKlMaisi with our field names (MONAI calls channels `num_channels`)."""
  cfg = {**TINY, **overrides}
  return maisi_net.AutoencoderKlMaisi(
      spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=cfg['num_res_blocks'],
      num_channels=cfg['channels'], attention_levels=(False,) * len(cfg['channels']),
      latent_channels=cfg['latent_channels'], norm_num_groups=cfg['norm_num_groups'],
      norm_eps=1e-6, num_splits=num_splits, dim_split=dim_split, save_mem=False).eval()


@pytest.fixture(scope='module')
def monai_model():
  """Tiny MONAI VAE with random weights: convs at torch's init, norms/biases perturbed."""
  torch.manual_seed(0)
  model = _monai_model()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # GroupNorm weight/bias and conv biases: not 1 / 0 / tiny
        base = 1.0 if name.endswith('weight') else 0.0
        p.copy_(base + 0.2 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def state_dict(monai_model):
  return {k: v.numpy().copy() for k, v in monai_model.state_dict().items()}


def _cl(t) -> np.ndarray:
  """torch [N, C, D, H, W] → numpy [N, D, H, W, C]."""
  return np.asarray(t.detach().numpy() if hasattr(t, 'detach') else t).transpose(0, 2, 3, 4, 1)


def _assert_rel(actual, desired, rel: float = 1e-4):
  """|actual − desired| <= rel · max|desired| everywhere."""
  actual, desired = np.asarray(actual), np.asarray(desired)
  assert actual.shape == desired.shape
  err, scale = np.max(np.abs(actual - desired)), np.max(np.abs(desired))
  assert err <= rel * scale, (err, scale)


def test_matches_monai_encode_decode(monai_model, state_dict):
  """Encoder mean/logvar, decoder output and the mean reconstruction agree to 1e-4 relative.

  Also against MONAI with num_splits=2 (MaisiConvolution splitting along H): its splitting
  is numerically the plain conv.
  """
  model = autoencoder.build_autoencoder(TINY)
  params = maisi_vae.convert_maisi_vae_state_dict(state_dict, TINY)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 1, 32, 32, 32)).astype(np.float32)
  z = rng.standard_normal((1, 4, 8, 8, 8)).astype(np.float32)
  split_model = _monai_model(num_splits=2, dim_split=1)
  split_model.load_state_dict(monai_model.state_dict())
  with torch.no_grad():
    mu, sigma = monai_model.encode(torch.from_numpy(x))
    decoded = monai_model.decode(torch.from_numpy(z))
    recon = monai_model.reconstruct(torch.from_numpy(x))
    split_decoded = split_model.decode(torch.from_numpy(z))
    split_mu, _ = split_model.encode(torch.from_numpy(x))

  encode = jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode'))
  mean, logvar = encode(params, jnp.asarray(_cl(x)))
  out = jax.jit(lambda p, z: model.apply({'params': p}, z, method='decode'))(
      params, jnp.asarray(_cl(z)))
  ours_recon, _, _ = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, _cl(x))
  _assert_rel(mean, _cl(mu))
  _assert_rel(logvar, 2 * np.log(_cl(sigma)))
  _assert_rel(jnp.exp(logvar / 2), _cl(sigma))
  _assert_rel(out, _cl(decoded))
  _assert_rel(ours_recon, _cl(recon))
  _assert_rel(out, _cl(split_decoded))
  _assert_rel(mean, _cl(split_mu))
  assert float(jnp.std(out)) > 1e-2 and float(jnp.std(logvar)) > 1e-2  # not degenerate


def test_default_maisi_config_converts_with_the_right_count():
  """MONAI's MAISI VAE (channels 64/128/256) converts; nothing is run."""
  torch.manual_seed(0)
  reference = maisi_net.AutoencoderKlMaisi(
      spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=(2, 2, 2),
      num_channels=(64, 128, 256), attention_levels=(False, False, False), latent_channels=4,
      norm_num_groups=32, norm_eps=1e-6)
  torch_count = sum(p.numel() for p in reference.parameters())
  model = autoencoder.AutoencoderKL()
  assert torch_count == autoencoder.count_params(autoencoder.abstract_params(model)) == 20_944_897
  sd = reference.state_dict()
  params = maisi_vae.convert_maisi_vae_state_dict(sd)
  assert autoencoder.count_params(params) == torch_count
  kernel = sd['decoder.blocks.7.nin_shortcut.conv.conv.weight'].numpy()  # [64, 128, 1, 1, 1]
  np.testing.assert_array_equal(params['decoder']['blocks_7']['nin_shortcut']['kernel'],
                                kernel.transpose(2, 3, 4, 1, 0))
  np.testing.assert_array_equal(params['encoder']['blocks_9']['scale'],
                                sd['encoder.blocks.9.weight'].numpy())
  shapes = jax.tree_util.tree_map(lambda a: a.shape, params)
  assert shapes == jax.tree_util.tree_map(lambda a: a.shape, autoencoder.abstract_params(model))


def _assert_trees_equal(a, b):
  flat_a, tree_a = jax.tree_util.tree_flatten(a)
  flat_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cli_round_trip_pt_with_wrappers(monai_model, state_dict, tmp_path, capsys):
  """A DDP-style {'state_dict': {'module.…': …}, 'epoch': …} .pt file converts and reloads."""
  ckpt = tmp_path / 'vae.pt'
  wrapped = {'module.' + k: v for k, v in monai_model.state_dict().items()}
  torch.save({'state_dict': wrapped, 'epoch': 273}, ckpt)
  out = tmp_path / 'converted'
  assert convert_main(['maisi-vae', str(ckpt), str(out), *TINY_CLI]) == 0
  assert 'maisi-vae' in capsys.readouterr().out
  assert sorted(os.listdir(out)) == ['config.json', 'params']
  meta = json.loads((out / 'config.json').read_text())
  assert meta['converter'] == 'maisi-vae' and meta['format'] == convert.FORMAT
  assert meta['source']['path'] == str(ckpt) and len(meta['source']['sha256']) == 64
  model_config, params = convert.load_converted(out)
  assert autoencoder.build_autoencoder(model_config) == autoencoder.build_autoencoder(TINY)
  assert meta['num_params'] == autoencoder.count_params(params)
  _assert_trees_equal(params, maisi_vae.convert_maisi_vae_state_dict(state_dict, TINY))
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.tmp')]  # no leftovers

  # OUT exists: refused (status 2, clear message) unless --overwrite.
  assert convert_main(['maisi-vae', str(ckpt), str(out), *TINY_CLI]) == 2
  assert 'already exists; pass --overwrite' in capsys.readouterr().err
  assert convert_main(['maisi-vae', str(ckpt), str(out), *TINY_CLI, '--overwrite']) == 0
  _assert_trees_equal(convert.load_converted(out)[1], params)


def test_cli_subprocess_safetensors(state_dict, tmp_path):
  """`python -m cf3d_jax.convert` end to end on a .safetensors file (skips without it)."""
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  ckpt = tmp_path / 'vae.safetensors'
  safetensors_numpy.save_file(state_dict, str(ckpt))
  out = tmp_path / 'converted'
  result = subprocess.run([sys.executable, '-m', 'cf3d_jax.convert', 'maisi-vae', str(ckpt),
                           str(out), *TINY_CLI], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  _, params = convert.load_converted(out)
  _assert_trees_equal(params, maisi_vae.convert_maisi_vae_state_dict(state_dict, TINY))

  # Wrong architecture on the command line: a message, no traceback, status 2, no OUT.
  bad = subprocess.run([sys.executable, '-m', 'cf3d_jax.convert', 'maisi-vae', str(ckpt),
                        str(tmp_path / 'bad')], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2 and 'Traceback' not in bad.stderr
  assert 'shape mismatches' in bad.stderr and 'channels[0]=8' in bad.stderr
  assert not (tmp_path / 'bad').exists()


def test_safetensors_bfloat16_is_read_as_float32(monai_model, tmp_path):
  safetensors_torch = pytest.importorskip('safetensors.torch')
  sd = {k: v.to(torch.bfloat16) for k, v in monai_model.state_dict().items()}
  ckpt = tmp_path / 'vae_bf16.safetensors'
  safetensors_torch.save_file(sd, str(ckpt))
  loaded = convert.load_torch_state_dict(ckpt)
  assert sorted(loaded) == sorted(sd)
  for key, value in sd.items():
    assert loaded[key].dtype == np.float32
    np.testing.assert_array_equal(loaded[key], value.float().numpy())


def test_importing_the_library_does_not_import_torch():
  code = ('import sys, cf3d_jax.convert, cf3d_jax.convert.maisi_vae, '
          'cf3d_jax.convert.__main__, cf3d_jax.models.autoencoder; '
          'bad = [m for m in ("torch", "safetensors", "monai") if m in sys.modules]; '
          'assert not bad, bad')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('edit,message', [
    (lambda sd: sd.pop('decoder.blocks.3.norm1.bias'),
     r'1 missing keys: decoder\.blocks\.3\.norm1\.bias'),
    (lambda sd: sd.__setitem__('encoder.blocks.7.attn.to_q.weight', np.zeros((16, 16))),
     r'(?s)1 unexpected keys: encoder\.blocks\.7\.attn\.to_q\.weight.*attention blocks'),
    (lambda sd: sd.__setitem__('quant_conv_mu.conv.weight', np.zeros((4, 4, 3, 3, 3))),
     r'quant_conv_mu\.conv\.weight: checkpoint \(4, 4, 3, 3, 3\), expected \(4, 4, 1, 1, 1\)'),
    (lambda sd: sd.__setitem__('post_quant_conv.conv.bias', 'not a tensor'),
     r"'post_quant_conv\.conv\.bias' holds a str"),
])
def test_wrong_state_dict_is_a_clear_error(state_dict, edit, message):
  sd = dict(state_dict)
  edit(sd)
  with pytest.raises(DataError, match=message) as info:
    maisi_vae.convert_maisi_vae_state_dict(sd, TINY, source='vae.pt')
  assert str(info.value).startswith('vae.pt')


def test_wrong_architecture_lists_all_problems(state_dict):
  with pytest.raises(DataError) as info:
    maisi_vae.convert_maisi_vae_state_dict(state_dict)  # the default MAISI channels
  message = str(info.value)
  assert 'shape mismatches' in message and 'missing keys' in message  # 2 vs 1 ResBlocks
  assert 'in_channels=1, channels[0]=8' in message and 'latent_channels=4' in message


class _NotWeights:
  pass


def test_load_torch_state_dict_errors(tmp_path, monkeypatch):
  with pytest.raises(DataError, match='checkpoint file not found'):
    convert.load_torch_state_dict(tmp_path / 'missing.pt')
  (tmp_path / 'vae.npz').write_bytes(b'')
  with pytest.raises(DataError, match="unsupported checkpoint suffix '.npz'"):
    convert.load_torch_state_dict(tmp_path / 'vae.npz')
  torch.save({'model': _NotWeights()}, tmp_path / 'pickled.pt')
  with pytest.raises(DataError, match=r'weights_only=True\) failed'):
    convert.load_torch_state_dict(tmp_path / 'pickled.pt')
  torch.save({'epoch': 3, 'optimizer': [1, 2]}, tmp_path / 'nothing.pt')
  with pytest.raises(DataError, match=r"not a state dict .*top-level keys: \['epoch'"):
    convert.load_torch_state_dict(tmp_path / 'nothing.pt')
  (tmp_path / 'vae.safetensors').write_bytes(b'')
  monkeypatch.setitem(sys.modules, 'safetensors', None)
  monkeypatch.setitem(sys.modules, 'safetensors.numpy', None)
  with pytest.raises(DataError, match=r'pip install safetensors'):
    convert.load_torch_state_dict(tmp_path / 'vae.safetensors')


def test_load_converted_and_registry_errors(tmp_path):
  with pytest.raises(DataError, match='config.json is missing'):
    convert.load_converted(tmp_path)
  with pytest.raises(ConfigError, match=r"unknown converter 'wdm'; known: \['maisi-vae', 'medicalnet', 'wdm-unet'\]"):
    convert.get_converter('wdm')
  (tmp_path / 'config.json').write_text(json.dumps({'format': 'other'}))
  with pytest.raises(DataError, match="format 'other'"):
    convert.load_converted(tmp_path)
