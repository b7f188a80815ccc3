"""cf3d_jax: language-guided 3D counterfactual MRI generation in JAX/Flax."""

__version__ = "0.1.0"

# TensorBoard through clu's MetricWriter without TensorFlow (cf3d_jax.tboard): registered before
# anything imports clu.metric_writers.
from cf3d_jax import tboard as _tboard  # noqa: E402

_tboard.install()
