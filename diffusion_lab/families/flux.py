"""Flux.1 (`flux`; Black Forest Labs 2024): a rectified-flow transformer of double- and single-stream blocks
(`FluxTransformer2DModel`), conditioned on T5's states and CLIP-L's pooled output.

The transformer sees the latents packed into 2x2 patches (a sequence of 64-channel tokens), rotary position ids
for image and text tokens, the timestep as sigma, and, for the guidance-distilled dev model, a guidance value:
training feeds a fixed one (`model.training_guidance`, 1.0 as SimpleTuner and ai-toolkit train; diffusers'
script uses 3.5). The shift follows resolution in training as in sampling: mu from the image's token count
(`calculate_shift`, the scheduler's `use_dynamic_shifting`).
"""

from types import SimpleNamespace

import torch

from diffusion_lab.families.flow_transformer import FlowTransformerFamily
from diffusion_lab.families.prompts import PromptEmbeddings
from diffusion_lab.families.registry import register
from diffusion_lab.families.sd3 import JOINT_ATTENTION

# diffusers' train_dreambooth_lora_flux.py default: the joint attention and both feed-forwards
ATTENTION_AND_FEED_FORWARD = (
    *JOINT_ATTENTION,
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FluxPipeline's `_pack_latents`."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of (height, width)."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(H/2 * W/2, 3) rotary position ids of the packed image tokens: FluxPipeline's `_prepare_latent_image_ids`."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@register
class Flux(FlowTransformerFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    transformer_class = "FluxTransformer2DModel"
    default_max_sequence_length = 512  # FluxPipeline's (dev; schnell was trained at 256)
    default_training_guidance = 1.0
    lora_target_modules = ATTENTION_AND_FEED_FORWARD
    tiny_overrides = ("experiment=flux_lora_tiny", "~latent_cache")

    def build_tiny(self, out_dir, sample_size: int = 32, seed: int = 0):
        from diffusion_lab.families.tiny import build_tiny_flux

        return build_tiny_flux(out_dir, sample_size=sample_size, seed=seed)

    def encode(self, pipeline, captions, device, max_sequence_length) -> PromptEmbeddings:
        hidden, pooled, _ = pipeline.encode_prompt(
            prompt=captions, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        return PromptEmbeddings(hidden, pooled)

    def prompt_inputs(self, prompt_encoder):
        """Flux dev is guidance-distilled: a negative prompt is fed only when one is asked for (true CFG)."""
        if prompt_encoder is None:
            return None

        def inputs(prompts: list[str], negative_prompt: str | None, device) -> dict:
            positive = prompt_encoder(prompts, device)
            given = {"prompt_embeds": positive.hidden, "pooled_prompt_embeds": positive.pooled}
            if negative_prompt:
                negative = prompt_encoder([negative_prompt] * len(prompts), device)
                given.update(
                    negative_prompt_embeds=negative.hidden, negative_pooled_prompt_embeds=negative.pooled
                )
            return given

        return inputs

    def denoiser(self, net: torch.nn.Module, training_guidance: float | None = None):
        """Packs x_t, adds the position ids and the guidance, calls the transformer with sigma as its timestep
        (the pipeline divides its timesteps by 1000), and unpacks the velocity."""
        guidance_value = self.default_training_guidance if training_guidance is None else training_guidance

        def denoise(x_t, timesteps, encoder_hidden_states, pooled_projections):
            b, _, h, w = x_t.shape
            guidance = None
            if net.config.guidance_embeds:
                guidance = torch.full((b,), float(guidance_value), device=x_t.device, dtype=torch.float32)
            tokens = net(
                hidden_states=pack_latents(x_t), timestep=timesteps.to(x_t.dtype) / 1000, guidance=guidance,
                pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
                img_ids=image_ids(h, w, x_t.device, x_t.dtype), return_dict=False,
            )[0]  # fmt: skip
            return SimpleNamespace(sample=unpack_latents(tokens, h, w))

        return denoise
