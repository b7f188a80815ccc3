"""Atomic file output: write to a temporary name in the target folder, rename when complete.

A crash mid-write leaves either the old file or nothing, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from typing import Iterator

from cf3d_jax.errors import DataError


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
