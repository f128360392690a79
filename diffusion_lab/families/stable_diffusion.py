"""The latent families: Stable Diffusion 1.x/2.x (`sd`) and SDXL (`sdxl`).

Both: a frozen VAE and frozen CLIP text encoder(s) around a trainable `UNet2DConditionModel`, loaded with
`from_pretrained(pretrained, subfolder=...)` from a hub id or a local folder. SDXL (a `text_encoder_2` in
`model_index.json`) adds the second encoder's pooled embedding and the micro-conditioning `time_ids`
(arXiv:2307.01952 section 2.2). Nothing else differs.
"""

from pathlib import Path

import torch

from diffusion_lab.core.crop_geometry import batch_crop_geometry
from diffusion_lab.core.schedulers import flow_settings, scheduler_from_name, with_zero_terminal_snr
from diffusion_lab.errors import ConfigError
from diffusion_lab.families.base import Family, ModelParts
from diffusion_lab.families.checkpoints import load_trained_weights, trained_scheduler
from diffusion_lab.families.lora import ATTENTION_PROJECTIONS, add_lora, save_kohya, save_lora
from diffusion_lab.families.prompts import PromptEmbeddings
from diffusion_lab.families.registry import register
from diffusion_lab.families.sd_parts import (
    has_second_text_encoder,
    load_parts,
    load_text_and_vae,
    pipeline_index,
)
from diffusion_lab.generation.samplers import TextToImageSampler

