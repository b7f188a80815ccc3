"""Notebook session, part 3: counterfactual volumes of one subject under several prompts.

`generate(gen, prompt_set, GUIDANCE, SEED)` decodes one fixed noise (`generate.subject_noise`)
under every prompt (`cf3d_jax.generate.generate`, no second implementation here), so a notebook
counterfactual of subject k at seed s equals the CLI's `samples/g{w}/subject_k` volume for the
same prompt, checkpoint and config (up to float rounding across batch sizes). `invert_scan`
makes counterfactuals of a given scan (inversion, as `config.sample.source` does:
`cf3d_jax.invert`).
Volumes are float32 `[D, H, W]` in [-1, 1]; stacks of them `[P, D, H, W]`.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from cf3d_jax.errors import PromptError
from cf3d_jax.figures import short_title
from cf3d_jax.notebook.prompts import PromptSet
from cf3d_jax.notebook.session import Generator


@dataclasses.dataclass(frozen=True)
class Counterfactuals:
  """Volumes of one subject under several prompts.

  Attributes:
    volumes: float32 `[P, D, H, W]` in [-1, 1], one per prompt of `prompt_set`.
    prompt_set: the prompts and where their embeddings came from.
    guidance: the classifier-free guidance scale w.
    seed, subject: the noise `generate.subject_noise(seed, subject)` (synthetic subjects).
    step: the checkpoint's training step.
    affine: 4×4 voxel-to-world affine of the data grid.
    source: for an inverted scan, its path; `input` its conformed volume `[D, H, W]`.
  """
  volumes: np.ndarray
  prompt_set: PromptSet
  guidance: float
  seed: int
  subject: int
  step: int
  affine: np.ndarray
  source: str | None = None
  input: np.ndarray | None = None

  @property
  def reference(self) -> np.ndarray:
    """What the differences are taken against: the input scan, else the first prompt's volume."""
    return self.input if self.input is not None else self.volumes[0]


def _guided_against(gen: Generator, prompt_set: PromptSet, factual: PromptSet | None):
  """The text each prompt is guided against (`generate.guidance_negatives` for
  `config.sample.guidance_negative`): `[P, L, E]`, `[P, L]`; 'factual' = `factual` (one prompt),
  else the first prompt."""
  from cf3d_jax.generate import guidance_negatives
  n, ref = len(prompt_set.prompts), factual or prompt_set
  return guidance_negatives(gen.config.sample.guidance_negative, prompt_set.emb, prompt_set.mask,
                            np.repeat(ref.emb[:1], n, 0), np.repeat(ref.mask[:1], n, 0),
                            gen.restored.null)


def _batch_size(gen: Generator, prompt_set: PromptSet, batch_size: int | None) -> int:
  return min(int(batch_size or gen.config.sample.batch_size), len(prompt_set.prompts))


def generate(gen: Generator, prompt_set: PromptSet, guidance: float, seed: int,
             subject: int = 0, batch_size: int | None = None) -> Counterfactuals:
  """Decodes ONE fixed noise (`generate.subject_noise(seed, subject)`) under every prompt at
  guidance scale w: `volumes [P, D, H, W]`. With the deterministic samplers (DDIM η = 0,
  rectified flow: the defaults) a volume depends only on (noise, prompt, w), so the factual
  (first) prompt gives the same volume in every call. Ancestral samplers also draw per-step noise
  from the CLI's key `fold_in(key(seed + SAMPLE_STREAM), 0)`, one draw per batch position: the
  same prompt at the same position (the factual always) gives the same volume."""
  import jax
  from cf3d_jax import generate as generate_lib
  key = jax.random.fold_in(jax.random.key(int(seed) + generate_lib.SAMPLE_STREAM), 0)
  ((_, x),) = generate_lib.generate(
      gen.restored, [int(subject)], prompt_set.emb, prompt_set.mask, [guidance],
      noise_seed=int(seed), key=key, batch_size=_batch_size(gen, prompt_set, batch_size),
      negative=gen.config.sample.guidance_negative, sampler_for=gen.sampler,
      per_batch_keys=False)
  return Counterfactuals(np.asarray(x[0, ..., 0], np.float32), prompt_set, float(guidance),
                         int(seed), int(subject), gen.step, gen.affine)


