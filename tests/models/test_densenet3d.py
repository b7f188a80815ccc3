"""3D DenseNet-121: parameters, eval and train-mode outputs and gradients equal MONAI's.

The full-model programs are compiled with `xla_backend_optimization_level=0`: on a 2-core CPU
that cut the eval compile from 15 s to 3 s and the train step's from 50 s to 23 s (the
semantics are the same; only the generated code is slower).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cf3d_jax.errors import ConfigError, DataError
from cf3d_jax.convert import monai_densenet
from cf3d_jax.models import densenet3d, layers

torch = pytest.importorskip('torch')
monai_nets = pytest.importorskip('monai.networks.nets')

NUM_CLASSES = 2
# MONAI DenseNet121(spatial_dims=3, in_channels=1, out_channels=2): sum(p.numel()).
NUM_PARAMS = 11_244_674
NUM_BATCH_STATS = 83_648  # running_mean + running_var of its 121 BatchNorm3d layers
EVAL_SHAPE = (2, 33, 41, 64, 1)  # odd sizes exercise the floor-mode pools; 2 voxels left on W
# norm5 sees N·1·2·2 = 8 values per channel. Train-mode BN over few values is ill-conditioned:
# torch's own float32 logits differ from its float64 ones by 1e-5 here, 4e-5 at 2 × 32·32·64
# (4 values) and 3% at 2 × 32³ (2 values); its conv0 gradients by 0.4% here. Measured JAX
# against torch: logits 7e-6 and conv0 gradients 0.3% here, the gradients 3.9% at 4 values.
TRAIN_SHAPE = (2, 32, 64, 64, 1)
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)


def _monai_densenet(num_classes: int = NUM_CLASSES, in_channels: int = 1, seed: int = 0):
  """MONAI's DenseNet121 with random Linear bias, BN affine parameters and running stats."""
  torch.manual_seed(seed)
  model = monai_nets.DenseNet121(spatial_dims=3, in_channels=in_channels,
                                 out_channels=num_classes)
  with torch.no_grad():
    model.class_layers.out.bias.normal_(0.0, 0.5)
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm3d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return model.eval()


