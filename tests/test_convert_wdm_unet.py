"""wdm-3d U-Net → flax: numerical agreement, parameter counts, text-on identity, CLI, errors.

The oracle is a compact torch transcription of wdm-3d's `guided_diffusion/unet.py` `UNetModel`
(the path its run.sh takes: dims=3, additive skips, no attention, bottleneck_attention=False,
resample_2d=False, use_scale_shift_norm=False) with the same module names, so its state-dict keys
are the released checkpoints' keys; it lives in `cf3d_jax.bench_torch`, which `--what=vs_torch`
times. torch is test-only; the tests skip without it.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from cf3d_jax import bench_torch, convert
from cf3d_jax.convert import wdm_unet
from cf3d_jax.convert.__main__ import main as convert_main
from cf3d_jax.errors import DataError
from cf3d_jax.models import unet

torch = pytest.importorskip('torch')

TINY = dict(in_channels=8, out_channels=8, base_channels=8, channel_mult=(1, 2, 2),
            num_res_blocks=2, num_middle_blocks=2, num_groups=4, head_channels=4)
TINY_CLI = ['--base-channels', '8', '--channel-mult', '1', '2', '2', '--num-groups', '4',
            '--head-channels', '4']
# Two levels for the text-on tests: compiling the init and the apply dominates their time.
SMALL = dict(TINY, channel_mult=(1, 2), num_res_blocks=1)
SMALL_TEXT = dict(SMALL, cross_attention_levels=(True, True), middle_cross_attention=True,
                  middle_attention=True, text_dim=12, init_seed=3)
SMALL_TEXT_CLI = ['--base-channels', '8', '--channel-mult', '1', '2', '--num-res-blocks', '1',
                  '--num-groups', '4', '--head-channels', '4', '--cross-attention-levels', '1',
                  '1', '--middle-cross-attention', '--middle-attention', '--text-dim', '12',
                  '--seed', '3']
X_SHAPE = (2, 8, 8, 8, 8)   # [N, D, H, W, C]


# ---------------------------------------------------------------------------------------------
# wdm-3d's U-Net in torch: the transcription the benchmark times (cf3d_jax.bench_torch)

UNetModel = bench_torch.wdm3d_modules().UNetModel
_randomised = bench_torch.randomised


def _torch_model(config, resblock_updown=True):
  return bench_torch.torch_unet(dict(config, resblock_updown=resblock_updown))


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers

@pytest.fixture(scope='module')
def torch_model():
  torch.manual_seed(0)
  return _randomised(_torch_model(TINY))


@pytest.fixture(scope='module')
def state_dict(torch_model):
  return {k: v.numpy().copy() for k, v in torch_model.state_dict().items()}


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(0)
  x = rng.standard_normal(X_SHAPE).astype(np.float32)
  t = np.array([3, 917], np.int64)
  return x, t


@pytest.fixture(scope='module')
def unconditional(state_dict, inputs):
  """(params, output) of the converted tiny model on `inputs`."""
  params = wdm_unet.convert_wdm_unet_state_dict(state_dict, TINY)
  model = wdm_unet.build_model(TINY)
  out = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t))(params, *inputs)
  return params, np.asarray(out)


@pytest.fixture(scope='module')
def small_torch():
  torch.manual_seed(2)
  return _randomised(_torch_model(SMALL))


@pytest.fixture(scope='module')
def small_unconditional(small_torch, inputs):
  """(params, output) of the converted two-level model on `inputs`."""
  params = wdm_unet.convert_wdm_unet_state_dict(small_torch.state_dict(), SMALL)
  model = wdm_unet.build_model(SMALL)
  out = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t))(params, *inputs)
  return params, np.asarray(out)


@pytest.fixture(scope='module')
def text_params(small_torch):
  """The two-level model converted with attention on (fresh attention params, seed 3)."""
  return wdm_unet.convert_wdm_unet_state_dict(small_torch.state_dict(), SMALL_TEXT)


def _torch_apply(model, x, t) -> np.ndarray:
  """[N, D, H, W, C] numpy → torch NCDHW → [N, D, H, W, C] numpy."""
  with torch.no_grad():
    y = model(torch.from_numpy(x.transpose(0, 4, 1, 2, 3)), torch.from_numpy(t))
  return y.numpy().transpose(0, 2, 3, 4, 1)


def _assert_rel(actual, desired, rel: float = 1e-4):
  actual, desired = np.asarray(actual), np.asarray(desired)
  assert actual.shape == desired.shape
  err, scale = np.max(np.abs(actual - desired)), np.max(np.abs(desired))
  assert err <= rel * scale, (err, scale)


def _assert_trees_equal(a, b):
  flat_a, tree_a = jax.tree_util.tree_flatten(a)
  flat_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------
# Tests

def test_matches_wdm3d_torch(torch_model, inputs, unconditional):
  """Converted params reproduce the torch model to 1e-4 relative (timesteps 3 and 917)."""
  expected = _torch_apply(torch_model, *inputs)
  _assert_rel(unconditional[1], expected)
  assert float(np.std(expected)) > 1e-2  # not degenerate


def test_matches_wdm3d_torch_without_resblock_updown(inputs):
  """wdm-3d's resblock_updown=False (strided conv / nearest + conv: `op`, `conv` keys)."""
  torch.manual_seed(1)
  config = dict(TINY, channel_mult=(1, 2), num_res_blocks=1, resblock_updown=False)
  reference = _randomised(_torch_model(config, resblock_updown=False))
  sd = reference.state_dict()
  assert 'input_blocks.2.0.op.weight' in sd and 'output_blocks.1.1.conv.weight' in sd
  params = wdm_unet.convert_wdm_unet_state_dict(sd, config)
  model = wdm_unet.build_model(config)
  out = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t))(params, *inputs)
  _assert_rel(out, _torch_apply(reference, *inputs))


