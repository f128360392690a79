"""LightningModules and the builders of their networks."""

from diffusion_lab.models.latent_diffusion import LatentDiffusion
from diffusion_lab.models.latent_dit import LatentDiT
from diffusion_lab.models.pixel_diffusion import PixelDiffusion
from diffusion_lab.models.unet import build_unet

__all__ = ["LatentDiT", "LatentDiffusion", "PixelDiffusion", "build_unet"]
