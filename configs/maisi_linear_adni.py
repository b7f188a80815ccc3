"""MAISI Linear on ADNI T1 (CN / MCI / AD prompts): configs/maisi_linear_ms.py on the ADNI data.

Run (AD phantoms):  python -m cf3d_jax.main --config=configs/maisi_linear_adni.py \
          --workdir=runs/maisi_linear_adni --config.space.autoencoder=runs/maisi_vae --mode=all
Real data: --config.data.source=manifest --config.data.manifest=scans.csv (docs/data.md).
Variants (get_config arg): those of configs/maisi_rflow_ms.py ('res128', 'biomedclip').
"""

import os

from cf3d_jax.config_base import apply_dataset, load_config_file


def get_config(arg: str | None = None):
  config = load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "maisi_linear_ms.py"), arg)
  apply_dataset(config, "adni")             # AD phantoms / ADNI manifest, adni_minilm table
  return config
