"""The forward process x_t = alpha_t * x0 + sigma_t * eps and what training needs from it.

alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]); the velocity is
v = alpha_t * eps - sigma_t * x0 (Salimans & Ho 2022, arXiv:2202.00512). Because
alpha_t^2 + sigma_t^2 = 1, every parametrisation converts to every other one exactly.
"""

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def per_image(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a (B,) coefficient over the image dimensions of `like`."""
    return coefficient.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=like.dtype)


def signal_and_noise_scales(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) for each timestep, in float32 whatever the training precision."""
    alphas_cumprod = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod.sqrt(), (1.0 - alphas_cumprod).sqrt()


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 (zero at the last step of a zero-terminal-SNR schedule)."""
    alphas_cumprod = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def training_target(
    prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """What the network is trained to output for the given parametrisation."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return per_image(alpha, noise) * noise - per_image(sigma, x0) * x0


def predicted_x0(
    prediction_type: str, x_t: torch.Tensor, output: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The clean image implied by a network output at x_t (undefined for epsilon where alpha_t = 0)."""
    _check_prediction_type(prediction_type)
    alpha, sigma = per_image(alpha, x_t), per_image(sigma, x_t)
    if prediction_type == "epsilon":
        return (x_t - sigma * output) / alpha
    if prediction_type == "sample":
        return output
    return alpha * x_t - sigma * output
