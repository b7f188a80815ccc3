"""MedicalNet 3D ResNet: features equal a torch transcription of MedicalNet's models/resnet.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cf3d_jax.errors import DataError
from cf3d_jax.convert import medicalnet
from cf3d_jax.models import resnet3d

X_SHAPE = (2, 32, 32, 32, 1)  # [N, D, H, W, 1]


def _torch_medicalnet(depth: int, shortcut_type: str):
  """MedicalNet's ResNet (Tencent/MedicalNet models/resnet.py), same module names, the
  segmentation head replaced by global average pooling as in wdm-3d's eval/models/resnet.py."""
  torch = pytest.importorskip('torch')
  from torch import nn
  from torch.nn import functional as F

  def conv3x3x3(in_planes, out_planes, stride=1, dilation=1):
    return nn.Conv3d(in_planes, out_planes, kernel_size=3, dilation=dilation, stride=stride,
                     padding=dilation, bias=False)

  def downsample_basic_block(x, planes, stride):
    out = F.avg_pool3d(x, kernel_size=1, stride=stride)
    zero_pads = torch.zeros(out.size(0), planes - out.size(1), *out.shape[2:], dtype=out.dtype)
    return torch.cat([out, zero_pads], dim=1)

  class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
      super().__init__()
      self.conv1 = conv3x3x3(inplanes, planes, stride=stride, dilation=dilation)
      self.bn1 = nn.BatchNorm3d(planes)
      self.relu = nn.ReLU(inplace=True)
      self.conv2 = conv3x3x3(planes, planes, dilation=dilation)
      self.bn2 = nn.BatchNorm3d(planes)
      self.downsample = downsample

    def forward(self, x):
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      residual = x if self.downsample is None else self.downsample(x)
      return self.relu(out + residual)

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
      super().__init__()
      self.conv1 = nn.Conv3d(inplanes, planes, kernel_size=1, bias=False)
      self.bn1 = nn.BatchNorm3d(planes)
      self.conv2 = nn.Conv3d(planes, planes, kernel_size=3, stride=stride, dilation=dilation,
                             padding=dilation, bias=False)
      self.bn2 = nn.BatchNorm3d(planes)
      self.conv3 = nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False)
      self.bn3 = nn.BatchNorm3d(planes * 4)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = downsample

    def forward(self, x):
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      residual = x if self.downsample is None else self.downsample(x)
      return self.relu(out + residual)

  class ResNet(nn.Module):

    def __init__(self, block, layers, shortcut_type='B'):
      self.inplanes = 64
      super().__init__()
      self.conv1 = nn.Conv3d(1, 64, kernel_size=7, stride=(2, 2, 2), padding=(3, 3, 3),
                             bias=False)
      self.bn1 = nn.BatchNorm3d(64)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool3d(kernel_size=(3, 3, 3), stride=2, padding=1)
      self.layer1 = self._make_layer(block, 64, layers[0], shortcut_type)
      self.layer2 = self._make_layer(block, 128, layers[1], shortcut_type, stride=2)
      self.layer3 = self._make_layer(block, 256, layers[2], shortcut_type, stride=1, dilation=2)
      self.layer4 = self._make_layer(block, 512, layers[3], shortcut_type, stride=1, dilation=4)
      self.conv_seg = nn.Sequential(nn.AdaptiveAvgPool3d((1, 1, 1)), nn.Flatten())
      for m in self.modules():
        if isinstance(m, nn.Conv3d):
          nn.init.kaiming_normal_(m.weight, mode='fan_out')

    def _make_layer(self, block, planes, blocks, shortcut_type, stride=1, dilation=1):
      downsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        if shortcut_type == 'A':
          downsample = functools.partial(downsample_basic_block, planes=planes * block.expansion,
                                         stride=stride)
        else:
          downsample = nn.Sequential(
              nn.Conv3d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride,
                        bias=False), nn.BatchNorm3d(planes * block.expansion))
      layers = [block(self.inplanes, planes, stride=stride, dilation=dilation,
                      downsample=downsample)]
      self.inplanes = planes * block.expansion
      for _ in range(1, blocks):
        layers.append(block(self.inplanes, planes, dilation=dilation))
      return nn.Sequential(*layers)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.conv_seg(x)

  block, counts = {10: (BasicBlock, [1, 1, 1, 1]), 18: (BasicBlock, [2, 2, 2, 2]),
                   34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3])}[depth]
  return ResNet(block, counts, shortcut_type)


def _randomised(model, seed: int):
  """Random BN affine parameters and running statistics (conv weights keep kaiming init)."""
  import torch
  torch.manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm3d):
      with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return model.eval()


def _state_dict(model, prefix: str = 'module.') -> dict[str, np.ndarray]:
  """The torch state dict as NumPy, keys prefixed as nn.DataParallel saves them."""
  return {prefix + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('depth,shortcut', [(10, None), (10, 'A'), (50, None)],
                         ids=['10_B', '10_A', '50_B'])
def test_features_match_torch_medicalnet(depth, shortcut):
  import torch
  resolved = shortcut or resnet3d.MEDICALNET_SHORTCUT[depth]
  torch.manual_seed(depth)
  ref = _randomised(_torch_medicalnet(depth, resolved), seed=depth + 1)
  x = np.random.default_rng(depth).standard_normal(X_SHAPE).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(np.moveaxis(x, -1, 1).copy())).numpy()

  variables = medicalnet.convert_medicalnet_state_dict(_state_dict(ref), depth, shortcut)
  model = resnet3d.build_resnet3d(depth, shortcut)
  got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x)))
  assert got.shape == want.shape == (2, resnet3d.feature_dim(depth))
  scale = np.abs(want).max()
  assert scale > 1e-3
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
  assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)
  # The two items differ: the test would notice a batch mix-up.
  assert not np.allclose(want[0], want[1], atol=1e-3 * scale)


