"""Export the trained network as a diffusers pipeline when training ends."""

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.callbacks.pixel_only import require_pixel_model
from diffusion_lab.export import save_ddpm_pipeline


class PipelineExport(L.Callback):
    """Writes a `DDPMPipeline` folder (EMA weights when an EMA callback is attached) to `dirpath`."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_pixel_model(pl_module, "pipeline_export")

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with ema_weights(trainer, pl_module):
            save_ddpm_pipeline(pl_module.net, pl_module.noise_scheduler, self.dirpath)
