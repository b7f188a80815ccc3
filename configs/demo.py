"""The tiny CPU demo: WDM on 32³ synthetic MS phantoms; the whole job runs in minutes on 2 cores.

Run:  python -m cf3d_jax.main --config=configs/demo.py --workdir=runs/demo --mode=all
The MS demo trains the showcase's recipe for 2,400 steps with its batch split over the CPU cores
(mesh.cpu_devices = -1; 7.7 min on 2 idle cores, measured), with the contrast-weighted loss
(objective.contrast_weight), and samples w = 1, 1.5, 2.
Variants (comma-separated): 'smoke' (used by the tests) shrinks it further
(--config=configs/demo.py:smoke); 'adni' switches to AD T1 phantoms with CN/MCI/AD prompts
(--config=configs/demo.py:adni, 900 steps, token-level text); 'long' trains 3,600 steps;
'showcase' trains the MS demo's recipe for 7,200 steps (about 30 min end to end on 2 cores; the
AD showcase 4,500 steps with uniform times and no contrast weight), calibrates each prompt's
guidance scale on held-out noises (--mode=calibrate) and samples w = 1, 1.5, 2 and the
calibrated set (docs/results.md, "The showcase with the contrast-weighted loss").
MAISI-RFlow objective instead of WDM's DDPM, one override: --config.objective.name=rflow
(rectified flow, Euler 30, L1 on the velocity, with the same skip preconditioning).
Real-subject counterfactuals from a trained demo: --mode=sample --config.sample.source=scan.nii.gz
"""

from cf3d_jax.config_base import apply_dataset, base_config, parse_variants

VARIANTS = ("smoke", "adni", "long", "showcase")


