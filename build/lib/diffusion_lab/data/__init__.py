"""LightningDataModules. Batches are dicts: `pixels` in [-1, 1], `index`, and `label` / `caption` where configured."""

from diffusion_lab.data.digits import DigitsDataModule
from diffusion_lab.data.image_datamodule import ImageDataModule
from diffusion_lab.data.latent_cache_datamodule import LatentCacheDataModule

__all__ = ["DigitsDataModule", "ImageDataModule", "LatentCacheDataModule"]
