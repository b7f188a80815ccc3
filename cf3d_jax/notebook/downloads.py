"""Notebook session, part 5: files. NIfTI volumes, difference maps, a montage and
`prompts.json` written atomically into `WORKDIR/notebook/...`, zipped, downloaded on Colab."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from typing import Sequence

from cf3d_jax.figures import save_montage
from cf3d_jax.files import atomic_path, write_text
from cf3d_jax.notebook.counterfactuals import Counterfactuals, difference_maps, panels, psnr_to
from cf3d_jax.notebook.session import Generator
from cf3d_jax.workdir import Workdir


def output_dir(gen: Generator, cf: Counterfactuals) -> str:
  """`WORKDIR/notebook/{synthetic|inverted}_g{w}_seed{s}_subject{k}` (inverted: the scan's name)."""
  if cf.source is None:
    name = f"synthetic_g{cf.guidance:g}_seed{cf.seed}_subject{cf.subject:03d}"
  else:
    base = os.path.basename(cf.source).removesuffix(".gz").removesuffix(".nii")
    name = f"inverted_{base}_g{cf.guidance:g}"
  return os.path.join(Workdir(gen.workdir).notebook, name)


def save_nifti(cf: Counterfactuals, out_dir: str) -> list[str]:
  """Writes, each atomically: `{i:02d}_{prompt-slug}.nii.gz` per volume, `diff_{i:02d}_...` per
  difference map, `input.nii.gz` (inverted scans), `montage.png` (mid-slices,
  `figures.save_montage`) and `prompts.json` (prompts, where each embedding came from, guidance,
  seed, step). Returns the paths written."""
  from cf3d_jax.data.nifti import save_volume
  from cf3d_jax.files import slug
  ps = cf.prompt_set
  paths = []
  for i, (p, v) in enumerate(zip(ps.prompts, cf.volumes)):
    paths.append(os.path.join(out_dir, f"{i:02d}_{slug(p)}.nii.gz"))
    save_volume(paths[-1], v, cf.affine)
  first = 0 if cf.input is not None else 1
  for i, d in enumerate(difference_maps(cf.volumes, cf.input), start=first):
    paths.append(os.path.join(out_dir, f"diff_{i:02d}_{slug(ps.prompts[i])}.nii.gz"))
    save_volume(paths[-1], d, cf.affine)
  if cf.input is not None:
    paths.append(os.path.join(out_dir, "input.nii.gz"))
    save_volume(paths[-1], cf.input, cf.affine)
  vols, titles, _, _ = panels(cf)
  paths.append(os.path.join(out_dir, "montage.png"))
  save_montage(paths[-1], vols, titles)
  info = {"prompts": list(ps.prompts), "requested": list(ps.requested),
          "embedding_sources": list(ps.sources), "encoder_note": ps.note,
          "guidance_scale": cf.guidance, "seed": cf.seed, "subject": cf.subject,
          "checkpoint_step": cf.step, "source": cf.source,
          "difference": "volume − input" if cf.input is not None else "volume − prompt 0",
          "files": [os.path.basename(p) for p in paths]}
  if cf.input is not None:
    info["psnr_vs_input_db"] = [float(x) for x in psnr_to(cf.volumes, cf.input)]
  paths.append(os.path.join(out_dir, "prompts.json"))
  write_text(paths[-1], json.dumps(info, indent=1))
  return paths


def zip_files(paths: Sequence[str], zip_path: str) -> str:
  """Zips `paths` (flat, by base name) into `zip_path` atomically; returns `zip_path`."""
  with atomic_path(zip_path) as tmp:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
      for p in paths:
        z.write(p, arcname=os.path.basename(p))
  return zip_path


def offer_download(path: str) -> str:
  """Offers `path` for download: `google.colab.files.download` on Colab, else a link (Jupyter)
  and the absolute path. Returns what was done, as one line."""
  path = os.path.abspath(path)
  if "google.colab" in sys.modules:
    from google.colab import files  # pylint: disable=g-import-not-at-top
    files.download(path)
    return f"download started: {path}"
  try:
    from IPython.display import FileLink, display  # pylint: disable=g-import-not-at-top
    rel = os.path.relpath(path)
    if not rel.startswith(".."):
      display(FileLink(rel))
  except ImportError:
    pass
  return f"files at {path}"
