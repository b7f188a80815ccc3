"""The MAISI KL autoencoder: layout, shapes at 64³–256³, split decoding, remat, errors.

Numerical agreement with MONAI's torch model is tested in tests/test_convert.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cf3d_jax.errors import ConfigError
from cf3d_jax.models import layers
from cf3d_jax.models.autoencoder import (LOGVAR_RANGE, AutoencoderConfigError, AutoencoderKL,
                                         abstract_params, autoencoder_hparams,
                                         build_autoencoder, count_params, init_params,
                                         param_logical_axes, sample_latent,
                                         upsample_trilinear_2x)
from cf3d_jax.models.chunked_decode import decode_split, decoder_halo

TINY = dict(channels=(8, 16, 16), num_res_blocks=(1, 1, 1), norm_num_groups=4)
MAISI_PARAMS = 20_944_897  # sum(p.numel()) of MONAI's AutoencoderKlMaisi, MAISI config


def _perturbed(params, scale: float = 0.1, seed: int = 1):
  """Adds Gaussian noise to every leaf, so norm scales and biases are not 1 and 0."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape), p.dtype),
      params)


@pytest.fixture(scope='module')
def tiny():
  """(model, params) of a tiny 3-level autoencoder (f = 4) with perturbed params."""
  model = AutoencoderKL(**TINY)
  return model, _perturbed(init_params(model, jax.random.key(0)))


def _decode(model, params, z):
  return jax.jit(lambda p, z: model.apply({'params': p}, z, method='decode'))(params, z)


def _split(model, params, z, num_splits, axis, overlap):
  fn = lambda p, z: decode_split(model, p, z, num_splits, axis=axis, overlap=overlap)
  return jax.jit(fn)(params, z)


def test_maisi_parameter_count_and_layout():
  params = abstract_params(AutoencoderKL())
  assert count_params(params) == MAISI_PARAMS
  # conv_in, 2 ResBlocks, Downsample, 2, Downsample, 2, GroupNorm, conv_out: blocks_0 … 10.
  for part in ('encoder', 'decoder'):
    assert sorted(params[part]) == sorted(f'blocks_{i}' for i in range(11))
  enc, dec = params['encoder'], params['decoder']
  assert enc['blocks_0']['kernel'].shape == (3, 3, 3, 1, 64)
  assert enc['blocks_4']['nin_shortcut']['kernel'].shape == (1, 1, 1, 64, 128)
  assert enc['blocks_3']['conv']['kernel'].shape == (3, 3, 3, 64, 64)  # Downsample
  assert enc['blocks_9']['scale'].shape == (256,)
  assert enc['blocks_10']['kernel'].shape == (3, 3, 3, 256, 4)
  assert dec['blocks_0']['kernel'].shape == (3, 3, 3, 4, 256)
  assert dec['blocks_3']['conv']['kernel'].shape == (3, 3, 3, 256, 256)  # Upsample
  assert dec['blocks_7']['nin_shortcut']['kernel'].shape == (1, 1, 1, 128, 64)
  assert dec['blocks_10']['kernel'].shape == (3, 3, 3, 64, 1)
  for name in ('quant_conv_mu', 'quant_conv_log_sigma', 'post_quant_conv'):
    assert params[name]['kernel'].shape == (1, 1, 1, 4, 4)


