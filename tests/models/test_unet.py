"""The conditioned 3D U-Net: WDM parameter counts, init, conditioning, dropout, dtypes, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cf3d_jax.models import layers
from cf3d_jax.models.unet import (UNet, UNetConfigError, abstract_params, build_unet,
                                  count_params, init_params, param_logical_axes)

X_SHAPE = (2, 16, 16, 16, 8)
TEXT_SHAPE = (5, 12)
TINY = dict(out_channels=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
            num_groups=4, head_channels=4)


def _tiny(**overrides) -> UNet:
  """A tiny U-Net (base 8, two levels, one ResBlock per level)."""
  return UNet(**{**TINY, **overrides})


def _inputs(seed: int = 0):
  """x [2, 16, 16, 16, 8], t [2], text [2, 5, 12], mask [2, 5] with the last two of item 1 off."""
  kx, kt = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, X_SHAPE)
  t = jnp.array([3, 917])
  text = jax.random.normal(kt, (X_SHAPE[0],) + TEXT_SHAPE)
  mask = jnp.array([[True] * 5, [True, True, True, False, False]])
  return x, t, text, mask


def _perturbed(params, scale: float = 0.1, seed: int = 1):
  """Adds Gaussian noise (host-side) to every leaf, so zero-initialised layers become active."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape), p.dtype),
      params)


@pytest.fixture(scope='module')
def text_model():
  """Cross-attention at every level and the middle, self-attention at the lowest level."""
  model = _tiny(cross_attention_levels=(True, True), middle_cross_attention=True,
                attention_levels=(False, True), middle_attention=True)
  params = init_params(model, jax.random.key(0), X_SHAPE, TEXT_SHAPE)
  apply = jax.jit(lambda p, x, t, e, m: model.apply({'params': p}, x, t, e, m))
  return model, params, apply


@pytest.mark.parametrize('channel_mult,size,expected', [
    ((1, 2, 2, 4, 4), 64, 57_914_824),
    ((1, 2, 2, 4, 4, 4), 128, 83_158_728),
])
def test_wdm_parameter_counts(channel_mult, size, expected):
  model = UNet(channel_mult=channel_mult)
  params = abstract_params(model, (1, size, size, size, 8))
  assert count_params(params) == expected


def test_wdm_block_layout():
  params = abstract_params(UNet(), (64, 64, 64, 8))
  decoder = [k for k in params if k.startswith('output_blocks_') and not k.endswith('_up')]
  assert len(decoder) == 15
  assert sorted(k for k in params if k.endswith('_up')) == [
      'output_blocks_11_up', 'output_blocks_2_up', 'output_blocks_5_up', 'output_blocks_8_up']
  assert len([k for k in params if k.startswith('input_blocks_')]) == 15
  assert params['out_conv']['kernel'].shape == (3, 3, 3, 64, 8)
  assert params['middle_block_1']['in_conv']['kernel'].shape == (3, 3, 3, 256, 256)


def test_shape_dtype_and_zero_output_at_init(text_model):
  model, params, apply = text_model
  x, t, text, mask = _inputs()
  y = apply(params, x, t, text, mask)
  assert y.shape == X_SHAPE and y.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y), 0.0)


def test_cross_attention_modules_at_every_configured_level(text_model):
  _, params, _ = text_model
  for name in ('input_blocks_1', 'output_blocks_2', 'output_blocks_3', 'middle_block_0',
               'middle_block_1', 'input_blocks_3', 'output_blocks_0'):
    assert f'{name}_cross_attn' in params, name
  # Highest resolution: encoder block 1 and the last decoder blocks work at 16³.
  assert params['input_blocks_1_cross_attn']['key']['kernel'].shape == (TEXT_SHAPE[1], 8)
  assert 'input_blocks_1_self_attn' not in params and 'input_blocks_3_self_attn' in params
  assert not any(k.endswith('_attn') for k in params if k.startswith('input_blocks_2'))


def test_text_changes_output(text_model):
  _, params, apply = text_model
  params = _perturbed(params)
  x, t, text, mask = _inputs()
  y1 = apply(params, x, t, text, mask)
  y2 = apply(params, x, t, text + 1.0, mask)
  assert np.all(np.isfinite(np.asarray(y1)))
  assert float(jnp.max(jnp.abs(y1 - y2))) > 1e-3


