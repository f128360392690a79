"""Export the trained model as a diffusers pipeline when training ends."""

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.export import write_pipeline


class PipelineExport(L.Callback):
    """Writes the model's `save_pipeline` folder (EMA weights when an EMA callback is attached) to `dirpath`:
    a DDPMPipeline, a StableDiffusionPipeline, or LoRA weights."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "save_pipeline", None)):
            raise ValueError(
                f"callbacks.pipeline_export needs a model with save_pipeline(dir); {type(pl_module).__name__} "
                "has none. Remove it with ~callbacks.pipeline_export"
            )

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with ema_weights(trainer, pl_module):
            write_pipeline(self.dirpath, [pl_module.net], pl_module.save_pipeline)
