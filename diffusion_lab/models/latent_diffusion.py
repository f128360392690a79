"""Latent Stable Diffusion fine-tuning as a LightningModule: frozen VAE and CLIP text encoder, trainable UNet."""

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from diffusers import SchedulerMixin, StableDiffusionPipeline

from diffusion_lab.core import diffusion_loss, held_out_draws, keyed_gaussian_sample, sample_keys
from diffusion_lab.core.random import mix_key
from diffusion_lab.core.schedulers import has_zero_terminal_snr, scheduler_from_name, with_zero_terminal_snr
from diffusion_lab.dtypes import dtype_from_name
from diffusion_lab.models.attention import set_attention
from diffusion_lab.models.lora import ATTENTION_PROJECTIONS, add_lora, has_lora, save_lora
from diffusion_lab.models.optimization import configure_optimizer
from diffusion_lab.models.stable_diffusion import load_text_and_vae, load_unet_and_scheduler, token_ids

_CAPTION_DROPOUT_SALT = 0xCA7


def _public(config) -> dict:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def caption_dropout_mask(seed: int, step: int, sample_ids: torch.Tensor, p: float) -> torch.Tensor:
    """True where an image's caption is replaced by the empty prompt, with probability p, so the UNet also
    learns the unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022,
    arXiv:2207.12598). Keyed per image like the noise, so the choice survives resume."""
    uniforms = [
        (mix_key(seed ^ _CAPTION_DROPOUT_SALT, step, int(i)) >> 10) / 2**53 for i in sample_ids.tolist()
    ]
    return torch.tensor(uniforms, dtype=torch.float64) < p


