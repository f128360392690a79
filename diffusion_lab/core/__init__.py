"""The diffusion core: objectives (`objectives`), timestep samplers (`timesteps`), loss weightings (`weighting`),
keyed randomness (`random`) and the sampling loop.

Pure PyTorch + diffusers, no Lightning or Hydra, so it can be read and tested on its own.
"""

from diffusion_lab.core.noise_process import (
    PREDICTION_TYPES,
    predicted_x0,
    signal_and_noise_scales,
    snr,
    training_target,
)
from diffusion_lab.core.objectives import DDPM, FlowMatching, Objective
from diffusion_lab.core.random import (
    keyed_coin,
    keyed_gaussian_sample,
    keyed_integers,
    keyed_normal,
    keyed_uniform,
    salted,
    sample_keys,
)
from diffusion_lab.core.sampling import sample_images
from diffusion_lab.core.timesteps import TimestepSampler
from diffusion_lab.core.weighting import NoiseLevels, Weighting, min_snr_weights

__all__ = [
    "DDPM",
    "PREDICTION_TYPES",
    "FlowMatching",
    "NoiseLevels",
    "Objective",
    "TimestepSampler",
    "Weighting",
    "keyed_coin",
    "keyed_gaussian_sample",
    "keyed_integers",
    "keyed_normal",
    "keyed_uniform",
    "min_snr_weights",
    "predicted_x0",
    "sample_images",
    "sample_keys",
    "salted",
    "signal_and_noise_scales",
    "snr",
    "training_target",
]
