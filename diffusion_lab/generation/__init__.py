"""Sampling: samplers over pixel and text-to-image models, and sample runs. Loading a model to sample from is the
model family's job (`families.load_sampler`)."""

from diffusion_lab.generation.samplers import PixelSampler, Sampler, SampleSettings, TextToImageSampler

__all__ = ["PixelSampler", "SampleSettings", "Sampler", "TextToImageSampler"]
