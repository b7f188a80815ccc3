"""MAISI's KL autoencoder trained on ADNI T1 (configs/autoencoder_ms.py on the ADNI data).

Run:  python -m cf3d_jax.main --config=configs/autoencoder_adni.py --workdir=runs/maisi_rflow_adni \
          --mode=train_autoencoder   (after --mode=prepare)
Variants (get_config arg): those of configs/autoencoder_ms.py ('res128', 'patch128', 'demo',
'smoke').
"""

import os

from cf3d_jax.config_base import apply_dataset, load_config_file


def get_config(arg: str | None = None):
  # configs/autoencoder_ms.py (MAISI VAE, 64³ patches of 256³ volumes, its variants) on ADNI.
  config = load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "autoencoder_ms.py"), arg)
  apply_dataset(config, "adni")             # AD phantoms / ADNI manifest, adni_minilm table
  return config
