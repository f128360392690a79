"""Stable Diffusion 3 / 3.5 (`sd3`; Esser et al. 2024, arXiv:2403.03206): an MMDiT (`SD3Transformer2DModel`)
trained with rectified flow, conditioned on CLIP-L and CLIP-G (penultimate states and pooled projections) and T5.

The context is the two CLIP states concatenated on features, padded to T5's width and stacked on the tokens
before T5's; the pooled vector is both CLIPs' projections. T5 is optional (`model.use_t5=false`): the model was
trained with each encoder dropped at random (section 5.3.2), and the pipeline feeds zeros in T5's place.
"""

import torch

from diffusion_lab.families.flow_transformer import FlowTransformerFamily
from diffusion_lab.families.prompts import PromptEmbeddings
from diffusion_lab.families.registry import register

# diffusers' train_dreambooth_lora_sd3.py default: every projection of the joint attention, image and text side
JOINT_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")  # fmt: skip


class _ConfigOnly:
    """Stands in for the transformer in a text-only pipeline: without T5, `encode_prompt` reads the context
    width (`joint_attention_dim`) of the zeros it feeds from the transformer's config, and nothing else."""

    def __init__(self, config) -> None:
        self.config = config


@register
class StableDiffusion3(FlowTransformerFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    transformer_class = "SD3Transformer2DModel"
    default_max_sequence_length = 256  # StableDiffusion3Pipeline's
    t5_optional = True
    lora_target_modules = JOINT_ATTENTION
    tiny_overrides = ("experiment=sd3_lora_tiny", "~latent_cache")

    def t5_components(self) -> tuple[str, ...]:
        return ("text_encoder_3", "tokenizer_3")

    def load_frozen(self, pretrained, revision=None, vae=None, components: str = "all", **text) -> dict:
        frozen = super().load_frozen(pretrained, revision, vae, components, **text)
        if "prompts" not in frozen:
            return frozen
        pipeline = frozen["prompts"].pipeline
        if pipeline.text_encoder_3 is None:
            from diffusers import SD3Transformer2DModel
            from diffusers.configuration_utils import FrozenDict

            config = SD3Transformer2DModel.load_config(pretrained, subfolder="transformer", revision=revision)
            pipeline.transformer = _ConfigOnly(FrozenDict(config))
        return frozen

    def load_pipeline(self, name_or_path: str, **kwargs):
        """A folder exported from a run without T5 lists `text_encoder_3` / `tokenizer_3` as null, which diffusers
        loads only when told so: `StableDiffusion3Pipeline.from_pretrained(dir, text_encoder_3=None,
        tokenizer_3=None)`, as here."""
        from diffusers import DiffusionPipeline

        index = dict(DiffusionPipeline.load_config(name_or_path, revision=kwargs.get("revision")))
        for name in self.t5_components():
            if (index.get(name) or [None])[0] is None:
                kwargs[name] = None
        return DiffusionPipeline.from_pretrained(name_or_path, **kwargs)

    def build_tiny(self, out_dir, sample_size: int = 32, seed: int = 0):
        from diffusion_lab.families.tiny import build_tiny_sd3

        return build_tiny_sd3(out_dir, sample_size=sample_size, seed=seed)

    def encode(self, pipeline, captions, device, max_sequence_length) -> PromptEmbeddings:
        hidden, _, pooled, _ = pipeline.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )  # fmt: skip
        return PromptEmbeddings(hidden, pooled)

    def denoiser(self, net: torch.nn.Module, training_guidance: float | None = None):
        """The MMDiT takes the latents and the timestep (sigma * 1000, as the pipeline feeds it) by name."""

        def denoise(x_t, timesteps, **conditioning):
            return net(hidden_states=x_t, timestep=timesteps, **conditioning)

        return denoise