def test_masked_tokens_do_not_influence_output(text_model):
  _, params, apply = text_model
  params = _perturbed(params)
  x, t, text, mask = _inputs()
  changed = text.at[1, 3:].set(100.0)  # the masked-out tokens of item 1
  np.testing.assert_allclose(apply(params, x, t, text, mask),
                             apply(params, x, t, changed, mask), atol=1e-6)
  # Without the mask the same change matters.
  assert float(jnp.max(jnp.abs(apply(params, x, t, text, None)
                               - apply(params, x, t, changed, None)))) > 1e-3


def test_fully_masked_text_is_ignored(text_model):
  _, params, apply = text_model
  params = _perturbed(params)
  x, t, text, _ = _inputs()
  off = jnp.zeros(text.shape[:2], bool)
  y1, y2 = apply(params, x, t, text, off), apply(params, x, t, -text, off)
  assert np.all(np.isfinite(np.asarray(y1)))
  np.testing.assert_allclose(y1, y2, atol=1e-6)


def test_float_and_scalar_timesteps(text_model):
  model, params, apply = text_model
  params = _perturbed(params)
  x, t, text, mask = _inputs()
  y_int = apply(params, x, t, text, mask)
  y_float = apply(params, x, t.astype(jnp.float32) + 0.5, text, mask)
  assert float(jnp.max(jnp.abs(y_float - y_int))) > 0
  scalar = jax.eval_shape(lambda: model.apply({'params': params}, x, 250.5, text, mask))
  assert scalar.shape == X_SHAPE


@pytest.fixture(scope='module')
def plain_params():
  """Perturbed params of the tiny text-free model (dropout adds no params)."""
  return _perturbed(init_params(_tiny(), jax.random.key(0), X_SHAPE))


def test_dropout_only_where_configured(plain_params):
  x, t, _, _ = _inputs()
  outputs = {}
  for active in (True, False):
    model = _tiny(dropout=0.5, dropout_levels=(False, active), middle_dropout=active)
    run = jax.jit(lambda key, model=model: model.apply({'params': plain_params}, x, t,
                                                       train=True, rngs={'dropout': key}))
    outputs[active] = [run(jax.random.key(k)) for k in (1, 2)]
  assert float(jnp.max(jnp.abs(outputs[True][0] - outputs[True][1]))) > 1e-3
  np.testing.assert_array_equal(outputs[False][0], outputs[False][1])
  # Without train=True dropout is off and needs no rng: the same as no dropout at all.
  active = _tiny(dropout=0.5, dropout_levels=(False, True), middle_dropout=True)
  np.testing.assert_allclose(
      jax.jit(lambda p: active.apply({'params': p}, x, t))(plain_params), outputs[False][0],
      rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_matches_float32(text_model):
  model, params, apply = text_model
  params = _perturbed(params)
  x, t, text, mask = _inputs()
  bf16 = model.clone(dtype=jnp.bfloat16)
  y16 = jax.jit(lambda p: bf16.apply({'params': p}, x, t, text, mask))(params)
  y32 = apply(params, x, t, text, mask)
  assert y16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
  assert rel < 0.05, rel


def test_indivisible_shape_is_a_clear_error():
  model = _tiny(channel_mult=(1, 2, 2))
  with pytest.raises(ValueError, match=r'\(16, 18, 16\).*divisible by .*4'):
    jax.eval_shape(lambda: init_params(model, jax.random.key(0), (1, 16, 18, 16, 8)))


def test_missing_text_is_a_clear_error():
  model = _tiny(cross_attention_levels=(True, False))
  with pytest.raises(UNetConfigError, match='text_emb is None'):
    jax.eval_shape(lambda: init_params(model, jax.random.key(0), X_SHAPE, None))


@pytest.mark.parametrize('overrides,message', [
    (dict(dropout_levels=(True,)), 'dropout_levels has 1 entries'),
    (dict(base_channels=6), 'not divisible by num_groups'),
])
def test_invalid_settings_are_clear_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    abstract_params(_tiny(**overrides), X_SHAPE)


def test_every_param_has_logical_axis_names(text_model):
  model, params, _ = text_model
  specs = param_logical_axes(model, X_SHAPE, TEXT_SHAPE)
  is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)
  flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=is_spec)
  flat_params = jax.tree_util.tree_leaves(params)
  assert len(flat_specs) == len(flat_params)
  for spec, leaf in zip(flat_specs, flat_params):
    assert is_spec(spec) and len(spec) == leaf.ndim
    assert all(name in layers.PARAM_AXIS_NAMES for name in spec), spec