def get_config(arg: str | None = None):
  variants = parse_variants(arg, VARIANTS, "configs/demo.py")
  config = base_config()
  config.data.shape = (32, 32, 32)          # 6 mm voxels → 16³ × 8 wavelet subbands
  config.data.num_subjects = 96
  config.data.records_per_shard = 32
  config.data.phantom.lesion_radius_mm = (9.0, 18.0)  # lesions of 1.5–3 voxels' radius at 6 mm
  config.text.paraphrases = False           # one prompt per class in training (see below)
  config.model.base_channels = 16
  config.model.channel_mult = (1, 2, 2)     # 16³ → 8³ → 4³
  config.model.num_res_blocks = 1
  config.model.num_middle_blocks = 3
  config.model.attention_levels = (False, False, False)
  config.model.cross_attention_levels = (True, False, True)
  config.model.dropout = 0.0
  config.model.dropout_levels = (False, False, True)
  config.model.num_groups = 8
  config.model.head_channels = 16
  # The text also enters through the timestep embedding (pooled text → MLP) and modulates every
  # ResBlock (scale-shift): with the paraphrases off, min-SNR weighting and the larger lesions,
  # the prompt effect at w = 15 is 6× the cross-attention-only model's (docs/results.md).
  config.model.text_time_embedding = True
  config.model.scale_shift_norm = True
  # x0 = c_skip z_t + c_out F: the identity at low noise comes for free. Plain x0 output (WDM)
  # learned only the class-mean brain in 1,200 steps (docs/benchmarks.md, "demo training").
  config.objective.preconditioning = "skip"
  # One data std per Haar subband (root mean square of the demo phantoms' diffused coefficients,
  # LLL/3 first): a single sigma_data=0.3 let c_skip pass 2–3× too much noise into the fine
  # subbands, and the samples kept it as voxel texture that the lesion rule counted as ~60 mL
  # under every prompt (docs/results.md, "What makes the prompt act").
  config.objective.sigma_data_channels = (0.81, 0.166, 0.157, 0.096, 0.177, 0.096, 0.101, 0.083)
  config.objective.loss_weighting = "min_snr"   # x0 loss × min(SNR_t, 5): the detail-bearing low-noise steps count more
  config.train.num_steps = 900
  config.train.batch_size = 4
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 50
  config.train.ema_decay = 0.99
  config.train.log_every = 50
  config.train.checkpoint_every = 300
  config.sample.num_subjects = 4
  config.sample.batch_size = 12
  config.sample.guidance_scales = (1.0, 3.0, 15.0)  # AD demo: at 900 CPU steps the prompt needs strong guidance
  # The air around the head set to −1 after decoding (cf3d_jax.background; MAISI does the same
  # with its body mask): the samples' faint background speckle, not their anatomy, was most of
  # their FID (docs/results.md, "What the FID counts"). Real phantoms pass through unchanged.
  config.sample.background_threshold = 0.25
  # --mode=train_classifier / --mode=evaluate at demo size (docs/results.md has the tables).
  config.classifier.num_steps = 300
  config.classifier.batch_size = 8          # ≥ 8: BatchNorm sees 1 voxel per item at norm5 (32³)
  config.classifier.eval_every = 50
  config.eval.num_per_prompt = 24           # 72 volumes per guidance scale
  config.eval.guidance_scales = (1.0, 0.5, 2.0, 3.0)  # the first is Table 1's setting
  config.eval.batch_size = 12
  config.eval.ms_ssim_kernel = 3            # 32³ holds 4 scales of a 3-voxel window (needs 24)
  config.eval.ms_ssim_scales = 4
  config.eval.diversity_pairs = 200
  # The MS demo is the showcase's recipe (below) stopped at 2,400 steps: logit-normal training
  # times, the pooled text table, contrastive guidance at low noise, plus the contrast-weighted
  # loss below. Without that loss it put 67 % of the volumes in their class at w = 4 and at
  # w = 6 over seeds 0, 1, 2 (docs/results.md, "The 10-minute demo on both cores"); the
  # 900-step token-table demo of 2026-12-06 put 25-33 % on this machine at any w. Token-level text
  # (builtin:ms_minilm_tokens) stays one override away; at 900 steps it landed 10 of 12 on one
  # machine and 2 of 12 on another ("Token-level text").
  if not {"smoke", "showcase", "adni"} & set(variants):
    config.objective.time_sampling = "logit-normal"
    config.objective.logit_normal = (-1.0, 1.0)
    config.sample.guidance_negative = "factual"
    config.sample.guidance_interval = (0.0, 0.3)
    # Each position's loss weighted by the clean volume's local contrast (objective.contrast_weight):
    # the model draws its lesions at their brightness, where the unweighted loss left them as
    # faint smudges that only strong guidance (w = 4-6) pushed over the rule's threshold. Over
    # seeds 0, 1, 2: 89 % of the volumes in their prompted class at w = 2 (100 / 83 / 83 %),
    # every noise ordered, 35 dB outside the WM; unweighted: 67 % at w = 6, 29.6 dB
    # (docs/results.md, "Contrast-weighted loss"). λ = 0.25 draws brighter and overshoots on two
    # seeds of three (75 % at w = 1.5); λ ≥ 0.5 adds texture.
    config.objective.contrast_weight = 0.15
    config.sample.guidance_scales = (1.0, 1.5, 2.0)
    # The batch over both cores of a 2-core machine: 5.6 instead of 4.4 steps/s here
    # (docs/benchmarks.md); set 0 for one CPU device.
    config.mesh.cpu_devices = -1
    # Given scans (--config.sample.source): edit-friendly DDPM inversion reconstructs each scan
    # exactly and edits it further per unit of w than DDIM inversion (docs/results.md).
    config.sample.inversion = "edit_friendly"
    if "long" not in variants:
      config.train.num_steps = 2400
      config.train.checkpoint_every = 600
  if "adni" in variants:
    apply_dataset(config, "adni")
    if "smoke" not in variants and "showcase" not in variants:
      # Token-level text on AD phantoms too: at w = 15 it orders CN < MCI < AD for 4 of 4 noises
      # where the pooled table orders 3 (docs/results.md, "Token-level text").
      config.text.table = "builtin:adni_minilm_tokens"
    # The T1 phantoms' subband RMS (measured as for MS above).
    config.objective.sigma_data_channels = (0.807, 0.2, 0.187, 0.102, 0.219, 0.104, 0.107, 0.086)
  if "long" in variants:
    config.train.num_steps = 3600
    config.train.checkpoint_every = 600
  if "showcase" in variants:
    # The demo trained longer (constant rate: its step-900 checkpoint is the demo's). The
    # training curve (python -m cf3d_jax.curve, docs/results.md) evaluates every 900 steps.
    config.train.num_steps = 4500
    config.train.checkpoint_every = 900
    config.train.max_to_keep = 5            # every point of the curve (900 … 4,500)
    # Contrastive guidance (each counterfactual prompt against the factual one) acting only at
    # the low-noise end, t ≤ 0.3 T, where this model draws lesions: at w = 6 it landed 92 % of
    # 24 volumes in their prompted class with 30.8 dB outside the WM on seed 0 of one machine,
    # and 83 / 42 / 71 % on seeds 0 / 1 / 2 of another, every noise ordered (docs/results.md).
    config.sample.guidance_negative = "factual"
    config.sample.guidance_interval = (0.0, 0.3)
    config.sample.guidance_scales = (1.0, 3.0, 6.0)
    config.sample.num_subjects = 8
    # The effect size of one w differs between trained models (the same recipe under seeds
    # 0 / 1 / 2 moved "high" by +40 / +10 / +38 mL at w = 6): --mode=all first picks each
    # prompt's w on 8 held-out noises of this model (cf3d_jax.calibrate), and --mode=sample adds
    # the set 'calibrated' (docs/results.md, "Calibrated guidance").
    config.sample.calibrate = "adni" not in variants   # calibration needs the MS class ranges
    config.sample.calibration_scales = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0)
    if "adni" not in variants:
      # Training times drawn toward low noise (56 % of the steps at t < 0.3 T, where this model
      # draws lesions) and 7,200 steps: without the contrast weight, 90 % of the volumes in
      # their prompted class at w = 3 over three seeds, 30.5 dB outside the WM (docs/results.md,
      # "7,200 steps"). The AD showcase keeps the recipe it was measured with (uniform times,
      # 4,500 steps).
      config.objective.time_sampling = "logit-normal"
      config.objective.logit_normal = (-1.0, 1.0)
      config.train.num_steps = 7200
      config.train.max_to_keep = 8          # every point of the curve (900 … 7,200)
      # The demo's contrast-weighted loss (objective.contrast_weight, 2026-12-08): the model draws
      # its lesions at their brightness, so w = 2 does what w = 3-6 did. Seeds 0, 1, 2 at w = 2
      # (docs/results.md, "The showcase with the contrast-weighted loss"). The batch over both
      # cores, as the demo (25 instead of 30 min of training).
      config.objective.contrast_weight = 0.15
      config.mesh.cpu_devices = -1
      # A grid at the low end, where these models choose (2). Given scans (--mode=calibrate with
      # sample.source) respond more weakly: docs/counterfactuals.md gives the command with the
      # grid up to 12 that the unweighted showcase was measured with.
      config.sample.calibration_scales = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
      config.sample.guidance_scales = (1.0, 1.5, 2.0)   # w = 2.5 overshoots "moderate"
      # Given scans: edit-friendly DDPM inversion. On seeds 0, 1, 2 (2026-12-07, evening) 14 of 17
      # held-out "minimal" phantoms edited under "high" at w = 3 measure > 25 mL (DDIM inversion
      # on seeds 0 and 1: 0 of 12), the scan exact outside the WM (docs/results.md).
      config.sample.inversion = "edit_friendly"
  if "smoke" in variants:
    config.data.shape = (16, 16, 16)
    config.data.num_subjects = 12
    config.data.records_per_shard = 5
    config.model.base_channels = 8
    config.model.num_groups = 4
    config.model.head_channels = 8
    config.model.num_middle_blocks = 1
    config.train.num_steps = 4
    config.train.batch_size = 2
    config.data.phantom.lesion_radius_mm = (2.5, 6.0)
    config.train.warmup_steps = 1
    config.train.ema_decay = 0.0            # 4 steps: an EMA would still hold the zero-initialised
                                            # output layers, and the prompt could not reach the output
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.sample.num_subjects = 1
    config.sample.batch_size = 6
    config.sample.guidance_scales = (1.0, 3.0)
    config.objective.num_sample_steps = 3
    config.eval.num_per_prompt = 2
    config.eval.ms_ssim_scales = 3          # 16³ holds 3 scales of a 3-voxel window
    config.classifier.block_config = (2, 2)
    config.classifier.num_steps = 2
    config.classifier.batch_size = 2
  return config
