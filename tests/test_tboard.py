"""cf3d_jax.tboard: clu's metric writers write TensorBoard event files without TensorFlow."""

import subprocess
import sys
import textwrap


def test_clu_writer_writes_event_files_with_tensorflow_unimportable(tmp_path):
  # A fresh interpreter in which `import tensorflow` fails, as on an install without it.
  code = textwrap.dedent(f"""
      import sys
      sys.modules["tensorflow"] = None
      import numpy as np
      import cf3d_jax
      from clu import metric_writers, periodic_actions
      writer = metric_writers.create_default_writer({str(tmp_path)!r}, asynchronous=False)
      writer.write_hparams({{"lr": 0.002, "seed": 0}})
      for step in (1, 2):
        writer.write_scalars(step, {{"loss": np.float32(1.0 / step)}})
      writer.write_images(2, {{"montage": np.zeros((8, 8, 1), np.uint8)}})
      writer.write_histograms(2, {{"w": np.arange(10.0)}})
      writer.close()
      from tensorboard.backend.event_processing import event_accumulator
      acc = event_accumulator.EventAccumulator({str(tmp_path)!r})
      acc.Reload()
      tags = acc.Tags()
      print("SCALARS", [(e.step, round(e.value, 4)) for e in acc.Scalars("loss")])
      print("IMAGES", tags["images"], "TEXT", tags["tensors"])
      print("TF", [m for m in sys.modules if m == "tensorflow" and sys.modules[m] is not None])
      """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "SCALARS [(1, 1.0), (2, 0.5)]" in out
  assert "IMAGES ['montage']" in out and "hparams" in out
  assert "TF []" in out


def test_install_is_a_no_op_once_clu_writers_are_imported():
  import cf3d_jax  # noqa: F401  (installs the shim)
  from cf3d_jax import tboard
  from clu import metric_writers
  assert tboard.install() is True   # already the tensorboardX writer
  assert metric_writers.SummaryWriter.__name__ == "TensorBoardXWriter"
  assert issubclass(metric_writers.SummaryWriter, metric_writers.MetricWriter)
