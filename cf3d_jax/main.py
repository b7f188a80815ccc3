"""Command-line entry: `python -m cf3d_jax.main --config=configs/demo.py --workdir=runs/demo`.

Modes: prepare (data shards + embedding table), train_autoencoder (the MAISI KL VAE),
prepare_latents (encode the images once into latent shards, latent space), train, sample
(counterfactuals; with `--config.sample.source` of given scans), all (prepare if missing →
[latent: train_autoencoder if no VAE → prepare_latents →] train → [calibrate →] sample), calibrate
(each prompt's guidance scale chosen on held-out noises, `cf3d_jax.calibrate`), train_classifier (the 3D DenseNet-121 text-alignment classifier), evaluate (the paper's Tables 1
and 2 → WORKDIR/eval/). Config overrides: `--config.train.num_steps=100`;
the config is locked, so a misspelt key is an error. Problems with inputs (a bad flag or config
value, a missing or unwritable file, a full disk) exit with status 2 and one line naming the file
or key and the fix; `--verbosity=1` adds the traceback.

The console shows cf3d_jax's own lines, warnings and one progress bar per stage; the libraries'
INFO logs go only to `WORKDIR/logs/MODE-TIME.log` (`--verbosity=1` shows them too;
`cf3d_jax.console`).
"""

from __future__ import annotations

import errno
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from cf3d_jax.errors import Cf3dError, Preempted
from cf3d_jax.modes import MODES, run


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: data/, checkpoints/, samples/ …")
_MODE = flags.DEFINE_enum("mode", "all", MODES, "What to run.")
_ON_ERROR = flags.DEFINE_enum("on_error", "fail", ["fail", "skip"],
                              "prepare: stop at the first bad scan, or skip it and go on.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-host (cf3d_jax.parallel.initialize_distributed): every process runs the same command.
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed: auto = when a coordinator is given or a "
                                 "TPU-pod/SLURM cluster is detected.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 ($CF3D_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the job ($CF3D_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process ($CF3D_PROCESS_ID).")


def _verbose(argv) -> bool:
  """`--verbosity=N` / `-v=N` with N >= 1 among argv (readable before the flags are parsed)."""
  for a in argv:
    for name in ("--verbosity=", "-v=", "--v="):
      if a.startswith(name):
        try:
          return int(a[len(name):]) >= 1
        except ValueError:
          return False
  return False


def _fail(message: str, verbose: bool) -> None:
  """Prints one line (and with `verbose` the traceback) to stderr; exits with status 2."""
  if verbose:
    traceback.print_exc()
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_path(argv) -> str | None:
  """The file of `--config=FILE[:ARG]` among argv, if given."""
  for a in argv[1:]:
    if a.startswith("--config="):
      return a[len("--config="):].split(":", 1)[0]
  return None


def _parse_flags(argv):
  """absl's parse with one line and exit 2 for a bad flag or config override (a misspelt
  `--config.train.num_step=…`, a value of the wrong type, a missing or broken config file)."""
  verbose = _verbose(argv)
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    _fail(f"--config={path}: config file not found (configs/*.py; docs/configs.md)", verbose)
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value          # config_flags loads the file lazily: its errors belong here
    return rest
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:   # a config file raised: keep its message
      head = text.split("Traceback", 1)[0].strip()
      text = f"{head} {text.strip().splitlines()[-1].strip()}"
    _fail(f"{' '.join(text.split())}; see --helpfull", verbose)
  except (AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError) as e:
    text = " ".join(str(e).replace("\\n", " ").replace("\\", "").replace("'", "").split())
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    if isinstance(e, (AttributeError, KeyError)) and overrides:
      hint = text[text.find("Did you mean"):] if "Did you mean" in text else ""
      _fail(f"no config key {text.split()[0]!r} (among {', '.join(overrides)}). {hint} "
            "Keys and defaults: docs/configs.md", verbose)
    _fail(f"{text}; check --config and its overrides (docs/configs.md)", verbose)


def os_error_message(e: OSError) -> str:
  """One line for a file-system error: the file, the reason and what to do."""
  where = e.filename or "a file"
  if e.errno == errno.ENOSPC:
    return f"{where}: no space left on the device; free space or use another --workdir"
  if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return f"{where}: {e.strerror}; check the permissions or use another --workdir"
  if e.errno == errno.ENOTDIR:
    return f"{where}: a path component is a file, not a folder; use another --workdir"
  return f"{where}: {e.strerror or e}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  verbose = flags.FLAGS.verbosity >= 1
  from cf3d_jax import console
  console.quiet_libraries(flags.FLAGS.verbosity)   # libraries' INFO only in WORKDIR/logs/
  try:
    from cf3d_jax.parallel import initialize_distributed
    initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value)
    run(_CONFIG.value, _WORKDIR.value, _MODE.value, _ON_ERROR.value)
  except Cf3dError as e:
    _fail(str(e), verbose)
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(143)                       # 128 + SIGTERM: the scheduler's convention
  except OSError as e:
    _fail(os_error_message(e), verbose)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
