"""Keyed randomness: every draw of training is a pure function of (seed, step, sample), never of a global
random stream.

Keying each image's draws on (seed, optimizer step, dataset index) makes them a function of what is being
trained: a resumed run draws exactly what the straight run drew, a 2-process DDP run with batch B draws
exactly what a 1-process run with batch 2B draws, and a cached latent gets the flip its image would have
got. Each kind of draw XORs the key with its own salt (`salted`), so the noise, the timestep, the flip
and the caption dropout of one image are independent.

The API: `sample_keys` makes the keys; `keyed_normal`, `keyed_uniform`, `keyed_integers` and `keyed_coin`
draw from them, one row per key.
"""

import torch

_MASK64 = (1 << 64) - 1

# One salt per kind of draw.
TIMESTEP_SALT = 0x5A5A5A5A
POSTERIOR_SALT = 0x1A7E47
FLIP_SALT = 0xF11B
CAPTION_DROPOUT_SALT = 0xCA7
CLASS_IMAGE_SALT = 0xC1A55  # prior preservation: which class picture pairs with an instance picture
CLASS_NOISE_SALT = 0xC1A55E  # ... and its own noise and level


def mix_key(seed: int, step: int, sample_id: int) -> int:
    """A 63-bit key for (seed, step, sample): splitmix64's finaliser over a combination of the three, so
    nearby inputs give unrelated keys and every bit of the key is usable as a coin flip."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xD1B54A32D192ED03 + sample_id * 0xABC98388FB8FAC03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def sample_keys(seed: int, step: int, sample_ids: torch.Tensor) -> list[int]:
    """One key per image."""
    return [mix_key(seed, step, int(sample_id)) for sample_id in sample_ids.tolist()]


def salted(keys: list[int], salt: int) -> list[int]:
    """The keys of another kind of draw for the same images."""
    return [key ^ salt for key in keys]


def keyed_generators(keys: list[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per key, for library functions that draw from a generator."""
    return [torch.Generator(device=device).manual_seed(key) for key in keys]


def keyed_normal(
    keys: list[int],
    shape: tuple[int, ...],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    offset: float = 0.0,
) -> torch.Tensor:
    """(len(keys), *shape) standard Gaussian draws, one row per key.

    offset > 0 adds a per-channel constant, the noise offset of Guttenberg (2023,
    crosslabs.org/blog/diffusion-with-offset-noise), so the model can learn to change mean brightness.
    """
    rows = []
    for generator in keyed_generators(keys, device):
        row = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if offset:
            row = row + offset * torch.randn((shape[0], 1, 1), generator=generator, device=device)
        rows.append(row)
    return torch.stack(rows).to(dtype)


def keyed_uniform(keys: list[int], device: torch.device | str) -> torch.Tensor:
    """(len(keys),) float32 draws in [0, 1)."""
    return torch.cat([torch.rand((1,), generator=g, device=device) for g in keyed_generators(keys, device)])


def keyed_integers(keys: list[int], high: int, device: torch.device | str) -> torch.Tensor:
    """(len(keys),) int64 draws, uniform in [0, high)."""
    draws = [torch.randint(0, high, (1,), generator=g, device=device) for g in keyed_generators(keys, device)]
    return torch.cat(draws)


def keyed_coin(keys: list[int], p: float = 0.5) -> torch.Tensor:
    """(len(keys),) bool, each True with probability p (on the CPU: a decision, not a tensor op)."""
    return keyed_uniform(keys, "cpu") < p


def keyed_gaussian_sample(mean: torch.Tensor, std: torch.Tensor, keys: list[int]) -> torch.Tensor:
    """mean + std * eps with eps keyed per image: a sample of the VAE's latent distribution.

    Cached (mean, std) and a live VAE encode give the same sample for the same keys, so caching latents
    changes the speed of training, not its draws.
    """
    eps = keyed_normal(salted(keys, POSTERIOR_SALT), tuple(mean.shape[1:]), mean.device, torch.float32)
    return (mean.float() + std.float() * eps).to(mean.dtype)
