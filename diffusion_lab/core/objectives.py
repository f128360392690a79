"""Training objectives: how a clean batch becomes a noisy input, a target and a weighted loss.

An objective owns the noise process (its diffusers scheduler, which sampling and exports reuse), a
`TimestepSampler` (where on the noise axis training draws) and a `Weighting` (how much each level's error
counts). Models only say how to get x0 and the conditioning; `Objective.loss` does the rest, with every draw
keyed per image (`core.random`).

- `DDPM`: x_t = alpha_t x0 + sigma_t eps on a diffusers DDPM schedule (Ho et al. 2020, arXiv:2006.11239),
  epsilon / v / sample targets.
- `FlowMatching`: rectified flow x_t = (1 - t) x0 + t eps with the velocity target eps - x0 (Liu et al. 2022,
  arXiv:2209.03003; Lipman et al. 2022, arXiv:2210.02747), as SD3 trains (arXiv:2403.03206); the network
  sees t * T as its timestep, as diffusers' flow schedulers feed it.
"""

import abc
import math

import diffusers
import torch
import torch.nn.functional as F

from diffusion_lab.compat.diffusers import explicit_config
from diffusion_lab.core.loss_mask import LossMask
from diffusion_lab.core.noise_process import (
    per_image,
    predicted_x0,
    signal_and_noise_scales,
    snr,
    training_target,
)
from diffusion_lab.core.random import keyed_normal
from diffusion_lab.core.schedulers import has_zero_terminal_snr, with_zero_terminal_snr
from diffusion_lab.core.timesteps import TimestepSampler, Uniform, shift_noise_level
from diffusion_lab.core.weighting import NoiseLevels, NoWeighting, Weighting
from diffusion_lab.errors import ConfigError