@pytest.mark.parametrize('depth', [10, 18, 34, 50])
def test_parameter_count_equals_torch(depth):
  shortcut = resnet3d.MEDICALNET_SHORTCUT[depth]
  ref = _torch_medicalnet(depth, shortcut)
  variables = resnet3d.abstract_variables(resnet3d.build_resnet3d(depth))
  assert _count(variables['params']) == sum(p.numel() for p in ref.parameters())
  buffers = [b for k, b in ref.state_dict().items() if 'running_' in k]
  assert _count(variables['batch_stats']) == sum(b.numel() for b in buffers)


def test_feature_map_and_init():
  model = resnet3d.build_resnet3d(10)
  x = jnp.ones((1, 24, 20, 17, 1))

  @jax.jit
  def init_and_apply(key, x):  # one compilation for init and both outputs
    variables = model.init(key, x)
    return variables, model.apply(variables, x, pooled=False), model.apply(variables, x)

  variables, fmap, features = init_and_apply(jax.random.key(0), x)
  assert _count(variables['params']) == _count(resnet3d.abstract_variables(model)['params'])
  assert fmap.shape == (1, 3, 3, 3, 512)  # ⌈⌈⌈s/2⌉/2⌉/2⌉ per axis
  np.testing.assert_allclose(np.asarray(features), np.asarray(fmap).mean(axis=(1, 2, 3)),
                             rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(features)).max() > 0


@pytest.fixture(scope='module')
def state_dict_10():
  """A depth-10 (shortcut B) MedicalNet state dict as NumPy, with the 'module.' prefix."""
  return _state_dict(_torch_medicalnet(10, 'B'))


def test_converter_accepts_plain_keys_and_ignores_head(state_dict_10):
  plain = {k[len('module.'):]: v for k, v in state_dict_10.items()}
  plain['conv_seg.2.weight'] = np.zeros((2, 32, 1, 1, 1), np.float32)
  a = medicalnet.convert_medicalnet_state_dict(plain, 10)
  b = medicalnet.convert_medicalnet_state_dict(state_dict_10, 10)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  kernel = a['params']['layer2_0']['downsample_0']['kernel']
  assert kernel.shape == (1, 1, 1, 64, 128)
  np.testing.assert_array_equal(
      np.asarray(a['params']['conv1']['kernel']),
      np.transpose(plain['conv1.weight'], (2, 3, 4, 1, 0)))
  np.testing.assert_array_equal(np.asarray(a['batch_stats']['layer1_0']['bn2']['var']),
                                plain['layer1.0.bn2.running_var'])


def test_converter_errors_name_the_keys(state_dict_10):
  sd = dict(state_dict_10)
  del sd['module.layer3.0.bn1.running_mean']
  with pytest.raises(medicalnet.MedicalNetCheckpointError,
                     match=r'1 missing keys \(layer3\.0\.bn1'):
    medicalnet.convert_medicalnet_state_dict(sd, 10)

  sd = dict(state_dict_10, **{'module.fc.weight': np.zeros((2, 512), np.float32)})
  with pytest.raises(DataError, match=r'unexpected keys \(fc\.weight\)'):
    medicalnet.convert_medicalnet_state_dict(sd, 10)

  sd = dict(state_dict_10)
  sd['module.layer1.0.conv2.weight'] = np.zeros((64, 64, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"'layer1\.0\.conv2\.weight' has shape \(64, 64, 3, 3\), "
                                       r'expected \(64, 64, 3, 3, 3\)'):
    medicalnet.convert_medicalnet_state_dict(sd, 10)

  with pytest.raises(medicalnet.MedicalNetCheckpointError, match="shortcut_type='B'"):
    medicalnet.convert_medicalnet_state_dict(state_dict_10, 10, 'A')

  sd = dict(state_dict_10, **{'conv1.weight': state_dict_10['module.conv1.weight']})
  with pytest.raises(medicalnet.MedicalNetCheckpointError, match='twice'):
    medicalnet.convert_medicalnet_state_dict(sd, 10)


def test_bad_settings_and_inputs():
  with pytest.raises(resnet3d.ResNet3DConfigError, match='depth 11'):
    resnet3d.build_resnet3d(11)
  with pytest.raises(resnet3d.ResNet3DConfigError, match='shortcut_type'):
    resnet3d.build_resnet3d(10, 'C')
  model = resnet3d.build_resnet3d(10)
  with pytest.raises(ValueError, match=r'\[N, D, H, W, 1\]'):
    model.init(jax.random.key(0), jnp.ones((1, 16, 16, 16, 2)))
  assert resnet3d.feature_dim(34) == 512 and resnet3d.feature_dim(50) == 2048


def test_convert_cli_medicalnet_round_trip(tmp_path):
  """`python -m cf3d_jax.convert medicalnet IN OUT --depth 10` on a MedicalNet-style .pth."""
  import torch
  from cf3d_jax import convert
  from cf3d_jax.convert.__main__ import main as convert_main
  ref = _randomised(_torch_medicalnet(10, 'B'), seed=3)
  ckpt = tmp_path / 'resnet_10.pth'
  torch.save({'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()}}, ckpt)
  out = tmp_path / 'med3d'
  assert convert_main(['medicalnet', str(ckpt), str(out), '--depth', '10']) == 0
  config, variables = convert.load_converted(str(out))
  assert config == {'depth': 10, 'shortcut_type': None}
  want = medicalnet.convert_medicalnet_state_dict(_state_dict(ref), 10)
  for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert convert_main(['medicalnet', str(ckpt), str(out), '--depth', '18']) == 2  # OUT exists
