"""The training and validation step every diffusion model shares."""

import abc
import contextlib
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from diffusion_lab.core.loss_mask import LossMask
from diffusion_lab.core.objectives import DDPM, Objective
from diffusion_lab.core.random import sample_keys
from diffusion_lab.errors import ConfigError
from diffusion_lab.families import Family, ModelParts
from diffusion_lab.models.optimization import configure_optimizer

ObjectiveFactory = Callable[..., Objective]  # noise scheduler -> objective (a `_partial_` config)


class DiffusionModel(L.LightningModule, abc.ABC):
    """Owns `net` (the trainable network, the one name callbacks and exports use), the `objective` and the
    optimizer. A subclass only says how a batch becomes clean inputs x0 (`clean_inputs`) and what else the
    network is given (`conditioning`).

    Every draw is keyed on (noise_seed, step, batch["index"]): training keys on the optimizer step, held-out
    loss on the image alone (the same noise and level every time it is evaluated).
    """

    net: torch.nn.Module
    family: Family  # what callbacks, exports and samplers ask about this model (`families`)
    loss_mask: LossMask | None = None  # per-pixel loss weights from `batch["loss_mask"]` (latent models)
    preservation = None  # an extra term keeping what the base model drew (models.preservation; latent models)

    def __init__(
        self,
        noise_scheduler,
        objective: ObjectiveFactory | None,
        optimizer: Callable[..., torch.optim.Optimizer] | None,
        lr: float,
        lr_scheduler: Callable | None,
        noise_seed: int,
        val_timestep_levels: int,
    ) -> None:
        super().__init__()
        self.objective: Objective = (objective or DDPM)(noise_scheduler)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr, self.noise_seed, self.val_timestep_levels = lr, noise_seed, val_timestep_levels
        self.alignment: torch.nn.Module | None = None  # a representation-alignment term (models.alignment)

    @property
    def noise_scheduler(self):
        """The objective's diffusers scheduler: what samplers and exports are built from."""
        return self.objective.noise_scheduler

    # ---- what a subclass provides ---------------------------------------------------------------------
    @abc.abstractmethod
    def clean_inputs(self, batch: dict, keys: list[int]) -> torch.Tensor:
        """x0 for the batch (pixels in [-1, 1], or scaled latents)."""

    def conditioning(self, batch: dict, keys: list[int] | None = None) -> dict:
        """Keyword arguments of the network besides (x_t, t); `keys` is None for held-out loss."""
        return {}

    @abc.abstractmethod
    def parts(self) -> ModelParts:
        """This module's networks and scheduler as diffusers parts (no copies), for the family to sample and
        export with."""

    @abc.abstractmethod
    def save_pipeline(self, out_dir: str | Path) -> Path:
        """The family's export of this model."""

    def sampler(self):
        """What grids and quality callbacks draw with: the family's sampler over this module's parts."""
        return self.family.sampler(self.parts())

    def denoiser(self):
        """What the objective calls as `denoiser(x_t, timesteps, **conditioning).sample`: `net` itself, unless
        the family calls its network otherwise (Flux packs latents into tokens)."""
        return self.net

    # ---- shared --------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        keys = sample_keys(self.noise_seed, self.global_step, batch["index"])
        x0 = self.clean_inputs(batch, keys)
        conditioning = self.conditioning(batch, keys)
        alignment = self.alignment
        active = alignment is not None and alignment.active(self.global_step)
        masked = {}
        if (
            self.loss_mask is not None
        ):  # per-pixel weights (issue 25): the batch's mask, as the config weighs it
            if "loss_mask" not in batch:
                raise ConfigError(
                    "model/loss_mask=masked needs masks in the data: data.mask_dir=DIR (a mask per image, same "
                    "file stem) or data.alpha_mask=true (the images' alpha channel)"
                )
            masked = {"mask": batch["loss_mask"], "loss_mask": self.loss_mask}
        with alignment.student_tokens(self.net) if active else contextlib.nullcontext() as tokens:
            loss = self.objective.loss(self.denoiser(), x0, keys, **masked, **conditioning)
        if alignment is not None:  # with its own line in the logs; 0 once it stops (`stop_step`)
            if active:
                term = alignment.loss(
                    self.objective, self.net, self.trainer, batch, x0, keys, tokens[0], **conditioning
                )
            else:  # the projector in the graph at zero: DDP expects a gradient for every parameter
                term = 0 * sum(parameter.sum() for parameter in alignment.parameters())
            self.log("train/diffusion_loss", loss, sync_dist=True)
            self.log("train/align_loss", term, sync_dist=True)
            loss = loss + alignment.weight * term
        if self.preservation is not None:  # the class kept as the base draws it (models.preservation)
            kept = self.preservation.loss(self, batch, x0, keys)
            self.log("train/preservation_loss", kept, sync_dist=True)
            loss = loss + self.preservation.weight * kept
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over all ranks
        return loss

    def prepare_data(self) -> None:
        if self.alignment is not None:  # e.g. REPA's encoder features, once per node
            self.alignment.prepare(self.trainer)

    def setup(self, stage: str) -> None:
        if self.alignment is not None and stage == "fit":
            self.alignment.setup(self.trainer)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        keys = sample_keys(self.noise_seed, -1, batch["index"])
        times = self.objective.validation_times(batch["index"], self.val_timestep_levels)
        loss = self.objective.loss(
            self.denoiser(), self.clean_inputs(batch, keys), keys, times=times, **self.conditioning(batch)
        )
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["index"]))

    def configure_optimizers(self):
        parameters = list(self.net.parameters())
        if self.alignment is not None:  # its projector trains with the network
            parameters += list(self.alignment.parameters())
        return configure_optimizer(parameters, self.optimizer_factory, self.lr, self.lr_scheduler_factory)
