"""A check shared by the callbacks that only know pixel models."""

import lightning as L


def require_pixel_model(pl_module: L.LightningModule, config_key: str) -> None:
    """Fail at fit start, not at the first validation or the end of training, naming the way out."""
    if not hasattr(pl_module, "net"):
        raise ValueError(
            f"callbacks.{config_key} works with pixel models (a `net`); {type(pl_module).__name__} has none. "
            f"Remove it with ~callbacks.{config_key}"
        )