def invert_scan(gen: Generator, path: str, factual: PromptSet, prompt_set: PromptSet,
                guidance: float, refine_iters: int | None = None,
                depth: float | None = None, method: str | None = None) -> Counterfactuals:
  """Counterfactuals of a given scan (as `config.sample.source` makes them): the scan conformed
  to the training grid (`invert.load_source`), inverted under its factual prompt (one-prompt
  `factual`) by the conditional model, decoded under every prompt at guidance w. method
  (default `config.sample.inversion`): 'ddim' = deterministic inversion, decoded with the
  deterministic sampler; 'edit_friendly' = edit-friendly DDPM inversion (the scan's noise maps
  drawn with `invert.inversion_key(seed, 0)`, as the CLI's first scan), decoded along its
  residuals. Differences are against the input."""
  import jax
  from cf3d_jax.generate import SAMPLE_STREAM, batched
  from cf3d_jax.invert import inversion_key, load_source
  if len(factual.prompts) != 1:
    raise PromptError(f"invert_scan takes one factual prompt, got {list(factual.prompts)}")
  cfg = gen.config.sample
  refine = cfg.inversion_refine if refine_iters is None else refine_iters
  depth = float(cfg.inversion_depth if depth is None else depth)
  method = str(cfg.inversion if method is None else method)
  volume = load_source(path, gen.config, gen.affine)                    # [D, H, W]
  invert = gen.inverter(refine, depth, method)
  params = gen.restored.params
  n = len(prompt_set.prompts)
  res = ()
  if method == "edit_friendly":
    keys = jax.random.key_data(inversion_key(int(gen.config.seed), 0))[None]
    z_t, _, r = invert(params, volume[None, ..., None], factual.emb, factual.mask, keys)
    res = (np.broadcast_to(np.asarray(r)[0], (n,) + np.shape(r)[1:]),)
  else:
    z_t = invert(params, volume[None, ..., None], factual.emb, factual.mask)
  z_t = np.asarray(z_t)
  zs = np.broadcast_to(z_t[0], (n,) + z_t.shape[1:])
  key = jax.random.key(int(gen.config.seed) + SAMPLE_STREAM)
  run = gen.sampler(guidance, deterministic=True, depth=depth, residuals=bool(res))
  x = batched(lambda _, z, e, m, ne, nm, *r: run(params, z, e, m, key, ne, nm,
                                                 **({"residuals": r[0]} if r else {})), n,
              _batch_size(gen, prompt_set, None), zs, prompt_set.emb, prompt_set.mask,
              *_guided_against(gen, prompt_set, factual), *res)
  return Counterfactuals(np.asarray(x[..., 0], np.float32), prompt_set, float(guidance),
                         int(gen.config.seed), 0, gen.step, gen.affine,
                         source=os.path.abspath(path), input=volume)


def difference_maps(volumes: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
  """Differences `[P', D, H, W]`: volumes[1:] − volumes[0] (P' = P − 1), or with `reference`
  `[D, H, W]` given, every volume − reference (P' = P). Positive = brighter than the reference."""
  volumes = np.asarray(volumes, np.float32)
  if volumes.ndim != 4:
    raise ValueError(f"volumes must be [P, D, H, W], got shape {volumes.shape}")
  if reference is None:
    return volumes[1:] - volumes[:1]
  reference = np.asarray(reference, np.float32)
  if reference.shape != volumes.shape[1:]:
    raise ValueError(f"reference shape {reference.shape} != volume shape {volumes.shape[1:]}")
  return volumes - reference[None]


def psnr_to(volumes: np.ndarray, reference: np.ndarray, data_range: float = 2.0) -> np.ndarray:
  """PSNR (dB) of each volume `[P, D, H, W]` against `reference [D, H, W]`: `[P]`."""
  mse = np.mean((np.asarray(volumes) - np.asarray(reference)[None]) ** 2, axis=(1, 2, 3))
  return 10.0 * np.log10(data_range ** 2 / np.maximum(mse, 1e-12))


def panels(cf: Counterfactuals) -> tuple[list[np.ndarray], list[str], list[np.ndarray], list[str]]:
  """(volumes, titles, differences, titles) to show: the input first for an inverted scan;
  differences against the input, else against the first prompt's volume."""
  titles = list(cf.prompt_set.prompts)
  vols = list(cf.volumes)
  if cf.input is not None:
    vols, titles = [cf.input] + vols, ["input"] + titles
    diffs = list(difference_maps(cf.volumes, cf.input))
    dtitles = [f"Δ {short_title(t, 24)} − input" for t in cf.prompt_set.prompts]
  else:
    diffs = list(difference_maps(cf.volumes))
    dtitles = [f"Δ {short_title(t, 24)} − first" for t in titles[1:]]
  return vols, titles, diffs, dtitles
