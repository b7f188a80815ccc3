"""MAISI's KL autoencoder trained on MS FLAIR (DESIGN.md §4): the VAE of the latent-diffusion rows.

Losses L1 + 1e-7·KL + 0.3·perceptual + 0.1·least-squares adversarial (PatchDiscriminator, 3
layers, 32 channels, instance norm), Adam 1e-4, random 64³ patches of the 256³ volumes that
configs/maisi_*_ms.py diffuse. MAISI's perceptual term is squeeze-net LPIPS, whose pretrained
weights cannot be downloaded here; we use MedicalNet 3D ResNet features instead, on when
`--config.autoencoder.perceptual_network=DIR` names a folder written by
`python -m cf3d_jax.convert medicalnet resnet_50_23dataset.pth DIR` (off by default).

Run (the same workdir as the latent-diffusion config, which then finds WORKDIR/autoencoder/vae):
  python -m cf3d_jax.main --config=configs/autoencoder_ms.py --workdir=runs/maisi_rflow_ms --mode=prepare
  python -m cf3d_jax.main --config=configs/autoencoder_ms.py --workdir=runs/maisi_rflow_ms \
      --mode=train_autoencoder --config.autoencoder.perceptual_network=runs/medicalnet50
Outputs WORKDIR/autoencoder/{checkpoints,tensorboard,vae,metrics.json}.
Variants (comma-separated get_config arg):
  res128  128³ volumes (configs/maisi_*:res128), 64³ patches
  patch128  MAISI's second stage: 128³ patches (continue a 64³ run with more num_steps)
  demo    32³ phantoms, tiny widths, 16³ patches, 600 steps: ~6 min on 2 shared CPU cores, val
          PSNR ≈ 22 dB on whole volumes
          (python -m cf3d_jax.main --config=configs/autoencoder_ms.py:demo --workdir=runs/ae_demo
           --mode=prepare, then --mode=train_autoencoder)
  smoke   16³, a few steps (tests)
"""

from cf3d_jax.config_base import base_config, parse_variants

VARIANTS = ("res128", "patch128", "demo", "smoke")


def get_config(arg: str | None = None):
  variants = parse_variants(arg, VARIANTS, "configs/autoencoder_ms.py")
  config = base_config()
  config.data.shape = (256, 256, 256)       # the images of configs/maisi_*_ms.py
  a = config.autoencoder                    # MAISI architecture and loss weights (base defaults)
  a.patch_shape = (64, 64, 64)              # MAISI's first stage
  a.batch_size = 1
  a.num_steps = 100_000
  a.adversarial_warmup_steps = 10_000       # generator alone first (MONAI tutorials' warm-up)
  a.eval_shape = (128, 128, 128)            # held-out metrics on central 128³ crops (memory)
  a.eval_batches = 8
  if "res128" in variants:
    config.data.shape = (128, 128, 128)
    a.eval_shape = ()
  if "patch128" in variants:
    a.patch_shape = (128, 128, 128)
    a.remat = True                          # 64-channel activations at 128³
  if "demo" in variants:
    config.data.shape = (32, 32, 32)
    config.data.num_subjects = 96
    config.data.records_per_shard = 32
    config.data.phantom.lesion_radius_mm = (6.0, 12.0)  # as configs/demo.py
    a.channels = (16, 32, 32)               # ×4 downsampling as MAISI: 8³ × 4 latents
    a.num_res_blocks = (1, 1, 1)
    a.norm_num_groups = 8
    a.patch_shape = (16, 16, 16)            # random 16³ patches (MAISI trains on patches too)
    a.batch_size = 4
    a.learning_rate = 1e-3
    a.num_steps = 600
    a.adversarial_warmup_steps = 300
    a.disc_channels = 8
    a.disc_layers = 2                       # 16³ → 8, 4, 3 → 2³ logits
    a.log_every = 50
    a.checkpoint_every = 300
    a.eval_shape = ()
    a.eval_batches = 0                      # every val volume
  if "smoke" in variants:
    config.data.shape = (16, 16, 16)
    config.data.num_subjects = 12
    config.data.records_per_shard = 5
    config.data.prefetch = 0
    a.channels = (8, 16)                    # ×2: 8³ × 4 latents
    a.num_res_blocks = (1, 1)
    a.norm_num_groups = 4
    a.patch_shape = (12, 12, 12)            # random crops of the 16³ volumes
    a.batch_size = 2
    a.learning_rate = 1e-3
    a.num_steps = 4
    a.adversarial_warmup_steps = 2          # two steps without, two with the discriminator
    a.disc_channels = 4
    a.disc_layers = 2                       # 12³ → 6, 3, 2 → 1³ logits
    a.log_every = 2
    a.checkpoint_every = 2
    a.eval_shape = ()
    a.eval_batches = 1
  return config
