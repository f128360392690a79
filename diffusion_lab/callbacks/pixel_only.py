"""A check shared by the callbacks that only know pixel models."""

import lightning as L


def require_pixel_model(pl_module: L.LightningModule, config_key: str) -> None:
    """Fail at fit start, not at the first validation or the end of training, naming the way out."""
    from diffusion_lab.models import PixelDiffusion

    if not isinstance(pl_module, PixelDiffusion):
        raise ValueError(
            f"callbacks.{config_key} works with pixel models (PixelDiffusion); {type(pl_module).__name__} is not "
            f"one. Remove it with ~callbacks.{config_key}"
        )
