"""What a run prints, and where its full log goes.

At the default `--verbosity=0` the console shows cf3d_jax's own INFO lines (what each stage
does and wrote, the result tables), every library's WARNING and above, and one progress bar
per stage, without absl's date/thread/file prefix; the libraries' INFO chatter (orbax's options and save events, JAX's backend probing,
clu's hyperparameter and metric lines, grain) is kept out of the console. `--verbosity=1`
shows everything in absl's format. Either way each mode's complete log (all libraries, INFO and above) is
written to `WORKDIR/logs/{mode}-{YYYYmmdd-HHMMSS}.log` (process 0; other processes of a
multi-host job log to their own console only).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator

from cf3d_jax.workdir import Workdir

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class OwnInfoFilter(logging.Filter):
  """Passes WARNING and above from anyone, and lower levels only from cf3d_jax's own modules."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.pathname.startswith(PACKAGE_DIR)


class ShortFormatter(logging.Formatter):
  """Console lines without absl's date/thread/file prefix: INFO is the message itself, other
  levels are prefixed with their name ('warning: …')."""

  def format(self, record: logging.LogRecord) -> str:
    text = super().format(record)
    return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


_FILTER = OwnInfoFilter()


def quiet_libraries(verbosity: int) -> None:
  """Installs `OwnInfoFilter` on the console handlers (absl's and any on the root logger) when
  `verbosity` <= 0; removes it otherwise."""
  from absl import logging as absl_logging
  handlers = set(logging.getLogger().handlers) | {absl_logging.get_absl_handler()}
  for h in handlers:
    if isinstance(h, logging.FileHandler):
      continue
    if verbosity <= 0:
      h.addFilter(_FILTER)
    else:
      h.removeFilter(_FILTER)
  if verbosity <= 0:
    absl_logging.get_absl_handler().setFormatter(ShortFormatter("%(message)s"))


@contextlib.contextmanager
def log_file(workdir: str, mode: str, write: bool = True) -> Iterator[str | None]:
  """Within the block the root logger also writes every record (INFO and above, all libraries)
  to `WORKDIR/logs/{mode}-{time}.log`; yields that path (None when `write` is False)."""
  if not write:
    yield None
    return
  from absl import logging as absl_logging
  folder = Workdir(workdir).logs
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}.log")
  handler = logging.FileHandler(path, encoding="utf-8")
  handler.setLevel(logging.INFO)
  handler.setFormatter(absl_logging.PythonFormatter())
  root = logging.getLogger()
  old_level = root.level
  root.addHandler(handler)
  root.setLevel(min(old_level or logging.INFO, logging.INFO))
  try:
    yield path
  finally:
    root.removeHandler(handler)
    root.setLevel(old_level)
    handler.close()


def run_on_config(fn: Callable[..., Any], flag_values, *args) -> Any:
  """The workdir commands' CLI body (`cf3d_jax.curve`, `cf3d_jax.seeds`): `fn(config, workdir,
  config_name, *args)` with the `--config` / `--workdir` flags, `config_name` as given on the
  command line (`configs/demo.py[:variant]`); a `Cf3dError` prints one line and exits 2."""
  from cf3d_jax.errors import Cf3dError
  try:
    name = flag_values["config"].serialize().split("=", 1)[1]
    return fn(flag_values.config, flag_values.workdir, name, *args)
  except Cf3dError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
