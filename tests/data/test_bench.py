"""The loader benchmark (`--what=data`) runs on its own synthetic shards (no timing asserted)."""

from cf3d_jax.data import bench


def test_data_bench_measures_the_loader_on_synthetic_records():
  rows = bench.run([16], [0], num_records=3, batches=2, repeats=1)
  assert len(rows) == 1
  row = rows[0]
  assert row["bench"] == "data" and row["size"] == 16 and row["workers"] == 0
  assert row["volumes_per_s"] > 0 and row["mb_per_s"] > 0


def test_data_bench_is_registered():
  from cf3d_jax import benchmark
  assert benchmark.BENCHES["data"] is bench.bench_data
