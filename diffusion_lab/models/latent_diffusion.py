"""Latent diffusion fine-tuning as a LightningModule: frozen VAE and text encoder(s), trainable UNet or
transformer.

What differs between latent families (SD 1.x/2.x, SDXL, SD3, Flux) is the family's (`families.stable_diffusion`,
`families.flow_transformer`): which parts it loads, its conditioning, how its network is called, its pipeline and
export. This module holds the parts, drops captions for classifier-free guidance and keeps the frozen parts frozen.
"""

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SchedulerMixin

from diffusion_lab.compat.diffusers import explicit_config
from diffusion_lab.core.loss_mask import LossMask
from diffusion_lab.core.random import CAPTION_DROPOUT_SALT, keyed_coin, keyed_gaussian_sample, salted
from diffusion_lab.errors import ConfigError
from diffusion_lab.families import LatentEncoder, ModelParts, family_of_pipeline
from diffusion_lab.families.checkpoints import current_key, describe_components
from diffusion_lab.families.lora import add_lora
from diffusion_lab.families.prompt_cache import PromptCache
from diffusion_lab.families.prompts import PromptEmbeddings
from diffusion_lab.families.quantization import check_base_storage
from diffusion_lab.families.sd_parts import pipeline_index
from diffusion_lab.models.diffusion_model import DiffusionModel, ObjectiveFactory


def training_scheduler(base, noise_scheduler: dict | SchedulerMixin | None):
    """The scheduler a latent model trains on: its base model's (`base`), with the non-null fields of
    `model.noise_scheduler` changed (`prediction_type=v_prediction` fine-tunes an epsilon model into v,
    `rescale_betas_zero_snr=true`); or, for flow matching, the flow-match scheduler given
    (`model/noise_scheduler=flow_match`). A DDPM schedule of its own would retrain the base on other betas:
    refused."""
    if isinstance(noise_scheduler, SchedulerMixin):
        if not isinstance(noise_scheduler, FlowMatchEulerDiscreteScheduler):
            raise ConfigError(
                f"a latent model trains on its base model's noise schedule, not on a {type(noise_scheduler).__name__} "
                "of its own: keep model/noise_scheduler=base and change fields with model.noise_scheduler.KEY=VALUE"
            )
        return noise_scheduler
    overrides = {key: value for key, value in dict(noise_scheduler or {}).items() if value is not None}
    if not overrides:
        return base
    valid = [name for name in inspect.signature(type(base).__init__).parameters if name != "self"]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(
            f"model.noise_scheduler.{unknown[0]}: not a field of the base model's {type(base).__name__}; "
            f"valid: {', '.join(valid)}"
        )
    return type(base).from_config(explicit_config(base.config), **overrides)


