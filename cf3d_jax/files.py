"""Atomic file output: write to a temporary name in the target folder, rename when complete.

A crash mid-write leaves either the old file or nothing, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import shutil
import tempfile
from typing import Iterator

from cf3d_jax.errors import ConfigError, DataError

LOCK_NAME = ".lock"


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path next to `path`; renames it onto `path` if the block succeeds.

  The temporary name keeps the final suffix (e.g. `.nii.gz`, `.npz`) so that libraries that
  infer the format from the name still work. On an exception the temporary file is removed.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  base = os.path.basename(path)
  fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=f"-{base}", dir=folder)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode.
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary folder next to `path`; renames it onto `path` when the block succeeds.

  An existing folder at `path` is replaced only after the new one is complete.
  """
  path = os.fspath(path).rstrip("/")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  recover_atomic_dir(path)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o777 & ~_umask())
    if os.path.exists(path):
      old = tmp + ".old"
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old)
    else:
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def recover_atomic_dir(path: str | os.PathLike) -> None:
  """Finishes an `atomic_dir(path)` killed between its two renames: the previous folder, left
  as `.tmp-NAME-*.old`, goes back to `path` if nothing is there, else is removed."""
  path = os.fspath(path).rstrip("/")
  parent = os.path.dirname(os.path.abspath(path))
  prefix = f".tmp-{os.path.basename(path)}-"
  if not os.path.isdir(parent):
    return
  for name in sorted(os.listdir(parent)):
    if not (name.startswith(prefix) and name.endswith(".old")):
      continue
    old = os.path.join(parent, name)
    if os.path.exists(path):
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(old, path)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def slug(text: str) -> str:
  """File-name-safe form of a text (prompt, subject id): lower-case letters, digits and '-'.
  'Subject has high lesion load.' → 'subject-has-high-lesion-load'; '' → 'null'."""
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "null"


def unique_slug(text: str, used: set[str]) -> str:
  """`slug(text)`, with '-2', '-3', … appended until it is not in `used`; adds it to `used`."""
  base = slug(text)
  name, n = base, 1
  while name in used:
    n += 1
    name = f"{base}-{n}"
  used.add(name)
  return name


def check_inside(path: str | os.PathLike, folder: str | os.PathLike) -> str:
  """`path` if its real path lies inside `folder`'s real path; DataError naming both if not
  (symlinks and '..' resolved), so no output escapes its folder."""
  real, root = os.path.realpath(path), os.path.realpath(folder)
  if os.path.commonpath([real, root]) != root or real == root:
    raise DataError(f"{path}: resolves to {real}, outside the output folder {root}; refusing "
                    "to write there")
  return os.fspath(path)


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[str]:
  """Holds `WORKDIR/.lock` (an exclusive `fcntl.flock`, released by the OS however the process
  ends, `kill -9` included) for the block; ConfigError naming the holder's pid and host if
  another process holds it. The file keeps the last holder's pid, host and start time."""
  import fcntl
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    try:
      with open(path, encoding="utf-8") as f:
        holder = json.load(f)
    except (OSError, ValueError):
      holder = {}
    os.close(fd)
    raise ConfigError(
        f"{workdir} is in use by pid {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')} (since {holder.get('since', '?')}): wait for it to finish "
        f"or stop it, or use another --workdir (lock: {path})") from None
  try:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    yield path
  finally:
    os.close(fd)                      # releases the lock