FROZEN = ("vae", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


def public_config(config) -> dict:
    """A scheduler config without its bookkeeping (`_class_name`, `_diffusers_version`): what decides sampling."""
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


@register
class StableDiffusion(Family):
    """SD 1.x/2.x: one CLIP text encoder, its last hidden states as the cross-attention context."""

    name = "sd"
    grid = "prompt"
    pipeline_classes = ("StableDiffusionPipeline",)
    lora_target_modules = ATTENTION_PROJECTIONS
    tiny_overrides = ("experiment=sd_finetune_tiny", "~callbacks.sample_quality", "~latent_cache")
    two_encoders = False
    denoiser_name = "unet"  # the trained network's name in the pipeline (and in LoRA files)
    kohya_prefix = "lora_unet"  # the key prefix of its single-file kohya LoRA (`lora.kohya_state_dict`)
    default_training_guidance: float | None = (
        None  # a guidance-distilled model's (Flux dev) training guidance
    )

    @property
    def pipeline_class(self):
        """The diffusers class this family's folders hold (`pipeline_classes[0]`)."""
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def owns_legacy_checkpoint(self, checkpoint: dict) -> bool:
        hyper = checkpoint.get("hyper_parameters", {})
        if "pretrained" not in hyper:
            return False
        return (
            has_second_text_encoder(pipeline_index(hyper["pretrained"], hyper.get("revision")))
            == self.two_encoders
        )

    # ---- parts ------------------------------------------------------------------------------------------
    def text_options(self, max_sequence_length: int | None = None, use_t5: bool = True) -> dict:
        """CLIP prompts are always 77 tokens and there is no T5: the T5 families' keys are refused here."""
        if max_sequence_length is not None or not use_t5:
            raise ConfigError(
                f"model.max_sequence_length / model.use_t5 apply to the T5 families (sd3, flux); {self.name} "
                "encodes 77 CLIP tokens: leave them null / true"
            )
        return {}

    def load_frozen(
        self,
        pretrained: str,
        revision: str | None = None,
        vae: str | None = None,
        components: str = "all",
        **text,
    ) -> dict:
        """The tokenizer(s), text encoder(s), VAE and `prompts` encoder (see `sd_parts.load_text_and_vae`);
        `components`: all, vae or text."""
        self.text_options(**text)
        return load_text_and_vae(pretrained, revision, vae, components)

    def load_parts(
        self, pretrained: str, revision: str | None = None, vae: str | None = None, components: str = "all",
        quantize: str | None = None, base_dtype: str | None = None, **text,
    ) -> ModelParts:  # fmt: skip
        """The trainable network (a LoRA's frozen base in `base_dtype`), its scheduler and the frozen `components`
        (all, or vae only: see `load_frozen`)."""
        self.text_options(**text)
        if quantize:
            raise ConfigError(f"model.quantize applies to the transformer families (sd3, flux, z_image); {self.name}'s "
                              "UNet fits in bf16 (model.base_dtype=bfloat16): leave it null")  # fmt: skip
        return load_parts(pretrained, revision, vae, components, base_dtype)

    def prepare_network(self, net: torch.nn.Module, attention: str) -> None:
        """The UNet's attention kernel (`model.attention`)."""
        from diffusion_lab.families.attention import set_attention

        set_attention(net, attention)

    def build_tiny(self, out_dir: Path, sample_size: int = 32, seed: int = 0) -> Path:
        from diffusion_lab.families.tiny import build_tiny_sd

        return build_tiny_sd(out_dir, sample_size=sample_size, seed=seed)

    def parts_from_checkpoint(self, checkpoint: dict) -> ModelParts:
        hyper = checkpoint["hyper_parameters"]
        parts = self.load_parts(hyper["pretrained"], hyper.get("revision"), hyper.get("vae"),
                                quantize=hyper.get("quantize"), base_dtype=hyper.get("base_dtype"),
                                max_sequence_length=hyper.get("max_sequence_length"),
                                use_t5=hyper.get("use_t5", True))  # fmt: skip
        trained = trained_scheduler(checkpoint)
        if trained is None and hyper.get("zero_terminal_snr"):  # written before objectives existed
            trained = with_zero_terminal_snr(parts.noise_scheduler)
        parts.noise_scheduler = trained or parts.noise_scheduler
        if hyper.get("lora_rank"):
            add_lora(parts.net, hyper["lora_rank"], hyper.get("lora_alpha"),
                     hyper.get("lora_target_modules") or self.lora_target_modules)  # fmt: skip
        load_trained_weights(parts.net, checkpoint)
        return parts

    def parts_from_pipeline(self, pipeline) -> ModelParts:
        frozen = {name: getattr(pipeline, name, None) for name in FROZEN}
        return ModelParts(
            pipeline.unet, pipeline.scheduler, {k: v for k, v in frozen.items() if v is not None}
        )

    # ---- conditioning -----------------------------------------------------------------------------------
    def conditioning(self, prompts: PromptEmbeddings, batch: dict, dtype: torch.dtype, device) -> dict:
        """The UNet's keyword arguments besides (x_t, t)."""
        return {"encoder_hidden_states": prompts.hidden.to(dtype)}

    def denoiser(self, net: torch.nn.Module, training_guidance: float | None = None):
        """What the objective calls as `denoiser(x_t, timesteps, **conditioning).sample`: the UNet itself."""
        return net

    # ---- using them -------------------------------------------------------------------------------------
    def pipeline(self, parts: ModelParts, scheduler=None):
        from diffusers import StableDiffusionPipeline

        frozen = parts.frozen
        return StableDiffusionPipeline(
            vae=frozen["vae"], text_encoder=frozen.get("text_encoder"), tokenizer=frozen.get("tokenizer"), unet=parts.net,
            scheduler=scheduler or parts.noise_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip

    def sampler(self, parts: ModelParts, prompt_encoder=None) -> TextToImageSampler:
        """The family's pipeline over `parts`; with a `prompt_encoder` (a run's prompt cache) the pipeline is given
        embeddings, and needs no text encoders."""
        return TextToImageSampler(self.pipeline(parts), prompt_inputs=self.prompt_inputs(prompt_encoder))

    pooled_inputs = False  # whether the pipeline takes pooled embeddings (SDXL, SD3, Flux)

    def prompt_inputs(self, prompt_encoder):
        """prompts, negative prompt, device -> the pipeline's embedding arguments, from `prompt_encoder` (None:
        the pipeline encodes its prompts itself). The negative is "" (or zeros, as the pipeline does) when none
        is given."""
        if prompt_encoder is None:
            return None

        def inputs(prompts: list[str], negative_prompt: str | None, device) -> dict:
            positive = prompt_encoder(prompts, device)
            negative = prompt_encoder([negative_prompt or ""] * len(prompts), device)
            given = {"prompt_embeds": positive.hidden, "negative_prompt_embeds": negative.hidden}
            if self.pooled_inputs:
                given.update(
                    pooled_prompt_embeds=positive.pooled, negative_pooled_prompt_embeds=negative.pooled
                )
            return given

        return inputs

    def sampler_from_pipeline(self, pipeline) -> TextToImageSampler:
        return TextToImageSampler(pipeline)  # as loaded: its safety checker, LoRA and all

    def sampling_scheduler(self, parts: ModelParts):
        """What exports carry: DDIM on the training schedule (not the training DDPMScheduler: a plain
        `pipeline(prompt)` would run 50 ancestral DDPM steps; DDIM's config keeps `clip_sample` and the rest, so
        any scheduler built from it with `from_config` matches training); for a flow model DPM-Solver++ with
        flow sigmas (flow-match Euler lacks `scale_model_input` and `init_noise_sigma`, which the pipeline
        reads, and a saved folder loads bare)."""
        name = "dpm++" if flow_settings(parts.noise_scheduler.config) else "ddim"
        return scheduler_from_name(name, parts.noise_scheduler.config)

    def save_pipeline(self, parts: ModelParts, folder: Path) -> Path:
        """A full fine-tune: the pipeline folder with `sampling_scheduler`, its VAE in fp32 beside the fp32
        UNet (plain diffusers loads a folder of one dtype). LoRA: the adapters in the diffusers LoRA format, for
        `DiffusionPipeline.from_pretrained(<base>).load_lora_weights(folder)`, plus that scheduler when the
        training schedule differs from the base model's (e.g. v-prediction on an epsilon base)."""
        if parts.has_lora:
            base = (parts.base or {}).get("scheduler_config")
            changed = base is not None and public_config(parts.noise_scheduler.config) != public_config(base)
            return save_lora(parts.net, folder, self.pipeline_class, component=self.denoiser_name,
                             scheduler=self.sampling_scheduler(parts) if changed else None)  # fmt: skip
        vae = parts.frozen["vae"]
        dtype = vae.dtype
        try:
            vae.float()
            self.pipeline(parts, scheduler=self.sampling_scheduler(parts)).save_pretrained(folder)
        finally:
            vae.to(dtype)
        return Path(folder)

    def save_kohya(self, parts: ModelParts, folder: Path) -> Path:
        """The LoRA also as one kohya-format file (`lora_unet_*`), for ComfyUI, A1111 / Forge and kohya."""
        return save_kohya(parts.net, folder, self.kohya_prefix)

    def evaluation_source(self, parts: ModelParts, folder: str | Path) -> dict:
        if parts.has_lora:
            return {"pretrained": str(parts.base["pretrained"]), "lora": str(folder)}
        return super().evaluation_source(parts, folder)


@register
class StableDiffusionXL(StableDiffusion):
    """SDXL (Podell et al. 2023, arXiv:2307.01952): the two encoders' penultimate states concatenated, encoder
    2's pooled projection, and `time_ids` from each image's real crop (`crop_geometry`)."""

    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    pooled_inputs = True
    tiny_overrides = ("experiment=sdxl_lora_tiny", "~latent_cache")
    two_encoders = True

    def build_tiny(self, out_dir: Path, sample_size: int = 32, seed: int = 0) -> Path:
        from diffusion_lab.families.tiny import build_tiny_sdxl

        return build_tiny_sdxl(out_dir, sample_size=sample_size, seed=seed)

    def conditioning(self, prompts: PromptEmbeddings, batch: dict, dtype: torch.dtype, device) -> dict:
        # original (height, width), crop (top, left), target (height, width) of the crop the data made
        time_ids = batch_crop_geometry(batch)[:, :6].to(device, dtype)
        return {
            "encoder_hidden_states": prompts.hidden.to(dtype),
            "added_cond_kwargs": {"text_embeds": prompts.pooled.to(dtype), "time_ids": time_ids},
        }

    def pipeline(self, parts: ModelParts, scheduler=None):
        from diffusers import StableDiffusionXLPipeline

        frozen = parts.frozen
        return StableDiffusionXLPipeline(
            vae=frozen["vae"], text_encoder=frozen.get("text_encoder"), tokenizer=frozen.get("tokenizer"),
            text_encoder_2=frozen.get("text_encoder_2"), tokenizer_2=frozen.get("tokenizer_2"), unet=parts.net,
            scheduler=scheduler or parts.noise_scheduler, add_watermarker=False,
            force_zeros_for_empty_prompt=(parts.base or {}).get("zeros_for_empty_prompt", True),
        )  # fmt: skip
