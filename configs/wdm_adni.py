"""WDM on ADNI T1, 128³ (the paper's WDM row for ADNI: CN / MCI / AD prompts).

Run (AD phantoms):  python -m cf3d_jax.main --config=configs/wdm_adni.py --workdir=runs/wdm_adni --mode=all
Real data: add --config.data.source=manifest --config.data.manifest=scans.csv (columns path,
subject_id, diagnosis) and embed the prompts with BiomedCLIP (docs/data.md).
Variants (get_config arg): 'res256' as configs/wdm_ms.py.
"""

from cf3d_jax.config_base import apply_dataset, apply_objective_preset, base_config


def get_config(arg: str | None = None):
  config = base_config()                    # 128³, 8 × 64³ subbands
  apply_dataset(config, "adni")             # AD phantoms / ADNI manifest, adni_minilm table
  apply_objective_preset(config, "wdm")     # DDPM linear 1e-4 → 0.02, x0, DDIM 25
  config.train.batch_size = 10
  if arg == "res256":
    config.data.shape = (256, 256, 256)
    config.model.channel_mult = (1, 2, 2, 4, 4, 4)
    config.model.attention_levels = (False,) * 6
    config.model.cross_attention_levels = (True, False, True, False, True, False)
    config.model.dropout_levels = (False, False, False, False, True, True)
    config.train.batch_size = 1
  elif arg:
    raise ValueError(f"configs/wdm_adni.py: unknown variant {arg!r}; known: 'res256'")
  return config