def test_build_unet_from_config():
  config = ml_collections.ConfigDict(dict(
      base_channels=8, channel_mult=[1, 2], num_res_blocks=1, num_groups=4,
      cross_attention_levels=[True, False], dtype='bfloat16', param_dtype='float32',
      name='unet', in_channels=8))
  model = build_unet(config)
  assert model.channel_mult == (1, 2) and model.cross_attention_levels == (True, False)
  assert model.dtype == jnp.bfloat16 and model.num_middle_blocks == 2
  with pytest.raises(ValueError, match='did you mean model.channel_mult'):
    build_unet(dict(channel_mults=(1, 2)))


def test_timestep_embedding_matches_formula():
  t = np.array([0.0, 1.0, 999.0, 12.5])
  emb = np.asarray(layers.timestep_embedding(jnp.asarray(t), 64))
  freqs = np.exp(-np.log(10000.0) * np.arange(32) / 32)
  expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], -1)
  np.testing.assert_allclose(emb, expected, atol=1e-4)


def test_cross_attention_intermediates_stay_within_n_heads_s_l():
  n, s, heads, head_dim, length = 2, 4096, 2, 4, 8
  q = jnp.zeros((n, s, heads, head_dim))
  kv = jnp.zeros((n, length, heads, head_dim))
  jaxpr = jax.make_jaxpr(layers.multi_head_attention)(q, kv, kv, jnp.ones((n, length), bool))
  sizes = [int(np.prod(v.aval.shape)) for e in jaxpr.eqns for v in e.outvars]
  assert max(sizes) <= n * heads * s * length


@pytest.mark.parametrize('scale_shift', [False, True])
def test_resblock_matches_torch_reference(scale_shift):
  torch = pytest.importorskip('torch')
  rng = np.random.RandomState(0)
  x = rng.randn(2, 8, 8, 8, 8).astype(np.float32)
  emb = rng.randn(2, 16).astype(np.float32)
  for down, out_ch in ((True, 8), (False, 12)):
    block = layers.ResBlock(out_ch, num_groups=4, down=down, scale_shift=scale_shift)
    shapes = nn.unbox(jax.eval_shape(block.init, jax.random.key(0), x, emb)['params'])
    params = _perturbed(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape), shapes), 0.2)
    y = np.asarray(jax.jit(block.apply)({'params': params}, x, emb))
    to_t = lambda a: torch.from_numpy(np.array(a))
    conv_w = lambda p: to_t(np.asarray(p['kernel']).transpose(4, 3, 0, 1, 2))
    gn = lambda h, p: torch.nn.functional.group_norm(h, 4, to_t(p['scale']), to_t(p['bias']),
                                                     1e-5)
    conv = lambda h, p, pad: torch.nn.functional.conv3d(h, conv_w(p), to_t(p['bias']),
                                                        padding=pad)
    xt = to_t(x.transpose(0, 4, 1, 2, 3))
    h = torch.nn.functional.silu(gn(xt, params['in_norm']))
    skip = xt
    if down:
      h, skip = torch.nn.functional.avg_pool3d(h, 2), torch.nn.functional.avg_pool3d(xt, 2)
    h = conv(h, params['in_conv'], 1)
    e = torch.nn.functional.silu(to_t(emb)) @ to_t(params['emb_dense']['kernel'])
    e = (e + to_t(params['emb_dense']['bias']))[:, :, None, None, None]
    if scale_shift:   # guided-diffusion's use_scale_shift_norm=True
      scale, shift = torch.chunk(e, 2, dim=1)
      h = torch.nn.functional.silu(gn(h, params['out_norm']) * (1 + scale) + shift)
    else:
      h = torch.nn.functional.silu(gn(h + e, params['out_norm']))
    h = conv(h, params['out_conv'], 1)
    if 'skip_conv' in params:
      skip = conv(skip, params['skip_conv'], 0)
    expected = (skip + h).numpy().transpose(0, 2, 3, 4, 1)
    np.testing.assert_allclose(y, expected, atol=1e-4)



