"""Functions run in spawned worker processes by the tests.

A spawned worker unpickles a function by importing its module by name. A test module cannot
hold such a function: it imports `conftest`, and in a worker that name may resolve to another
folder's conftest.py (tests/text/ has one), so the worker dies on import. This module has a
name no other folder uses and imports nothing from the tests.
"""

from __future__ import annotations

import os
import time


def conform_or_die(row: dict, *args):
  """A stand-in for conform_scan: 'poison' rows kill the process outright (as the kernel's OOM
  killer would); 'slow' rows take a second; every row returns ("ok", its path)."""
  del args
  if "poison" in row["path"]:
    os._exit(9)
  if "slow" in row["path"]:
    time.sleep(1.0)
  return ("ok", row["path"])
