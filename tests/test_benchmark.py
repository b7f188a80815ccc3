"""The benchmark module runs and writes its JSON (no timing is asserted)."""

import json
import subprocess
import sys

from conftest import ROOT


def test_benchmark_writes_table_and_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, "-m", "cf3d_jax.benchmark", "--config=configs/demo.py:smoke",
       "--what=train,conv", "--repeats=1", f"--output={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[train]" in proc.stdout and "[conv]" in proc.stdout
  result = json.loads(out.read_text())
  train = [r for r in result["rows"] if r["bench"] == "train"]
  assert {r["conv_impl"] for r in train} == {"xla", "im2col"}
  assert all(r["ms_per_step"] > 0 and r["voxels_per_s"] > 0 for r in train)
  conv = [r for r in result["rows"] if r["bench"] == "conv"]
  assert [r["level"] for r in conv] == [0, 1, 2]
  assert all(r["jax_im2col_ms"] > 0 and r["torch_ms"] > 0 for r in conv)
