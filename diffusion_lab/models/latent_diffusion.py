"""Latent Stable Diffusion (1.x/2.x and XL) fine-tuning as a LightningModule: frozen VAE and text encoder(s),
trainable UNet."""

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import SchedulerMixin, StableDiffusionPipeline, StableDiffusionXLPipeline

from diffusion_lab.core.random import CAPTION_DROPOUT_SALT, keyed_coin, keyed_gaussian_sample, salted
from diffusion_lab.core.schedulers import scheduler_from_name
from diffusion_lab.data.transforms import batch_crop_geometry
from diffusion_lab.dtypes import dtype_from_name
from diffusion_lab.errors import ConfigError
from diffusion_lab.models.attention import set_attention
from diffusion_lab.models.diffusion_model import DiffusionModel, ObjectiveFactory
from diffusion_lab.models.lora import ATTENTION_PROJECTIONS, add_lora, has_lora, save_lora
from diffusion_lab.models.prompts import PromptEmbeddings
from diffusion_lab.models.serialization import current_key, describe_components
from diffusion_lab.models.stable_diffusion import load_text_and_vae, load_unet_and_scheduler


def _public(config) -> dict:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


class LatentDiffusion(DiffusionModel):
    """Tokenizer(s), text encoder(s) and VAE (frozen) around the trainable UNet `net`; x0 is the VAE's scaled
    latents, the conditioning the prompt's embeddings (the empty prompt's with probability `caption_dropout`).
    The objective starts from the checkpoint's noise scheduler.

    Everything loads with `from_pretrained(pretrained, subfolder=...)`: a hub id
    (`stable-diffusion-v1-5/stable-diffusion-v1-5`, `stabilityai/stable-diffusion-xl-base-1.0`) or a local
    folder in the same layout (`diffusion-lab tiny-sd [variant=sdxl]`). A checkpoint with `text_encoder_2`
    is SDXL: the two encoders' context and pooled embedding (`prompts.PromptEncoder`) and the
    micro-conditioning `time_ids` (original size, crop top-left, target size) of each image's real crop
    (`crop_geometry`, arXiv:2307.01952 section 2.2). Nothing else differs: one training step for both. The
    VAE and text encoders are frozen (`requires_grad_(False)`, kept in eval mode, no optimizer state, left
    out of checkpoints); only the UNet trains, or only its LoRA adapters.

    Batches carry either images (`pixels` in [-1, 1], `caption`, `crop_geometry`) or what
    `LatentCacheDataModule` stored for them (`latent_mean`, `latent_std`, `text_embedding`,
    `empty_text_embedding`, SDXL: `pooled_text_embedding`, `empty_pooled_text_embedding`); both carry `index`.
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
        vae: str | None = None,
        vae_dtype: str | None = "float32",
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
        val_timestep_levels: int = 10,
    ) -> None:
        parts = {
            **load_text_and_vae(pretrained, revision, vae),
            **load_unet_and_scheduler(pretrained, revision),
        }
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
        # Plain lists in the checkpoint (Hydra passes ListConfig, which weights-only loading refuses on resume).
        lora_target_modules = list(lora_target_modules)
        self.save_hyperparameters(ignore=["objective", "optimizer", "lr_scheduler"])
        self._base_scheduler_config = base_scheduler_config
        self.tokenizer, self.tokenizer_2 = parts["tokenizer"], parts.get("tokenizer_2")
        self.text_encoder, self.text_encoder_2 = parts["text_encoder"], parts.get("text_encoder_2")
        self.prompts = parts["prompts"]
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
        for frozen in (self.vae, self.text_encoder, self.text_encoder_2):
            if frozen is not None:
                frozen.eval()
        return self

    @property
    def is_sdxl(self) -> bool:
        return self.prompts.is_sdxl

    @property
    def pipeline_class(self) -> type:
        return StableDiffusionXLPipeline if self.is_sdxl else StableDiffusionPipeline

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

    def encode_prompts(self, captions: Sequence[str]) -> PromptEmbeddings:
        return self.prompts(captions, self.device)

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """The UNet's cross-attention context for `captions`."""
        return self.encode_prompts(captions).hidden

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
        """The prompt embeddings (and for SDXL the pooled embedding and `time_ids`); in training (`keys`
        given) some captions are dropped to the empty prompt's embeddings, both encoders' together."""
        dropped = torch.zeros(len(batch["index"]), dtype=torch.bool)
        if keys is not None:
            dropped = self.caption_dropped(keys)
        if "text_embedding" in batch:  # cached: the text encoders never run

            def chosen(name: str) -> torch.Tensor:
                mask = dropped.to(batch[name].device).view(-1, *([1] * (batch[name].ndim - 1)))
                return torch.where(mask, batch[f"empty_{name}"], batch[name])

            pooled = self.is_sdxl and "pooled_text_embedding" in batch
            prompts = PromptEmbeddings(
                chosen("text_embedding"), chosen("pooled_text_embedding") if pooled else None
            )
        else:
            captions = [
                "" if drop else caption
                for caption, drop in zip(batch["caption"], dropped.tolist(), strict=True)
            ]
            prompts = self.encode_prompts(captions)
        dtype = self.net.dtype
        kwargs = {"encoder_hidden_states": prompts.hidden.to(dtype)}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": prompts.pooled.to(dtype),
                "time_ids": self.time_ids(batch),
            }
        return kwargs

    def time_ids(self, batch: dict) -> torch.Tensor:
        """SDXL's micro-conditioning per image: original (height, width), crop (top, left), target (height,
        width), from the crop the data actually made (`crop_geometry`, flips included)."""
        return batch_crop_geometry(batch)[:, :6].to(self.device, self.net.dtype)

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
    def pipeline(
        self, scheduler: SchedulerMixin | None = None
    ) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
        """A StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) over this module's own parts (no copies)."""
        common = {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer, "unet": self.net,
                  "scheduler": scheduler or self.noise_scheduler}  # fmt: skip
        if self.is_sdxl:
            return StableDiffusionXLPipeline(
                **common, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                force_zeros_for_empty_prompt=self.prompts.zeros_for_empty_prompt, add_watermarker=False,
            )  # fmt: skip
        return StableDiffusionPipeline(
            **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )

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
            scheduler = self.sampling_scheduler() if changed else None
            return save_lora(self.net, out_dir, self.pipeline_class, scheduler=scheduler)
        dtype = self.vae.dtype
        try:  # the VAE is saved in fp32 beside the fp32 UNet: plain diffusers loads a folder of one dtype
            self.vae.float()
            self.pipeline(scheduler=self.sampling_scheduler()).save_pretrained(out_dir)
        finally:
            self.vae.to(dtype)
        return Path(out_dir)