@pytest.mark.parametrize('size', [64, 128, 256])
def test_encode_decode_shapes_without_compute(size):
  model = AutoencoderKL()
  params = abstract_params(model)
  x = jax.ShapeDtypeStruct((2, size, size, size, 1), jnp.float32)
  mean, logvar = jax.eval_shape(
      lambda p, x: model.apply({'params': p}, x, method='encode'), params, x)
  latent = (2, size // 4, size // 4, size // 4, 4)
  assert mean.shape == logvar.shape == latent and mean.dtype == jnp.float32
  z = jax.ShapeDtypeStruct(latent, jnp.float32)
  out = jax.eval_shape(lambda p, z: model.apply({'params': p}, z, method='decode'), params, z)
  assert out.shape == x.shape and out.dtype == jnp.float32
  recon, _, _ = jax.eval_shape(
      lambda p, x, k: model.apply({'params': p}, x, k), params, x, jax.random.key(0))
  assert recon.shape == x.shape
  split = jax.eval_shape(lambda p, z: decode_split(model, p, z, 4, axis=1), params, z)
  assert split.shape == x.shape


def test_upsample_matches_torch_trilinear_formula():
  """Against a direct implementation of torch's align_corners=False source-index rule."""
  x = np.random.default_rng(0).standard_normal((1, 3, 4, 5, 2)).astype(np.float32)
  ref = x
  for axis in (1, 2, 3):
    n = ref.shape[axis]
    src = np.maximum((np.arange(2 * n) + 0.5) / 2 - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    lam = (src - i0).reshape([-1 if a == axis else 1 for a in range(5)])
    ref = (1 - lam) * np.take(ref, i0, axis=axis) + lam * np.take(ref, i1, axis=axis)
  np.testing.assert_allclose(upsample_trilinear_2x(jnp.asarray(x)), ref, rtol=1e-6, atol=1e-6)


def test_decoder_halo():
  # MAISI: 1 + 4 → ×2+2 = 12 → +4 → ×2+2 = 34 → +4 + 1 = 39 image voxels → ceil(39/4) = 10
  assert decoder_halo(AutoencoderKL()) == 10
  # TINY: 1 + 2 → 8 → 10 → 22 → 24 + 1 = 25 → 7.
  assert decoder_halo(AutoencoderKL(**TINY)) == 7


def _stats_free_group_norm(next_fun, args, kwargs, context):
  """Interceptor: GroupNorm → its affine map only, making the decoder purely local."""
  if isinstance(context.module, layers.GroupNorm) and context.method_name == '__call__':
    x = args[0]
    scale = context.module.get_variable('params', 'scale')
    bias = context.module.get_variable('params', 'bias')
    return x * scale + bias
  return next_fun(*args, **kwargs)


@pytest.mark.parametrize('axis', [0, 2])
def test_split_decode_is_exact_once_overlap_covers_the_receptive_field(tiny, axis):
  """With the norms made local the only error source is the halo: overlap >= halo is exact.

  The chunks are decoded with windows of core + 2·overlap latent voxels; the core's outputs
  equal the full decode to float rounding when the receptive field (`decoder_halo`) fits in
  the overlap, and differ when it does not.
  """
  model, params = tiny
  shape = [1, 4, 4, 4, 4]
  shape[1 + axis] = 32  # 4 chunks of 8 latent voxels; windows of 8 + 2·7 = 22
  z = jax.random.normal(jax.random.key(1), tuple(shape))
  halo = decoder_halo(model)
  with nn.intercept_methods(_stats_free_group_norm):
    full = _decode(model, params, z)
    exact = _split(model, params, z, 4, axis, halo)
    short = _split(model, params, z, 4, axis, halo - 1)
  scale = float(jnp.max(jnp.abs(full)))
  assert full.shape[1 + axis] == 128
  assert float(jnp.max(jnp.abs(exact - full))) <= 1e-5 * scale
  assert float(jnp.max(jnp.abs(short - full))) > 1e-4 * scale


def test_split_decode_approximates_full_decode_with_group_norm(tiny):
  """With real GroupNorms each chunk uses its own window's statistics: close, not equal.

  Tolerance: 10% of the output's largest magnitude (this example: 5.4%, from the chunk
  statistics of 22×4×4-voxel windows); without overlap the seams also see zero padding and the
  error is of the order of the output itself. One split is exactly `decode`.
  """
  model, params = tiny
  z = jax.random.normal(jax.random.key(1), (1, 32, 4, 4, 4))
  full = _decode(model, params, z)
  scale = float(jnp.max(jnp.abs(full)))
  np.testing.assert_array_equal(np.asarray(_split(model, params, z, 1, 0, None)),
                                np.asarray(full))
  err = float(jnp.max(jnp.abs(_split(model, params, z, 4, 0, None) - full)))
  err_no_overlap = float(jnp.max(jnp.abs(_split(model, params, z, 4, 0, 0) - full)))
  assert 0 < err <= 0.1 * scale, (err, scale)
  assert err_no_overlap > 5 * err, (err_no_overlap, err)


def test_remat_gives_same_outputs_and_gradients(tiny):
  model, params = tiny
  x = jax.random.normal(jax.random.key(2), (1, 8, 8, 8, 1))

  def loss(p, m):
    recon, mean, logvar = m.apply({'params': p}, x, jax.random.key(3))
    return jnp.mean(jnp.abs(recon - x)) + 1e-3 * jnp.mean(mean ** 2 + jnp.exp(logvar))

  rematted = model.clone(remat=True)
  assert (jax.tree_util.tree_structure(abstract_params(rematted))
          == jax.tree_util.tree_structure(params))
  value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, model)
  value_r, grads_r = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, rematted)
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                         grads_r, grads)
  assert float(jnp.max(jnp.abs(grads['encoder']['blocks_1']['conv1']['kernel']))) > 0


