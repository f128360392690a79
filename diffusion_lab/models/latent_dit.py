"""A DiT / SiT trained from scratch on a frozen VAE's latents: DiT's own setting (Peebles & Xie 2023: ImageNet
256 px as 32 x 32 x 4 latents of stabilityai/sd-vae-ft-ema, class-conditional)."""

from collections.abc import Callable

import torch
from diffusers import SchedulerMixin

from diffusion_lab.core.random import keyed_gaussian_sample
from diffusion_lab.errors import ConfigError
from diffusion_lab.families import LatentEncoder, ModelParts, family_named
from diffusion_lab.models.diffusion_model import ObjectiveFactory
from diffusion_lab.models.pixel_diffusion import PixelDiffusion


class LatentDiT(PixelDiffusion):
    """`net` (a `networks.DiffusionTransformer` with the VAE's latent channels and size) on a keyed draw of the
    VAE's posterior of the batch's `pixels`, scaled as the VAE's config says; a class-conditional net also gets
    the batch's `label`. The VAE (`vae`: a hub id or a folder holding its config.json) is frozen, kept in
    `vae_dtype` and out of checkpoints: it is reloaded from `vae`, which the checkpoint names."""

    def __init__(
        self,
        net: torch.nn.Module,
        noise_scheduler: SchedulerMixin,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr: float,
        vae: str,
        vae_dtype: str | None = "float32",
        lr_scheduler: Callable | None = None,
        objective: ObjectiveFactory | None = None,
        noise_seed: int = 0,
        val_timestep_levels: int = 10,
        alignment: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    ) -> None:
        super().__init__(net, noise_scheduler, optimizer, lr, lr_scheduler, objective, noise_seed,
                         val_timestep_levels, alignment)  # fmt: skip
        self.encoder = LatentEncoder(None, vae=vae, vae_dtype=vae_dtype)  # not a submodule: not checkpointed
        self.family = family_named("dit_latent")
        config = self.encoder.vae.config
        if net.config.in_channels != config.latent_channels:
            raise ConfigError(
                f"model.net.in_channels={net.config.in_channels}, but the VAE {vae} has {config.latent_channels} "
                "latent channels"
            )
        if config.get("shift_factor"):  # DiTPipeline decodes latents / scaling_factor, with no shift
            raise ConfigError(
                f"model.vae={vae} shifts its latents (shift_factor), which DiTPipeline cannot undo"
            )
        if self.noise_scheduler.config.get("clip_sample"):  # scaled latents spread past [-1, 1]
            raise ConfigError(
                "model.noise_scheduler.clip_sample=true clamps the predicted latents to [-1, 1] when sampling, "
                "which scaled VAE latents exceed: set model.noise_scheduler.clip_sample=false"
            )
        if net.config.position_embedding != "sincos":
            raise ConfigError(
                "model.net.position_embedding=learned: the stock DiTTransformer2DModel in a DiTPipeline folder "
                "holds sin-cos position embeddings only"
            )

    def on_fit_start(self) -> None:
        self.encoder.to(self.device)

    def clean_inputs(self, batch: dict, keys: list[int]) -> torch.Tensor:
        if self.encoder.vae.device != batch["pixels"].device:
            self.encoder.to(batch["pixels"].device)
        mean, std = self.encoder.encode_posterior(batch["pixels"])
        if mean.shape[-1] != self.net.config.sample_size:
            raise ConfigError(
                f"model.net.sample_size={self.net.config.sample_size}, but the VAE makes these "
                f"{batch['pixels'].shape[-1]} px images {mean.shape[-1]} x {mean.shape[-2]} latents: "
                f"set model.net.sample_size={mean.shape[-1]}"
            )
        return self.encoder.scale_latents(keyed_gaussian_sample(mean, std, keys)).to(self.net.dtype)

    def parts(self) -> ModelParts:
        return ModelParts(
            self.net, self.noise_scheduler, {"vae": self.encoder.vae}, {"vae": self.hparams.vae}
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vae"] = self.hparams.vae
        checkpoint["vae_fingerprint"] = self.encoder.key()["frozen_parts"]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The network learned one VAE's latent space: resuming on another's would train on a silent mismatch.
        saved = checkpoint.get("vae_fingerprint")
        if saved is not None and saved != self.encoder.key()["frozen_parts"]:
            raise ConfigError(
                f"the checkpoint was trained on the latents of model.vae={checkpoint['vae']} ({saved}); "
                f"model.vae={self.hparams.vae} is another VAE ({self.encoder.key()['frozen_parts']}): "
                f"resume with model.vae={checkpoint['vae']}"
            )
