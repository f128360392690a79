"""Pixel-space diffusion as a LightningModule on diffusers parts."""

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import SchedulerMixin

from diffusion_lab.families import ModelParts
from diffusion_lab.families.checkpoints import describe_components
from diffusion_lab.families.registry import family_of_network
from diffusion_lab.models.diffusion_model import DiffusionModel, ObjectiveFactory


class PixelDiffusion(DiffusionModel):
    """A UNet2DModel or a DiT trained on pixels: x0 is the batch's `pixels` in [-1, 1]; a class-conditional net
    (`num_class_embeds`) also gets the batch's `label`. `objective` (a partial taking the noise scheduler)
    picks DDPM or flow matching; its default is DDPM on `noise_scheduler`."""

    def __init__(
        self,
        net: torch.nn.Module,
        noise_scheduler: SchedulerMixin,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr: float,
        lr_scheduler: Callable | None = None,
        objective: ObjectiveFactory | None = None,
        noise_seed: int = 0,
        val_timestep_levels: int = 10,
        alignment: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    ) -> None:
        super().__init__(
            noise_scheduler, objective, optimizer, lr, lr_scheduler, noise_seed, val_timestep_levels
        )
        self.save_hyperparameters(
            ignore=["net", "noise_scheduler", "objective", "optimizer", "lr_scheduler", "alignment"]
        )
        self.net = net
        self.alignment = alignment(net) if alignment is not None else None  # model/alignment (a partial)
        self.family = family_of_network(net)  # a UNet: pixel; a DiT / SiT: dit

    def clean_inputs(self, batch: dict, keys: list[int]) -> torch.Tensor:
        return batch["pixels"]

    def conditioning(self, batch: dict, keys: list[int] | None = None) -> dict:
        return self.family.conditioning(batch, self.net)

    def parts(self) -> ModelParts:
        return ModelParts(self.net, self.noise_scheduler)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Enough to rebuild the diffusers objects from the checkpoint alone (`diffusion-lab export`); the
        # scheduler is the objective's (a flow model's is a FlowMatchEulerDiscreteScheduler).
        checkpoint["diffusers_components"] = describe_components(
            net=self.net, noise_scheduler=self.noise_scheduler
        )
        checkpoint["family"] = self.family.name

    def save_pipeline(self, out_dir: str | Path) -> Path:
        """`unet/ + scheduler/ + model_index.json`: what `DiffusionPipeline.from_pretrained(out_dir)` loads."""
        return self.family.save_pipeline(self.parts(), Path(out_dir))
