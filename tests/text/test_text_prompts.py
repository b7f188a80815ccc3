"""Tests for cf3d_jax.text.prompts: class rules, templates and prompt lists."""

import math

import numpy as np
import pytest

from cf3d_jax.errors import ConfigError, DataError, PromptError
from cf3d_jax.text import prompts


@pytest.mark.parametrize('volume,expected', [
    (0.0, 'minimal'), (9.999, 'minimal'), (10.0, 'moderate'), (24.999, 'moderate'),
    (25.0, 'high'), (1e4, 'high'), (np.float32(12.5), 'moderate'), (3, 'minimal'),
])
def test_lesion_class_bounds(volume, expected):
  assert prompts.lesion_class(volume) == expected


@pytest.mark.parametrize('volume', [math.nan, -0.1, math.inf, 'abc', None])
def test_lesion_class_rejects_invalid_volume(volume):
  with pytest.raises(DataError, match=repr(volume).replace('.', r'\.')):
    prompts.lesion_class(volume)


@pytest.mark.parametrize('text,expected', [
    ('CN', 'CN'), ('cn', 'CN'), (' Mci ', 'MCI'), ('ad', 'AD'), ('Dementia', 'AD'),
    ('Alzheimer\u2019s disease', 'AD'), ('alzheimers_disease', 'AD'), ('EMCI', 'MCI'),
    ('Mild  cognitive impairment', 'MCI'), ('cognitively-normal', 'CN'),
])
def test_diagnosis_class_accepts_synonyms(text, expected):
  assert prompts.diagnosis_class(text) == expected


@pytest.mark.parametrize('text', ['SMC', '', 'healthy-ish', math.nan, None])
def test_diagnosis_class_unknown_names_value_and_allowed(text):
  with pytest.raises(PromptError) as info:
    prompts.diagnosis_class(text)
  message = str(info.value)
  assert repr(text) in message
  for cls in prompts.ADNI_CLASSES:
    assert repr(cls) in message


def test_templates_cover_every_class_with_canonical_first():
  assert prompts.DEFAULT_TEMPLATES['ms']['minimal'][0] == 'Subject has minimal lesion load.'
  assert prompts.DEFAULT_TEMPLATES['ms']['high'][0] == 'Subject has high lesion load.'
  assert prompts.DEFAULT_TEMPLATES['adni']['CN'][0] == 'Subject is cognitively normal.'
  assert prompts.DEFAULT_TEMPLATES['adni']['MCI'][0] == 'Subject has mild cognitive impairment.'
  assert prompts.DEFAULT_TEMPLATES['adni']['AD'][0] == "Subject has Alzheimer's disease."
  for dataset, classes in prompts.CLASSES.items():
    assert tuple(prompts.DEFAULT_TEMPLATES[dataset]) == classes
    assert tuple(prompts.HELDOUT_TEMPLATES[dataset]) == classes
    for cls in classes:
      assert len(prompts.DEFAULT_TEMPLATES[dataset][cls]) == 3
      assert len(prompts.HELDOUT_TEMPLATES[dataset][cls]) == 1
      assert prompts.canonical_prompt(dataset, cls) == prompts.DEFAULT_TEMPLATES[dataset][cls][0]


def test_templates_are_distinct_and_heldout_unseen():
  for dataset in prompts.DATASETS:
    train = [t for ts in prompts.DEFAULT_TEMPLATES[dataset].values() for t in ts]
    heldout = [t for ts in prompts.HELDOUT_TEMPLATES[dataset].values() for t in ts]
    assert len(set(train)) == len(train)
    assert not set(train) & set(heldout)
    assert prompts.NULL_PROMPT not in train + heldout


@pytest.mark.parametrize('dataset', prompts.DATASETS)
def test_prompts_for_includes_null_and_every_template(dataset):
  listed = prompts.prompts_for(dataset)
  assert listed[0] == prompts.NULL_PROMPT
  assert len(set(listed)) == len(listed)
  train = [t for ts in prompts.DEFAULT_TEMPLATES[dataset].values() for t in ts]
  assert listed[1:] == train
  assert listed == prompts.prompts_for(dataset)
  heldout = [t for ts in prompts.HELDOUT_TEMPLATES[dataset].values() for t in ts]
  assert not set(heldout) & set(listed)
  assert prompts.prompts_for(dataset, include_heldout=True) == listed + heldout


def test_prompts_for_custom_templates_deduplicates():
  custom = {'minimal': ('low', 'shared'), 'moderate': 'mid', 'high': ('shared', 'high')}
  assert prompts.prompts_for('ms', custom) == ['', 'low', 'shared', 'mid', 'high']


def test_prompts_for_errors():
  with pytest.raises(ConfigError, match='brats'):
    prompts.prompts_for('brats')
  with pytest.raises(ConfigError, match="'high'"):
    prompts.prompts_for('ms', {'minimal': ('a',), 'moderate': ('b',)})
  with pytest.raises(ConfigError, match='severe'):
    prompts.prompts_for('ms', {'minimal': 'a', 'moderate': 'b', 'high': 'c', 'severe': 'd'})
  with pytest.raises(PromptError, match='severe'):
    prompts.canonical_prompt('ms', 'severe')