class LatentDiffusion(DiffusionModel):
    """The trainable UNet `net` between a frozen VAE and text encoder(s) (`requires_grad_(False)`, kept in eval
    mode, no optimizer state, left out of checkpoints); only the UNet trains, or only its LoRA adapters.
    x0 is the VAE's scaled latents, the conditioning the prompt's embeddings (the empty prompt's with
    probability `caption_dropout`).

    `pretrained` is a hub id (`stable-diffusion-v1-5/stable-diffusion-v1-5`,
    `stabilityai/stable-diffusion-xl-base-1.0`) or a local folder in the same layout (`diffusion-lab tiny-sd`);
    its `model_index.json` names the family. Batches carry images (`pixels` in [-1, 1], `caption`,
    `crop_geometry`) or what `LatentCacheDataModule` stored for them (`latent_mean`, `latent_std`,
    `text_embedding`, `empty_text_embedding`, SDXL: `pooled_text_embedding`, `empty_pooled_text_embedding`).
    """

    def __init__(
        self,
        pretrained: str,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr: float,
        lr_scheduler: Callable | None = None,
        revision: str | None = None,
        objective: ObjectiveFactory | None = None,
        noise_scheduler: dict | SchedulerMixin | None = None,
        caption_dropout: float = 0.1,
        noise_seed: int = 0,
        gradient_checkpointing: bool = False,
        attention: str = "sdpa",
        vae: str | None = None,
        vae_dtype: str | None = "float32",
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] | None = None,
        val_timestep_levels: int = 10,
        max_sequence_length: int | None = None,
        use_t5: bool = True,
        training_guidance: float | None = None,
        prompt_cache: str | None = None,
        text_encoder_dtype: str | None = None,
        quantize: str | None = None,
        base_dtype: str | None = None,
        loss_mask: dict | None = None,
        preservation=None,
    ) -> None:
        check_base_storage(quantize, base_dtype, lora_rank)
        loss_mask = dict(loss_mask) if loss_mask else None  # a plain dict in the checkpoint's hyperparameters
        family = family_of_pipeline(
            pipeline_index(pretrained, revision), where=f"model.pretrained={pretrained}"
        )
        if training_guidance is not None and family.default_training_guidance is None:
            raise ConfigError(
                f"model.training_guidance applies to guidance-distilled models (flux dev); {family.name} takes "
                "none: leave it null"
            )
        text = {"max_sequence_length": max_sequence_length, "use_t5": use_t5}
        # With a prompt cache the text encoders load only to fill it (`prepare_data`), never with the model.
        components = "vae" if prompt_cache else "all"
        parts: ModelParts = family.load_parts(
            pretrained, revision, vae, components, quantize=quantize, base_dtype=base_dtype, **text
        )
        scheduler = training_scheduler(parts.noise_scheduler, noise_scheduler)
        super().__init__(scheduler, objective, optimizer, lr, lr_scheduler, noise_seed, val_timestep_levels)
        changed = (
            []
            if isinstance(noise_scheduler, SchedulerMixin)
            else [key for key, value in dict(noise_scheduler or {}).items() if value is not None]
        )
        is_flow_base = isinstance(parts.noise_scheduler, FlowMatchEulerDiscreteScheduler)
        if self.objective.kind == "flow" and not is_flow_base and changed:
            raise ConfigError(
                f"model/objective=flow_matching does not use model.noise_scheduler's {', '.join(changed)} "
                "(DDPM fields): leave them null"
            )
        # Plain lists and dicts in the checkpoint (Hydra passes ListConfig, which weights-only loading refuses).
        lora_target_modules = list(lora_target_modules or family.lora_target_modules)
        self.save_hyperparameters(
            ignore=["objective", "optimizer", "lr_scheduler", "noise_scheduler", "preservation"]
        )
        if not isinstance(
            noise_scheduler, SchedulerMixin
        ):  # (the trained scheduler itself is in each checkpoint)
            self.hparams["noise_scheduler"] = dict(noise_scheduler or {})
        self.family = family
        self._base = parts.base
        # The frozen modules (vae, text_encoder, ...) are submodules under their pipeline names, so Lightning
        # moves them with the model; tokenizers and the prompt encoder are kept beside them.
        self._frozen_modules = [
            name for name, part in parts.frozen.items() if isinstance(part, torch.nn.Module)
        ]
        for name in self._frozen_modules:
            setattr(self, name, parts.frozen[name])
        self._frozen_other = {
            name: part for name, part in parts.frozen.items() if name not in self._frozen_modules
        }
        self.encoder = LatentEncoder(
            pretrained, revision, vae, vae_dtype, text_encoder_dtype, frozen=parts.frozen, **text
        )
        self.prompt_cache = PromptCache(self.encoder, prompt_cache) if prompt_cache else None
        self.net = parts.net
        self.encoder.to(
            torch.device("cpu")
        )  # the VAE in vae_dtype, resident text encoders in text_encoder_dtype
        # from_pretrained returns eval-mode modules and Lightning keeps the modes it finds: the UNet must be
        # in train mode, or diffusers skips gradient checkpointing.
        self.net.train()
        family.prepare_network(self.net, attention)
        if lora_rank is not None:
            add_lora(self.net, lora_rank, lora_alpha, lora_target_modules)
        self.loss_mask = LossMask(**dict(loss_mask)) if loss_mask else None
        self.preservation = preservation
        if preservation is not None:
            preservation.check(self.net)
        if gradient_checkpointing:
            self.net.enable_gradient_checkpointing()

    # ---- frozen parts -------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        # Lightning switches the whole module to train mode at fit start; the frozen parts stay in eval.
        super().train(mode)
        for name in self._frozen_modules:
            getattr(self, name).eval()
        return self

    def on_fit_start(self) -> None:
        self.encoder.restore_vae_dtype()
        if self.preservation is not None and hasattr(self.preservation, "setup"):
            self.preservation.setup(self)  # e.g. the class pictures' latents, on the training device

    def prepare_data(self) -> None:
        """With a prompt cache: the prompts callbacks will draw with (the prompt grid's, its negative, "") are
        encoded now, once per node, and the text encoders released, so training runs without them."""
        super().prepare_data()
        if self.preservation is not None and hasattr(self.preservation, "prepare"):
            self.preservation.prepare(self)  # e.g. the class pictures, generated once per node
        if self.prompt_cache is None:
            return
        prompts = [""] + (self.preservation.cached_prompts() if self.preservation is not None else [])
        for callback in self.trainer.callbacks:
            prompts += list(getattr(callback, "cached_prompts", list)())
        self.prompt_cache.fill(prompts, self.trainer.strategy.root_device)
        self.release_text_encoders()

    def cache_prompts(self, prompts: list[str]) -> None:
        """Encode what the prompt cache lacks of `prompts` in one go (a quality callback's captions, before it
        draws them batch by batch), releasing the text encoders again if they were not loaded before."""
        if self.prompt_cache is not None:
            self._sampling_prompts(list(dict.fromkeys(prompts)) or [""], self.device)

    def release_text_encoders(self) -> None:
        self.encoder.release_text()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def parts(self) -> ModelParts:
        """This module's own parts (no copies), as the family builds pipelines and exports from them."""
        frozen = {**self._frozen_other, **{name: getattr(self, name) for name in self._frozen_modules}}
        return ModelParts(self.net, self.noise_scheduler, frozen, self._base)

    def denoiser(self):
        return self.family.denoiser(self.net, training_guidance=self.hparams.training_guidance)

    # ---- what the UNet sees -------------------------------------------------------------------------
    def clean_inputs(self, batch: dict, keys: list[int]) -> torch.Tensor:
        """Scaled latents sampled (one keyed draw per image) from the cached posterior (mean, std), or from the
        VAE's run on `pixels`: the same draw either way."""
        if "latent_mean" in batch:  # cached: the VAE never runs
            mean, std = batch["latent_mean"], batch["latent_std"]
        else:
            mean, std = self.encoder.encode_posterior(batch["pixels"])
        return self.encoder.scale_latents(keyed_gaussian_sample(mean, std, keys)).to(self.net.dtype)

    def caption_dropped(self, keys: list[int]) -> torch.Tensor:
        """True where an image's caption is replaced by the empty prompt, with probability `caption_dropout`,
        so the UNet also learns the unconditional prediction that classifier-free guidance needs (Ho &
        Salimans 2022, arXiv:2207.12598). Keyed per image like the noise, so the choice survives resume."""
        return keyed_coin(salted(keys, CAPTION_DROPOUT_SALT), self.hparams.caption_dropout)

    def prompt_embeddings(self, batch: dict, dropped: torch.Tensor) -> PromptEmbeddings:
        """The batch's prompts encoded (or read from the cache), dropped ones as the empty prompt: both
        encoders' inputs together."""
        if "text_embedding" not in batch:
            captions = [
                "" if drop else caption
                for caption, drop in zip(batch["caption"], dropped.tolist(), strict=True)
            ]
            return self.encode_prompts(captions)

        def chosen(name: str) -> torch.Tensor | None:
            if name not in batch:
                return None
            mask = dropped.to(batch[name].device).view(-1, *([1] * (batch[name].ndim - 1)))
            return torch.where(mask, batch[f"empty_{name}"], batch[name])

        return PromptEmbeddings(chosen("text_embedding"), chosen("pooled_text_embedding"))

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        """Prompts through the prompt cache, or the text encoders."""
        return (self.prompt_cache or self.encoder.encode_prompts)(prompts, self.device)

    def conditioning(self, batch: dict, keys: list[int] | None = None) -> dict:
        """In training (`keys` given) some captions are dropped to the empty prompt; the family turns the
        prompts (and for SDXL the crop geometry) into the UNet's keyword arguments."""
        dropped = torch.zeros(len(batch["index"]), dtype=torch.bool)
        if keys is not None:
            dropped = self.caption_dropped(keys)
        prompts = self.prompt_embeddings(batch, dropped)
        return self.family.conditioning(prompts, batch, self.net.dtype, self.device)

    # ---- checkpoints: the trainable weights only ----------------------------------------------------
    def _frozen_names(self) -> set[str]:
        """Every state-dict key but the trainable weights': frozen parameters, buffers, and the aliases of tied
        weights (T5's `encoder.embed_tokens` is its `shared`), which `named_parameters` lists once."""
        trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        return {key for key in self.state_dict() if key not in trainable}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen weights are the pretrained ones: reloaded from `pretrained`, not copied into every
        # checkpoint (SD 1.5: 0.8 GB of VAE and text encoder per file). The objective's scheduler is kept,
        # so sampling and export know a flow model from a DDPM one.
        frozen = self._frozen_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["diffusers_components"] = describe_components(noise_scheduler=self.noise_scheduler)
        checkpoint["family"] = self.family.name

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        frozen = self._frozen_names()
        current = self.state_dict()
        trained = {current_key(key): value for key, value in checkpoint["state_dict"].items()}
        checkpoint["state_dict"] = {**{k: current[k] for k in frozen}, **trained}

    def sampler(self):
        """The family's sampler; with a prompt cache it feeds the pipeline cached embeddings."""
        return self.family.sampler(self.parts(), prompt_encoder=self.prompt_cache and self._sampling_prompts)

    def _sampling_prompts(self, prompts: list[str], device) -> PromptEmbeddings:
        """The prompt cache for a callback's drawing: text encoders loaded for prompts it lacks (a quality
        callback's captions) are released again, not kept beside the training model."""
        loaded = self.encoder.text_loaded
        try:
            return self.prompt_cache(prompts, device)
        finally:
            if not loaded and self.encoder.text_loaded:
                self.release_text_encoders()

    def save_pipeline(self, out_dir: str | Path) -> Path:
        """The family's export: a pipeline folder, or LoRA adapters for the base model. A full model's folder
        holds the text encoders too: a run with a prompt cache loads them (on the CPU) to write it."""
        parts = self.parts()
        if parts.has_lora or self.prompt_cache is None:
            return self.family.save_pipeline(parts, Path(out_dir))
        loaded = self.encoder.text_loaded
        try:
            parts.frozen.update(self.encoder.text_parts())
            return self.family.save_pipeline(parts, Path(out_dir))
        finally:
            if not loaded:
                self.release_text_encoders()
