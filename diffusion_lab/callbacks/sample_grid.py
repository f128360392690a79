"""Sample grids from the (EMA) network: at every validation, and a final one when training ends."""

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.callbacks.end_of_run import EndOfRunWork
from diffusion_lab.callbacks.family_check import require_grid
from diffusion_lab.callbacks.image_logging import log_image_file
from diffusion_lab.core.schedulers import check_scheduler_name
from diffusion_lab.generation import SampleSettings
from diffusion_lab.images import save_grid
from diffusion_lab.runs.signals import stop_if_requested


class SampleGrid(EndOfRunWork):
    """Writes `<out_dir>/step_<global step, 7 digits>.png` at each validation and `<out_dir>/final.png` at the end.

    The same seeds every time (image k: seed + k, as `diffusion-lab sample`), so successive grids show the same
    noise being denoised by a better model. A class-conditional net gets labels 0, 1, 2, ... cycling over its
    classes.
    """

    def __init__(
        self,
        out_dir: str,
        num_images: int = 64,
        scheduler: str | None = None,
        num_inference_steps: int = 50,
        seed: int = 0,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.num_images = num_images
        self.scheduler_name = check_scheduler_name(scheduler)
        self.num_inference_steps = num_inference_steps
        self.seed = seed

    def generate(self, pl_module: L.LightningModule) -> torch.Tensor:
        sampler = pl_module.sampler()
        num_classes = sampler.num_classes
        labels = [k % num_classes for k in range(self.num_images)] if num_classes else None
        settings = SampleSettings(scheduler=self.scheduler_name, num_inference_steps=self.num_inference_steps)
        return sampler.generate(
            [self.seed + k for k in range(self.num_images)], settings, class_labels=labels
        )

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path:
        stop_if_requested()
        path = save_grid(self.generate(pl_module), self.out_dir / f"{name}.png")
        log_image_file(trainer, "samples", path)
        return path

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_grid(pl_module, "image", "sample_grid")

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        with ema_weights(trainer, pl_module):
            self._write(trainer, pl_module, f"step_{trainer.global_step:07d}")

    @rank_zero_only
    def finish_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with ema_weights(trainer, pl_module):
            self._write(trainer, pl_module, "final")