def test_sampling_and_call(tiny):
  model, params = tiny
  x = jax.random.normal(jax.random.key(4), (1, 8, 8, 8, 1))
  key = jax.random.key(5)
  apply = jax.jit(lambda p, x, k: model.apply({'params': p}, x, k))
  recon, mean, logvar = apply(params, x, key)
  assert recon.shape == x.shape and mean.shape == (1, 2, 2, 2, 4)
  assert float(logvar.min()) >= LOGVAR_RANGE[0] and float(logvar.max()) <= LOGVAR_RANGE[1]
  z = sample_latent(mean, logvar, key)
  np.testing.assert_allclose(
      z, mean + jnp.exp(logvar / 2) * jax.random.normal(key, mean.shape), rtol=1e-6)
  np.testing.assert_allclose(recon, _decode(model, params, z), rtol=1e-5, atol=1e-5)
  # No key: decode the mean (MONAI's `reconstruct`).
  recon_mean, _, _ = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x)
  np.testing.assert_allclose(recon_mean, _decode(model, params, mean), rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(recon_mean - recon))) > 1e-4


def test_bfloat16_compute_is_close_to_float32(tiny):
  model, params = tiny
  x = jax.random.normal(jax.random.key(6), (1, 8, 8, 8, 1))
  run = lambda m: jax.jit(lambda p: m.apply({'params': p}, x))(params)[0]
  y32, y16 = run(model), run(model.clone(dtype=jnp.bfloat16))
  assert y16.dtype == jnp.float32
  assert float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32)) < 0.05


def test_hparams_round_trip_and_logical_axes():
  model = AutoencoderKL(**TINY, dtype=jnp.bfloat16)
  hparams = autoencoder_hparams(model)
  assert hparams['channels'] == [8, 16, 16] and hparams['dtype'] == 'bfloat16'
  assert build_autoencoder(hparams) == model
  specs = jax.tree_util.tree_leaves(param_logical_axes(model),
                                    is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  leaves = jax.tree_util.tree_leaves(abstract_params(model))
  assert len(specs) == len(leaves)
  assert all(len(spec) == leaf.ndim for spec, leaf in zip(specs, leaves))


@pytest.mark.parametrize('shape,message', [
    ((1, 16, 18, 16, 1), r'\(16, 18, 16\).*divisible by 4'),
    ((1, 16, 16, 16, 2), r'\[N, D, H, W, 1\].*\(1, 16, 16, 16, 2\)'),
    ((16, 16, 16, 1), r'channels-last'),
])
def test_bad_input_shapes_are_clear_errors(shape, message):
  model = AutoencoderKL()
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  with pytest.raises(AutoencoderConfigError, match=message):
    jax.eval_shape(lambda p, x: model.apply({'params': p}, x, method='encode'),
                   abstract_params(model), x)


@pytest.mark.parametrize('overrides,message', [
    (dict(attention_levels=(False, False, True)), 'attention is not supported'),
    (dict(with_decoder_nonlocal_attn=True), 'attention is not supported'),
    (dict(num_res_blocks=(2, 2)), 'one entry per level'),
    (dict(channels=(64, 120, 256)), r'\[120\] not positive multiples of norm_num_groups=32'),
])
def test_invalid_settings_are_clear_errors(overrides, message):
  with pytest.raises(ConfigError, match=message):
    AutoencoderKL(**overrides)


def test_build_autoencoder_rejects_unknown_keys():
  with pytest.raises(AutoencoderConfigError, match=r'num_res_block \(did you mean num_res_blocks'):
    build_autoencoder({'num_res_block': [2, 2, 2]})
  with pytest.raises(AutoencoderConfigError, match='float8'):
    build_autoencoder({'dtype': 'float8'})


def test_decode_split_argument_errors():
  model = AutoencoderKL(**TINY)
  params = abstract_params(model)
  z = jax.ShapeDtypeStruct((1, 12, 4, 4, 4), jnp.float32)
  with pytest.raises(AutoencoderConfigError, match='num_splits=5 must be a positive divisor'):
    jax.eval_shape(lambda p, z: decode_split(model, p, z, 5), params, z)
  with pytest.raises(AutoencoderConfigError, match='axis=3'):
    jax.eval_shape(lambda p, z: decode_split(model, p, z, 2, axis=3), params, z)
