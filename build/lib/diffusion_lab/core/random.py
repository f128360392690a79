"""Noise and timesteps drawn from per-sample keys instead of a global random stream.

Keying each image's draw on (seed, optimizer step, dataset index) makes the noise a pure function of what
is being trained: a resumed run draws exactly what the straight run drew, and a 2-process DDP run with
batch B draws exactly what a 1-process run with batch 2B draws, whatever RNG other code consumed.
"""

import torch

_MASK64 = (1 << 64) - 1


def mix_key(seed: int, step: int, sample_id: int) -> int:
    """A 63-bit key for (seed, step, sample): splitmix64's finaliser over a combination of the three, so
    nearby inputs give unrelated keys and every bit of the key is usable as a coin flip."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xD1B54A32D192ED03 + sample_id * 0xABC98388FB8FAC03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def sample_keys(seed: int, step: int, sample_ids: torch.Tensor) -> list[int]:
    """One generator seed per image."""
    return [mix_key(seed, step, int(sample_id)) for sample_id in sample_ids.tolist()]


def _generators(keys: list[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(key) for key in keys]


def keyed_timesteps(keys: list[int], num_train_timesteps: int, device: torch.device) -> torch.Tensor:
    """A uniform timestep in [0, T) per key."""
    draws = [
        torch.randint(0, num_train_timesteps, (1,), generator=generator, device=device)
        for generator in _generators([k ^ 0x5A5A5A5A for k in keys], device)
    ]
    return torch.cat(draws)


def keyed_noise(
    keys: list[int], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, offset: float = 0.0
) -> torch.Tensor:
    """Standard Gaussian noise of `shape` (per image) for each key.

    offset > 0 adds a per-channel constant, the noise offset of Guttenberg (2023,
    crosslabs.org/blog/diffusion-with-offset-noise), so the model can learn to change mean brightness.
    """
    images = []
    for generator in _generators(keys, device):
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if offset:
            noise = noise + offset * torch.randn((shape[0], 1, 1), generator=generator, device=device)
        images.append(noise)
    return torch.stack(images).to(dtype)


def keyed_gaussian_sample(mean: torch.Tensor, std: torch.Tensor, keys: list[int]) -> torch.Tensor:
    """mean + std * eps with eps keyed per image: a sample of the VAE's latent distribution.

    Cached (mean, std) and a live VAE encode give the same sample for the same keys, so caching latents
    changes the speed of training, not its draws. The salt keeps eps independent of the diffusion noise.
    """
    eps = keyed_noise([key ^ 0x1A7E47 for key in keys], tuple(mean.shape[1:]), mean.device, torch.float32)
    return (mean.float() + std.float() * eps).to(mean.dtype)
