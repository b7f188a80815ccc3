"""wdm-3d's U-Net in PyTorch, and `--what=vs_torch`: its train step here and in torch.

The torch transcription of wdm-3d's `guided_diffusion/unet.py` `UNetModel` (the path its run.sh
takes: dims=3, additive skips, no attention, bottleneck_attention=False, resample_2d=False,
use_scale_shift_norm=False) keeps wdm-3d's module names, so its state-dict keys are the released
checkpoints' keys. It is the oracle of the converter tests (`tests/test_convert_wdm_unet.py`)
and the torch side of the benchmark, so both check and time one network. torch is imported
lazily (`wdm3d_modules`): this module imports without it.

`bench_vs_torch` (`python -m cf3d_jax.benchmark --what=vs_torch`): per image size S (the
wavelet grid is S/2 with 8 subbands), the train step of wdm-3d's run.sh architecture without
text (`vs_torch_arch`: the converter's `WDM_128` at base `--vs_torch_base`, so both sides have
the same parameters) at batch 1:

  jax    the trainer's jitted step (`train.make_train_step`, state donated): Haar DWT of the
         image, DDPM corruption at a uniform timestep, the U-Net with the config's
         `model.conv_impl` ('auto' resolved), MSE on x0 (the objective preset 'wdm'), gradient
         norm and clipping, AdamW (`train.make_optimizer(config.train)`), EMA.
  torch  the same step in torch (same weights: ours are the converted torch init): the Haar
         DWT as a stride-2 conv, the same corruption, MSE, `clip_grad_norm_`, `torch.optim.AdamW`
         (foreach), EMA by `_foreach_lerp_`; `torch.set_num_threads(threads)`, threads = the
         CPUs XLA's CPU backend runs on (`jax_threads`); NCDHW and channels_last_3d. On a GPU
         backend torch runs on CUDA when it can. If torch is not loaded yet and
         OMP_WAIT_POLICY is unset, it is set to PASSIVE first: torch's OpenMP threads otherwise
         spin at every barrier, and on cores shared with other work (2 cores, load ~3) that
         made its 2-thread step at 32³ 16 s instead of 2 s (1 thread: 1.8 s); XLA's pool does
         not suffer so. Set OMP_WAIT_POLICY yourself (e.g. ACTIVE) to time another policy.

(wdm-3d's own loop has no clipping and no per-step EMA; both sides here do the same work.)
Times are medians of `repeats` steps after one warm-up step. Columns: size (image S), grid
(S/2), base, params_jax, params_torch (equal, else an AssertionError), jax_ms, torch_ms
(channels-first), torch_channels_last_ms, ratio (jax_ms / the faster torch layout), conv_impl,
threads, torch_device, torch (version), omp_wait_policy (as torch was loaded, if by this
function), note. A size whose step needs more memory than is free
(`memory.peak_bytes` of the compiled JAX step, ×`TORCH_MEMORY_FACTOR` for torch) is not run:
its row says "skipped: needs ~N GiB".
"""

from __future__ import annotations

import functools
import gc
import math
import os
import sys
import types
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

INSTALL_HINT = 'pip install -c constraints.txt torch==2.13.0'
# The memory check assumes torch's step needs this multiple of the compiled JAX step's peak (a
# margin: at base 64, 64³ images, torch's step added 1.8 GiB of RSS where XLA's peak was 2.0 GiB).
TORCH_MEMORY_FACTOR = 2.0