class LatentDiffusion(L.LightningModule):
    """Owns tokenizer, text encoder, VAE, UNet, noise scheduler, the loss and the optimizer.

    Everything loads with `from_pretrained(pretrained, subfolder=...)`: a hub id
    (`stable-diffusion-v1-5/stable-diffusion-v1-5`) or a local folder in the same layout (`diffusion-lab
    tiny-sd`). The VAE and text encoder are frozen (`requires_grad_(False)`, kept in eval mode, no
    optimizer state, left out of checkpoints); only the UNet trains, or only its LoRA adapters.

    Batches carry either images (`pixels` in [-1, 1] and `caption`) or what `LatentCacheDataModule` stored
    for them (`latent_mean`, `latent_std`, `text_embedding`, `empty_text_embedding`); both carry `index`.
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
        attention: str = "sdpa",
        vae_dtype: str | None = "float32",
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
        val_timestep_levels: int = 10,
        zero_terminal_snr: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        parts = {**load_text_and_vae(pretrained, revision), **load_unet_and_scheduler(pretrained, revision)}
        self.tokenizer = parts["tokenizer"]
        self.text_encoder = parts["text_encoder"]
        self.vae = parts["vae"]
        self.unet = parts["unet"]
        self.noise_scheduler = parts["noise_scheduler"]
        self._base_scheduler_config = dict(self.noise_scheduler.config)
        if prediction_type is not None:  # e.g. fine-tune an epsilon model into v-prediction
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        if zero_terminal_snr or has_zero_terminal_snr(self.noise_scheduler.config):
            self.noise_scheduler = with_zero_terminal_snr(self.noise_scheduler)
        self._vae_dtype = dtype_from_name(vae_dtype)
        self.on_fit_start()
        # from_pretrained returns eval-mode modules and Lightning keeps the modes it finds: the UNet must be
        # in train mode, or diffusers skips gradient checkpointing.
        self.unet.train()
        set_attention(self.unet, attention)
        if lora_rank is not None:
            add_lora(self.unet, lora_rank, lora_alpha, lora_target_modules)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

    # ---- frozen parts -------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that predicts the noise (what `compile` and `channels_last` apply to)."""
        return self.unet

    def train(self, mode: bool = True):
        # Lightning switches the whole module to train mode at fit start; the frozen parts stay in eval.
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    def on_fit_start(self) -> None:
        # A "true" precision (bf16-true) has cast every weight by now; the VAE goes back to its own dtype
        # (the SD VAE overflows in fp16: diffusers issue 4424).
        if self._vae_dtype is not None and self.vae.dtype != self._vae_dtype:
            self.vae.to(self._vae_dtype)

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std) for images in [-1, 1]; in the VAE's own dtype, outside
        autocast, when `vae_dtype` is set."""
        no_autocast = torch.autocast(pixels.device.type, enabled=False)
        with no_autocast if self._vae_dtype is not None else contextlib.nullcontext():
            posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, keys: list[int]) -> torch.Tensor:
        """Scaled latents sampled from the VAE posterior (one keyed draw per image)."""
        mean, std = self.encode_posterior(pixels)
        return self.scale_latents(keyed_gaussian_sample(mean, std, keys))

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """CLIP's last hidden states, the UNet's cross-attention context."""
        ids = token_ids(self.tokenizer, list(captions)).to(self.device)
        return self.text_encoder(ids)[0]

    # ---- what the UNet sees -------------------------------------------------------------------------
    def latents(self, batch: dict, keys: list[int]) -> torch.Tensor:
        if "latent_mean" in batch:  # cached: the VAE never runs
            latents = self.scale_latents(
                keyed_gaussian_sample(batch["latent_mean"], batch["latent_std"], keys)
            )
        else:
            latents = self.encode_images(batch["pixels"], keys)
        return latents.to(self.unet.dtype)

    def text_context(self, batch: dict, dropped: torch.Tensor | None = None) -> torch.Tensor:
        """Caption embeddings, the empty prompt's where `dropped`."""
        if dropped is None:
            dropped = torch.zeros(len(batch["index"]), dtype=torch.bool)
        if "text_embedding" in batch:  # cached: the text encoder never runs
            mask = dropped.to(batch["text_embedding"].device).view(-1, 1, 1)
            context = torch.where(mask, batch["empty_text_embedding"], batch["text_embedding"])
        else:
            captions = [
                "" if drop else caption
                for caption, drop in zip(batch["caption"], dropped.tolist(), strict=True)
            ]
            context = self.encode_text(captions)
        return context.to(self.unet.dtype)

    # ---- training -----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        h = self.hparams
        keys = sample_keys(h.noise_seed, self.global_step, batch["index"])
        dropped = caption_dropout_mask(h.noise_seed, self.global_step, batch["index"], h.caption_dropout)
        loss = diffusion_loss(
            self.unet,
            self.noise_scheduler,
            self.latents(batch, keys),
            keys,
            snr_gamma=h.snr_gamma,
            noise_offset=h.noise_offset,
            encoder_hidden_states=self.text_context(batch, dropped),
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
            self.unet,
            self.noise_scheduler,
            self.latents(batch, keys),
            keys,
            timesteps=timesteps,
            encoder_hidden_states=self.text_context(batch),
        )
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["index"]))

    def configure_optimizers(self):
        return configure_optimizer(
            self.unet.parameters(), self.optimizer_factory, self.hparams.lr, self.lr_scheduler_factory
        )

    # ---- checkpoints: the trainable weights only ----------------------------------------------------
    def _frozen_names(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if not parameter.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen weights are the pretrained ones: reloaded from `pretrained`, not copied into every
        # checkpoint (SD 1.5: 0.8 GB of VAE and text encoder per file).
        frozen = self._frozen_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        frozen = self._frozen_names()
        current = self.state_dict()
        checkpoint["state_dict"] = {**{k: current[k] for k in frozen}, **checkpoint["state_dict"]}

    # ---- using the result ---------------------------------------------------------------------------
    def pipeline(self, scheduler: SchedulerMixin | None = None) -> StableDiffusionPipeline:
        """A StableDiffusionPipeline over this module's own parts (no copies)."""
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler or self.noise_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip

    def sampling_scheduler(self) -> SchedulerMixin:
        """What exports carry: DDIM on the training schedule (see `save_pipeline`)."""
        return scheduler_from_name("ddim", self.noise_scheduler.config)

    def save_pipeline(self, out_dir: str | Path) -> Path:
        """A full fine-tune: the StableDiffusionPipeline folder, whose scheduler is DDIM on the training schedule
        (not the training DDPMScheduler: a plain `pipeline(prompt)` would run 50 ancestral DDPM steps; DDIM's
        config keeps `clip_sample` and the rest, so any scheduler built from it with `from_config` matches
        training). LoRA: the adapters in the diffusers LoRA format with their rank, alpha and targets, for
        `DiffusionPipeline.from_pretrained(<pretrained>).load_lora_weights(out_dir)`, plus that DDIM scheduler
        when the training schedule differs from the base model's (e.g. `prediction_type=v_prediction`)."""
        if has_lora(self.unet):
            changed = _public(self.noise_scheduler.config) != _public(self._base_scheduler_config)
            return save_lora(self.unet, out_dir, scheduler=self.sampling_scheduler() if changed else None)
        self.pipeline(scheduler=self.sampling_scheduler()).save_pretrained(out_dir)
        return Path(out_dir)
