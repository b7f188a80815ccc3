"""The default value and meaning of every config key; `configs/*.py` start from `base_config()`.

Configs are `ml_collections.ConfigDict`s, locked by the CLI (`config_flags`, lock_config=True),
so a misspelt override (`--config.train.num_step=…`) is an error naming the key. `validate`
(the one pass, `cf3d_jax.validation`) checks values the type system cannot (names, ranges,
shapes) and raises ConfigError naming the key.
"""

from __future__ import annotations

import os

import ml_collections

from cf3d_jax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  """WDM on MS FLAIR at 128³ (DESIGN.md §4) with the seed paper's text conditioning."""
  from cf3d_jax import parallel   # here, so importing this module (configs/*.py) stays light
  c = ml_collections.ConfigDict()
  c.seed = 0                                  # the one seed every random draw derives from

  c.space = ml_collections.ConfigDict()
  c.space.name = "wavelet"                    # where diffusion runs: 'wavelet' (WDM) | 'latent' (MAISI)
  c.space.lll_scale = 3.0                     # wavelet: LLL subband divided by this before diffusion
  c.space.autoencoder = ""                    # latent: VAE folder (convert maisi-vae / train_autoencoder); '' = WORKDIR/autoencoder/vae
  c.space.latent_channels = 4                 # latent: VAE latent channels (checked against the VAE)
  c.space.downsample = 4                      # latent: VAE downsampling per axis (checked against the VAE)
  c.space.scale_factor = 0.0                  # latent: z = latent × this; 0 = 1/std recorded by prepare_latents
  c.space.decode_splits = 1                   # latent: decode in this many depth chunks (memory; GroupNorm per chunk)
  c.space.encode_batch_size = 4               # latent: volumes per encoder call in prepare_latents

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "ms"                       # 'ms' (lesion load classes) | 'adni' (CN/MCI/AD)
  c.data.source = "phantom"                   # 'phantom' (synthetic, from MNI152) | 'manifest'
  c.data.manifest = ""                        # CSV: path, subject_id, lesion_volume_ml|diagnosis
  c.data.shape = (128, 128, 128)              # image grid (D, H, W), voxels
  c.data.fov_mm = 192.0                       # isotropic field of view (phantoms and resampling)
  c.data.num_subjects = 300                   # phantoms to generate
  c.data.class_fractions = (0.5, 0.3, 0.2)    # phantom class mix (deliberately imbalanced)
  c.data.split = (0.7, 0.15, 0.15)            # train/val/test fractions, by subject
  c.data.class_weighting = True               # sample train records ∝ 1/class count
  c.data.records_per_shard = 64               # records per ArrayRecord shard
  c.data.num_workers = 0                      # grain worker processes decoding/augmenting (0 = in-process)
  c.data.prefetch = 2                         # batches read ahead per process (0 = synchronous)
  c.data.read_threads = 2                     # threads reading ahead in each process (prefetch > 0)
  c.data.prepare_workers = -1                 # prepare: scan-conforming processes; -1 = min(cpus, 16), 0/1 = in-process
  c.data.max_scan_gb = 1.0                    # prepare: reject a scan whose reading would peak above this (header shape × (stored bytes + 4 for the float32 copy)), before reading it
  c.data.augment = ml_collections.ConfigDict()  # train-time augmentation, all off by default
  c.data.augment.intensity_scale = 0.0        # s ~ U(1 - a, 1 + a): x ← clip(-1 + s (x + 1) + b, -1, 1)
  c.data.augment.intensity_shift = 0.0        # b ~ U(-a, a) (in units of the [-1, 1] range)
  c.data.augment.flip_axes = ()               # volume axes (0=D/R-L, 1=H/A-P, 2=W/S-I) flipped w.p. 1/2; not anatomy-safe
  c.data.intensity_percentiles = (0.5, 99.5)  # robust min/max for real scans → [-1, 1]
  c.data.phantom = ml_collections.ConfigDict()
  c.data.phantom.deform_mm = 3.0              # amplitude of the per-subject smooth deformation
  c.data.phantom.bias_strength = 0.15         # multiplicative bias field amplitude
  c.data.phantom.noise_std = 0.03             # Rician noise std (fraction of full scale)
  c.data.phantom.lesion_radius_mm = (2.5, 6.0)  # range of a lesion's largest semi-axis, mm

  c.text = ml_collections.ConfigDict()
  c.text.table = "builtin:ms_minilm"          # embedding table: a .npz path or 'builtin:NAME'
  c.text.null_prob = 0.2                      # probability a training prompt becomes the null text
  c.text.paraphrases = True                   # draw one of the class's templates per sample

  c.model = ml_collections.ConfigDict()
  c.model.name = "unet"
  c.model.out_channels = 8                    # = 8 × image channels for the wavelet space
  c.model.base_channels = 64
  c.model.channel_mult = (1, 2, 2, 4, 4)      # wdm-3d at 128³; (1,2,2,4,4,4) at 256³
  c.model.num_res_blocks = 2
  c.model.num_middle_blocks = 4               # WDM has 2; the paper deepens the bottleneck
  c.model.attention_levels = (False,) * 5     # self-attention per level
  c.model.middle_attention = False
  c.model.cross_attention_levels = (True, False, True, False, True)  # text, incl. highest res
  c.model.middle_cross_attention = True
  c.model.head_channels = 32
  c.model.dropout = 0.1                       # used only where switched on below
  c.model.dropout_levels = (False, False, False, True, True)  # low-resolution levels only
  c.model.middle_dropout = True
  c.model.num_groups = 32
  c.model.resblock_updown = True
  c.model.text_time_embedding = False         # + pooled text → MLP added to the timestep embedding (not in the paper)
  c.model.scale_shift_norm = False            # ResBlocks modulate GN by scale/shift from the embedding (ADM; not in wdm-3d)
  c.model.conv_impl = "auto"                  # "auto" (CPU: "planes", else "xla") | "xla" | "im2col" | "planes"; same params
  c.model.dtype = "float32"                   # compute dtype: 'float32' | 'bfloat16'
  c.model.param_dtype = "float32"             # master weights (keep float32 with bf16 compute)
  # Rematerialisation per U-Net level (one entry per channel_mult level; () = none anywhere):
  # 'none' keeps activations, 'dots' keeps only conv/matmul outputs, 'full' recomputes the block.
  c.model.remat_levels = ()
  c.model.middle_remat = "none"               # the same for the middle blocks

  # --mode=train_autoencoder (cf3d_jax/autoencoder_train.py): MAISI's KL-VAE, DESIGN.md §4.
  c.autoencoder = ml_collections.ConfigDict()
  c.autoencoder.channels = (64, 128, 256)     # AutoencoderKL widths per level (MAISI); ×2**(levels-1) downsampling
  c.autoencoder.num_res_blocks = (2, 2, 2)    # residual blocks per level
  c.autoencoder.latent_channels = 4           # latent channels (= space.latent_channels for latent diffusion)
  c.autoencoder.norm_num_groups = 32          # GroupNorm groups (must divide every width)
  c.autoencoder.remat = False                 # rematerialise the ResBlocks in the backward pass (memory)
  c.autoencoder.conv_impl = "auto"            # as model.conv_impl
  c.autoencoder.num_steps = 100_000           # optimisation steps
  c.autoencoder.batch_size = 1                # patches per step (MAISI: 1)
  c.autoencoder.learning_rate = 1e-4          # Adam, generator and discriminator alike (MAISI)
  c.autoencoder.kl_weight = 1e-7              # × KL(q(z|x) ‖ N(0, I)) (MAISI)
  c.autoencoder.contrast_weight = 0.0         # λ: L1 weighted by the input's local contrast (small bright structures count more); 0 = MAISI's plain L1
  # Perceptual term: MAISI's squeeze-net LPIPS weights cannot be downloaded here, so we use
  # MedicalNet 3D ResNet features (normalised differences of its four stages) instead.
  c.autoencoder.perceptual_weight = 0.3       # × perceptual distance (MAISI's weight)
  c.autoencoder.perceptual_network = ""       # converted MedicalNet folder (convert medicalnet); "" = term off
  c.autoencoder.adversarial_weight = 0.1      # × least-squares GAN losses, generator and discriminator (MAISI)
  c.autoencoder.adversarial_warmup_steps = 10_000  # steps before the discriminator and its loss switch on
  c.autoencoder.disc_channels = 32            # PatchDiscriminator channels of the first layer (MAISI)
  c.autoencoder.disc_layers = 3               # PatchDiscriminator layers after the first conv (MAISI)
  c.autoencoder.patch_shape = (64, 64, 64)    # random training crop (D, H, W); () = the whole volume
  c.autoencoder.ema_decay = 0.0               # EMA of the VAE params, exported when > 0; 0 = no EMA
  c.autoencoder.log_every = 100               # steps between logged train metrics
  c.autoencoder.checkpoint_every = 5000       # steps between checkpoints
  c.autoencoder.max_to_keep = 3               # checkpoints kept
  c.autoencoder.eval_batches = 4              # val batches (× batch_size volumes) for metrics.json; 0 = all
  c.autoencoder.eval_shape = ()               # val metrics on this centre crop; () = the whole volume

  c.objective = ml_collections.ConfigDict()
  c.objective.name = "ddpm"                   # 'ddpm' (WDM, MAISI Linear) | 'rflow' (MAISI RFlow)
  c.objective.num_train_steps = 1000          # T (both: rflow times are continuous in [0, T])
  c.objective.num_sample_steps = 0            # sampler steps; 0 = the family's default (DDIM 25, RFlow 30)
  c.objective.sampler = "default"             # ddpm: 'ddim' (default) | 'ancestral'; rflow: 'euler' (default) | 'heun'
  c.objective.loss = "default"                # 'mse' | 'l1'; default: ddpm mse, rflow l1 (MAISI)
  c.objective.preconditioning = "none"        # 'none' (WDM, MAISI) | 'skip' (EDM-style, see objectives)
  c.objective.sigma_data = 0.3                # data std for 'skip' (wavelet coefficients ≈ 0.3)
  c.objective.loss_weighting = "none"         # 'none' | 'edm' (1/c_out²: unit-variance targets per noise level and channel; needs 'skip') | 'min_snr' (ddpm x0)
  c.objective.snr_range = (0.0, 5.0)          # 'min_snr': x0 weight clip(SNR_t, lo, hi); (0, 5) = Hang et al.'s min-SNR-5
  c.objective.contrast_weight = 0.0          # λ > 0 (ddpm and rflow): each position's loss × (1 + λ c / mean c), c the clean target's local contrast (squared deviation from its 3³ box mean, per channel in data stds), normalised to mean 1: small bright structures such as lesions weigh more; 0 = every position alike
  c.objective.contrast_source = "clean"      # the volume whose local contrast sets contrast_weight's map: 'clean' (z0: the learned distribution tilts toward contrast) | 'noisy' (z_t, which the network sees: the optimum stays E[z0 | z_t], only the model's capacity moves)
  c.objective.contrast_channels = ()         # channels whose local contrast sets contrast_weight's map (indices; () = all; (0,) = the Haar LLL subband: blobs and edges, not voxel texture)
  c.objective.channel_weight_power = 0.0     # > 0 (ddpm and rflow; needs sigma_data_channels): each diffused channel's loss × (max σ / σ_c)^p, σ_c from sigma_data_channels (2 = every channel's error relative to its own scale); 0 = channels weighted equally
  c.objective.sigma_data_channels = ()        # 'skip': one std per diffused channel (e.g. per Haar subband); () = sigma_data for all
  # DDPM only:
  c.objective.beta_schedule = "linear"        # 'linear' | 'scaled_linear'
  c.objective.beta_start = 1e-4
  c.objective.beta_end = 0.02
  c.objective.prediction = "x0"               # 'x0' (WDM) | 'eps' (MAISI Linear) | 'v'
  c.objective.eta = 0.0                       # DDIM eta (0 = deterministic)
  c.objective.timestep_spacing = "leading"    # 'leading' | 'trailing' | 'linspace'
  c.objective.ancestral_variance = "fixed_small"  # ancestral sampler: 'fixed_small' | 'fixed_large'
  # Both objectives: training times t/T drawn uniform (WDM, MAISI) or logit-normal
  c.objective.time_sampling = "uniform"       # training t: 'uniform' (WDM, MAISI) | 'logit-normal' (s = sigmoid(loc + scale·n))
  c.objective.logit_normal = (0.0, 1.0)       # (loc, scale) of the logit-normal; loc < 0 trains the low-noise end more
  # Rectified flow only (MONAI RFlowScheduler):
  c.objective.time_shift = True               # resolution shift s' = r s/(1+(r−1)s), train and sample
  c.objective.shift_base_numel = 32 ** 3      # r = shift_scale · (D·H·W of the diffused tensor / this)^(1/3)
  c.objective.shift_scale = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1_000_000
  c.train.batch_size = 1                      # global batch
  c.train.learning_rate = 1e-5
  c.train.warmup_steps = 0
  c.train.lr_schedule = "constant"            # after warmup: 'constant' | 'cosine' (decay to final_lr_fraction · learning_rate)
  c.train.lr_decay_steps = 0                  # cosine: the step where the decay ends (0 = train.num_steps)
  c.train.final_lr_fraction = 0.0             # cosine: the rate at and after lr_decay_steps, as a fraction of learning_rate
  c.train.weight_decay = 0.0
  c.train.grad_clip_norm = 1.0                # 0 disables clipping
  c.train.ema_decay = 0.9999
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.train.max_to_keep = 3
  c.train.init_from = ""                      # converted U-Net folder (convert wdm-unet) to start from; new attention / extra middle blocks keep their (identity) init
  c.train.allow_config_change = ()           # keys allowed to differ from the workdir's recorded config (e.g. ('train.learning_rate',) to fine-tune); shape keys never

  c.sample = ml_collections.ConfigDict()
  c.sample.prompts = ("Subject has minimal lesion load.", "Subject has moderate lesion load.",
                      "Subject has high lesion load.")   # first = the factual reference
  c.sample.guidance_scales = (1.0,)           # CFG w: out = u + w (c − u); 1 = conditional only
  c.sample.guidance_interval = (0.0, 1.0)     # CFG only where t/T lies in [lo, hi] (1 = pure noise); elsewhere w = 1
  c.sample.guidance_rescale = 0.0             # φ of guidance rescale (Lin et al. 2024): pull the guided output back to the conditional one's std; 0 = off
  c.sample.guidance_negative = "null"         # what a prompt is guided against: 'null' = the null text (CFG, the paper's); 'factual' = against the factual prompt A (contrastive: out_A + w (out_B − out_A); the factual is out_A at every w)
  c.sample.background_threshold = 0.0         # > 0: each volume's background (voxels within this of −1 that connect to the grid's border through such voxels) set to −1 after decoding, as MAISI regularizes the air; 0 = off (cf3d_jax.background)
  c.sample.background_margin = 0              # > 0: background voxels within this many face steps of brighter ones stay as decoded (keeps a dark edge)
  c.sample.background_min_island = 27         # brighter specks of fewer voxels, surrounded by that background, are background too; 0 = keep every speck
  # Calibrated guidance (cf3d_jax.calibrate; phantom data with class ranges, MS):
  c.sample.calibrate = False                  # --mode=sample and --mode=evaluate add the set 'calibrated' (each prompt at the w --mode=calibrate chose for this model); --mode=all calibrates first
  c.sample.calibration_scales = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0)  # the w grid: per prompt, the w with the most volumes in the prompted class
  c.sample.calibration_noises = 8             # noises the scales are chosen on (never the sample or eval noises); with sample.source, validation phantoms (each inverted, decoded under the other prompts)
  c.sample.calibration_margin = 0.0           # a calibration volume counts as in class only inside the range shrunk by this fraction at each finite bound (0.1: minimal < 9.1, moderate 11–22.7, high ≥ 27.5 mL)
  c.sample.calibration_min_psnr = 0.0         # dB: only scales whose mean PSNR factual vs counterfactual outside the template WM reaches this are chosen (0 = any; none reaches it: the highest-PSNR scale)
  c.sample.num_subjects = 8                   # K fixed noises
  c.sample.batch_size = 8                     # volumes per sampler call
  c.sample.use_ema = True
  c.sample.checkpoint_step = -1               # -1 = latest
  # Real-subject counterfactuals (sample mode): invert each scan under its factual prompt, then
  # decode under every prompt. NIfTI paths (comma-separated, globs, folders) or a CSV with a
  # `path` column and `prompt` or lesion_volume_ml/diagnosis columns. Empty = synthetic subjects.
  c.sample.source = ""
  c.sample.source_prompts = ()                # factual prompt per scan; () = the CSV's, else prompts[0]
  c.sample.inversion = "ddim"                 # 'ddim' (deterministic; inversion_refine applies) or
                                              # 'edit_friendly' (DDPM noise maps, Huberman-Spiegelglas
                                              # et al. 2024: exact reconstruction, stronger edits)
  c.sample.inversion_refine = 3               # fixed-point refinements per inversion step (0 = plain)
  c.sample.inversion_depth = 1.0              # fraction of the sampler grid inverted (1 = to pure noise;
                                              # < 1 stops part-way: the prompt changes more, SDEdit-like)
  c.sample.edit_mask = ""                     # region a counterfactual may change: '' = everywhere; 'template_wm'
                                              # (phantoms) or a NIfTI mask on the grid. Outside it the decode follows
                                              # the given scan's inversion (output = input there) or, from noise, the
                                              # factual prompt's trajectory (output = the factual volume there)

  c.eval = ml_collections.ConfigDict()
  c.eval.lesion_threshold = 0.2               # lesion rule: intensity > this inside template WM
  # --mode=evaluate (the paper's Tables 1 and 2; cf3d_jax/evaluate.py):
  c.eval.num_per_prompt = 333                 # generated subjects (fixed noises) per prompt; paper 333
  c.eval.guidance_scales = (1.0, 2.0, 3.0)    # the sweep (Table 2); the first is Table 1's setting
  c.eval.batch_size = 8                       # volumes per sampler call
  c.eval.real_split = "test"                  # real volumes for FID and classifier accuracy
  c.eval.ms_ssim_kernel = 7                   # Gaussian window (wdm-3d: 7; needs ≥ 16·kernel voxels)
  c.eval.ms_ssim_scales = 5                   # MS-SSIM scales (fewer for small volumes)
  c.eval.diversity_pairs = 500                # pairs drawn for MS-SSIM diversity (0 = all pairs)
  c.eval.med3d = ""                           # converted MedicalNet dir (convert medicalnet); "" = random-init ResNet-10 (relative FID only)
  c.eval.classifier = ""                      # classifier dir; "" = WORKDIR/classifier if trained

  c.classifier = ml_collections.ConfigDict()  # --mode=train_classifier (3D DenseNet-121)
  c.classifier.num_steps = 2000
  c.classifier.batch_size = 4
  c.classifier.learning_rate = 1e-4
  c.classifier.weight_decay = 1e-4
  c.classifier.dropout = 0.0
  c.classifier.eval_every = 200               # validation accuracy every N steps (best kept)
  c.classifier.block_config = (6, 12, 24, 16)  # dense layers per block: DenseNet-121 (the paper)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)                   # (data, fsdp, spatial); -1 = the remaining devices
  # Logical axis → mesh axes, in order of precedence (cf3d_jax.parallel). Default: batch over
  # data × fsdp, volumes split along depth on spatial, params/EMA/Adam FSDP-sharded on fsdp.
  # Axes that do not divide a dimension leave it unsplit.
  c.mesh.rules = parallel.DEFAULT_RULES
  # Split a CPU host into this many JAX devices before JAX starts (the mesh then spreads the
  # batch over them; XLA's CPU backend leaves cores idle otherwise): 0 = JAX's own (1, or what
  # $XLA_FLAGS forces), -1 = auto (the most, up to the usable cores, that divide the mode's
  # batches). Only the CPU backend; changes float rounding, so keep it fixed across a resume.
  c.mesh.cpu_devices = 0
  return c


