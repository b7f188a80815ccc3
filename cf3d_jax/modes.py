"""What each `--mode` runs; importable without the CLI's absl flags (tests, notebooks)."""

from __future__ import annotations

MODES = ("prepare", "train", "sample", "all", "train_classifier", "evaluate")


def run(config, workdir: str, mode: str, on_error: str = "fail") -> None:
  """Dispatches one mode (importing heavy modules only when needed)."""
  from cf3d_jax import config_base
  config_base.validate(config)
  if mode in ("prepare", "all"):
    from cf3d_jax.data.prepare import prepare
    prepare(config, workdir, on_error)
  if mode in ("train", "all"):
    from cf3d_jax.train import train_and_evaluate
    train_and_evaluate(config, workdir)
  if mode in ("sample", "all"):
    from cf3d_jax.sample import sample_counterfactuals
    sample_counterfactuals(config, workdir)
  if mode == "train_classifier":
    from cf3d_jax.classifier import train_classifier
    train_classifier(config, workdir)
  if mode == "evaluate":
    from cf3d_jax.evaluate import evaluate
    evaluate(config, workdir)
