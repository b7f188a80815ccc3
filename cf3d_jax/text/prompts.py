"""Prompt templates and the rules that turn clinical variables into prompt classes.

Two datasets are known:

* ``'ms'``: multiple sclerosis, classed by white-matter lesion volume (ml) into
  ``minimal`` [0, 10), ``moderate`` [10, 25) and ``high`` [25, inf).
* ``'adni'``: ADNI, classed by diagnosis into ``CN``, ``MCI`` and ``AD``.

Each class has a tuple of templates. The FIRST template is the canonical prompt, used when
sampling counterfactuals; the others are paraphrases that the data pipeline draws at random in
training so that the model does not memorise one sentence. ``HELDOUT_TEMPLATES`` holds one more
paraphrase per class that training never sees, for evaluating robustness to wording.

This module has no heavy dependencies (no torch, no jax).
"""

from __future__ import annotations

import math
import re
from typing import Mapping

from cf3d_jax.errors import ConfigError, DataError, PromptError

MS_CLASSES = ('minimal', 'moderate', 'high')
ADNI_CLASSES = ('CN', 'MCI', 'AD')
NULL_PROMPT = ''

CLASSES: dict[str, tuple[str, ...]] = {'ms': MS_CLASSES, 'adni': ADNI_CLASSES}
DATASETS = tuple(CLASSES)

# Lesion-volume class bounds in ml: minimal < 10 <= moderate < 25 <= high.
LESION_BOUNDS_ML = (10.0, 25.0)

Templates = Mapping[str, tuple[str, ...]]

DEFAULT_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    'ms': {
        'minimal': (
            'Subject has minimal lesion load.',
            'The brain MRI shows minimal white matter lesion load.',
            'Few or no multiple sclerosis lesions are visible.',
        ),
        'moderate': (
            'Subject has moderate lesion load.',
            'The brain MRI shows moderate white matter lesion load.',
            'A moderate number of multiple sclerosis lesions are visible.',
        ),
        'high': (
            'Subject has high lesion load.',
            'The brain MRI shows high white matter lesion load.',
            'Many multiple sclerosis lesions are visible.',
        ),
    },
    'adni': {
        'CN': (
            'Subject is cognitively normal.',
            'The brain MRI of a cognitively healthy individual.',
            'No signs of cognitive impairment or dementia.',
        ),
        'MCI': (
            'Subject has mild cognitive impairment.',
            'The brain MRI of an individual with mild cognitive impairment.',
            'Early memory decline without dementia.',
        ),
        'AD': (
            "Subject has Alzheimer's disease.",
            "The brain MRI of an individual with Alzheimer's disease.",
            "Dementia due to Alzheimer's disease with brain atrophy.",
        ),
    },
}

HELDOUT_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    'ms': {
        'minimal': ('Brain scan with a low burden of demyelinating lesions.',),
        'moderate': ('Brain scan with an intermediate burden of demyelinating lesions.',),
        'high': ('Brain scan with a heavy burden of demyelinating lesions.',),
    },
    'adni': {
        'CN': ('Brain scan of a healthy elderly control.',),
        'MCI': ('Brain scan of a patient with prodromal memory impairment.',),
        'AD': ("Brain scan of a patient with Alzheimer's dementia.",),
    },
}

# Spelled-out diagnoses accepted by `diagnosis_class`, after `_normalise_label`.
_DIAGNOSIS_SYNONYMS: dict[str, str] = {
    'cn': 'CN',
    'nc': 'CN',
    'hc': 'CN',
    'normal': 'CN',
    'control': 'CN',
    'healthy': 'CN',
    'healthy control': 'CN',
    'cognitively normal': 'CN',
    'normal control': 'CN',
    'mci': 'MCI',
    'emci': 'MCI',
    'lmci': 'MCI',
    'mild cognitive impairment': 'MCI',
    'early mci': 'MCI',
    'late mci': 'MCI',
    'ad': 'AD',
    'dementia': 'AD',
    'alzheimer': 'AD',
    "alzheimer's": 'AD',
    'alzheimers': 'AD',
    "alzheimer's disease": 'AD',
    'alzheimers disease': 'AD',
    "alzheimer's dementia": 'AD',
}


def _check_dataset(dataset: str) -> None:
  """Raises ConfigError unless `dataset` is one of DATASETS."""
  if dataset not in CLASSES:
    raise ConfigError(f'unknown dataset {dataset!r}; expected one of {list(DATASETS)}')