def import_torch() -> Any:
  """The torch module, or ImportError with the install command of the test extras."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'--what=vs_torch and the wdm-3d torch transcription need PyTorch ({e}); '
                      f'install the test extras: `{INSTALL_HINT}`') from e
  return torch


# ---------------------------------------------------------------------------------------------
# wdm-3d's U-Net in torch (guided_diffusion/unet.py, the modules its run.sh builds)

@functools.lru_cache(maxsize=None)
def wdm3d_modules() -> types.SimpleNamespace:
  """The torch classes and functions: GroupNorm32, zero_module, timestep_embedding, Upsample,
  Downsample, ResBlock, TimestepEmbedSequential, UNetModel (NCDHW)."""
  torch = import_torch()
  tnn, F = torch.nn, torch.nn.functional

  class GroupNorm32(tnn.GroupNorm):
    def forward(self, x):
      return super().forward(x.float()).type(x.dtype)

  def zero_module(module):
    for p in module.parameters():
      p.detach().zero_()
    return module

  def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

  class Upsample(tnn.Module):
    def __init__(self, channels, use_conv):
      super().__init__()
      self.use_conv = use_conv
      if use_conv:
        self.conv = tnn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x):
      x = F.interpolate(x, scale_factor=2, mode='nearest')
      return self.conv(x) if self.use_conv else x

  class Downsample(tnn.Module):
    def __init__(self, channels, use_conv):
      super().__init__()
      self.op = (tnn.Conv3d(channels, channels, 3, stride=2, padding=1) if use_conv
                 else tnn.AvgPool3d(kernel_size=2, stride=2))

    def forward(self, x):
      return self.op(x)

  class ResBlock(tnn.Module):
    def __init__(self, channels, emb_channels, out_channels=None, up=False, down=False,
                 num_groups=32):
      super().__init__()
      out = out_channels or channels
      self.in_layers = tnn.Sequential(GroupNorm32(num_groups, channels), tnn.SiLU(),
                                      tnn.Conv3d(channels, out, 3, padding=1))
      self.updown = up or down
      if up:
        self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
      elif down:
        self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
      else:
        self.h_upd = self.x_upd = tnn.Identity()
      self.emb_layers = tnn.Sequential(tnn.SiLU(), tnn.Linear(emb_channels, out))
      self.out_layers = tnn.Sequential(GroupNorm32(num_groups, out), tnn.SiLU(),
                                       tnn.Dropout(0.0),
                                       zero_module(tnn.Conv3d(out, out, 3, padding=1)))
      self.skip_connection = (tnn.Identity() if out == channels
                              else tnn.Conv3d(channels, out, 1))

    def forward(self, x, emb):
      if self.updown:
        in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
        h = in_conv(self.h_upd(in_rest(x)))
        x = self.x_upd(x)
      else:
        h = self.in_layers(x)
      h = h + self.emb_layers(emb).type(h.dtype)[..., None, None, None]
      return self.skip_connection(x) + self.out_layers(h)

  class TimestepEmbedSequential(tnn.Sequential):
    def forward(self, x, emb):
      for layer in self:
        x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
      return x

  class UNetModel(tnn.Module):
    """wdm-3d UNetModel(dims=3, additive_skips=True, attention_resolutions=(),
    bottleneck_attention=False, resample_2d=False, use_scale_shift_norm=False)."""

    def __init__(self, in_channels=8, model_channels=64, out_channels=8, num_res_blocks=2,
                 channel_mult=(1, 2, 2, 4, 4), num_groups=32, resblock_updown=True):
      super().__init__()
      self.model_channels = model_channels
      emb_dim = model_channels * 4
      kw = dict(num_groups=num_groups)
      self.time_embed = tnn.Sequential(tnn.Linear(model_channels, emb_dim), tnn.SiLU(),
                                       tnn.Linear(emb_dim, emb_dim))
      self.input_blocks = tnn.ModuleList([TimestepEmbedSequential(
          tnn.Conv3d(in_channels, model_channels, 3, padding=1))])
      chans, ch = [model_channels], model_channels
      for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
          self.input_blocks.append(TimestepEmbedSequential(
              ResBlock(ch, emb_dim, mult * model_channels, **kw)))
          ch = mult * model_channels
          chans.append(ch)
        if level != len(channel_mult) - 1:
          self.input_blocks.append(TimestepEmbedSequential(
              ResBlock(ch, emb_dim, ch, down=True, **kw) if resblock_updown
              else Downsample(ch, True)))
          chans.append(ch)
      self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim, **kw),
                                                  ResBlock(ch, emb_dim, **kw))
      self.output_blocks = tnn.ModuleList([])
      for level, mult in list(enumerate(channel_mult))[::-1]:
        for i in range(num_res_blocks + 1):
          chans.pop()
          mid_ch = chans[-1] if chans else model_channels
          layers = [ResBlock(ch, emb_dim, mid_ch, **kw)]
          ch = mid_ch
          if level and i == num_res_blocks:
            layers.append(ResBlock(mid_ch, emb_dim, mid_ch, up=True, **kw) if resblock_updown
                          else Upsample(mid_ch, True))
          self.output_blocks.append(TimestepEmbedSequential(*layers))
      self.out = tnn.Sequential(GroupNorm32(num_groups, ch), tnn.SiLU(),
                                zero_module(tnn.Conv3d(model_channels, out_channels, 3,
                                                       padding=1)))

    def forward(self, x, timesteps):
      """x `[N, C, D, H, W]`, timesteps `[N]` → `[N, out_channels, D, H, W]`."""
      emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
      hs, h = [], x
      for module in self.input_blocks:
        h = module(h, emb)
        hs.append(h)
      h = self.middle_block(h, emb)
      for module in self.output_blocks:
        h = module((h + hs.pop()) / 2, emb)
      return self.out(h)

  return types.SimpleNamespace(
      GroupNorm32=GroupNorm32, zero_module=zero_module, timestep_embedding=timestep_embedding,
      Upsample=Upsample, Downsample=Downsample, ResBlock=ResBlock,
      TimestepEmbedSequential=TimestepEmbedSequential, UNetModel=UNetModel)


def torch_unet(config: Mapping[str, Any]) -> Any:
  """wdm-3d's `UNetModel` for a converter model dict (`wdm_unet.WDM_128` keys; missing ones
  take its values; attention keys are ignored: wdm-3d's run.sh has none)."""
  from cf3d_jax.convert.wdm_unet import WDM_128
  c = {**WDM_128, **config}
  return wdm3d_modules().UNetModel(
      c['in_channels'], c['base_channels'], c['out_channels'], c['num_res_blocks'],
      tuple(c['channel_mult']), c['num_groups'], bool(c['resblock_updown']))


