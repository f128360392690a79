"""Loss weightings: how much each noise level's error counts, for any objective.

A weighting sees the noise level of each image as its objective describes it (`NoiseLevels`): the
signal-to-noise ratio, sigma (the objective's noise coefficient: sqrt(1 - alpha_bar) for DDPM, t for flow
matching) and what the network predicts. The weightings of the literature are weights on the error of the
implied clean image x0 (min-SNR's paper; diffusers' SD3 scripts, which turn the velocity into x0 before the
loss); each is converted to a weight on the error of the network's own target (`x0_error_factor`), so it
means the same whatever the network predicts.
"""

import abc
from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3

from diffusion_lab.core import noise_process
from diffusion_lab.errors import ConfigError

# What a network can be trained to output: diffusers' prediction_type names (flow_prediction: eps - x0).
PREDICTION_TYPES = (*noise_process.PREDICTION_TYPES, "flow_prediction")


@dataclass(frozen=True)
class NoiseLevels:
    """Per image (B,): signal-to-noise ratio, the objective's sigma, and the network's parametrisation."""

    snr: torch.Tensor
    sigma: torch.Tensor
    prediction_type: str


class Weighting(abc.ABC):
    @abc.abstractmethod
    def __call__(self, levels: NoiseLevels) -> torch.Tensor:
        """(B,) float32 weights on each image's mean squared error."""


class NoWeighting(Weighting):
    """Every noise level counts the same on the network's own target (DDPM's simple loss)."""

    def __call__(self, levels):
        return torch.ones_like(levels.snr)


class MinSNR(Weighting):
    """Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556); see `min_snr_weights`."""

    def __init__(self, gamma: float = 5.0) -> None:
        if gamma <= 0:
            raise ConfigError(f"model.objective.weighting.gamma must be positive, got {gamma}")
        self.gamma = float(gamma)

    def __call__(self, levels):
        return min_snr_weights(levels.snr, self.gamma, levels.prediction_type)


# diffusers' smallest training sigma (1 / 1000): keeps sigma^-2 finite at a draw of t = 0.
_MIN_SIGMA = 1e-3


class SigmaSqrt(Weighting):
    """sigma^-2 on the x0 error: diffusers' `sigma_sqrt` (`compute_loss_weighting_for_sd3`, from the SD3
    training scripts; not in the SD3 paper). On flow's velocity error it is 1: the preconditioned x0 loss of
    those scripts is the plain velocity loss."""

    def __call__(self, levels):
        sigma = levels.sigma.float().clamp(min=_MIN_SIGMA)
        return compute_loss_weighting_for_sd3("sigma_sqrt", sigma) / x0_error_factor(levels)


class CosMap(Weighting):
    """2 / (pi (1 - 2 sigma + 2 sigma^2)) on the x0 error: diffusers' `cosmap`, the cosine schedule's
    weighting expressed on rectified flow's sigma (arXiv:2403.03206 eq. 21)."""

    def __call__(self, levels):
        weight = compute_loss_weighting_for_sd3("cosmap", levels.sigma.float()).float()
        return weight / x0_error_factor(levels)


def x0_error_factor(levels: NoiseLevels) -> torch.Tensor:
    """The MSE of the network's target divided by the MSE of the x0 it implies: SNR (epsilon), SNR + 1 (v),
    1 (sample), 1 / t^2 (flow velocity, x0 = x_t - t v)."""
    snr, prediction_type = levels.snr.float(), levels.prediction_type
    if prediction_type == "epsilon":
        return snr
    if prediction_type == "v_prediction":
        return snr + 1.0
    if prediction_type == "flow_prediction":
        return 1.0 / levels.sigma.float().clamp(min=_MIN_SIGMA) ** 2
    return torch.ones_like(snr)


def min_snr_weights(snr_values: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (arXiv:2303.09556), right for every parametrisation.

    The paper's weight is min(SNR, gamma) on the x0-MSE. Each parametrisation's MSE is the x0-MSE times a
    factor (epsilon: SNR, v: SNR + 1, sample: 1, flow velocity: 1 / t^2 = (1 + sqrt(SNR))^2), so the weight on
    *that* MSE divides it out. Dividing by SNR for v-prediction too is the bug of diffusers issue 9451.
    Written so that SNR = 0 (a zero-terminal-SNR step, flow's t = 1) and SNR = inf (flow's t = 0) give the
    limits instead of 0/0.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if gamma is None:
        return torch.ones_like(snr_values)
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "epsilon":
        return torch.clamp(gamma / snr_values, max=1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    if prediction_type == "flow_prediction":
        weights = clipped / (1.0 + snr_values.sqrt()) ** 2
        at_clean = torch.ones_like(snr_values) if gamma == float("inf") else torch.zeros_like(snr_values)
        return torch.where(torch.isinf(snr_values), at_clean, weights)
    return clipped