OBJECTIVE_PRESETS = {
    # WDM (wdm-3d): DDPM, linear betas 1e-4 → 0.02, x0 prediction, MSE, DDIM 25 ("leading").
    "wdm": dict(name="ddpm", beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                prediction="x0", sampler="ddim", num_sample_steps=25, eta=0.0,
                timestep_spacing="leading", loss="mse", preconditioning="none",
                sigma_data_channels=(), loss_weighting="none"),
    # MAISI Linear: DDPM 1000 steps, scaled-linear betas 0.0015 → 0.0195, epsilon prediction,
    # no sample clipping (the latent space has none), ancestral sampling over all 1000 steps.
    "maisi_linear": dict(name="ddpm", beta_schedule="scaled_linear", beta_start=0.0015,
                         beta_end=0.0195, prediction="eps", sampler="ancestral",
                         num_sample_steps=1000, timestep_spacing="leading", loss="mse",
                         preconditioning="none", sigma_data_channels=(), loss_weighting="none"),
    # MAISI RFlow: rectified flow, uniform continuous t with the resolution shift, velocity, L1,
    # Euler 30.
    "maisi_rflow": dict(name="rflow", sampler="euler", num_sample_steps=30,
                        time_sampling="uniform", time_shift=True, shift_base_numel=32 ** 3,
                        shift_scale=1.0, loss="l1", preconditioning="none",
                        sigma_data_channels=(), loss_weighting="none"),
}