def lesion_class(volume_ml: float) -> str:
  """Maps a lesion volume in ml to 'minimal' [0, 10), 'moderate' [10, 25) or 'high' [25, inf).

  Raises:
    DataError: the volume is not a number, NaN, infinite or negative.
  """
  try:
    value = float(volume_ml)
  except (TypeError, ValueError):
    raise DataError(f'lesion volume {volume_ml!r} is not a number (expected ml >= 0)') from None
  if not math.isfinite(value) or value < 0:
    raise DataError(f'lesion volume {volume_ml!r} ml is invalid (expected a finite value >= 0)')
  low, high = LESION_BOUNDS_ML
  if value < low:
    return 'minimal'
  if value < high:
    return 'moderate'
  return 'high'


def _normalise_label(text: str) -> str:
  """Lower-cases, unifies apostrophes and separators, collapses whitespace."""
  text = text.replace('\u2019', "'").replace('_', ' ').replace('-', ' ')
  return re.sub(r'\s+', ' ', text.strip().lower())


def diagnosis_class(text: str) -> str:
  """Maps a diagnosis ('CN', 'mci', 'Dementia', "Alzheimer's disease", ...) to CN, MCI or AD.

  Raises:
    PromptError: the diagnosis is not recognised; the message names it and the allowed values.
  """
  key = _normalise_label(text) if isinstance(text, str) else None
  if key not in _DIAGNOSIS_SYNONYMS:
    raise PromptError(
        f'unknown diagnosis {text!r}; expected one of {list(ADNI_CLASSES)} (any case) or '
        f'{sorted(_DIAGNOSIS_SYNONYMS)}')
  return _DIAGNOSIS_SYNONYMS[key]


def class_templates(dataset: str, templates: Templates | None = None) -> dict[str, tuple[str, ...]]:
  """Returns {class: templates} for `dataset`, checked to cover every class.

  Args:
    dataset: 'ms' or 'adni'.
    templates: overrides DEFAULT_TEMPLATES[dataset]; must give each class >= 1 string.
  """
  _check_dataset(dataset)
  templates = DEFAULT_TEMPLATES[dataset] if templates is None else templates
  out = {}
  for cls in CLASSES[dataset]:
    entries = templates.get(cls)
    if isinstance(entries, str):
      entries = (entries,)
    if not entries or not all(isinstance(t, str) for t in entries):
      raise ConfigError(
          f'templates for dataset {dataset!r} class {cls!r} must be a non-empty sequence of '
          f'strings, got {entries!r}')
    out[cls] = tuple(entries)
  extra = sorted(set(templates) - set(CLASSES[dataset]))
  if extra:
    raise ConfigError(
        f'templates for dataset {dataset!r} name unknown classes {extra}; '
        f'expected {list(CLASSES[dataset])}')
  return out


def canonical_prompt(dataset: str, cls: str, templates: Templates | None = None) -> str:
  """The first template of `cls`: the prompt used for sampling."""
  table = class_templates(dataset, templates)
  if cls not in table:
    raise PromptError(f'unknown class {cls!r} for dataset {dataset!r}; expected {list(table)}')
  return table[cls][0]


def prompts_for(dataset: str, templates: Templates | None = None,
                include_heldout: bool = False) -> list[str]:
  """Every prompt an embedding table for `dataset` needs, deduplicated in a stable order.

  The order is: NULL_PROMPT, then each class (in CLASSES order) with its templates in order,
  then (if `include_heldout`) the HELDOUT_TEMPLATES of each class.
  """
  groups = [(NULL_PROMPT,)] + list(class_templates(dataset, templates).values())
  if include_heldout:
    groups += list(class_templates(dataset, HELDOUT_TEMPLATES[dataset]).values())
  return list(dict.fromkeys(p for group in groups for p in group))


def prompt_class(dataset: str, prompt: str) -> int | None:
  """Class index (in ``CLASSES[dataset]`` order) of a prompt that is one of the dataset's
  training or held-out templates, or None if it names no class."""
  _check_dataset(dataset)
  for templates in (None, HELDOUT_TEMPLATES.get(dataset)):
    table = class_templates(dataset, templates)
    for i, cls in enumerate(CLASSES[dataset]):
      if prompt in table[cls]:
        return i
  return None
