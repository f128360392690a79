"""The denoising objective shared by the pixel and the latent path."""

import torch
import torch.nn.functional as F

from diffusion_lab.core.noise_process import min_snr_weights, signal_and_noise_scales, snr, training_target
from diffusion_lab.core.random import keyed_noise, keyed_timesteps, sample_keys


def diffusion_loss(
    net: torch.nn.Module,
    noise_scheduler,
    x0: torch.Tensor,
    keys: list[int],
    *,
    timesteps: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    **net_kwargs,
) -> torch.Tensor:
    """DDPM training loss (Ho et al. 2020, arXiv:2006.11239, Algorithm 1) for any diffusers denoiser.

    `x0` is the batch of clean training images (pixels or latents); `keys` seed each image's draws
    (see `core.random`). Passing `timesteps` fixes them, as held-out validation does.
    """
    config = noise_scheduler.config
    # A timestep per image, and Gaussian noise of the image's shape.
    if timesteps is None:
        timesteps = keyed_timesteps(keys, config.num_train_timesteps, x0.device)
    noise = keyed_noise(keys, tuple(x0.shape[1:]), x0.device, x0.dtype, offset=noise_offset)
    # Noise every image to its step in one shot: x_t = alpha_t * x0 + sigma_t * eps.
    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    # The network predicts the target of the scheduler's parametrisation.
    prediction = net(noisy, timesteps, **net_kwargs).sample
    alpha, sigma = signal_and_noise_scales(noise_scheduler.alphas_cumprod, timesteps)
    target = training_target(config.prediction_type, x0, noise, alpha, sigma)
    # Mean squared error per image, optionally min-SNR weighted, averaged over the batch.
    per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    weights = min_snr_weights(
        snr(noise_scheduler.alphas_cumprod, timesteps), snr_gamma, config.prediction_type
    )
    return (per_image * weights).mean()


def held_out_draws(
    seed: int, sample_ids: torch.Tensor, num_train_timesteps: int, levels: int
) -> tuple[list[int], torch.Tensor]:
    """Keys and timesteps for held-out loss: the same noise and timestep for an image every time it is
    evaluated (keyed on the image, not the step), so `val/loss` is comparable across runs."""
    return sample_keys(seed, -1, sample_ids), validation_timesteps(sample_ids, num_train_timesteps, levels)


def validation_timesteps(sample_ids: torch.Tensor, num_train_timesteps: int, levels: int) -> torch.Tensor:
    """Fixed timesteps for held-out loss: image i is always noised to the (i mod levels)-th of `levels`
    evenly spaced steps, so `val/loss` is comparable across runs, batch sizes and world sizes."""
    grid = torch.linspace(0, num_train_timesteps - 1, levels, device=sample_ids.device).round().long()
    return grid[sample_ids.long() % levels]
