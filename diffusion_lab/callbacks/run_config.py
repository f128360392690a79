"""The run's resolved config inside every checkpoint: what a resume with another architecture is compared with."""

import lightning as L

RUN_CONFIG = "diffusion_lab_config"  # the run's resolved config, stored in each checkpoint


class RunConfig(L.Callback):
    def __init__(self, config: dict) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_CONFIG] = self.config
