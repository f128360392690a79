"""Which grid a callback draws must be the model family's."""

import lightning as L

GRID_CALLBACKS = {"image": "sample_grid", "prompt": "prompt_grid"}


def require_grid(pl_module: L.LightningModule, grid: str, config_key: str) -> None:
    """Fail at fit start, not at the first validation or the end of training, naming the way out."""
    family = pl_module.family
    if family.grid != grid:
        raise ValueError(
            f"callbacks.{config_key} draws {grid} grids; the {family.name} family draws {family.grid} grids "
            f"(callbacks.{GRID_CALLBACKS[family.grid]}). Remove it with ~callbacks.{config_key}"
        )
