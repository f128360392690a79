"""Z-Image (`z_image`; Tongyi-MAI 2025): a 6 B single-stream diffusion transformer
(`ZImageTransformer2DModel`: image and caption tokens in one sequence, refiner layers for each, 3-axis rotary
embeddings) trained with rectified flow, conditioned on one text encoder, Qwen3-4B's second-to-last hidden states
of the prompt in Qwen's chat template. The newest family here, and one a 24 GB card LoRA-tunes in bf16.

Two conventions differ from SD3 / Flux and live in `denoiser` alone: the transformer takes lists (one latent and
one caption of its own length per image) and a time that runs the other way (1 - sigma), and it predicts x0 -
noise, the negated velocity. Captions are padded with zero rows to `max_sequence_length` so they batch and cache
like every other family's; the denoiser drops the zero rows again, as the pipeline's attention mask does.
"""

from types import SimpleNamespace

import torch

from diffusion_lab.families.flow_transformer import FlowTransformerFamily
from diffusion_lab.families.prompts import PromptEmbeddings
from diffusion_lab.families.registry import register

ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")


def unpadded(hidden: torch.Tensor) -> list[torch.Tensor]:
    """(N, L, D) padded with zero rows -> N captions of their own lengths."""
    return [rows[rows.abs().amax(dim=-1) > 0] for rows in hidden]


@register
class ZImage(FlowTransformerFamily):
    name = "z_image"
    pipeline_classes = ("ZImagePipeline",)
    transformer_class = "ZImageTransformer2DModel"
    default_max_sequence_length = 512  # ZImagePipeline's
    lora_target_modules = ATTENTION
    tiny_overrides = ("experiment=z_image_lora_tiny", "~latent_cache")
    pooled_inputs = False
    sampling_schedulers = (
        "euler",
    )  # ZImagePipeline passes its own sigmas, which only flow-match Euler takes
    kohya_prefix = (
        "lora_unet"  # as musubi-tuner writes Z-Image LoRAs, which diffusers' ZImage loader converts
    )

    def build_tiny(self, out_dir, sample_size: int = 32, seed: int = 0):
        from diffusion_lab.families.tiny import build_tiny_z_image

        return build_tiny_z_image(out_dir, sample_size=sample_size, seed=seed)

    def encode(self, pipeline, captions, device, max_sequence_length) -> PromptEmbeddings:
        embeddings, _ = pipeline.encode_prompt(
            prompt=list(captions),
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )  # fmt: skip  (a copy: encode_prompt rewrites its list in place)
        padded = embeddings[0].new_zeros(len(embeddings), max_sequence_length, embeddings[0].shape[-1])
        for row, caption in enumerate(embeddings):
            padded[row, : len(caption)] = caption
        return PromptEmbeddings(padded, None)

    def prompt_inputs(self, prompt_encoder):
        if prompt_encoder is None:
            return None

        def inputs(prompts: list[str], negative_prompt: str | None, device) -> dict:
            positive = unpadded(prompt_encoder(prompts, device).hidden)
            negative = unpadded(prompt_encoder([negative_prompt or ""] * len(prompts), device).hidden)
            return {"prompt_embeds": positive, "negative_prompt_embeds": negative}

        return inputs

    def conditioning(self, prompts: PromptEmbeddings, batch: dict, dtype: torch.dtype, device) -> dict:
        return {"cap_feats": prompts.hidden.to(dtype)}

    def denoiser(self, net: torch.nn.Module, training_guidance: float | None = None):
        """Lists in, time as 1 - sigma, velocity = -output: what `ZImagePipeline.__call__` does each step."""

        def denoise(x_t, timesteps, cap_feats):
            time = (1000 - timesteps.float()) / 1000  # in float32, as the pipeline computes it
            outputs = net(list(x_t.unsqueeze(2).unbind(0)), time, unpadded(cap_feats), return_dict=False)[0]
            return SimpleNamespace(sample=-torch.stack(outputs).squeeze(2))

        return denoise
