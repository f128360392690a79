"""Text-to-image grids from fixed prompts and seeds while a latent model trains."""

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


class PromptGrid(EndOfRunWork):
    """Every `every_n_steps` optimizer steps and at the end: `<out_dir>/step_<7 digits>.png` and `final.png`.

    One row per prompt, one column per seed; the same prompts, seeds, guidance scale and negative prompt every
    time, so successive grids show one model getting better. Uses the EMA weights when EMA is on.
    """

    def __init__(
        self,
        out_dir: str,
        prompts: list[str],
        seeds: list[int] = (0, 1, 2, 3),
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        scheduler: str | None = None,
        num_inference_steps: int = 25,
        every_n_steps: int = 500,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        if not prompts:
            raise ValueError("callbacks.prompt_grid.prompts is empty: give at least one prompt")
        self.out_dir = Path(out_dir)
        self.prompts, self.seeds = list(prompts), list(seeds)
        self.guidance_scale, self.negative_prompt = guidance_scale, negative_prompt
        self.scheduler_name, self.num_inference_steps = check_scheduler_name(scheduler), num_inference_steps
        self.every_n_steps = every_n_steps
        self.height, self.width = height, width  # e.g. an SDXL bucket (1216 x 832); None: the native size
        self._last_step = -1

    def cached_prompts(self) -> list[str]:
        """What a run with a prompt cache encodes before training, so drawing this grid needs no text encoder."""
        return [*self.prompts, self.negative_prompt or ""]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_grid(pl_module, "prompt", "prompt_grid")

    def generate(self, pl_module: L.LightningModule) -> torch.Tensor:
        """(prompts x seeds, C, H, W) in [-1, 1]."""
        settings = SampleSettings(
            scheduler=self.scheduler_name, num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
            negative_prompt=self.negative_prompt, height=self.height, width=self.width,
        )  # fmt: skip
        prompts = [prompt for prompt in self.prompts for _ in self.seeds]
        seeds = [seed for _ in self.prompts for seed in self.seeds]
        return pl_module.sampler().generate(seeds, settings, prompts=prompts)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path:
        stop_if_requested()
        with ema_weights(trainer, pl_module):
            images = self.generate(pl_module)
        path = save_grid(images, self.out_dir / f"{name}.png", columns=len(self.seeds))
        log_image_file(trainer, "prompts", path)
        return path

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step and step > 0:
            self._last_step = step
            self._write(trainer, pl_module, f"step_{step:07d}")

    @rank_zero_only
    def finish_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "final")
