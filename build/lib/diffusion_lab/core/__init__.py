"""The noise-process core: pure functions shared by the pixel and latent paths.

Imports neither Lightning nor Hydra, so it can be read and tested on its own.
"""

from diffusion_lab.core.loss import diffusion_loss, held_out_draws, validation_timesteps
from diffusion_lab.core.noise_process import (
    PREDICTION_TYPES,
    min_snr_weights,
    predicted_epsilon,
    predicted_x0,
    signal_and_noise_scales,
    snr,
    training_target,
)
from diffusion_lab.core.random import keyed_gaussian_sample, keyed_noise, keyed_timesteps, sample_keys
from diffusion_lab.core.sampling import sample_images

__all__ = [
    "PREDICTION_TYPES",
    "diffusion_loss",
    "held_out_draws",
    "keyed_gaussian_sample",
    "keyed_noise",
    "keyed_timesteps",
    "min_snr_weights",
    "predicted_epsilon",
    "predicted_x0",
    "sample_images",
    "sample_keys",
    "signal_and_noise_scales",
    "snr",
    "training_target",
    "validation_timesteps",
]
