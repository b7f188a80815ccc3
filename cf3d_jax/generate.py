"""Generation: samplers and inverters of a restored generator, and the one pad-and-batch loop.

`generate(gen, noise_ids, emb, mask, scales, ...)` is noise ids × prompts × guidance scales →
volumes, what `--mode=sample`, `--mode=evaluate` and the notebook decode with; `batched` is the
loop under it (and under the inversions of given scans): fixed-size batches, the last padded
by repetition, so every sampler call has one compiled shape.

Randomness: subject k's starting noise is `normal(fold_in(key(seed + SAMPLE_STREAM), k))`
(`subject_noise`), the same for every prompt and scale; the sampler's own draws (ancestral
samplers) come from the key the caller gives, folded with each batch's first item.
Volumes are `[N, D, H, W, 1]` in [-1, 1] (NDHWC).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cf3d_jax import parallel
from cf3d_jax.background import background_of, regularize_background
from cf3d_jax.checkpoints import Generator
from cf3d_jax.errors import ConfigError
from cf3d_jax.objectives import Objective
from cf3d_jax.objectives.guidance import edit_friendly_inversion, guided, invert_loop, sample_loop
from cf3d_jax.spaces import Space, placed

SAMPLE_STREAM = 1_000_003  # offsets the sampling key from the training key


def subject_noise(seed: int, k: int, shape: Sequence[int]) -> jax.Array:
  """The fixed starting noise of subject k, `shape` = latent shape without batch."""
  key = jax.random.fold_in(jax.random.key(seed + SAMPLE_STREAM), k)
  return jax.random.normal(key, tuple(shape), jnp.float32)


def _on_mesh(jitted, space: Space, mesh, rules):
  """`call(params, batch, rest=())` → `jitted(params, space_params, *batch, *rest)`. With `mesh`:
  the host `batch` arrays (every process holds the same whole batch) become global arrays split
  by `parallel.batch_spec`, the space's params and the `rest` arrays are replicated, the call is
  traced with the activation rules, and the result comes back to every process as NumPy."""
  if mesh is None:
    return lambda params, batch, rest=(): jitted(params, space.params, *batch, *rest)
  space_params = parallel.replicate(space.params, mesh)

  def call(params, batch, rest=()):
    on_mesh = parallel.put_batch(dict(enumerate(np.asarray(a) for a in batch)), mesh, rules)
    with parallel.activation_context(mesh, rules):
      out = jitted(params, space_params, *(on_mesh[i] for i in range(len(batch))),
                   *(parallel.replicate(a, mesh) for a in rest))
    return jax.tree.map(parallel.to_host, out)

  return call


def make_sampler(model, objective: Objective, space: Space, scale: float, null_emb, null_mask,
                 deterministic: bool = False, depth: float = 1.0, mesh=None,
                 rules: parallel.Rules = parallel.DEFAULT_RULES,
                 interval: tuple[float, float] = (0.0, 1.0), edit_masks=None,
                 rescale: float = 0.0, trajectory: bool = False,
                 background: tuple[float, int, int] | None = None, residuals: bool = False):
  """jit(params, z_T [B,...], emb [B,L,E], mask [B,L], key) → images `[B, D, H, W, 1]` in [-1, 1].

  The callable also takes `neg_emb [B,L,E]` / `neg_mask [B,L]` (keywords): the text each item is
  guided against (contrastive guidance, `guidance_negatives`); absent = the null text
  (`null_emb [L,E]`, `null_mask [L]`) for every item, the paper's classifier-free guidance.

  deterministic: use the objective's ODE step whatever sampler is configured (after inversion).
  interval: the guidance interval (fractions of T, `guidance.guided`); rescale: the guidance
  rescale φ (`guidance.rescale_guided`; 0 = plain guidance).
  edit_masks `(mask_z [1, d, h, w, 1], mask_img [1, D, H, W, 1])` (`edit_masks`): blended
  editing of given scans; the sampler then takes `known` `[B, S', ...]` (the inversion
  trajectory, batch first) and the input images `[B, D, H, W, 1]` after the key, follows the
  inversion outside the mask at every step and returns `mask_img·x + (1 − mask_img)·input`.
  trajectory: return `(images, known [B, S', ...])`, the sampler's state after each step (what a
  counterfactual with `edit_masks` follows outside the mask); not with `edit_masks`.
  background `(threshold, margin, min_island)` (`background.background_of`): each decoded
  volume's background set to −1 (`background.regularize_background`; before the blend with a
  given scan); None = as decoded.
  residuals: decode an edit-friendly inversion (`make_inverter(method='edit_friendly')`): the
  callable then takes `residuals` `[B, S', ...]` (keyword, batch first), and every step is the
  stochastic update's mean plus the item's residual (`guidance.sample_loop`).
  The space's own arrays (a VAE's params) are jit arguments, not compiled-in constants.
  mesh: sample on a device mesh (`parallel`): `params` as restored onto it (FSDP by the rules),
  z / emb / mask host arrays split over the batch axes (B divisible by data × fsdp where
  it splits), the Haar transform block-local on `spatial`; returns NumPy on every process.
  """
  if trajectory and edit_masks is not None:
    raise ValueError("make_sampler: trajectory=True records a free run; not with edit_masks")
  sp_placed = placed(space, mesh, rules)

  def finish(x):
    x = jnp.clip(x, -1.0, 1.0)
    return x if background is None else regularize_background(x, *background)

  def run(params, space_params, z_start, emb, mask, neg_emb, neg_mask, *rest):
    def model_fn(z, t, e, m):
      return model.apply({"params": params}, z, t, e, m, train=False)
    res = None
    if residuals:
      res, rest = jnp.swapaxes(rest[0], 0, 1), rest[1:]    # [S', B, ...] for the scan
    if edit_masks is None:
      (key_data,), known, mask_z = rest, None, None
    else:
      known, x_input, key_data, mask_z, mask_img = rest
      known = jnp.swapaxes(known, 0, 1)                  # [S', B, ...] for the scan
    key = jax.random.wrap_key_data(key_data)
    sp = sp_placed.with_params(space_params)
    fn = guided(model_fn, scale, neg_emb, neg_mask, interval, objective.num_train_steps, rescale)
    # Images live in [-1, 1]: the last clamp removes the inverse transform's rounding (±1e-7).
    z = sample_loop(objective, fn, z_start, emb, mask, key, sp.clip_x0,
                    deterministic=deterministic, depth=depth, known=known, edit_mask=mask_z,
                    trajectory=trajectory, residuals=res)
    if trajectory:
      return finish(sp.decode(z[0])), jnp.swapaxes(z[1], 0, 1)
    x = finish(sp.decode(z))
    if edit_masks is None:
      return x
    return mask_img * x + (1 - mask_img) * x_input

  call = _on_mesh(jax.jit(run), space, mesh, rules)

  def negatives(emb, neg_emb, neg_mask):
    """The per-item negative text `[B,L,E]`, `[B,L]`: the given one, else the null text."""
    if (neg_emb is None) != (neg_mask is None):
      raise ValueError("give both neg_emb and neg_mask, or neither")
    if neg_emb is None:
      b = np.shape(emb)[0]
      neg_emb = np.broadcast_to(np.asarray(null_emb), (b,) + np.shape(null_emb))
      neg_mask = np.broadcast_to(np.asarray(null_mask), (b,) + np.shape(null_mask))
    if np.shape(neg_emb) != np.shape(emb):
      raise ValueError(f"neg_emb has shape {np.shape(neg_emb)}; expected emb's {np.shape(emb)}")
    return neg_emb, neg_mask

  def with_residuals(res):
    if residuals != (res is not None):
      raise ValueError("this sampler was made with residuals=True: give `residuals`" if residuals
                       else "`residuals` given to a sampler made without residuals=True")
    return () if res is None else (res,)

  if edit_masks is None:
    return lambda params, z_start, emb, mask, key, neg_emb=None, neg_mask=None, residuals=None: \
        call(params, (z_start, emb, mask) + negatives(emb, neg_emb, neg_mask)
             + with_residuals(residuals), (_key_data(key),))
  return lambda params, z_start, emb, mask, key, known, x_input, neg_emb=None, neg_mask=None, \
      residuals=None: call(
          params, (z_start, emb, mask) + negatives(emb, neg_emb, neg_mask)
          + with_residuals(residuals) + (known, x_input), (_key_data(key),) + tuple(edit_masks))


GUIDANCE_NEGATIVES = ("null", "factual")


def guidance_negatives(mode: str, emb: np.ndarray, mask: np.ndarray, factual_emb: np.ndarray,
                       factual_mask: np.ndarray, null: tuple[np.ndarray, np.ndarray]
                       ) -> tuple[np.ndarray, np.ndarray]:
  """The text each item is guided against (`config.sample.guidance_negative`): `[B,L,E]`, `[B,L]`.

  emb `[B,L,E]`, mask `[B,L]`: each item's prompt; factual_emb / factual_mask: the same item's
  factual prompt (the first prompt, or a given scan's own); null `([L,E], [L])`.
  'null': every item against the null text (classifier-free guidance, the paper's).
  'factual' (contrastive guidance): every item against its factual prompt A. A counterfactual
  prompt B gives `out = out_A + w (out_B − out_A)`: w scales the difference between the two
  prompts' predictions; the factual item (B = A) is the conditional model `out_A` at every w.
  Factual and counterfactual share the base `out_A`, so the subject outside the region the
  prompts disagree on is kept, and the factual volume is the same across a guidance sweep.
  """
  emb, mask = np.asarray(emb), np.asarray(mask)
  null_e = np.broadcast_to(np.asarray(null[0], emb.dtype), emb.shape)
  null_m = np.broadcast_to(np.asarray(null[1], mask.dtype), mask.shape)
  if mode == "null":
    return null_e, null_m
  if mode != "factual":
    raise ConfigError(f"config.sample.guidance_negative={mode!r}: expected one of "
                      f"{GUIDANCE_NEGATIVES}")
  return np.asarray(factual_emb, emb.dtype), np.asarray(factual_mask, mask.dtype)


def _key_data(key: jax.Array) -> np.ndarray:
  """Raw uint32 data of a (typed or legacy) key: a plain array that can be replicated."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.asarray(key)


INVERSIONS = ("ddim", "edit_friendly")


def make_inverter(model, objective: Objective, space: Space, refine_iters: int,
                  depth: float = 1.0, mesh=None, rules: parallel.Rules = parallel.DEFAULT_RULES,
                  trajectory: bool = False, method: str = "ddim"):
  """jit(params, images [B, D, H, W, 1], emb [B,L,E], mask [B,L], keys=None) → z_T `[B, ...]`.

  The conditional model (no guidance) drives the inversion. mesh: as `make_sampler`.
  method (`config.sample.inversion`): 'ddim' = deterministic DDIM inversion with
  `refine_iters` fixed-point refinements (`guidance.invert_loop`); trajectory: return
  `(z_T, known [B, S', ...])`, the states blended editing follows. 'edit_friendly' =
  `guidance.edit_friendly_inversion` (DDPM only; needs `keys` `[B]`, each item's draw of its
  noisy copies, independent of the batch it falls in):
  returns `(z_T, known [B, S', ...], residuals [B, S', ...])` whatever `trajectory` says; decode
  with `make_sampler(..., residuals=True)`.
  """
  if method not in INVERSIONS:
    raise ConfigError(f"config.sample.inversion={method!r}: expected one of {INVERSIONS}")
  if method == "edit_friendly" and not hasattr(objective, "stochastic_mean"):
    raise ConfigError("config.sample.inversion='edit_friendly' needs a DDPM objective (a "
                      f"stochastic step to invert); this config's is {type(objective).__name__}")
  sp_placed = placed(space, mesh, rules)
  batch_first = lambda a: jnp.swapaxes(a, 0, 1)

  def run(params, space_params, x, emb, mask, *key_data):   # key_data: ([B, 2] uint32,) or ()
    def model_fn(z, t, e, m):
      return model.apply({"params": params}, z, t, e, m, train=False)
    sp = sp_placed.with_params(space_params)
    z0 = sp.encode(x)
    if method == "edit_friendly":
      z, known, res = edit_friendly_inversion(objective, model_fn, z0, emb, mask,
                                              jax.random.wrap_key_data(key_data[0]), sp.clip_x0,
                                              depth)
      return z, batch_first(known), batch_first(res)
    out = invert_loop(objective, model_fn, z0, emb, mask, refine_iters, depth, trajectory)
    return (out[0], batch_first(out[1])) if trajectory else out

  call = _on_mesh(jax.jit(run), space, mesh, rules)

  def invert(params, x, emb, mask, keys=None):
    if (method == "edit_friendly") != (keys is not None):
      raise ValueError("edit-friendly inversion needs `keys` (one per item); DDIM inversion "
                       "takes none")
    return call(params, (x, emb, mask) + (() if keys is None else (_key_data(keys),)))

  return invert


def sampling_kwargs(config) -> dict:
  """The `make_sampler` / `sampler_on_mesh` keywords every guided decode of `config` shares:
  the guidance interval and rescale and the background regularization."""
  return {"interval": tuple(float(v) for v in config.sample.guidance_interval),
          "rescale": float(config.sample.guidance_rescale), "background": background_of(config)}


def mesh_kwargs(gen: Generator, batch_size: int, key: str) -> dict:
  """`make_sampler` / `make_inverter` keywords for the generator's mesh; ConfigError naming
  `key` if `batch_size` does not split over its data axis."""
  parallel.check_batch_divisible(batch_size, gen.mesh, key)
  return {"mesh": gen.mesh, "rules": gen.rules}


def sampler_on_mesh(gen: Generator, batch_size: int, key: str,
                    interval: Sequence[float] = (0.0, 1.0),
                    rescale: float = 0.0, background: tuple[float, int, int] | None = None
                    ) -> Callable[..., Callable]:
  """(scale, **kw) → `make_sampler` of `gen` at that guidance scale on its mesh, guided within
  `interval` with guidance rescale φ = `rescale` and `background` regularization (kw:
  `trajectory`, `edit_masks`), made once per
  (scale, trajectory, edit_masks object) and reused; ConfigError
  naming `key` (e.g. 'sample.batch_size') if `batch_size` does not split over the mesh."""
  on_mesh = mesh_kwargs(gen, batch_size, key)
  made: dict[tuple, Callable] = {}

  def sampler_for(scale, **kw):
    # One sampler (and so one compile) per scale and kind, however often it is asked for: the
    # calibrated set decodes at scales the plain sets already compiled.
    key_ = (float(scale), bool(kw.get("trajectory", False)), id(kw.get("edit_masks")))
    unknown = sorted(set(kw) - {"trajectory", "edit_masks"})
    if unknown:
      raise TypeError(f"sampler_for: unexpected keywords {unknown}")
    if key_ not in made:   # the masks are kept with their sampler, so their id stays theirs
      made[key_] = (make_sampler(gen.model, gen.objective, gen.space, float(scale), *gen.null,
                                 interval=tuple(interval), rescale=float(rescale),
                                 background=background, **kw,
                                 **on_mesh), kw.get("edit_masks"))
    return made[key_][0]

  return sampler_for


def batched(fn: Callable, n: int, batch_size: int, *arrays, desc: str | None = None):
  """The one pad-and-batch loop: `fn(start, *[a[idx] for a in arrays])` for each batch
  `idx = start, …, start + batch_size − 1` of `range(n)`, the last padded by repeating its last
  index (one compiled shape for every call). Returns the outputs' real rows concatenated
  `[n, ...]` as NumPy (each array of a tuple output alike). desc: a progress bar (process 0)."""
  from tqdm import tqdm
  outs = []
  for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch",
                    disable=desc is None or jax.process_index() > 0):
    count = min(batch_size, n - start)
    idx = np.arange(start, start + count)
    idx = np.concatenate([idx, np.full(batch_size - count, idx[-1])])
    out = fn(start, *[a[idx] for a in arrays])
    outs.append(jax.tree.map(lambda a: np.asarray(a)[:count], out))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


def generate(gen: Generator, noise_ids: Sequence[int], emb: np.ndarray, mask: np.ndarray,
             scales: Sequence[float], *, noise_seed: int, key: jax.Array, batch_size: int,
             negative: str, sampler_for: Callable[..., Callable],
             per_batch_keys: bool = True, desc: str | None = None, edit_masks=None
             ) -> Iterator[tuple[float, np.ndarray]]:
  """Noise ids × prompts × guidance scales → volumes, one scale at a time.

  For each scale w of `scales` yields (w, volumes `[K, P, D, H, W, 1]`): the noise
  `subject_noise(noise_seed, k, gen.latent_shape)` of each k of `noise_ids` (K) decoded under
  each prompt (`emb [P, L, E]`, `mask [P, L]`; prompt 0 is the factual) by `sampler_for(w)` (a
  `make_sampler` callable, e.g. `sampler_on_mesh`), with `gen.params`, each item guided against
  the text `negative` names (`guidance_negatives`: the null text, or 'factual' = prompt 0).
  Items run k-major in batches of `batch_size` (`batched`); the batch starting at item i
  samples with key `fold_in(key, i)`, or with `key` itself when `per_batch_keys` is False.
  desc: a progress-bar label, shown as '{desc} w={w}'.

  edit_masks `(mask_z, mask_img)` (`invert.edit_masks`): counterfactuals that may change only
  the mask. Each noise is first decoded under the factual prompt, recording the sampler's state
  after every step (`sampler_for(w, trajectory=True)`); every other prompt then follows that
  trajectory outside the mask at every step (`sampler_for(w, edit_masks=...)`, blended
  editing with the factual run as the given scan) and equals the factual volume there. The
  factual items run in their own batches (keys `fold_in(key, i)`, i over the K factual items),
  then the counterfactual ones (keys `fold_in(key, K + i)`).
  """
  emb, mask = np.asarray(emb), np.asarray(mask)
  n_prompts = len(emb)
  prompts = np.arange(n_prompts) if edit_masks is None else np.arange(1, n_prompts)
  ks = np.repeat(np.asarray(noise_ids, np.int64), len(prompts))
  ps = np.tile(prompts, len(noise_ids))
  decode = functools.partial(_decode, gen, emb=emb, mask=mask, noise_seed=noise_seed, key=key,
                             batch_size=batch_size, negative=negative,
                             per_batch_keys=per_batch_keys)
  for scale in scales:
    label = None if desc is None else f"{desc} w={scale:g}"
    if edit_masks is None:
      x = decode(sampler_for(float(scale)), ks, ps, desc=label)
      yield float(scale), x.reshape((len(noise_ids), n_prompts) + x.shape[1:])
      continue
    k_fact = np.asarray(noise_ids, np.int64)
    factual, known = decode(sampler_for(float(scale), trajectory=True), k_fact,
                            np.zeros_like(k_fact), desc=label)
    row = np.repeat(np.arange(len(k_fact)), len(prompts))   # each item's factual run
    x = decode(sampler_for(float(scale), edit_masks=edit_masks), ks, ps, desc=label,
               key_offset=len(k_fact), follow=(known[row], factual[row]))
    x = np.concatenate([factual[:, None], x.reshape((len(k_fact), len(prompts)) + x.shape[1:])],
                       axis=1)
    yield float(scale), x


def _decode(gen: Generator, run: Callable, ks: np.ndarray, ps: np.ndarray, *, emb: np.ndarray,
            mask: np.ndarray, noise_seed: int, key: jax.Array, batch_size: int, negative: str,
            per_batch_keys: bool, desc: str | None, key_offset: int = 0, follow=None):
  """Items (noise id `ks[i]`, prompt `ps[i]`) decoded by the sampler `run` in batches (see
  `generate`); follow `(known [N, S', ...], factual images [N, D, H, W, 1])`: what each item
  follows outside the edit mask. Returns what `run` returns, rows concatenated."""
  z_shape = gen.latent_shape

  def one_batch(start, k_batch, p_batch, *follow_batch):
    z = jnp.stack([subject_noise(noise_seed, int(k), z_shape) for k in k_batch])
    first = np.zeros_like(p_batch)
    neg = guidance_negatives(negative, emb[p_batch], mask[p_batch], emb[first], mask[first],
                             gen.null)
    batch_key = jax.random.fold_in(key, key_offset + start) if per_batch_keys else key
    return run(gen.params, z, emb[p_batch], mask[p_batch], batch_key, *follow_batch, *neg)

  return batched(one_batch, len(ks), batch_size, ks, ps, *(follow or ()), desc=desc)
