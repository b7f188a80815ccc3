"""cf3d_jax: language-guided 3D counterfactual MRI generation in JAX/Flax."""

__version__ = "0.1.0"
