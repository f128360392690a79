"""Sampling trained models: samplers over pixel and text-to-image models, loading them, sample runs."""

from diffusion_lab.generation.loading import load_sampler, sampler_for_module
from diffusion_lab.generation.samplers import PixelSampler, Sampler, SampleSettings, TextToImageSampler

__all__ = [
    "PixelSampler",
    "SampleSettings",
    "Sampler",
    "TextToImageSampler",
    "load_sampler",
    "sampler_for_module",
]
