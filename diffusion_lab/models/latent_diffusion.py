"""Latent Stable Diffusion fine-tuning as a LightningModule: frozen VAE and CLIP text encoder, trainable UNet."""

from collections.abc import Callable, Sequence

import lightning as L
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from diffusion_lab.core import diffusion_loss, held_out_draws, sample_keys
from diffusion_lab.core.random import mix_key
from diffusion_lab.models.optimization import configure_optimizer

_CAPTION_DROPOUT_SALT = 0xCA7


def drop_captions(
    captions: Sequence[str], seed: int, step: int, sample_ids: torch.Tensor, p: float
) -> list[str]:
    """Replace each caption by "" with probability p, so the UNet also learns the unconditional prediction
    that classifier-free guidance needs (Ho & Salimans 2022, arXiv:2207.12598). Keyed per image like the
    noise, so the choice survives resume."""
    keep = []
    for caption, sample_id in zip(captions, sample_ids.tolist(), strict=True):
        uniform = (mix_key(seed ^ _CAPTION_DROPOUT_SALT, step, int(sample_id)) >> 10) / 2**53
        keep.append("" if uniform < p else caption)
    return keep


class LatentDiffusion(L.LightningModule):
    """Owns tokenizer, text encoder, VAE, UNet, noise scheduler, the loss and the optimizer.

    Everything loads with `from_pretrained(pretrained, subfolder=...)`: a hub id
    (`stable-diffusion-v1-5/stable-diffusion-v1-5`) or a local folder in the same layout (`diffusion-lab
    tiny-sd`). The VAE and text encoder are frozen (`requires_grad_(False)`, kept in eval mode, no
    optimizer state); only the UNet trains. Batches: `pixels` in [-1, 1], `caption`, `index`.
    """

    def __init__(
        self,
        pretrained: str,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr: float,
        lr_scheduler: Callable | None = None,
        revision: str | None = None,
        prediction_type: str | None = None,
        caption_dropout: float = 0.1,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        noise_seed: int = 0,
        gradient_checkpointing: bool = False,
        val_timestep_levels: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        source = {"pretrained_model_name_or_path": pretrained, "revision": revision}
        self.tokenizer = CLIPTokenizer.from_pretrained(**source, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(**source, subfolder="text_encoder")
        self.vae = AutoencoderKL.from_pretrained(**source, subfolder="vae")
        self.unet = UNet2DConditionModel.from_pretrained(**source, subfolder="unet")
        self.noise_scheduler = DDPMScheduler.from_pretrained(**source, subfolder="scheduler")
        if prediction_type is not None:  # e.g. fine-tune an epsilon model into v-prediction
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        for frozen in (self.vae, self.text_encoder):
            frozen.requires_grad_(False).eval()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

    def train(self, mode: bool = True):
        # Lightning switches the whole module to train mode at fit start; the frozen parts stay in eval.
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, keys: list[int]) -> torch.Tensor:
        """Latents sampled from the VAE posterior, scaled by the VAE's `scaling_factor`."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        generator = torch.Generator(device=pixels.device).manual_seed(keys[0])
        return posterior.sample(generator=generator) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """CLIP's last hidden states, the UNet's cross-attention context."""
        ids = self.tokenizer(
            list(captions), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)  # fmt: skip
        return self.text_encoder(ids)[0]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        keys = sample_keys(self.hparams.noise_seed, self.global_step, batch["index"])
        captions = drop_captions(
            batch["caption"],
            self.hparams.noise_seed,
            self.global_step,
            batch["index"],
            self.hparams.caption_dropout,
        )
        loss = diffusion_loss(
            self.unet,
            self.noise_scheduler,
            self.encode_images(batch["pixels"], keys),
            keys,
            snr_gamma=self.hparams.snr_gamma,
            noise_offset=self.hparams.noise_offset,
            encoder_hidden_states=self.encode_text(captions),
        )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        keys, timesteps = held_out_draws(
            self.hparams.noise_seed, batch["index"], self.noise_scheduler.config.num_train_timesteps,
            self.hparams.val_timestep_levels,
        )  # fmt: skip
        loss = diffusion_loss(
            self.unet,
            self.noise_scheduler,
            self.encode_images(batch["pixels"], keys),
            keys,
            timesteps=timesteps,
            encoder_hidden_states=self.encode_text(batch["caption"]),
        )
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["pixels"]))

    def configure_optimizers(self):
        return configure_optimizer(
            self.unet.parameters(), self.optimizer_factory, self.hparams.lr, self.lr_scheduler_factory
        )