@pytest.mark.parametrize('impl', ['im2col', 'planes', 'auto'])
@pytest.mark.parametrize('k,stride,pad', [(3, 1, 1), (3, 2, 1), (1, 1, 0), (4, 2, 1), (3, 1, 0)])
def test_conv_formulations_match_xla_conv(impl, k, stride, pad):
  """Every `conv_impl` computes lax.conv's result and gradients (input and kernel) to 1e-4, at
  the strides, kernel sizes and paddings the networks use (odd sizes: strided edges)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 5, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, k, 3, 5)), jnp.float32)
  want = layers.conv3d(x, kernel, stride, pad, 'xla')
  got = layers.conv3d(x, kernel, stride, pad, impl)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  def loss(x, kern, impl):
    return jnp.sum(jnp.sin(layers.conv3d(x, kern, stride, pad, impl)))
  grads = [jax.grad(loss, argnums=(0, 1))(x, kernel, i) for i in ('xla', impl)]
  for g_fast, g_ref in zip(grads[1], grads[0]):
    np.testing.assert_allclose(g_fast, g_ref, rtol=1e-4, atol=1e-4)


def test_conv_impl_names_are_checked_and_auto_resolves_per_backend(monkeypatch):
  x, kernel = jnp.ones((1, 4, 4, 4, 2)), jnp.ones((3, 3, 3, 2, 2))
  with pytest.raises(ValueError, match="conv impl 'fft'"):
    layers.conv3d(x, kernel, 1, 1, 'fft')
  assert layers.resolve_conv_impl('im2col') == 'im2col'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert layers.resolve_conv_impl('auto') == 'planes'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert layers.resolve_conv_impl('auto') == 'xla'


@pytest.mark.parametrize('impl', ['im2col', 'planes'])
def test_unet_conv_formulation_equals_xla_with_the_same_params(impl):
  kw = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_groups=4,
            cross_attention_levels=(True, False), head_channels=8)
  ref, fast = UNet(conv_impl='xla', **kw), UNet(conv_impl=impl, **kw)
  params = init_params(ref, jax.random.key(0), (1, 8, 8, 8, 8), (1, 4))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 8, 8))
  args = (x, jnp.array([3.0, 700.0]), jnp.ones((2, 1, 4)), jnp.ones((2, 1), bool))
  np.testing.assert_allclose(fast.apply({'params': params}, *args),
                             ref.apply({'params': params}, *args), rtol=1e-4, atol=1e-4)


def test_remat_levels_give_the_same_outputs_and_gradients(text_model):
  """remat 'full' / 'dots' per level and in the middle: same params, outputs and gradients."""
  model, params, _ = text_model
  params = _perturbed(params)
  x, t, text, mask = _inputs()

  def loss_and_grad(m):
    def loss(p):
      return jnp.mean(jnp.square(m.apply({'params': p}, x, t, text, mask)))
    return jax.jit(jax.value_and_grad(loss))(params)

  ref_loss, ref_grad = loss_and_grad(model)
  remat = model.clone(remat_levels=('full', 'dots'), middle_remat='full')
  assert jax.tree.structure(abstract_params(remat, X_SHAPE, TEXT_SHAPE)) == \
      jax.tree.structure(params)
  got_loss, got_grad = loss_and_grad(remat)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_text_time_embedding_conditions_every_block_without_cross_attention():
  model = _tiny(text_time_embedding=True, scale_shift_norm=True)
  assert model.uses_text
  params = init_params(model, jax.random.key(0), X_SHAPE, TEXT_SHAPE)
  assert params['text_embed_0']['kernel'].shape == (TEXT_SHAPE[1], 4 * TINY['base_channels'])
  assert params['input_blocks_1']['emb_dense']['kernel'].shape[-1] == 2 * TINY['base_channels']
  assert not any(k.endswith('_attn') for k in params)
  specs = param_logical_axes(model, X_SHAPE, TEXT_SHAPE)
  for name in ('text_embed_0', 'text_embed_2'):
    assert all(len(spec) == params[name][leaf].ndim
               and all(a in layers.PARAM_AXIS_NAMES for a in spec)
               for leaf, spec in specs[name].items())
  apply = jax.jit(lambda p, x, t, e, m: model.apply({'params': p}, x, t, e, m))
  params = _perturbed(params)
  x, t, text, mask = _inputs()
  y = apply(params, x, t, text, mask)
  assert float(jnp.max(jnp.abs(y - apply(params, x, t, text + 1.0, mask)))) > 1e-3
  # The pool averages the valid tokens only.
  changed = text.at[1, 3:].set(100.0)
  np.testing.assert_allclose(y, apply(params, x, t, changed, mask), atol=1e-5)
  with pytest.raises(UNetConfigError, match='text_time_embedding=True'):
    model.apply({'params': params}, x, t)