def apply_objective_preset(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """Sets `c.objective` to one model family's published settings ('wdm' | 'maisi_linear' |
  'maisi_rflow'), the published recipe: no per-channel sigma_data, no loss weighting; other keys
  keep their values. Returns c."""
  if preset not in OBJECTIVE_PRESETS:
    raise ConfigError(f"objective preset {preset!r}: expected one of {sorted(OBJECTIVE_PRESETS)}")
  for key, value in OBJECTIVE_PRESETS[preset].items():
    c.objective[key] = value
  return c


DATASET_DEFAULTS = {
    "ms": dict(table="builtin:ms_minilm",
               prompts=("Subject has minimal lesion load.", "Subject has moderate lesion load.",
                        "Subject has high lesion load.")),
    "adni": dict(table="builtin:adni_minilm",
                 prompts=("Subject is cognitively normal.",
                          "Subject has mild cognitive impairment.",
                          "Subject has Alzheimer's disease.")),
}


def apply_dataset(c: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
  """Switches data.dataset and what goes with it: the builtin text table and the sample prompts
  (canonical prompt per class, the first = the factual reference). Returns c."""
  if dataset not in DATASET_DEFAULTS:
    raise ConfigError(f"dataset {dataset!r}: expected one of {sorted(DATASET_DEFAULTS)}")
  biomedclip = c.text.table == biomedclip_table(c.data.dataset)
  c.data.dataset = dataset
  c.text.table = biomedclip_table(dataset) if biomedclip else DATASET_DEFAULTS[dataset]["table"]
  c.sample.prompts = DATASET_DEFAULTS[dataset]["prompts"]
  return c


def biomedclip_table(dataset: str) -> str:
  """Where the paper configs' 'biomedclip' variant expects the dataset's BiomedCLIP token table
  (relative to the working directory). Made once, offline, from a local copy of BiomedCLIP:
  `python -m cf3d_jax.text.embed --encoder=biomedclip --model=PATH --dataset=DATASET
  --output=tables/DATASET_biomedclip.npz` (docs/data.md)."""
  return f"tables/{dataset}_biomedclip.npz"


def parse_variants(arg: str | None, known: tuple[str, ...], config_file: str) -> list[str]:
  """The comma-separated variants of a `get_config(arg)`; ValueError naming the file for an
  unknown one."""
  variants = [v.strip() for v in (arg or "").split(",") if v.strip()]
  unknown = sorted(set(variants) - set(known))
  if unknown:
    raise ValueError(f"{config_file}: unknown variant(s) {unknown}; known: {known}")
  return variants


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Loads a config file's `get_config(arg)` as `--config=PATH:ARG` would (unlocked): for
  notebooks and tests."""
  import importlib.util
  if not os.path.exists(path):
    raise ConfigError(f"{path}: config file not found")
  name = "cf3d_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: defines no get_config(arg)")
  return module.get_config(arg)


def validate(c: ml_collections.ConfigDict, mode: str | None = None) -> None:
  """The one validation pass (`cf3d_jax.validation.validate`): ranges, conditions between keys,
  names against the registries and, per `mode`, the grids; ConfigError naming the key."""
  from cf3d_jax import validation   # here, so importing this module (configs/*.py) stays light
  validation.validate(c, mode)
