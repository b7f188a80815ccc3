"""Prompt-effect summaries of phantom measurements (class-hit rates, changes, ordering)."""

import numpy as np
import pytest

from cf3d_jax.data import phantom_reference, phantoms
from cf3d_jax.metrics import phantom
from cf3d_jax.text.prompts import canonical_prompt

MS = [canonical_prompt("ms", c) for c in ("minimal", "moderate", "high")]
AD = [canonical_prompt("adni", c) for c in ("CN", "MCI", "AD")]


def test_prompt_effect_class_hits_changes_and_ordering():
  values = np.array([[5.0, 12.0, 30.0],     # all in class, rising
                     [9.9, 10.0, 24.9],     # minimal, moderate in; high just short
                     [12.0, 11.0, 40.0]])   # minimal out (12 ≥ 10); not rising
  eff = phantom.prompt_effect(values, MS, "ms")
  assert eff["stat"] == "lesion_volume_ml" and eff["num_noises"] == 3
  assert eff["class_hit_rate"] == {MS[0]: pytest.approx(2 / 3), MS[1]: 1.0,
                                   MS[2]: pytest.approx(2 / 3)}
  assert eff["class_hit_rate_all"] == pytest.approx(7 / 9)
  assert eff["mean_distance_to_class_range_ml"][MS[0]] == pytest.approx(2.0 / 3)
  assert eff["mean_distance_to_class_range_ml"][MS[2]] == pytest.approx(0.1 / 3)
  assert eff["change_vs_first"][MS[2]] == pytest.approx(np.mean([25, 15, 28]))
  assert eff["change_vs_first_per_noise"][MS[1]] == [7.0, 0.1, -1.0]
  assert eff["ordered_fraction"] == pytest.approx(2 / 3)
  # Prompts in another order: the ordering follows the classes, not the columns.
  swapped = phantom.prompt_effect(values[:, ::-1], MS[::-1], "ms")
  assert swapped["ordered_fraction"] == pytest.approx(2 / 3)
  table = phantom.format_table({"g3": eff}, MS)
  assert "g3" in table and "78%" in table and "67%" in table


def test_prompt_effect_adni_orders_ventricles_and_has_no_class_range():
  eff = phantom.prompt_effect(np.array([[20.0, 22.0, 30.0], [20.0, 19.0, 30.0]]), AD, "adni")
  assert eff["ordered_fraction"] == 0.5 and "class_hit_rate" not in eff
  free = phantom.prompt_effect(np.array([[1.0, 2.0]]), ["a purple brain", "a green brain"], "ms")
  assert "class_hit_rate" not in free and "ordered_fraction" not in free
  with pytest.raises(ValueError, match="noises × prompts"):
    phantom.prompt_effect(np.zeros((2, 2)), MS, "ms")


def test_rule_measures_phantoms_at_their_ground_truth():
  reference = phantom_reference.make_reference((32, 32, 32), 192.0)
  rule = phantom.PhantomRule.build("ms", reference, 0.2)
  rng = np.random.default_rng(3)
  for cls in ("minimal", "high"):
    subject = phantoms.make_ms_subject(reference, cls, rng, lesion_radius_mm=(6.0, 12.0))
    assert rule.measure(subject["volume"]) == pytest.approx(subject["lesion_volume_ml"], abs=0.5)
    assert rule.measure(subject["volume"][..., None]) == rule.measure(subject["volume"])
  vol = subject["volume"]
  assert phantom.masked_psnr(vol, vol, ~reference.wm_mask, 2.0) == float("inf")
  noisy = vol + 0.01
  assert phantom.masked_psnr(vol, noisy, ~reference.wm_mask, 2.0) == pytest.approx(
      10 * np.log10(4 / 1e-4), rel=1e-4)
  assert "white-matter" in rule.description
