"""LightningDataModules. Batches are dicts: `pixels` in [-1, 1], `index`, and `label` / `caption` where configured.

The DataModules load on first use, so the decoding and reference helpers below them import without Lightning
(`eval` reads reference images through them).
"""

import importlib

_DATAMODULES = {
    "DigitsDataModule": "diffusion_lab.data.digits",
    "DreamBoothDataModule": "diffusion_lab.data.dreambooth",
    "ImageDataModule": "diffusion_lab.data.image_datamodule",
    "LatentCacheDataModule": "diffusion_lab.data.latent_cache_datamodule",
}
__all__ = list(_DATAMODULES)


def __getattr__(name: str):
    if name in _DATAMODULES:
        return getattr(importlib.import_module(_DATAMODULES[name]), name)
    raise AttributeError(f"module 'diffusion_lab.data' has no attribute {name!r}")
