"""The latent (MAISI RFlow) path at toy size, end to end on 2 CPU cores: 32³ MS phantoms →
train a small MAISI-architecture KL autoencoder (×4: 8³ × 4 latents) → encode the dataset once
into latent shards (scale factor = 1/std) → rectified-flow U-Net with text cross-attention on
the latents → counterfactuals decoded through the VAE.

Run:  python -m cf3d_jax.main --config=configs/demo_latent.py --workdir=runs/demo_latent --mode=all
(`all` = prepare → train_autoencoder → prepare_latents → train → sample.) With a VAE you already
have (e.g. NVIDIA's, converted): --config.space.autoencoder=DIR (its latent channels and
downsampling must match config.space). Variants: 'smoke' (tests), 'adni' (AD phantoms).
"""

import os

from cf3d_jax.config_base import apply_objective_preset, load_config_file, parse_variants

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("smoke", "adni")


def get_config(arg: str | None = None):
  variants = parse_variants(arg, VARIANTS, "configs/demo_latent.py")
  # Data, text and sampling of the WDM demo (32³ phantoms, 4 subjects × 3 prompts × w 1 and 3).
  config = load_config_file(os.path.join(HERE, "demo.py"), "adni" if "adni" in variants else None)
  # The VAE: configs/autoencoder_ms.py's demo (widths 16/32/32, 16³ patches, LSGAN after 300).
  config.autoencoder = load_config_file(os.path.join(HERE, "autoencoder_ms.py"), "demo").autoencoder
  config.autoencoder.num_steps = 400
  config.autoencoder.adversarial_warmup_steps = 200
  config.autoencoder.checkpoint_every = 200
  config.space.name = "latent"
  config.space.encode_batch_size = 8
  apply_objective_preset(config, "maisi_rflow")   # velocity, L1, uniform t + shift, Euler 30
  config.objective.preconditioning = "skip"       # as the WDM demo: identity at low noise
  # The latent demo keeps the recipe it was measured with (docs/latent.md), not the WDM demo's
  # later additions: latents are scaled to unit std, so one sigma_data fits all channels.
  config.objective.sigma_data_channels = ()
  config.objective.loss_weighting = "none"
  config.objective.contrast_weight = 0.0          # measured on the WDM demo only
  config.model.text_time_embedding = False
  config.model.scale_shift_norm = False
  config.text.paraphrases = True
  config.data.phantom.lesion_radius_mm = (6.0, 12.0)
  config.sample.guidance_scales = (1.0, 3.0)
  m = config.model                                 # 8³ × 4 latents → 4³
  m.out_channels = 4
  m.base_channels = 32
  m.channel_mult = (1, 2)
  m.num_res_blocks = 2
  m.num_middle_blocks = 3
  m.attention_levels = (False, False)
  m.cross_attention_levels = (True, True)
  m.dropout_levels = (False, True)
  m.num_groups = 8
  m.head_channels = 16
  config.train.num_steps = 1500
  config.train.checkpoint_every = 500
  if "smoke" in variants:
    config.data.shape = (16, 16, 16)
    config.data.num_subjects = 12
    config.data.records_per_shard = 5
    config.data.phantom.lesion_radius_mm = (2.5, 6.0)
    a = config.autoencoder
    a.channels = (8, 16, 16)
    a.norm_num_groups = 4
    a.patch_shape = ()
    a.batch_size = 2
    a.num_steps = 2
    a.adversarial_warmup_steps = 2            # discriminator never on: one compiled step
    a.disc_channels = 4
    a.disc_layers = 1
    a.log_every = 2
    a.checkpoint_every = 2
    a.eval_batches = 1
    m.base_channels = 8
    m.num_groups = 4
    m.head_channels = 8
    m.num_middle_blocks = 1
    config.train.num_steps = 2
    config.train.batch_size = 2
    config.train.warmup_steps = 1
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.sample.num_subjects = 1
    config.sample.batch_size = 6
    config.sample.guidance_scales = (2.0,)
    config.objective.num_sample_steps = 3
  return config
