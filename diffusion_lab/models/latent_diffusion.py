"""Latent Stable Diffusion fine-tuning as a LightningModule: frozen VAE and CLIP text encoder, trainable UNet."""

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import SchedulerMixin, StableDiffusionPipeline

from diffusion_lab.core.random import CAPTION_DROPOUT_SALT, keyed_coin, keyed_gaussian_sample, salted
from diffusion_lab.core.schedulers import scheduler_from_name
from diffusion_lab.dtypes import dtype_from_name
from diffusion_lab.errors import ConfigError
from diffusion_lab.models.attention import set_attention
from diffusion_lab.models.diffusion_model import DiffusionModel, ObjectiveFactory
from diffusion_lab.models.lora import ATTENTION_PROJECTIONS, add_lora, has_lora, save_lora
from diffusion_lab.models.serialization import current_key, describe_components
from diffusion_lab.models.stable_diffusion import load_text_and_vae, load_unet_and_scheduler, token_ids


def _public(config) -> dict:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


class LatentDiffusion(DiffusionModel):
    """Tokenizer, text encoder and VAE (frozen) around the trainable UNet `net`; x0 is the VAE's scaled
    latents, the conditioning the text encoder's states (the empty prompt's with probability
    `caption_dropout`). The objective starts from the checkpoint's noise scheduler.

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
        objective: ObjectiveFactory | None = None,
        prediction_type: str | None = None,
        caption_dropout: float = 0.1,
        noise_seed: int = 0,
        gradient_checkpointing: bool = False,
        attention: str = "sdpa",
        vae_dtype: str | None = "float32",
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
        val_timestep_levels: int = 10,
    ) -> None:
        parts = {**load_text_and_vae(pretrained, revision), **load_unet_and_scheduler(pretrained, revision)}
        noise_scheduler = parts["noise_scheduler"]
        base_scheduler_config = dict(noise_scheduler.config)
        if prediction_type is not None:  # e.g. fine-tune an epsilon model into v-prediction
            noise_scheduler.register_to_config(prediction_type=prediction_type)
        super().__init__(
            noise_scheduler, objective, optimizer, lr, lr_scheduler, noise_seed, val_timestep_levels
        )
        if prediction_type is not None and self.objective.family != "ddpm":
            raise ConfigError(
                f"model.prediction_type={prediction_type!r} applies to model/objective=ddpm; "
                f"{type(self.objective).__name__} always predicts the velocity eps - x0: set model.prediction_type=null"
            )
        self.save_hyperparameters(ignore=["objective", "optimizer", "lr_scheduler"])
        self._base_scheduler_config = base_scheduler_config
        self.tokenizer = parts["tokenizer"]
        self.text_encoder = parts["text_encoder"]
        self.vae = parts["vae"]
        self.net = parts["unet"]
        self._vae_dtype = dtype_from_name(vae_dtype)
        self.on_fit_start()
        # from_pretrained returns eval-mode modules and Lightning keeps the modes it finds: the UNet must be
        # in train mode, or diffusers skips gradient checkpointing.
        self.net.train()
        set_attention(self.net, attention)
        if lora_rank is not None:
            add_lora(self.net, lora_rank, lora_alpha, lora_target_modules)
        if gradient_checkpointing:
            self.net.enable_gradient_checkpointing()

    # ---- frozen parts -------------------------------------------------------------------------------
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
    def clean_inputs(self, batch: dict, keys: list[int]) -> torch.Tensor:
        """Scaled latents: sampled from cached (mean, std), or from the VAE run on `pixels`."""
        if "latent_mean" in batch:  # cached: the VAE never runs
            latents = self.scale_latents(
                keyed_gaussian_sample(batch["latent_mean"], batch["latent_std"], keys)
            )
        else:
            latents = self.encode_images(batch["pixels"], keys)
        return latents.to(self.net.dtype)

    def caption_dropped(self, keys: list[int]) -> torch.Tensor:
        """True where an image's caption is replaced by the empty prompt, with probability `caption_dropout`,
        so the UNet also learns the unconditional prediction that classifier-free guidance needs (Ho &
        Salimans 2022, arXiv:2207.12598). Keyed per image like the noise, so the choice survives resume."""
        return keyed_coin(salted(keys, CAPTION_DROPOUT_SALT), self.hparams.caption_dropout)

    def conditioning(self, batch: dict, keys: list[int] | None = None) -> dict:
        """Caption embeddings as the UNet's cross-attention context; in training (`keys` given) some are
        dropped to the empty prompt's."""
        dropped = torch.zeros(len(batch["index"]), dtype=torch.bool)
        if keys is not None:
            dropped = self.caption_dropped(keys)
        if "text_embedding" in batch:  # cached: the text encoder never runs
            mask = dropped.to(batch["text_embedding"].device).view(-1, 1, 1)
            context = torch.where(mask, batch["empty_text_embedding"], batch["text_embedding"])
        else:
            captions = [
                "" if drop else caption
                for caption, drop in zip(batch["caption"], dropped.tolist(), strict=True)
            ]
            context = self.encode_text(captions)
        return {"encoder_hidden_states": context.to(self.net.dtype)}

    # ---- checkpoints: the trainable weights only ----------------------------------------------------
    def _frozen_names(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if not parameter.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen weights are the pretrained ones: reloaded from `pretrained`, not copied into every
        # checkpoint (SD 1.5: 0.8 GB of VAE and text encoder per file). The objective's scheduler is kept,
        # so sampling and export know a flow model from a DDPM one.
        frozen = self._frozen_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["diffusers_components"] = describe_components(noise_scheduler=self.noise_scheduler)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        frozen = self._frozen_names()
        current = self.state_dict()
        trained = {current_key(key): value for key, value in checkpoint["state_dict"].items()}
        checkpoint["state_dict"] = {**{k: current[k] for k in frozen}, **trained}

    # ---- using the result ---------------------------------------------------------------------------
    def pipeline(self, scheduler: SchedulerMixin | None = None) -> StableDiffusionPipeline:
        """A StableDiffusionPipeline over this module's own parts (no copies)."""
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.net,
            scheduler=scheduler or self.noise_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip

    def sampling_scheduler(self) -> SchedulerMixin:
        """What exports carry: DDIM on the training schedule (see `save_pipeline`); for a flow model
        DPM-Solver++ with flow sigmas (flow-match Euler lacks `scale_model_input` and `init_noise_sigma`, which
        StableDiffusionPipeline reads; `fit_for_pipelines` patches a live one, but a saved folder loads bare)."""
        name = "ddim" if self.objective.family == "ddpm" else "dpm++"
        return scheduler_from_name(name, self.noise_scheduler.config)

    def save_pipeline(self, out_dir: str | Path) -> Path:
        """A full fine-tune: the StableDiffusionPipeline folder, whose scheduler is DDIM on the training schedule
        (not the training DDPMScheduler: a plain `pipeline(prompt)` would run 50 ancestral DDPM steps; DDIM's
        config keeps `clip_sample` and the rest, so any scheduler built from it with `from_config` matches
        training). LoRA: the adapters in the diffusers LoRA format with their rank, alpha and targets, for
        `DiffusionPipeline.from_pretrained(<pretrained>).load_lora_weights(out_dir)`, plus that DDIM scheduler
        when the training schedule differs from the base model's (e.g. `prediction_type=v_prediction`)."""
        if has_lora(self.net):
            changed = _public(self.noise_scheduler.config) != _public(self._base_scheduler_config)
            return save_lora(self.net, out_dir, scheduler=self.sampling_scheduler() if changed else None)
        self.pipeline(scheduler=self.sampling_scheduler()).save_pretrained(out_dir)
        return Path(out_dir)
