"""MAISI Linear on MS FLAIR: the latent model of configs/maisi_rflow_ms.py trained as a DDPM
(1000 steps, scaled-linear betas 0.0015 → 0.0195, epsilon prediction, ancestral sampling over
all 1000 steps) — the paper's MAISI Linear row.

Run:  python -m cf3d_jax.main --config=configs/maisi_linear_ms.py --workdir=runs/maisi_linear_ms \
          --config.space.autoencoder=runs/maisi_vae --mode=all
Variants (get_config arg): those of configs/maisi_rflow_ms.py ('res128', 'biomedclip').
"""

import os

from cf3d_jax.config_base import apply_objective_preset, load_config_file


def get_config(arg: str | None = None):
  config = load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "maisi_rflow_ms.py"), arg)
  apply_objective_preset(config, "maisi_linear")
  return config
