"""What each `--mode` runs; importable without the CLI's absl flags (tests, notebooks).

`all` runs the whole job for the config's space: prepare → train → [calibrate, with
`config.sample.calibrate`; for given scans with `config.sample.source`] → sample for the wavelet
space;
for the latent space prepare → train_autoencoder (only when `config.space.autoencoder` is empty
and `WORKDIR/autoencoder/vae` does not exist yet) → prepare_latents → train → sample.
"""

from __future__ import annotations

import contextlib
import os

MODES = ("prepare", "train_autoencoder", "prepare_latents", "train", "calibrate", "sample", "all",
         "train_classifier", "evaluate")


def _needs_autoencoder_training(config, workdir: str) -> bool:
  from cf3d_jax import spaces
  return (config.space.name == "latent" and not config.space.autoencoder
          and not os.path.isdir(spaces.autoencoder_path(config.space, workdir)))


# The batch sizes each mode splits over the device mesh.
_BATCH_KEYS = {"train": ("train.batch_size",), "sample": ("sample.batch_size",),
               "calibrate": ("sample.batch_size",),
               "all": ("train.batch_size", "sample.batch_size"), "evaluate": ("eval.batch_size",),
               "train_classifier": (), "train_autoencoder": (), "prepare": (),
               "prepare_latents": ()}


def cpu_devices(config, mode: str) -> int | None:
  """Applies `config.mesh.cpu_devices` for this mode before JAX starts (`parallel.
  configure_cpu_devices`): auto picks a divisor of the batches the mode splits."""
  from cf3d_jax import parallel
  if mode not in _BATCH_KEYS:
    return None                                   # preflight names the bad mode
  batches = [config[k.split(".")[0]][k.split(".")[1]] for k in _BATCH_KEYS[mode]]
  return parallel.configure_cpu_devices(int(config.mesh.cpu_devices), batches)


def preflight(config, workdir: str, mode: str) -> None:
  """Everything checkable before a mode writes anything (ConfigError naming the key or path):
  the mode, every config value (`config_base.validate`), the workdir (a folder or absent), and
  the batch sizes this mode uses against the device mesh (after splitting a CPU host into
  `mesh.cpu_devices` devices)."""
  from cf3d_jax import config_base
  from cf3d_jax.errors import ConfigError
  if mode not in MODES:
    raise ConfigError(f"--mode={mode!r}: expected one of {MODES}")
  config_base.validate(config, mode)
  if mode == "prepare_latents" and config.space.name != "latent":
    raise ConfigError("--mode=prepare_latents needs config.space.name='latent'")
  if not workdir:
    raise ConfigError("--workdir is empty: give the run folder")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir}: is a file, not a folder; give a folder (it is "
                      "created if missing)")
  cpu_devices(config, mode)                        # before anything starts JAX's backend
  keys = _BATCH_KEYS[mode]
  if keys:
    from cf3d_jax import parallel
    mesh = parallel.make_mesh(config.mesh.shape)     # ConfigError if it does not fit the devices
    parallel.check_spatial_divisible(tuple(config.data.shape), mesh, "data.shape")
    for key in keys:
      section, name = key.split(".")
      parallel.check_batch_divisible(config[section][name], mesh, key)


def run(config, workdir: str, mode: str, on_error: str = "fail") -> None:
  """Dispatches one mode (importing heavy modules only when needed)."""
  preflight(config, workdir, mode)
  import jax
  from cf3d_jax.files import workdir_lock
  # One job per workdir: process 0 holds WORKDIR/.lock (the other hosts of a job share it).
  lock = workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  from cf3d_jax import console
  with lock, console.log_file(workdir, mode, write=jax.process_index() == 0):
    _run_modes(config, workdir, mode, on_error)


def _run_modes(config, workdir: str, mode: str, on_error: str) -> None:
  """The modes' jobs in order (after `preflight`, under the workdir lock)."""
  latent = config.space.name == "latent"
  if mode in ("prepare", "all"):
    from cf3d_jax.data.prepare import prepare
    prepare(config, workdir, on_error)
  if mode == "train_autoencoder" or (mode == "all" and _needs_autoencoder_training(config,
                                                                                   workdir)):
    from cf3d_jax.autoencoder_train import train_autoencoder
    train_autoencoder(config, workdir)
  if mode == "prepare_latents" or (mode == "all" and latent):
    from cf3d_jax.latents import prepare_latents
    prepare_latents(config, workdir)
  if mode in ("train", "all"):
    from cf3d_jax.train import train_and_evaluate
    train_and_evaluate(config, workdir)
  if mode == "calibrate" or (mode == "all" and config.sample.calibrate):
    from cf3d_jax.calibrate import calibrate, calibrate_scans
    (calibrate_scans if config.sample.source else calibrate)(config, workdir)
  if mode in ("sample", "all"):
    from cf3d_jax.sample import sample_counterfactuals
    sample_counterfactuals(config, workdir)
  if mode == "train_classifier":
    from cf3d_jax.classifier import train_classifier
    train_classifier(config, workdir)
  if mode == "evaluate":
    from cf3d_jax.evaluate import evaluate
    evaluate(config, workdir)
