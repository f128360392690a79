"""Turning seeds (and prompts or class labels) into images, the same way for every kind of model.

One seed per image: image i depends on its own seed only, not on the batch it was drawn in or on how many
images were asked for, so a settings file reproduces each picture.
"""

import inspect
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from diffusion_lab.core import sample_images
from diffusion_lab.core.schedulers import has_zero_terminal_snr, scheduler_from_name
from diffusion_lab.errors import ConfigError


@dataclass
class SampleSettings:
    """How to sample, independent of what: the knobs both the `sample` command and callbacks expose."""

    scheduler: str | None = None  # None: the model's default (DDIM; UniPC for a flow model)
    num_inference_steps: int = 50
    eta: float = 0.0  # DDIM only: 0 deterministic, 1 as stochastic as DDPM
    guidance_scale: float = 7.5  # text models: classifier-free guidance
    # Text models: CFG rescale (arXiv:2305.08891, section 3.4); None: 0.7 for a zero-terminal-SNR model, else 0.
    guidance_rescale: float | None = None
    negative_prompt: str | None = None
    height: int | None = None  # text (latent) models: output size in pixels; None = the UNet's native size
    width: int | None = None
    max_sequence_length: int | None = None  # T5 models (SD3, Flux): prompt tokens; None: the model's

    def as_dict(self) -> dict:
        return asdict(self)


class Sampler(Protocol):
    """What the sample command, the grids and the FID callback need of a model."""

    kind: str  # "pixel" or "text"
    num_classes: int | None  # class-conditional pixel models
    net: torch.nn.Module  # the trained network

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Sampler": ...

    def scheduler(self, settings: SampleSettings): ...

    def generate(
        self,
        seeds: list[int],
        settings: SampleSettings,
        class_labels: list[int] | None = None,
        prompts: list[str] | None = None,
        progress: bool = False,
    ) -> torch.Tensor: ...


