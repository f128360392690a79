"""Pixel-space DDPM as a LightningModule on diffusers parts."""

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from diffusers import SchedulerMixin, UNet2DModel

from diffusion_lab.core import diffusion_loss, held_out_draws, sample_keys
from diffusion_lab.core.schedulers import has_zero_terminal_snr, with_zero_terminal_snr
from diffusion_lab.models.optimization import configure_optimizer
from diffusion_lab.models.serialization import describe_components
from diffusion_lab.pipelines.pixel import save_pixel_pipeline


class PixelDiffusion(L.LightningModule):
    """Owns the denoiser, its noise scheduler, the loss and the optimizer; nothing else.

    Batches are dicts with `pixels` in [-1, 1], `index` (dataset position, keys the noise) and, for a
    class-conditional net (`num_class_embeds`), `label`.
    """

    def __init__(
        self,
        net: UNet2DModel,
        noise_scheduler: SchedulerMixin,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr: float,
        lr_scheduler: Callable | None = None,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        noise_seed: int = 0,
        val_timestep_levels: int = 10,
        zero_terminal_snr: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "noise_scheduler", "optimizer", "lr_scheduler"])
        self.net = net
        if zero_terminal_snr or has_zero_terminal_snr(noise_scheduler.config):
            noise_scheduler = with_zero_terminal_snr(noise_scheduler)
        self.noise_scheduler = noise_scheduler
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

    @property
    def denoiser(self) -> UNet2DModel:
        """The network that predicts the noise (what `compile` and `channels_last` apply to)."""
        return self.net

    def _conditioning(self, batch: dict) -> dict:
        return {"class_labels": batch["label"]} if self.net.config.num_class_embeds else {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        keys = sample_keys(self.hparams.noise_seed, self.global_step, batch["index"])
        loss = diffusion_loss(
            self.net,
            self.noise_scheduler,
            batch["pixels"],
            keys,
            snr_gamma=self.hparams.snr_gamma,
            noise_offset=self.hparams.noise_offset,
            **self._conditioning(batch),
        )
        self.log(
            "train/loss", loss, prog_bar=True, sync_dist=True
        )  # the mean over all ranks: the whole batch
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        keys, timesteps = held_out_draws(
            self.hparams.noise_seed, batch["index"], self.noise_scheduler.config.num_train_timesteps,
            self.hparams.val_timestep_levels,
        )  # fmt: skip
        loss = diffusion_loss(
            self.net,
            self.noise_scheduler,
            batch["pixels"],
            keys,
            timesteps=timesteps,
            **self._conditioning(batch),
        )
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["pixels"]))

    def configure_optimizers(self):
        return configure_optimizer(
            self.net.parameters(), self.optimizer_factory, self.hparams.lr, self.lr_scheduler_factory
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Enough to rebuild the diffusers objects from the checkpoint alone (`diffusion-lab export`).
        checkpoint["diffusers_components"] = describe_components(
            net=self.net, noise_scheduler=self.noise_scheduler
        )

    def save_pipeline(self, out_dir: str | Path) -> Path:
        """`unet/ + scheduler/ + model_index.json`: what `DiffusionPipeline.from_pretrained(out_dir)` loads."""
        return save_pixel_pipeline(self.net, self.noise_scheduler, out_dir)
