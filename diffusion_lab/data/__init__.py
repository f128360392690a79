"""LightningDataModules. Batches are dicts: `pixels` in [-1, 1], `index`, and `label` where there is one."""

from diffusion_lab.data.digits import DigitsDataModule
from diffusion_lab.data.hf_images import HFImageDataModule

__all__ = ["DigitsDataModule", "HFImageDataModule"]