def test_wdm3d_128_parameter_count_and_keys():
  """Full 128³ configuration: 57,914,824 params on both sides, identical keys and shapes.
  Nothing is allocated (torch on the meta device, jax.eval_shape)."""
  with torch.device('meta'):
    reference = UNetModel()
  torch_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  assert sum(math.prod(s) for s in torch_shapes.values()) == 57_914_824
  abstract = wdm_unet.abstract_params(wdm_unet.WDM_128)
  assert unet.count_params(abstract) == 57_914_824
  expected = wdm_unet._expected(convert.flatten_params(abstract))
  assert {k: wdm_unet._torch_shape(s) for k, (_, s) in expected.items()} == torch_shapes
  assert expected['output_blocks.11.1.in_layers.2.weight'][0] == (
      'output_blocks_11_up', 'in_conv', 'kernel')


def test_text_on_is_exactly_the_unconditional_model(small_torch, inputs, small_unconditional,
                                                    text_params):
  """Cross-attention at both levels and the middle (+ self-attention in the middle): the
  fresh attention params merged with the converted ones add exactly zero, so the output is
  bit-identical for any text and mask, and equals the unconditional model's up to float
  rounding (the two are different XLA programs, fused differently: a few ulp)."""
  x, t = inputs
  _assert_rel(small_unconditional[1], _torch_apply(small_torch, x, t))
  model = wdm_unet.build_model(SMALL_TEXT)
  assert model.uses_text
  attn = text_params['middle_block_1_cross_attn']
  np.testing.assert_array_equal(attn['out']['kernel'], 0.0)   # zero output projection
  assert np.std(attn['key']['kernel']) > 0.01                  # but a real init elsewhere
  apply = jax.jit(lambda p, x, t, e, m: model.apply({'params': p}, x, t, e, m))
  rng = np.random.default_rng(1)
  mask = np.array([[True] * 5, [True, True, False, False, False]])
  outs = [np.asarray(apply(text_params, x, t, text, m)) for text, m in [
      (rng.standard_normal((2, 5, 12)).astype(np.float32), mask),
      (30 * rng.standard_normal((2, 5, 12)).astype(np.float32), np.ones((2, 5), bool)),
      (np.zeros((2, 5, 12), np.float32), np.zeros((2, 5), bool))]]
  for out in outs[1:]:
    np.testing.assert_array_equal(out, outs[0])
  _assert_rel(outs[0], small_unconditional[1], rel=1e-6)


def test_merge_pretrained_fills_a_sharded_init(small_unconditional, text_params):
  """merge_pretrained on a jax.Array init (as train creates it): every converted param is
  replaced, the attention params and the shardings are kept."""
  flat = convert.flatten_params(text_params)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  init = convert.unflatten_params({
      p: jax.device_put(v if wdm_unet.is_attention_param('/'.join(p)) else np.zeros_like(v),
                        device) for p, v in flat.items()})
  merged = wdm_unet.merge_pretrained(init, small_unconditional[0])
  assert all(isinstance(v, jax.Array) and v.sharding == device
             for v in jax.tree_util.tree_leaves(merged))
  _assert_trees_equal(merged, text_params)