def randomised(model: Any) -> Any:
  """`model` with random weights (in place; eval mode): norms and biases off 1 / 0, the
  zero-initialised convs non-zero, so every layer shows in the output."""
  torch = import_torch()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_((1.0 if 'layers.0.weight' in name or name == 'out.0.weight' else 0.0)
                + 0.2 * torch.randn_like(p))
      elif 'out_layers.3' in name or name.startswith('out.2'):
        p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
  return model.eval()


def torch_haar_kernel() -> np.ndarray:
  """`[8, 1, 2, 2, 2]` float32: the orthonormal Haar DWT as a stride-2 conv, subbands in
  `cf3d_jax.wavelets` order (LLL … HHH, the first letter filters D)."""
  low, high = np.array([1.0, 1.0]) / math.sqrt(2), np.array([1.0, -1.0]) / math.sqrt(2)
  bands = [np.einsum('i,j,k->ijk', *[(low, high)[(s >> bit) & 1] for bit in (2, 1, 0)])
           for s in range(8)]
  return np.stack(bands)[:, None].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The benchmark

def vs_torch_arch(base_channels: int = 64) -> dict[str, Any]:
  """wdm-3d's run.sh U-Net (the converter's `WDM_128`, no text) at `base_channels`, with
  GroupNorm groups gcd(32, base) (32 at wdm-3d's 64)."""
  from cf3d_jax.convert.wdm_unet import WDM_128
  return dict(WDM_128, base_channels=int(base_channels),
              num_groups=math.gcd(32, int(base_channels)))


def jax_unet(arch: Mapping[str, Any], conv_impl: str) -> Any:
  """Our `UNet` for the converter model dict `arch` with the conv formulation `conv_impl`."""
  from cf3d_jax.convert import wdm_unet
  return wdm_unet.build_model({**arch, 'conv_impl': conv_impl})