def seed_generators(seeds: list[int]) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same noise on a CPU and on any GPU (diffusers' advice).
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


class PixelSampler:
    """An unconditional or class-conditional pixel-space UNet (UNet2DModel) with its training scheduler."""

    kind = "pixel"

    def __init__(self, net: torch.nn.Module, noise_scheduler) -> None:
        self.net, self.noise_scheduler = net, noise_scheduler

    @property
    def num_classes(self) -> int | None:
        return self.net.config.num_class_embeds

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PixelSampler":
        self.net.to(device=device, dtype=dtype)
        return self

    def scheduler(self, settings: SampleSettings):
        return scheduler_from_name(settings.scheduler, self.noise_scheduler.config)

    @torch.no_grad()
    def generate(
        self,
        seeds: list[int],
        settings: SampleSettings,
        class_labels: list[int] | None = None,
        prompts: list[str] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """(len(seeds), C, H, W) in [-1, 1]."""
        if prompts:
            raise ValueError("this is an unconditional pixel model: it takes no prompt")
        if class_labels is not None and not self.num_classes:
            raise ValueError("this pixel model is not class-conditional: it takes no class label")
        config = self.net.config
        was_training = self.net.training
        self.net.eval()
        try:
            images = sample_images(
                self.net,
                self.scheduler(settings),
                len(seeds),
                (config.in_channels, config.sample_size, config.sample_size),
                num_inference_steps=settings.num_inference_steps,
                generator=seed_generators(seeds),
                eta=settings.eta,
                class_labels=None if class_labels is None else torch.tensor(class_labels),
                device=self.device,
                dtype=next(self.net.parameters()).dtype,
                progress=progress,
            )
            images = self.decode(images)
        finally:
            self.net.train(was_training)
        return images.float().clamp(-1, 1)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """What the sampling loop drew, as images: pixels already."""
        return samples


class LatentClassSampler(PixelSampler):
    """An unconditional or class-conditional network on a frozen VAE's latents (the latent DiT): the pixel
    loop over latents, then the VAE's decoder (as `DiTPipeline` decodes)."""

    def __init__(self, net: torch.nn.Module, noise_scheduler, vae) -> None:
        super().__init__(net, noise_scheduler)
        self.vae = vae

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "LatentClassSampler":
        super().to(device, dtype)
        self.vae.to(device)  # in its own dtype (the SD VAE overflows in fp16)
        return self

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        latents = samples / config.scaling_factor + (config.get("shift_factor") or 0.0)
        return self.vae.decode(latents.to(self.vae.dtype)).sample


def _cast(value, dtype: torch.dtype):
    """A tensor, or a list of them (Z-Image's captions), in `dtype`."""
    if isinstance(value, list):
        return [_cast(item, dtype) for item in value]
    return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value


class TextToImageSampler:
    """Any diffusers text-to-image pipeline (Stable Diffusion and relatives, SD3, Flux): prompts, guidance,
    negatives. `own_scheduler`: with no scheduler named, sample with the pipeline's own (SD3 / Flux: flow-match
    Euler, as their folders ship) rather than the DDIM / UniPC default; `call_defaults`: pipeline arguments a
    model was trained with (`max_sequence_length`) that the settings may override; `prompt_inputs(prompts,
    negative_prompt, device)`: the pipeline's embedding arguments from a prompt cache, in place of the prompts
    (the pipeline then needs no text encoders; they are cast to the denoiser's dtype, which SD3's, Flux's and
    Z-Image's pipelines take their latents' dtype from); `schedulers`: the names the pipeline can sample with
    (None: any that fits the model)."""

    kind = "text"
    num_classes = None

    def __init__(
        self,
        pipeline,
        own_scheduler: bool = False,
        call_defaults: dict | None = None,
        prompt_inputs=None,
        schedulers: tuple[str, ...] | None = None,
    ) -> None:
        self.pipeline, self.prompt_inputs, self.schedulers = pipeline, prompt_inputs, schedulers
        self.training_scheduler_config = pipeline.scheduler.config
        self.own_scheduler, self.call_defaults = own_scheduler, dict(call_defaults or {})

    @property
    def net(self) -> torch.nn.Module:
        """The pipeline's denoiser: `unet` or `transformer`."""
        unet = getattr(self.pipeline, "unet", None)
        return unet if unet is not None else self.pipeline.transformer

    @property
    def device(self) -> torch.device:
        return self.net.device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TextToImageSampler":
        # a quantised base (QLoRA) computes in the dtype it was loaded with, which diffusers will not change
        if dtype is None or dtype == self.net.dtype or getattr(self.net, "is_quantized", False):
            self.pipeline.to(device)
        else:
            self.pipeline.to(device, dtype)
        return self

    def scheduler(self, settings: SampleSettings):
        if (
            settings.scheduler is not None
            and self.schedulers is not None
            and settings.scheduler not in self.schedulers
        ):
            raise ConfigError(
                f"scheduler={settings.scheduler}: {type(self.pipeline).__name__} sets its own sigmas, which only "
                f"{', '.join(self.schedulers)} take{'s' if len(self.schedulers) == 1 else ''} (or null)"
            )
        if settings.scheduler is None and self.own_scheduler:
            config = self.training_scheduler_config
            return type(self.pipeline.scheduler).from_config(config)
        return scheduler_from_name(settings.scheduler, self.training_scheduler_config)

    def call_options(self, settings: SampleSettings) -> dict:
        """The pipeline arguments only some pipelines take (`eta`: DDIM-family; `max_sequence_length`: T5)."""
        accepted = inspect.signature(self.pipeline.__call__).parameters
        options = {**self.call_defaults, "eta": settings.eta}
        if settings.max_sequence_length is not None:
            options["max_sequence_length"] = settings.max_sequence_length
        if "max_sequence_length" in options and "max_sequence_length" not in accepted:
            raise ValueError(f"{type(self.pipeline).__name__} takes no max_sequence_length (it has no T5)")
        return {key: value for key, value in options.items() if key in accepted}

    def native_size(self) -> tuple[int | None, int | None]:
        """The output size in pixels the pipeline defaults to (None: it decides each side itself, as Z-Image's)."""
        native = getattr(self.net.config, "sample_size", None) or getattr(
            self.pipeline, "default_sample_size", None
        )
        if native is None:
            return None, None
        height, width = (native, native) if isinstance(native, int) else native
        return height * self.pipeline.vae_scale_factor, width * self.pipeline.vae_scale_factor

    def guidance_options(self, settings: SampleSettings) -> dict:
        """`guidance_rescale` for the pipeline call: 0.7 (the paper's value) for a zero-terminal-SNR model unless
        given; left out for pipelines that do not take it (Kolors, SAG, ...) unless a value was asked for."""
        rescale = settings.guidance_rescale
        if rescale is None:
            rescale = 0.7 if has_zero_terminal_snr(self.training_scheduler_config) else 0.0
        if "guidance_rescale" in inspect.signature(self.pipeline.__call__).parameters:
            return {"guidance_rescale": rescale}
        if rescale:
            raise ValueError(
                f"{type(self.pipeline).__name__} takes no guidance_rescale (asked for {rescale})"
            )
        return {}

    @torch.no_grad()
    def generate(
        self,
        seeds: list[int],
        settings: SampleSettings,
        class_labels: list[int] | None = None,
        prompts: list[str] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """(len(seeds), C, H, W) in [-1, 1]; `prompts` gives one prompt per seed."""
        if class_labels is not None:
            raise ValueError("text-to-image models are conditioned on prompts, not class labels")
        if not prompts or len(prompts) != len(seeds):
            raise ValueError("a text-to-image model needs one prompt per image (prompt= or prompt_file=)")
        pipeline = self.pipeline
        pipeline.scheduler = self.scheduler(settings)
        # Diffusers falls back to the native size for both sides when either is missing: fill one at a time.
        native_height, native_width = self.native_size()
        height = settings.height or native_height
        width = settings.width or native_width
        pipeline.set_progress_bar_config(disable=not progress, leave=False)
        unet = self.net
        was_training = unet.training
        unet.eval()
        try:
            if self.prompt_inputs is not None:
                given = self.prompt_inputs(list(prompts), settings.negative_prompt, self.device)
                given = {key: _cast(value, self.net.dtype) for key, value in given.items()}
            else:
                negative = [settings.negative_prompt] * len(prompts) if settings.negative_prompt else None
                given = {"prompt": list(prompts), "negative_prompt": negative}
            images = pipeline(
                **given,
                guidance_scale=settings.guidance_scale,
                **self.guidance_options(settings),
                num_inference_steps=settings.num_inference_steps,
                **self.call_options(settings),
                height=height,
                width=width,
                generator=seed_generators(seeds),
                output_type="pt",
            ).images
        finally:
            unet.train(was_training)
        return images.float() * 2 - 1
