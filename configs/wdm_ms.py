"""WDM on MS FLAIR, 128³ (the paper's WDM row, with language guidance).

Run:  python -m cf3d_jax.main --config=configs/wdm_ms.py --workdir=runs/wdm_ms --mode=all
Real data: add --config.data.source=manifest --config.data.manifest=scans.csv
Variants (get_config arg, comma-separated): 'res256' switches to 256³ with wdm-3d's 6-level
U-Net at batch 1; 'biomedclip' conditions on the paper's text encoder, BiomedCLIP's token
states, from `tables/ms_biomedclip.npz` (made once offline: docs/data.md; the default is the
shipped MiniLM table).
"""

from cf3d_jax.config_base import apply_objective_preset, base_config, biomedclip_table, \
    parse_variants


def get_config(arg: str | None = None):
  variants = parse_variants(arg, ("res256", "biomedclip"), "configs/wdm_ms.py")
  config = base_config()                    # 128³, 8 × 64³ subbands
  apply_objective_preset(config, "wdm")     # DDPM linear 1e-4 → 0.02, x0, DDIM 25
  config.train.batch_size = 10              # wdm-3d at 128³ (the paper: 1 at 256³)
  if "res256" in variants:
    config.data.shape = (256, 256, 256)
    config.model.channel_mult = (1, 2, 2, 4, 4, 4)
    config.model.attention_levels = (False,) * 6
    config.model.cross_attention_levels = (True, False, True, False, True, False)
    config.model.dropout_levels = (False, False, False, False, True, True)
    config.train.batch_size = 1
  if "biomedclip" in variants:
    config.text.table = biomedclip_table(config.data.dataset)
  return config
