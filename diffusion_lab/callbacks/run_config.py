"""The run's resolved config inside every checkpoint: what a resume with another architecture is compared with."""

import lightning as L

from diffusion_lab.runs.resume import RUN_CONFIG


class RunConfig(L.Callback):
    def __init__(self, config: dict) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_CONFIG] = self.config