def jax_threads() -> int:
  """Threads XLA's CPU backend computes on: the CPUs this process may run on (its intra-op
  pool is sized by the schedulable CPUs)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def available_bytes() -> int | None:
  """Memory free for one more step: the accelerator's limit minus its use, else the host's
  MemAvailable (capped by a cgroup v2 limit); None if unknown."""
  if jax.default_backend() != 'cpu':
    stats = jax.devices()[0].memory_stats() or {}
    if 'bytes_limit' in stats:
      return int(stats['bytes_limit'] - stats.get('bytes_in_use', 0))
  free = None
  try:
    with open('/proc/meminfo') as f:
      free = next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    with open('/sys/fs/cgroup/memory.max') as f, open('/sys/fs/cgroup/memory.current') as g:
      limit = f.read().strip()
      if limit != 'max':
        free = min(free, int(limit) - int(g.read()))
  except (OSError, StopIteration, ValueError):
    pass
  return free


def _run_config(config, size: int, conv_impl: str):
  """A copy of `config` for the step at image size³: wavelet space, objective preset 'wdm'
  (x0, MSE), batch 1, `conv_impl` (`config` is unchanged)."""
  from cf3d_jax.config_base import apply_objective_preset
  run = config.copy_and_resolve_references()
  with run.unlocked():
    apply_objective_preset(run, 'wdm')
    run.space.name = 'wavelet'
    run.data.shape = (size, size, size)
    run.train.batch_size = 1
    run.model.conv_impl = conv_impl
  return run


def _jax_step(run, arch: Mapping[str, Any], params: Any):
  """(compiled step, its arguments as a mutable list [state, batch, key], the number of
  params, objective): the trainer's step from `params` (converted torch weights) on a random
  image `[1, S, S, S, 1]`."""
  from cf3d_jax import checkpoints, train
  from cf3d_jax.models import unet as unet_lib
  model = jax_unet(arch, run.model.conv_impl)
  _, objective, space = checkpoints.build_components(run)
  tx = train.make_optimizer(run.train)
  params = jax.tree.map(jnp.asarray, params)
  state = {'params': params, 'ema': jax.tree.map(jnp.copy, params),
           'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}
  shape = tuple(run.data.shape)
  volume = jax.random.uniform(jax.random.key(2), (1,) + space.record_shape(shape), jnp.float32,
                              -1.0, 1.0)
  batch = {'volume': volume, 'text_emb': jnp.zeros((1, 1, 1), jnp.float32),
           'text_mask': jnp.ones((1, 1), bool)}   # ignored: the model has no text
  key = jax.random.key(1)
  compiled = train.make_train_step(model, tx, objective, space, run).lower(
      state, batch, key).compile()
  return compiled, [state, batch, key], unet_lib.count_params(params), objective


def _torch_step(torch, arch: Mapping[str, Any], state_dict: Any, run, alpha_bar: np.ndarray,
                channels_last: bool, device: str):
  """`step()`: one torch train step (module docstring) of `torch_unet(arch)` from
  `state_dict`, on a random image `[1, 1, S, S, S]` (NCDHW)."""
  model = torch_unet(arch)
  model.load_state_dict(state_dict)
  model = model.to(device).train()
  fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  params = list(model.parameters())
  ema = [p.detach().clone() for p in params]
  opt = torch.optim.AdamW(params, lr=float(run.train.learning_rate),
                          weight_decay=float(run.train.weight_decay), foreach=True)
  clip = float(run.train.grad_clip_norm) if run.train.grad_clip_norm > 0 else math.inf
  decay = float(run.train.ema_decay)
  haar = torch.from_numpy(torch_haar_kernel()).to(device)
  scale = torch.ones(8, device=device)
  scale[0] = 1.0 / float(run.space.lll_scale)
  ab = torch.from_numpy(np.asarray(alpha_bar, np.float32)).to(device)
  size = int(run.data.shape[0])
  volume = (torch.rand(1, 1, size, size, size, device=device) * 2 - 1).to(memory_format=fmt)
  sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)

  def step():
    opt.zero_grad(set_to_none=True)
    z0 = torch.nn.functional.conv3d(volume, haar, stride=2) * scale[:, None, None, None]
    t = torch.randint(0, len(ab), (1,), device=device)
    a = ab[t].view(-1, 1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * torch.randn_like(z0)
    loss = torch.nn.functional.mse_loss(model(z_t, t.float()), z0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - decay)
    sync()

  return step


def bench_vs_torch(config, repeats: int, sizes: Sequence[int] = (32, 64),
                   base_channels: int = 64, arch: Mapping[str, Any] | None = None,
                   threads: int = 0, channels_last: bool = True) -> list[dict]:
  """One row per image size in `sizes` (module docstring). `arch`: a converter model dict
  (default `vs_torch_arch(base_channels)`); threads: torch's (0 = `jax_threads()`). The
  config gives `model.conv_impl`, `train` (optimizer, clipping, EMA) and `space.lll_scale`."""
  if 'torch' not in sys.modules:   # libgomp reads it once, when torch loads it
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
  torch = import_torch()
  from cf3d_jax import memory
  from cf3d_jax.benchmark import _sig, time_fn
  from cf3d_jax.convert import wdm_unet
  from cf3d_jax.errors import ConfigError
  from cf3d_jax.models import layers
  arch = dict(arch or vs_torch_arch(base_channels))
  impl = layers.resolve_conv_impl(str(config.model.conv_impl))
  threads = int(threads) or jax_threads()
  device = 'cuda' if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 'cpu'
  factor = 2 ** len(arch['channel_mult'])
  bad = [s for s in sizes if int(s) % factor]
  if bad:
    raise ConfigError(f'vs_torch_sizes {bad}: the image size must be a multiple of {factor} '
                      f'(the wavelet grid halves it, the U-Net halves that '
                      f'{len(arch["channel_mult"]) - 1} times)')
  old_threads = torch.get_num_threads()
  torch.set_num_threads(threads)
  rows = []
  try:
    for size in (int(s) for s in sizes):
      torch.manual_seed(0)
      reference = torch_unet(arch)
      params_torch = sum(p.numel() for p in reference.parameters())
      state_dict = reference.state_dict()
      params = wdm_unet.convert_wdm_unet_state_dict(state_dict, arch,
                                                    source='the torch transcription')
      run = _run_config(config, size, impl)
      compiled, args, params_jax, objective = _jax_step(run, arch, params)
      del params
      if params_jax != params_torch:
        raise AssertionError(f'vs_torch: {params_jax} JAX params, {params_torch} torch params')
      row = {'bench': 'vs_torch', 'size': size, 'grid': size // 2,
             'base': arch['base_channels'], 'params_jax': params_jax,
             'params_torch': params_torch, 'jax_ms': None, 'torch_ms': None,
             'torch_channels_last_ms': None, 'ratio': None, 'conv_impl': impl,
             'threads': threads, 'torch_device': device, 'torch': torch.__version__,
             'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY', 'default'), 'note': ''}
      rows.append(row)
      free = available_bytes()
      need = memory.peak_bytes(compiled) * TORCH_MEMORY_FACTOR
      if free is not None and need > 0.9 * free:
        row['note'] = (f'skipped: needs ~{need / 2 ** 30:.2g} GiB, '
                       f'{free / 2 ** 30:.2g} GiB available')
        print(f'vs_torch: {row}', flush=True)
        continue

      def run_jax(compiled=compiled, args=args):
        args[0], metrics = compiled(*args)
        return args[0], metrics

      jax_s = time_fn(run_jax, repeats)[1]
      del compiled, args, run_jax
      gc.collect()
      torch_s = {}
      for cl in (False, True) if channels_last else (False,):
        step = _torch_step(torch, arch, state_dict, run, objective.alpha_bar, cl, device)
        torch_s[cl] = time_fn(step, repeats)[1]
        del step
        gc.collect()
      row.update(jax_ms=_sig(jax_s * 1e3), torch_ms=_sig(torch_s[False] * 1e3),
                 ratio=_sig(jax_s / min(torch_s.values()), 3))
      if True in torch_s:
        row['torch_channels_last_ms'] = _sig(torch_s[True] * 1e3)
      print(f'vs_torch: {row}', flush=True)
  finally:
    torch.set_num_threads(old_threads)
  return rows
