"""Image metrics (PSNR, 3D SSIM / MS-SSIM, diversity), Fréchet distance, phantom ground-truth rules."""

from cf3d_jax.metrics.fid import feature_statistics, fid_from_features, frechet_distance
from cf3d_jax.metrics.image import (MS_SSIM_WEIGHTS, MetricInputError, ms_ssim_3d, ms_ssim_min_size,
                                    pairwise_ms_ssim_diversity, psnr, sample_pairs, ssim_3d)

__all__ = ["MS_SSIM_WEIGHTS", "MetricInputError", "feature_statistics", "fid_from_features",
           "frechet_distance", "ms_ssim_3d", "ms_ssim_min_size", "pairwise_ms_ssim_diversity",
           "psnr", "sample_pairs", "ssim_3d"]
