"""What the rectified-flow transformer families (SD3, Flux, Z-Image) share, on top of the Stable Diffusion
family's checkpoint, LoRA and export logic.

Each is a stock diffusers pipeline: a `transformer/` trained on flow matching, frozen text encoders and a
16-channel VAE, loaded with the pipeline class's own `from_pretrained` (so any layout diffusers reads, reads
here), its prompts encoded by the pipeline's own `encode_prompt` (training sees what inference feeds), its
samples drawn by that pipeline with its own FlowMatchEuler scheduler, and its export the same pipeline folder.
A subclass names its classes and says how the transformer is called (`denoiser`) and how prompts encode.
"""

import abc
from typing import ClassVar

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.families.base import ModelParts
from diffusion_lab.families.prompts import PipelinePromptEncoder, PromptEmbeddings
from diffusion_lab.families.quantization import base_loading
from diffusion_lab.families.sd_parts import decode_in_own_dtype, load_vae
from diffusion_lab.families.stable_diffusion import StableDiffusion
from diffusion_lab.generation.samplers import TextToImageSampler

NOT_FROZEN = ("transformer", "scheduler")


class FlowTransformerFamily(StableDiffusion, abc.ABC):
    """A flow-matching transformer behind a stock pipeline (`pipeline_classes[0]`)."""

    transformer_class: ClassVar[str]  # the diffusers class under `transformer/`
    default_max_sequence_length: ClassVar[int]  # the pipeline's own `max_sequence_length` default
    t5_optional: ClassVar[bool] = (
        False  # SD3 was trained to work without its T5 (arXiv:2403.03206 section 5.3.2)
    )
    denoiser_name = "transformer"
    sampling_schedulers: ClassVar[tuple[str, ...] | None] = None  # names its pipeline samples with; None: any
    kohya_prefix = "lora_transformer"

    def owns_legacy_checkpoint(self, checkpoint: dict) -> bool:
        return False  # every checkpoint of these families names its family

    # ---- text -------------------------------------------------------------------------------------------
    def text_options(self, max_sequence_length: int | None = None, use_t5: bool = True) -> dict:
        """The prompt settings in force (null: the pipeline's default length), checked."""
        if not use_t5 and not self.t5_optional:
            raise ConfigError(
                f"model.use_t5=false: the {self.name} family needs its T5 encoder (only sd3 runs without)"
            )
        length = self.default_max_sequence_length if max_sequence_length is None else int(max_sequence_length)
        if not 1 <= length <= self.default_max_sequence_length:
            raise ConfigError(
                f"model.max_sequence_length={max_sequence_length}: between 1 and {self.default_max_sequence_length} "
                f"(the {self.name} pipeline's limit)"
            )
        return {"max_sequence_length": length, "use_t5": bool(use_t5)}

    @abc.abstractmethod
    def encode(
        self, pipeline, captions: list[str], device: torch.device, max_sequence_length: int
    ) -> PromptEmbeddings:
        """The pipeline's `encode_prompt` for `captions`, as (context, pooled)."""

    def t5_components(self) -> tuple[str, ...]:
        """The pipeline names of the T5 encoder and its tokenizer (dropped with `use_t5=false`)."""
        return ()

    def text_components(self) -> tuple[str, ...]:
        """The pipeline's tokenizers and text encoders, by name."""
        names = self.pipeline_class._get_signature_keys(self.pipeline_class)[0]
        return tuple(name for name in names if name.startswith(("tokenizer", "text_encoder")))

    def load_frozen(
        self,
        pretrained: str,
        revision: str | None = None,
        vae: str | None = None,
        components: str = "all",
        **text,
    ) -> dict:
        """The tokenizers, text encoders (frozen, eval mode) and VAE (or the replacement `vae`), by their pipeline
        names, and `prompts`, the encoder training and the caches call; `components`: all, vae or text."""
        options = self.text_options(**text)
        skipped = {name: None for name in NOT_FROZEN}
        if not options["use_t5"]:
            skipped.update({name: None for name in self.t5_components()})
        if components == "vae":
            skipped.update({name: None for name in self.text_components()})
        if components == "text":
            skipped["vae"] = None
        elif vae:
            skipped["vae"] = load_vae(vae)
        pipeline = self.pipeline_class.from_pretrained(pretrained, revision=revision, **skipped)
        frozen = {
            name: part
            for name, part in pipeline.components.items()
            if part is not None and name not in NOT_FROZEN
        }
        for part in frozen.values():
            if isinstance(part, torch.nn.Module):
                part.requires_grad_(False).eval()
        if "vae" in frozen:
            decode_in_own_dtype(frozen["vae"])
        if components == "vae":
            return frozen
        length = options["max_sequence_length"]
        encoders = [
            frozen[name]
            for name in self.text_components()
            if name.startswith("text_encoder") and name in frozen
        ]
        frozen["prompts"] = PipelinePromptEncoder(
            pipeline, lambda pipe, captions, device: self.encode(pipe, captions, device, length), encoders
        )
        return frozen

    # ---- parts ------------------------------------------------------------------------------------------
    def load_parts(
        self, pretrained: str, revision: str | None = None, vae: str | None = None, components: str = "all",
        quantize: str | None = None, base_dtype: str | None = None, **text,
    ) -> ModelParts:  # fmt: skip
        """The transformer (with `quantize`, stored in nf4 / int8 and computing in bf16, or in `base_dtype`:
        `families.quantization`), its scheduler and the frozen `components`."""
        import diffusers

        source = {"pretrained_model_name_or_path": pretrained, "revision": revision}
        frozen = self.load_frozen(pretrained, revision, vae, components, **text)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(**source, subfolder="scheduler")
        net = getattr(diffusers, self.transformer_class).from_pretrained(
            **source, subfolder="transformer", **base_loading(quantize, base_dtype)
        )
        base = {"pretrained": pretrained, "revision": revision, "scheduler_config": dict(scheduler.config),
                **self.text_options(**text)}  # fmt: skip
        return ModelParts(net, scheduler, frozen, base)

    def parts_from_pipeline(self, pipeline) -> ModelParts:
        frozen = {name: part for name, part in pipeline.components.items() if name not in NOT_FROZEN}
        return ModelParts(
            pipeline.transformer, pipeline.scheduler, {k: v for k, v in frozen.items() if v is not None}
        )

    def prepare_network(self, net: torch.nn.Module, attention: str) -> None:
        """These transformers run their own attention processors (joint text-image attention, rotary
        embeddings), all on torch's SDPA: replacing them would break the model."""
        if attention != "sdpa":
            raise ConfigError(
                f"model.attention={attention}: the {self.name} family runs diffusers' own SDPA processors (sdpa only)"
            )

    def conditioning(self, prompts: PromptEmbeddings, batch: dict, dtype: torch.dtype, device) -> dict:
        """SD3's and Flux's transformer arguments: the context and the pooled vector."""
        return {
            "encoder_hidden_states": prompts.hidden.to(dtype),
            "pooled_projections": prompts.pooled.to(dtype),
        }

    # ---- using them -------------------------------------------------------------------------------------
    def pipeline(self, parts: ModelParts, scheduler=None):
        names = self.pipeline_class._get_signature_keys(self.pipeline_class)[0]
        components = {name: parts.frozen.get(name) for name in names if name not in NOT_FROZEN}
        return self.pipeline_class(
            transformer=parts.net, scheduler=scheduler or self.sampling_scheduler(parts), **components
        )

    def sampling_scheduler(self, parts: ModelParts):
        """The training scheduler itself: the pipelines sample with FlowMatchEuler on its shift (dynamic for
        Flux), as the base model's folder ships."""
        return type(parts.noise_scheduler).from_config(parts.noise_scheduler.config)

    pooled_inputs = True

    def sampler(self, parts: ModelParts, prompt_encoder=None) -> TextToImageSampler:
        length = (parts.base or {}).get("max_sequence_length")
        return TextToImageSampler(self.pipeline(parts), own_scheduler=True, schedulers=self.sampling_schedulers,
                                  call_defaults={"max_sequence_length": length} if length else None,
                                  prompt_inputs=self.prompt_inputs(prompt_encoder))  # fmt: skip

    def sampler_from_pipeline(self, pipeline) -> TextToImageSampler:
        return TextToImageSampler(pipeline, own_scheduler=True, schedulers=self.sampling_schedulers)
