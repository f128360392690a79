"""Timestep samplers: where on the noise axis training spends its steps.

Each sampler draws a noise level t in [0, 1] per image from the image's key (t = 1 is pure noise, the
convention of rectified flow and of SD3, arXiv:2403.03206 section 3.1). A flow objective uses t as is; a DDPM
objective takes the discrete step floor(t * T). The densities are those SD3 compared (section 3.1,
equations 19-21); diffusers' `compute_density_for_timestep_sampling` draws them for a whole batch from one
generator, so here each image draws from its own keyed generator (exact resume, DDP equal to one process).
"""

import abc
import math

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from diffusion_lab.core.random import TIMESTEP_SALT, keyed_generators, keyed_integers, keyed_uniform, salted
from diffusion_lab.errors import ConfigError


class TimestepSampler(abc.ABC):
    """Base: `fractions` is the density; `indices` discretises it for schedules of T steps."""

    @abc.abstractmethod
    def fractions(self, keys: list[int], shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        """(len(keys),) float32 noise levels in [0, 1] for images of `shape` (C, H, W)."""

    def indices(
        self, keys: list[int], shape: tuple[int, ...], num_train_timesteps: int, device: torch.device | str
    ) -> torch.Tensor:
        """(len(keys),) int64 steps in [0, T): floor(t * T)."""
        t = self.fractions(keys, shape, device)
        return (t * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)

    def _uniform(self, keys: list[int], device) -> torch.Tensor:
        return keyed_uniform(salted(keys, TIMESTEP_SALT), device)

    def _diffusers_density(self, scheme: str, keys: list[int], device, **options) -> torch.Tensor:
        """diffusers' density, one keyed generator per image."""
        generators = keyed_generators(salted(keys, TIMESTEP_SALT), device)
        draws = [
            compute_density_for_timestep_sampling(scheme, 1, device=device, generator=g, **options)
            for g in generators
        ]
        return torch.cat(draws).float()


class Uniform(TimestepSampler):
    """t ~ U(0, 1): DDPM's Algorithm 1 (arXiv:2006.11239) and plain rectified flow."""

    def fractions(self, keys, shape, device):
        return self._uniform(keys, device)

    def indices(self, keys, shape, num_train_timesteps, device):
        # Uniform over T discrete steps: drawn as integers directly, as DDPM training always did.
        return keyed_integers(salted(keys, TIMESTEP_SALT), num_train_timesteps, device)


class LogitNormal(TimestepSampler):
    """t = sigmoid(n), n ~ N(mean, std): more steps at intermediate noise; SD3's best (rf/lognorm(0.00, 1.00),
    arXiv:2403.03206 eq. 19). mean > 0 biases toward noisier steps."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if std <= 0:
            raise ConfigError(f"model.objective.timesteps.std must be positive, got {std}")
        self.mean, self.std = float(mean), float(std)

    def fractions(self, keys, shape, device):
        return self._diffusers_density("logit_normal", keys, device, logit_mean=self.mean, logit_std=self.std)


class Mode(TimestepSampler):
    """Mode sampling with heavy tails (arXiv:2403.03206 eq. 20): t = 1 - u - scale * (cos^2(pi u / 2) - 1 + u).
    scale = 0 is uniform; scale in [-1, 2/(pi - 2)] keeps it a density. SD3's best of this family: 1.29."""

    def __init__(self, scale: float = 1.29) -> None:
        if not -1.0 <= scale <= 2 / (math.pi - 2):
            raise ConfigError(
                f"model.objective.timesteps.scale must lie in [-1, {2 / (math.pi - 2):.4f}] (a density), got {scale}"
            )
        self.scale = float(scale)

    def fractions(self, keys, shape, device):
        return self._diffusers_density("mode", keys, device, mode_scale=self.scale).clamp(0.0, 1.0)


class CosMap(TimestepSampler):
    """The density of the cosine schedule mapped to rectified flow (arXiv:2403.03206 eq. 21):
    t = 1 - 1 / (tan(pi u / 2) + 1)."""

    def fractions(self, keys, shape, device):
        u = self._uniform(keys, device)
        return (1 - 1 / (torch.tan(math.pi * u / 2) + 1)).clamp(0.0, 1.0)


def shift_noise_level(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t -> shift * t / (1 + (shift - 1) * t): the same signal-to-noise ratio at `shift` times the size
    (arXiv:2403.03206 eq. 23); what FlowMatchEulerDiscreteScheduler's `shift` does to its sigmas."""
    return shift * t / (1 + (shift - 1) * t)


class Shift(TimestepSampler):
    """Uniform t shifted toward noise by the input's size (arXiv:2403.03206 section 5.3.2): more pixels carry
    more redundant signal, so the same noise level destroys less of the image. shift = sqrt(H * W) /
    `base_size` (the side at which no shift is applied). A training density only: the fixed shift that
    sampling uses too is the flow objective's `shift` (the two compose)."""

    def __init__(self, base_size: int = 32) -> None:
        if base_size <= 0:
            raise ConfigError(f"model.objective.timesteps.base_size must be positive, got {base_size}")
        self.base_size = int(base_size)

    def shift_for(self, shape: tuple[int, ...]) -> float:
        height, width = shape[-2], shape[-1]
        return math.sqrt(height * width) / self.base_size

    def fractions(self, keys, shape, device):
        return shift_noise_level(self._uniform(keys, device), self.shift_for(shape))