class Objective(abc.ABC):
    """What every objective provides (its abstract methods); `loss` is shared."""

    kind: str  # which samplers fit: "ddpm" or "flow" (see core.schedulers)

    def __init__(
        self,
        noise_scheduler,
        timesteps: TimestepSampler | None = None,
        weighting: Weighting | None = None,
        noise_offset: float = 0.0,
    ) -> None:
        self.noise_scheduler = noise_scheduler
        self.timesteps = timesteps or Uniform()
        self.weighting = weighting or NoWeighting()
        self.noise_offset = float(noise_offset)

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    @property
    @abc.abstractmethod
    def prediction_type(self) -> str:
        """diffusers' name of what the network predicts."""

    # ---- the noise process, per image ------------------------------------------------------------------
    @abc.abstractmethod
    def draw_times(self, keys: list[int], shape: tuple[int, ...], device) -> torch.Tensor:
        """Training noise levels, in the objective's own time variable."""

    @abc.abstractmethod
    def validation_times(self, sample_ids: torch.Tensor, levels: int) -> torch.Tensor:
        """Fixed levels for held-out loss: image i always gets the (i mod levels)-th of `levels` evenly spaced
        ones, so `val/loss` is comparable across runs, batch sizes and world sizes."""

    @abc.abstractmethod
    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """See the subclasses."""

    @abc.abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """See the subclasses."""

    @abc.abstractmethod
    def earlier_times(self, times: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
        """Less noisy levels: each time moved toward the clean end by `gaps`, a fraction of the whole range
        (SRA's teacher level)."""

    @abc.abstractmethod
    def network_timesteps(self, times: torch.Tensor) -> torch.Tensor:
        """What the network is given as its timestep."""

    @abc.abstractmethod
    def noise_levels(self, times: torch.Tensor) -> NoiseLevels:
        """See the subclasses."""

    @abc.abstractmethod
    def predicted_x0(self, x_t: torch.Tensor, output: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """The clean image implied by a network output at x_t."""

    # ---- the loss --------------------------------------------------------------------------------------
    def draws(
        self, x0: torch.Tensor, keys: list[int], times: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise levels, noise) of a batch: keyed, so every caller (the loss, an alignment teacher) gets the
        same ones for the same keys."""
        shape = tuple(x0.shape[1:])
        if times is None:
            times = self.draw_times(keys, shape, x0.device)
        return times, keyed_normal(keys, shape, x0.device, x0.dtype, offset=self.noise_offset)

    def loss(
        self,
        net: torch.nn.Module,
        x0: torch.Tensor,
        keys: list[int],
        *,
        times: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        loss_mask: LossMask | None = None,
        **net_kwargs,
    ) -> torch.Tensor:
        """The weighted mean squared error of the network's prediction on a batch of clean inputs `x0`
        (pixels or latents). `keys` seed each image's draws; passing `times` fixes the noise levels, as
        held-out validation does; `mask` (N, 1, H, W) in [0, 1] weights the error per pixel as `loss_mask` says."""
        times, noise = self.draws(x0, keys, times)
        prediction = net(self.noisy(x0, noise, times), self.network_timesteps(times), **net_kwargs).sample
        target = self.target(x0, noise, times)
        squared_error = F.mse_loss(prediction.float(), target.float(), reduction="none")
        if mask is None:
            per_image = squared_error.flatten(1).mean(dim=1)
        else:
            per_image = (loss_mask or LossMask()).per_image(squared_error, mask)
        return (per_image * self.weighting(self.noise_levels(times))).mean()


class DDPM(Objective):
    """The DDPM noise process of any diffusers DDPM-family scheduler; its `prediction_type` picks the target and
    its `rescale_betas_zero_snr` makes the last step pure noise (arXiv:2305.08891), with trailing spacing."""

    kind = "ddpm"

    def __init__(
        self,
        noise_scheduler,
        timesteps: TimestepSampler | None = None,
        weighting: Weighting | None = None,
        noise_offset: float = 0.0,
    ) -> None:
        if not hasattr(noise_scheduler, "alphas_cumprod"):
            raise ConfigError(
                f"model/objective=ddpm needs a DDPM-family noise scheduler (betas, alphas_cumprod); got "
                f"{type(noise_scheduler).__name__}: use model/objective=flow_matching for it"
            )
        if has_zero_terminal_snr(noise_scheduler.config):
            noise_scheduler = with_zero_terminal_snr(noise_scheduler)
        super().__init__(noise_scheduler, timesteps, weighting, noise_offset)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def draw_times(self, keys, shape, device):
        return self.timesteps.indices(keys, shape, self.num_train_timesteps, device)

    def validation_times(self, sample_ids, levels):
        grid = torch.linspace(0, self.num_train_timesteps - 1, levels, device=sample_ids.device)
        return grid.round().long()[sample_ids.long() % levels]

    def noisy(self, x0, noise, times):
        return self.noise_scheduler.add_noise(x0, noise, times)

    def target(self, x0, noise, times):
        alpha, sigma = signal_and_noise_scales(self.noise_scheduler.alphas_cumprod, times)
        return training_target(self.prediction_type, x0, noise, alpha, sigma)

    def earlier_times(self, times, gaps):
        steps = (gaps.to(times.device) * (self.num_train_timesteps - 1)).round().long()
        return (times - steps).clamp(min=0)

    def network_timesteps(self, times):
        return times

    def noise_levels(self, times):
        _, sigma = signal_and_noise_scales(self.noise_scheduler.alphas_cumprod, times)
        return NoiseLevels(snr(self.noise_scheduler.alphas_cumprod, times), sigma, self.prediction_type)

    def predicted_x0(self, x_t, output, times):
        alpha, sigma = signal_and_noise_scales(self.noise_scheduler.alphas_cumprod, times)
        return predicted_x0(self.prediction_type, x_t, output, alpha, sigma)


class FlowMatching(Objective):
    """Rectified flow on diffusers' `FlowMatchEulerDiscreteScheduler`, whose `shift` (noise levels mapped by
    shift * t / (1 + (shift - 1) * t), arXiv:2403.03206 eq. 23) applies to training draws and to sampling
    alike (None keeps the scheduler's). Given a DDPM-family scheduler (a pixel model's default, a Stable
    Diffusion checkpoint's), it keeps only its number of training timesteps, with shift 1."""

    kind = "flow"

    def __init__(
        self,
        noise_scheduler,
        timesteps: TimestepSampler | None = None,
        weighting: Weighting | None = None,
        noise_offset: float = 0.0,
        shift: float | None = None,
    ) -> None:
        config = {"num_train_timesteps": noise_scheduler.config.num_train_timesteps, "shift": 1.0}
        if isinstance(noise_scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
            config = explicit_config(noise_scheduler.config)
        shift = config["shift"] if shift is None else shift
        if shift <= 0:
            raise ConfigError(f"model.objective.shift must be positive, got {shift}")
        if config.get("use_dynamic_shifting") and shift != config["shift"]:
            raise ConfigError(
                f"model.objective.shift={shift}: this scheduler's shift follows resolution (use_dynamic_shifting, "
                "as Flux's); to fix one instead set model.noise_scheduler.use_dynamic_shifting=false as well"
            )
        flow = diffusers.FlowMatchEulerDiscreteScheduler.from_config({**config, "shift": float(shift)})
        super().__init__(flow, timesteps, weighting, noise_offset)

    @property
    def shift(self) -> float:
        return float(self.noise_scheduler.config.shift)

    def shift_for(self, shape: tuple[int, ...]) -> float:
        """The shift for inputs of `shape` (C, H, W): the scheduler's, or with `use_dynamic_shifting` the one
        diffusers' pipelines sample a latent of that size with, exp(mu) for mu = `calculate_shift` of its token
        count in 2x2 patches (Flux, SD3 / Z-Image when so configured), linear from `base_shift` at
        `base_image_seq_len` tokens to `max_shift` at `max_image_seq_len`."""
        config = self.noise_scheduler.config
        if not config.get("use_dynamic_shifting"):
            return self.shift
        tokens = (shape[-2] // 2) * (shape[-1] // 2)
        slope = (config.max_shift - config.base_shift) / (
            config.max_image_seq_len - config.base_image_seq_len
        )
        mu = config.base_shift + slope * (tokens - config.base_image_seq_len)
        # diffusers' time_shift: exponential exp(mu) / (exp(mu) + 1/t - 1), linear mu / (mu + 1/t - 1)
        return mu if config.get("time_shift_type") == "linear" else math.exp(mu)

    @property
    def prediction_type(self) -> str:
        return "flow_prediction"

    def draw_times(self, keys, shape, device):
        t = self.timesteps.fractions(keys, shape, device)
        shift = self.shift_for(shape)
        return shift_noise_level(t, shift) if shift != 1.0 else t

    def validation_times(self, sample_ids, levels):
        grid = (torch.arange(levels, device=sample_ids.device, dtype=torch.float32) + 0.5) / levels
        return grid[sample_ids.long() % levels]

    def noisy(self, x0, noise, times):
        t = per_image(times, x0)
        return (1 - t) * x0 + t * noise

    def target(self, x0, noise, times):
        return noise - x0

    def earlier_times(self, times, gaps):
        return (times - gaps.to(times)).clamp(min=0)

    def network_timesteps(self, times):
        return times * self.num_train_timesteps

    def noise_levels(self, times):
        t = times.float()
        return NoiseLevels(((1 - t) / t) ** 2, t, self.prediction_type)

    def predicted_x0(self, x_t, output, times):
        return x_t - per_image(times, x_t) * output