def _state_dict(model, prefix: str = '') -> dict[str, np.ndarray]:
  return {prefix + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _to_torch(x: np.ndarray):
  return torch.from_numpy(np.moveaxis(x, -1, 1).copy())


def _assert_close(got, want, rtol=1e-4, elementwise=True):
  """Relative error ≤ rtol in norm and (if `elementwise`) per element, up to rtol·max|want|."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  scale = np.abs(want).max()
  assert scale > 1e-3
  if elementwise:
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)
  error = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert error <= rtol, f'relative error {error:.3g} > {rtol:g}'


@pytest.fixture(scope='module')
def monai_model():
  return _monai_densenet()


@pytest.fixture(scope='module')
def state_dict(monai_model):
  return _state_dict(monai_model)


@pytest.fixture(scope='module')
def variables(state_dict):
  return monai_densenet.convert_monai_densenet_state_dict(state_dict, NUM_CLASSES)


def test_parameter_count_equals_monai():
  model = densenet3d.build_densenet121(NUM_CLASSES)
  abstract = densenet3d.abstract_variables(model)  # jax.eval_shape: nothing is computed
  ref = monai_nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES)
  assert sum(p.numel() for p in ref.parameters()) == NUM_PARAMS
  assert densenet3d.count_params(abstract['params']) == NUM_PARAMS
  assert densenet3d.NUM_PARAMS_2_CLASSES == NUM_PARAMS
  assert densenet3d.count_params(abstract['batch_stats']) == NUM_BATCH_STATS
  assert NUM_BATCH_STATS == sum(b.numel() for k, b in ref.state_dict().items() if 'running' in k)
  # Another head and stem: the count follows MONAI's too.
  other = densenet3d.abstract_variables(densenet3d.build_densenet121(5, in_channels=3))
  ref = monai_nets.DenseNet121(spatial_dims=3, in_channels=3, out_channels=5)
  assert densenet3d.count_params(other['params']) == sum(p.numel() for p in ref.parameters())


def test_every_param_has_logical_axis_names():
  model = densenet3d.build_densenet121(NUM_CLASSES)
  specs = densenet3d.param_logical_axes(model)
  is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)
  flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=is_spec)
  flat_params = jax.tree_util.tree_leaves(densenet3d.abstract_variables(model)['params'])
  assert len(flat_specs) == len(flat_params) == 364  # 120 convs, 121 BN × 2, Linear × 2
  for spec, leaf in zip(flat_specs, flat_params):
    assert is_spec(spec) and len(spec) == leaf.ndim
    assert all(name in layers.PARAM_AXIS_NAMES for name in spec), spec


def test_eval_logits_and_features_match_monai(monai_model, variables):
  x = np.random.default_rng(0).standard_normal(EVAL_SHAPE).astype(np.float32)
  with torch.no_grad():
    want = monai_model(_to_torch(x)).numpy()
    h = monai_model.class_layers.relu(monai_model.features(_to_torch(x)))
    want_features = h.mean(dim=(2, 3, 4)).numpy()

  model = densenet3d.build_densenet121(NUM_CLASSES)
  fn = lambda v, x: (model.apply(v, x, train=False),
                     model.apply(v, x, train=False, method='features'))
  got, features = _compile(fn, variables, jnp.asarray(x))(variables, jnp.asarray(x))
  assert got.shape == (2, NUM_CLASSES) and features.shape == (2, 1024)
  assert got.dtype == features.dtype == jnp.float32
  _assert_close(got, want)
  _assert_close(features, want_features)
  # The two items differ: the test would notice a batch mix-up.
  assert not np.allclose(want[0], want[1], atol=1e-3 * np.abs(want).max())


def test_train_step_matches_monai(state_dict, variables):
  """One train-mode step: logits (batch statistics), gradients and the updated running
  statistics equal MONAI's; flax's running variance uses the biased batch variance."""
  x = np.random.default_rng(1).standard_normal(TRAIN_SHAPE).astype(np.float32)
  ref = _monai_densenet()  # the same seed: the same weights as `state_dict`
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
  ref.train()
  logits_ref = ref(_to_torch(x))
  (logits_ref ** 2).sum().backward()

  model = densenet3d.build_densenet121(NUM_CLASSES)

  def loss_fn(params, batch_stats, x):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                                  train=True, mutable=['batch_stats'])
    return jnp.sum(logits ** 2), (logits, updates['batch_stats'])

  step = jax.value_and_grad(loss_fn, has_aux=True)
  args = (variables['params'], variables['batch_stats'], jnp.asarray(x))
  (loss, (logits, new_stats)), grads = _compile(step, *args)(*args)

  _assert_close(logits, logits_ref.detach().numpy())
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
  grad_ref = {k: p.grad.numpy() for k, p in ref.named_parameters()}
  _assert_close(grads['out']['kernel'], grad_ref['class_layers.out.weight'].T, rtol=1e-3)
  _assert_close(grads['norm5']['scale'], grad_ref['features.norm5.weight'], rtol=1e-3)
  # Deep gradients pass back through 120 train-mode BatchNorms over few voxels and carry
  # float32 noise (torch's own float32 and float64 gradients of these differ by 0.3–0.5% in
  # norm, single elements by far more): compared in norm only; a wrong one is off by O(1).
  _assert_close(grads['conv0']['kernel'],
                np.transpose(grad_ref['features.conv0.weight'], (2, 3, 4, 1, 0)), rtol=2e-2,
                elementwise=False)
  _assert_close(grads['denseblock2']['denselayer7']['conv2']['kernel'],
                np.transpose(grad_ref['features.denseblock2.denselayer7.layers.conv2.weight'],
                             (2, 3, 4, 1, 0)), rtol=2e-2, elementwise=False)

  # Running means: new = 0.9·old + 0.1·batch mean, as torch's momentum 0.1.
  modules = dict(ref.named_modules())
  # n: voxels per channel, N·D·H·W there (norm0 after conv0 ÷2, blocks after ÷4, ÷2 per transition).
  for flax_path, torch_name, n in [(('norm0',), 'features.norm0', 2 * 16 * 32 * 32),
                                   (('transition3', 'norm'), 'features.transition3.norm',
                                    2 * 2 * 4 * 4),
                                   (('norm5',), 'features.norm5', 2 * 1 * 2 * 2)]:
    stats = new_stats
    for p in flax_path:
      stats = stats[p]
    bn = modules[torch_name]
    old_var = state_dict[torch_name + '.running_var']
    assert not np.allclose(np.asarray(stats['mean']), state_dict[torch_name + '.running_mean'])
    _assert_close(stats['mean'], bn.running_mean.numpy())
    # torch folds in the unbiased batch variance, flax the biased one (n voxels per channel).
    unbiased = (bn.running_var.numpy() - 0.9 * old_var) / 0.1
    _assert_close(stats['var'], 0.9 * old_var + 0.1 * unbiased * (n - 1) / n, rtol=1e-3)
  changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
                                   new_stats, variables['batch_stats'])
  assert all(jax.tree_util.tree_leaves(changed))


def test_small_variant_init_features_dropout_and_dtype():
  """A 2-block DenseNet (quick to compile): init statistics, `features` feeding the head,
  channel-wise dropout in training only, bfloat16 compute with float32 outputs."""
  model = densenet3d.DenseNet3D(num_classes=3, in_channels=2, dropout_rate=0.5,
                                init_features=8, growth_rate=4, block_config=(2, 3), bn_size=2)
  shape = (2, 9, 10, 11, 2)
  assert densenet3d.min_spatial_size(2) == 5 and densenet3d.MIN_SPATIAL == 29
  v = densenet3d.init_variables(model, jax.random.key(0), shape)
  abstract = densenet3d.abstract_variables(model, shape)
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(abstract)
  assert set(v['params']) == {'conv0', 'norm0', 'denseblock1', 'transition1', 'denseblock2',
                              'norm5', 'out'}
  assert v['params']['denseblock2']['denselayer3']['conv1']['kernel'].shape == (1, 1, 1, 16, 8)
  assert v['params']['transition1']['conv']['kernel'].shape == (1, 1, 1, 16, 8)
  assert v['params']['out']['kernel'].shape == (20, 3)
  np.testing.assert_array_equal(np.asarray(v['params']['out']['bias']), 0.0)
  np.testing.assert_array_equal(np.asarray(v['params']['norm5']['scale']), 1.0)
  np.testing.assert_array_equal(np.asarray(v['batch_stats']['norm5']['var']), 1.0)
  std = float(np.std(np.asarray(v['params']['conv0']['kernel'])))  # Kaiming: √(2 / fan_in)
  assert abs(std / np.sqrt(2.0 / (2 * 7 ** 3)) - 1) < 0.1

  x = jax.random.normal(jax.random.key(1), shape)

  def run(v, x, key):
    features = model.apply(v, x, train=False, method='features')
    logits = model.apply(v, x, train=False)
    bf16 = model.clone(dtype=jnp.bfloat16).apply(v, x, train=False)
    train_logits = [model.apply(v, x, train=True, rngs={'dropout': k}, mutable=['batch_stats'])[0]
                    for k in jax.random.split(key)]
    return features, logits, bf16, train_logits

  key = jax.random.key(2)
  features, logits, bf16, (train_a, train_b) = _compile(run, v, x, key)(v, x, key)
  assert features.shape == (2, 20) and logits.shape == (2, 3)
  want = features @ v['params']['out']['kernel'] + v['params']['out']['bias']
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bf16), np.asarray(logits), atol=0.05)
  assert not np.allclose(np.asarray(train_a), np.asarray(train_b))  # dropout keys matter


def test_dense_layer_dropout_is_channelwise():
  """Dropout3d: each new channel of an item is dropped everywhere or nowhere, old channels
  pass through, and evaluation is deterministic."""
  layer = densenet3d._DenseLayer(growth_rate=16, bn_size=2, dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (3, 4, 5, 6, 8))
  v = layer.init(jax.random.key(1), x, train=False)

  def run(v, x, key):
    out, _ = layer.apply(v, x, train=True, rngs={'dropout': key}, mutable=['batch_stats'])
    return out, layer.apply(v, x, train=False)

  key = jax.random.key(2)
  out, out_eval = _compile(run, v, x, key)(v, x, key)
  assert out.shape == out_eval.shape == (3, 4, 5, 6, 24)
  np.testing.assert_array_equal(np.asarray(out[..., :8]), np.asarray(x))
  zero = np.asarray(out[..., 8:] == 0).reshape(3, -1, 16)
  assert np.array_equal(zero.all(axis=1), zero.any(axis=1))
  assert 0 < zero.all(axis=1).sum() < zero.shape[0] * 16
  assert not np.asarray(out_eval[..., 8:] == 0).all(axis=(1, 2, 3)).any()
  with pytest.raises(Exception, match='dropout'):
    layer.apply(v, x, train=True, mutable=['batch_stats'])


def test_bad_settings_and_inputs():
  with pytest.raises(densenet3d.DenseNet3DConfigError, match='num_classes=0'):
    densenet3d.build_densenet121(0)
  with pytest.raises(ConfigError, match='dropout_rate=1.0'):
    densenet3d.build_densenet121(2, dropout_rate=1.0)
  model = densenet3d.build_densenet121(2)
  v = densenet3d.abstract_variables(model)
  apply = lambda shape: jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v,
                                       jax.ShapeDtypeStruct(shape, jnp.float32))
  assert apply((3, 29, 30, 31, 1)).shape == (3, 2)
  with pytest.raises(ValueError, match=r'at least 29 voxels'):
    apply((1, 32, 28, 32, 1))
  with pytest.raises(ValueError, match=r'\[N, D, H, W, 1\]'):
    apply((1, 32, 32, 32, 2))


def test_converter_accepts_prefixes_and_tensors(state_dict, variables):
  sd = {'module.' + k: torch.from_numpy(v) for k, v in state_dict.items()}
  converted = monai_densenet.convert_monai_densenet_state_dict(sd, NUM_CLASSES)
  assert jax.tree_util.tree_structure(converted) == jax.tree_util.tree_structure(variables)
  np.testing.assert_array_equal(
      np.asarray(converted['params']['denseblock3']['denselayer24']['conv2']['kernel']),
      np.transpose(state_dict['features.denseblock3.denselayer24.layers.conv2.weight'],
                   (2, 3, 4, 1, 0)))
  np.testing.assert_array_equal(np.asarray(variables['params']['out']['kernel']),
                                state_dict['class_layers.out.weight'].T)
  np.testing.assert_array_equal(np.asarray(variables['batch_stats']['transition2']['norm']['var']),
                                state_dict['features.transition2.norm.running_var'])


def test_converter_errors_name_the_keys(state_dict):
  convert = monai_densenet.convert_monai_densenet_state_dict
  sd = dict(state_dict)
  del sd['features.denseblock4.denselayer16.layers.norm2.running_mean']
  with pytest.raises(monai_densenet.MonaiDenseNetCheckpointError,
                     match=r'1 missing keys \(features\.denseblock4\.denselayer16\.layers'
                           r'\.norm2\.running_mean\)'):
    convert(sd, NUM_CLASSES)

  sd = dict(state_dict, **{'class_layers.fc.weight': np.zeros((2, 1024), np.float32)})
  with pytest.raises(DataError, match=r'1 unexpected keys \(class_layers\.fc\.weight\)'):
    convert(sd, NUM_CLASSES)

  sd = {k.replace('.layers.', '.'): v for k, v in state_dict.items()}  # torchvision-style names
  with pytest.raises(monai_densenet.MonaiDenseNetCheckpointError,
                     match=r'580 missing keys .* 580 unexpected keys'):
    convert(sd, NUM_CLASSES)

  with pytest.raises(ValueError, match=r"out_channels=4\): 2 entries with the wrong shape: "
                                       r"'class_layers\.out\.bias' has shape \(2,\), expected "
                                       r"\(4,\) \(the checkpoint has num_classes=2\); "
                                       r"'class_layers\.out\.weight' has shape \(2, 1024\)"):
    convert(state_dict, 4)

  with pytest.raises(ValueError, match=r"'features\.conv0\.weight' has shape "
                                       r'\(64, 1, 7, 7, 7\).*in_channels=1\)'):
    convert(state_dict, NUM_CLASSES, in_channels=2)

  sd = dict(state_dict)
  sd['features.transition1.conv.weight'] = np.zeros((128, 256, 1, 1), np.float32)
  with pytest.raises(monai_densenet.MonaiDenseNetCheckpointError,
                     match=r'expected \(128, 256, 1, 1, 1\)'):
    convert(sd, NUM_CLASSES)

  sd = dict(state_dict, **{'module.features.conv0.weight': state_dict['features.conv0.weight']})
  with pytest.raises(monai_densenet.MonaiDenseNetCheckpointError, match='twice'):
    convert(sd, NUM_CLASSES)
