"""TensorBoard event files without TensorFlow, behind clu's `MetricWriter` interface.

clu's `metric_writers` package imports its TensorFlow `SummaryWriter` when it is imported (and
`periodic_actions` imports the package), which made TensorFlow (1.3 GB, two oneDNN banners per
process) a dependency of every run. `install()` registers, before clu is imported, a module in
place of `clu.metric_writers.summary_writer` whose `SummaryWriter` is `TensorBoardXWriter`
below: a `clu.metric_writers.interface.MetricWriter` that writes the same event files through
tensorboardX (pure Python). Everything else of clu (`create_default_writer`, the async and
logging writers, `periodic_actions`) is clu's own.

    from cf3d_jax import tboard
    tboard.install()                       # before the first `import clu.metric_writers`
    from clu import metric_writers
    writer = metric_writers.create_default_writer(logdir)

Scalars, images ([H, W, C] or [N, H, W, C], C = 1 or 3), histograms, texts, audios and hparams
(as a markdown table under the text tag 'hparams') are written; raw summaries and videos are
skipped with a warning, as clu's own PyTorch writer does.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Mapping, Optional

from absl import logging

SHIMMED = "clu.metric_writers.summary_writer"


def install() -> bool:
  """Makes clu's `SummaryWriter` the tensorboardX writer. Returns False (and changes nothing) if
  clu's metric writers were already imported, e.g. with TensorFlow's writer."""
  if "clu.metric_writers" in sys.modules or SHIMMED in sys.modules:
    return getattr(sys.modules.get(SHIMMED), "IS_TENSORBOARDX_SHIM", False)
  module = types.ModuleType(SHIMMED, "cf3d_jax.tboard: TensorBoard writer without TensorFlow")
  module.IS_TENSORBOARDX_SHIM = True

  def __getattr__(name: str):   # the class needs clu's interface, importable only from here on
    if name == "SummaryWriter":
      module.SummaryWriter = writer_class()
      return module.SummaryWriter
    raise AttributeError(name)

  module.__getattr__ = __getattr__
  sys.modules[SHIMMED] = module
  return True


_CLASS = None


def writer_class() -> type:
  """`TensorBoardXWriter`, a subclass of clu's `MetricWriter` (built once, on first use)."""
  global _CLASS
  if _CLASS is not None:
    return _CLASS
  import numpy as np
  from clu.metric_writers import interface

  class TensorBoardXWriter(interface.MetricWriter):
    """clu MetricWriter writing TensorBoard event files with tensorboardX."""

    def __init__(self, logdir: str):
      super().__init__()
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(logdir=str(logdir), flush_secs=30)

    def write_summaries(self, step: int, values: Mapping[str, Any],
                        metadata: Optional[Mapping[str, Any]] = None):
      logging.log_first_n(logging.WARNING, "TensorBoardXWriter does not write raw summaries", 1)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
      for key, value in scalars.items():
        self._writer.add_scalar(key, float(np.asarray(value)), global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]):
      for key, value in images.items():
        value = np.asarray(value)
        if value.ndim == 3:
          self._writer.add_image(key, value, global_step=step, dataformats="HWC")
        else:
          self._writer.add_images(key, value, global_step=step, dataformats="NHWC")

    def write_videos(self, step: int, videos: Mapping[str, Any]):
      logging.log_first_n(logging.WARNING, "TensorBoardXWriter does not write videos", 1)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
      for key, value in audios.items():
        self._writer.add_audio(key, np.asarray(value), global_step=step,
                               sample_rate=sample_rate)

    def write_texts(self, step: int, texts: Mapping[str, str]):
      for key, value in texts.items():
        self._writer.add_text(key, value, global_step=step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Optional[Mapping[str, int]] = None):
      for key, value in arrays.items():
        bins = (num_buckets or {}).get(key) or "tensorflow"
        self._writer.add_histogram(key, np.asarray(value), global_step=step, bins=bins)

    def write_hparams(self, hparams: Mapping[str, Any]):
      rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(hparams.items()))
      self._writer.add_text("hparams", "| key | value |\n| --- | --- |\n" + rows, global_step=0)

    def flush(self):
      self._writer.flush()

    def close(self):
      self._writer.close()

  _CLASS = TensorBoardXWriter
  return _CLASS
