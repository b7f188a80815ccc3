"""MAISI RFlow on MS FLAIR: latent rectified-flow diffusion at 256³ (the paper's MAISI RFlow row).

Diffusion runs on the 4-channel latents of a MAISI KL autoencoder (4× per axis: 256³ → 64³ × 4),
with the MAISI latent U-Net widths (64, 128, 256, 512), self-attention at the two lowest levels,
and the seed paper's additions: text cross-attention at several scales including the highest,
a deeper bottleneck, dropout only at low resolution; MONAI RFlow conventions (velocity, L1,
uniform t with the resolution shift, Euler 30).

Run, with NVIDIA's pretrained VAE converted once (`python -m cf3d_jax.convert maisi-vae
autoencoder_epoch273.pt runs/maisi_vae`):
  python -m cf3d_jax.main --config=configs/maisi_rflow_ms.py --workdir=runs/maisi_rflow_ms \
      --config.space.autoencoder=runs/maisi_vae --mode=all
(`all` = prepare → prepare_latents → train → sample; without `space.autoencoder` it first trains
a VAE with configs/autoencoder_ms.py's settings: --mode=train_autoencoder.)
Variants (get_config arg, comma-separated): 'res128' for 128³ images (32³ × 4 latents);
'biomedclip' conditions on BiomedCLIP's token states from `tables/ms_biomedclip.npz` (made once
offline: docs/data.md; the default is the shipped MiniLM table).
"""

from cf3d_jax.config_base import apply_objective_preset, base_config, biomedclip_table, \
    parse_variants

VARIANTS = ("res128", "biomedclip")


def get_config(arg: str | None = None):
  variants = parse_variants(arg, VARIANTS, "configs/maisi_rflow_ms.py")
  res128 = "res128" in variants
  config = base_config()
  apply_objective_preset(config, "maisi_rflow")
  config.data.shape = (128, 128, 128) if res128 else (256, 256, 256)
  config.space.name = "latent"               # frozen MAISI VAE, z = latent × 1/std
  config.space.latent_channels = 4
  config.space.downsample = 4
  config.space.decode_splits = 1 if res128 else 4   # 256³ decode in 4 depth chunks
  config.model.out_channels = 4
  config.model.base_channels = 64
  config.model.channel_mult = (1, 2, 4, 8)   # MAISI latent U-Net: 64, 128, 256, 512
  config.model.num_res_blocks = 2
  config.model.num_middle_blocks = 4         # the paper's deeper bottleneck (MAISI: 2)
  config.model.attention_levels = (False, False, True, True)
  config.model.middle_attention = True
  config.model.cross_attention_levels = (True, False, True, True)
  config.model.middle_cross_attention = True
  config.model.head_channels = 32
  config.model.dropout_levels = (False, False, True, True)
  config.model.middle_dropout = True
  config.train.batch_size = 1                 # the paper's batch at 256³
  config.train.learning_rate = 1e-4           # MAISI's diffusion training rate
  if "biomedclip" in variants:
    config.text.table = biomedclip_table(config.data.dataset)
  return config
