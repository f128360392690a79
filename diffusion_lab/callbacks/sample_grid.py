"""Sample grids from the (EMA) network: at every validation, and a final one when training ends."""

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.callbacks.image_logging import log_image_file
from diffusion_lab.callbacks.pixel_only import require_pixel_model
from diffusion_lab.core import sample_images
from diffusion_lab.core.schedulers import scheduler_from_name
from diffusion_lab.images import save_grid


class SampleGrid(L.Callback):
    """Writes `<dirpath>/step_<global step, 7 digits>.png` at each validation and `<dirpath>/final.png` at the end.

    The same seed every time, so successive grids show the same noise being denoised by a better model.
    A class-conditional net gets labels 0, 1, 2, ... cycling over its classes.
    """

    def __init__(
        self,
        dirpath: str,
        num_images: int = 64,
        scheduler: str = "ddim",
        num_inference_steps: int = 50,
        seed: int = 0,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.num_images = num_images
        self.scheduler_name = scheduler
        self.num_inference_steps = num_inference_steps
        self.seed = seed

    @torch.no_grad()
    def generate(self, pl_module: L.LightningModule) -> torch.Tensor:
        net = pl_module.net
        scheduler = scheduler_from_name(self.scheduler_name, pl_module.noise_scheduler.config)
        num_classes = net.config.num_class_embeds
        labels = torch.arange(self.num_images) % num_classes if num_classes else None
        was_training = net.training
        net.eval()
        try:
            return sample_images(
                net,
                scheduler,
                self.num_images,
                (net.config.in_channels, net.config.sample_size, net.config.sample_size),
                num_inference_steps=self.num_inference_steps,
                generator=torch.Generator().manual_seed(self.seed),
                class_labels=labels,
                device=pl_module.device,
            )
        finally:
            net.train(was_training)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path:
        path = save_grid(self.generate(pl_module), self.dirpath / f"{name}.png")
        log_image_file(trainer, "samples", path)
        return path

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_pixel_model(pl_module, "sample_grid")

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        with ema_weights(trainer, pl_module):
            self._write(trainer, pl_module, f"step_{trainer.global_step:07d}")

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with ema_weights(trainer, pl_module):
            self._write(trainer, pl_module, "final")
