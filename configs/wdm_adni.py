"""WDM on ADNI T1, 128³ (the paper's WDM row for ADNI: CN / MCI / AD prompts).

Run (AD phantoms):  python -m cf3d_jax.main --config=configs/wdm_adni.py --workdir=runs/wdm_adni --mode=all
Real data: add --config.data.source=manifest --config.data.manifest=scans.csv (columns path,
subject_id, diagnosis) and embed the prompts with BiomedCLIP (docs/data.md).
Variants (get_config arg): those of configs/wdm_ms.py ('res256', 'biomedclip': then
`tables/adni_biomedclip.npz`).
"""

import os

from cf3d_jax.config_base import apply_dataset, load_config_file


def get_config(arg: str | None = None):
  # configs/wdm_ms.py (128³, WDM objective, batch 10, the res256 variant) on the ADNI data.
  config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "wdm_ms.py"),
                            arg)
  apply_dataset(config, "adni")             # AD phantoms / ADNI manifest, adni_minilm table
  return config
