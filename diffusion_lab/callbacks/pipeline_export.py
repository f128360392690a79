"""Export the trained model as a diffusers pipeline when training ends."""

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.callbacks.end_of_run import EndOfRunWork
from diffusion_lab.families.export import write_pipeline
from diffusion_lab.runs.signals import stop_if_requested


class PipelineExport(EndOfRunWork):
    """Writes the model family's pipeline folder (EMA weights when an EMA callback is attached) to `out_dir`:
    a DDPMPipeline, a StableDiffusionPipeline, ... or LoRA weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    @rank_zero_only
    def finish_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stop_if_requested()
        with ema_weights(trainer, pl_module):
            write_pipeline(self.out_dir, [pl_module.net], pl_module.save_pipeline)