def test_cli_round_trip(torch_model, state_dict, small_torch, text_params, tmp_path, capsys):
  """`python -m cf3d_jax.convert wdm-unet in.pt out` (unconditional and text-on), then
  `load_converted`."""
  ckpt = tmp_path / 'brats_1000000.pt'
  torch.save(torch_model.state_dict(), ckpt)
  out = tmp_path / 'wdm'
  assert convert_main(['wdm-unet', str(ckpt), str(out), *TINY_CLI]) == 0
  assert 'wdm-unet' in capsys.readouterr().out
  meta = json.loads((out / 'config.json').read_text())
  assert meta['converter'] == 'wdm-unet' and meta['model']['text_dim'] == 0
  model_config, params = convert.load_converted(out)
  assert wdm_unet.build_model(model_config) == wdm_unet.build_model(TINY)
  _assert_trees_equal(params, wdm_unet.convert_wdm_unet_state_dict(state_dict, TINY))

  small_ckpt, text_out = tmp_path / 'small.pt', tmp_path / 'wdm_text'
  torch.save(small_torch.state_dict(), small_ckpt)
  assert convert_main(['wdm-unet', str(small_ckpt), str(text_out), *SMALL_TEXT_CLI]) == 0
  model_config, params = convert.load_converted(text_out)
  assert wdm_unet.build_model(model_config) == wdm_unet.build_model(SMALL_TEXT)
  assert model_config['text_dim'] == 12 and model_config['init_seed'] == 3
  assert 'middle_block_1_cross_attn' in params
  _assert_trees_equal(params, text_params)

  # Cross-attention without --text-dim: a message and status 2, nothing written.
  assert convert_main(['wdm-unet', str(ckpt), str(tmp_path / 'bad'), *TINY_CLI,
                       '--middle-cross-attention']) == 2
  assert '--text-dim' in capsys.readouterr().err and not (tmp_path / 'bad').exists()


@pytest.mark.parametrize('edit,message', [
    (lambda sd: sd.__setitem__('middle_block.1.emb_layers.2.weight',
                               sd.pop('middle_block.1.emb_layers.1.weight')),
     r'(?s)1 missing keys: middle_block\.1\.emb_layers\.1\.weight.*'
     r'1 unexpected keys: middle_block\.1\.emb_layers\.2\.weight'),
    (lambda sd: sd.__setitem__('out.2.weight', np.zeros((8, 8, 1, 1, 1), np.float32)),
     r'out\.2\.weight: checkpoint \(8, 8, 1, 1, 1\), expected \(8, 8, 3, 3, 3\)'),
    (lambda sd: sd.__setitem__('middle_block.1.qkv.weight', np.zeros((96, 32, 1))),
     r'(?s)unexpected keys: middle_block\.1\.qkv\.weight.*attention blocks'),
])
def test_wrong_state_dict_is_a_clear_error(state_dict, edit, message):
  sd = dict(state_dict)
  edit(sd)
  with pytest.raises(DataError, match=message) as info:
    wdm_unet.convert_wdm_unet_state_dict(sd, TINY, source='brats.pt')
  assert str(info.value).startswith('brats.pt: the state dict does not match')


def test_wrong_architecture_describes_the_checkpoint(state_dict):
  with pytest.raises(DataError) as info:
    wdm_unet.convert_wdm_unet_state_dict(state_dict, source='brats.pt')  # 128³ defaults
  message = str(info.value)
  assert 'shape mismatches' in message and 'missing keys' in message
  assert ('The checkpoint has in_channels=8, base_channels=8, channel_mult=(1, 2, 2), '
          'num_res_blocks=2, num_middle_blocks=2, out_channels=8.') in message


def test_merge_pretrained_errors(unconditional):
  params = unconditional[0]
  target = jax.tree_util.tree_map(np.zeros_like, params)
  bad_shape = jax.tree_util.tree_map(lambda a: a, params)
  bad_shape['out_conv']['bias'] = np.zeros(3, np.float32)
  with pytest.raises(DataError, match=r'out_conv/bias: pretrained \(3,\), target \(8,\)'):
    wdm_unet.merge_pretrained(target, bad_shape, source='runs/wdm')
  extra = {**params, 'middle_block_9': {'in_norm': {'scale': np.ones(32)}}}
  with pytest.raises(DataError, match=r'1 params the model does not have: '
                                      r'middle_block_9/in_norm/scale'):
    wdm_unet.merge_pretrained(target, extra)
  lacking = {k: v for k, v in params.items() if k != 'middle_block_1'}
  with pytest.raises(DataError, match=r'runs/wdm: .*\n.*model params missing .*'
                                      r'middle_block_1/emb_dense/bias'):
    wdm_unet.merge_pretrained(target, lacking, source='runs/wdm')
  # Allowed explicitly, a missing ResBlock keeps its init (here zeros).
  merged = wdm_unet.merge_pretrained(target, lacking,
                                     allow_new=lambda p: p.startswith('middle_block_1/'))
  np.testing.assert_array_equal(merged['middle_block_1']['in_conv']['kernel'], 0.0)
  np.testing.assert_array_equal(merged['out_conv']['kernel'], params['out_conv']['kernel'])
